"""Prometheus metrics of the service, served at ``/metrics`` by the mounted routes.

BentoML's own HTTP metrics are switched off (``service.py``): they label every series with the
raw request path, so each ``/keys/<id>`` or unknown path a client sends -- authenticated or
not -- became new series for good.  The gate records every request here instead, labelled by
its route template (:func:`h33_bento.runners.http.route_template`), so the set of series is
fixed by the code, whatever clients send.  Every series has a ``model`` label: the name of the
served model it is about (``SINGLE_MODEL_NAME``, "default", in a one-model service), empty for
requests that address none (``/health``, ``/metrics``, ``/models``, unknown paths and names).

``prometheus_client`` is imported only when the metrics are created (in the service constructor):
BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker after importing the service module, and
a client imported before that would not write to the shared multiprocess files.
"""
from __future__ import annotations

import os
from typing import Any

LANE_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
COUNT_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Metrics:
    """The service's own metrics (prefix ``h33_``); :meth:`for_model` gives a view labelled by one model."""

    def __init__(self, model: str = "") -> None:
        import prometheus_client as pc

        self.model = model
        self.engine_runs = pc.Counter("h33_engine_runs_total", "Encrypted program executions", ["model"])
        self.engine_seconds = pc.Histogram("h33_engine_seconds", "Engine time per run (lane packing + program)",
                                           ["model"], buckets=SECONDS_BUCKETS)
        self.batch_size = pc.Histogram("h33_engine_batch_requests", "Requests served by one engine run",
                                       ["model"], buckets=COUNT_BUCKETS)
        self.lane_fill = pc.Histogram("h33_lane_fill_ratio", "Occupied lanes / lanes per engine run",
                                      ["model"], buckets=LANE_BUCKETS)
        self.queue_seconds = pc.Histogram("h33_queue_seconds", "Time a request waited for its engine run",
                                          ["model"], buckets=SECONDS_BUCKETS)
        self.requests = pc.Counter("h33_requests_total", "HTTP answers by model, route template, method and status",
                                   ["model", "endpoint", "method", "status"])
        self.request_seconds = pc.Histogram("h33_request_seconds", "HTTP request duration by model and route "
                                            "template", ["model", "endpoint"], buckets=SECONDS_BUCKETS)
        self.key_installs = pc.Counter("h33_key_installs_total", "Evaluation-key bundles installed into an engine",
                                       ["model"])
        self.key_recycles = pc.Counter("h33_key_recycles_total", "Flushes of the worker's OpenFHE key state at the "
                                       "installed-keys cap", ["model"])
        self.installed_keys = pc.Gauge("h33_installed_keys", "Distinct keys in OpenFHE's maps since the last flush",
                                       ["model"], multiprocess_mode="livesum")
        self.rss_bytes = pc.Gauge("h33_worker_rss_bytes", "Worker resident memory, after the last key install or "
                                  "flush", ["model"], multiprocess_mode="livesum")

    def observe_run(self, requests: int, lanes_used: int, lanes: int, seconds: float) -> None:
        m = self.model
        self.engine_runs.labels(m).inc()
        self.engine_seconds.labels(m).observe(seconds)
        self.batch_size.labels(m).observe(requests)
        self.lane_fill.labels(m).observe(lanes_used / lanes)

    def for_model(self, model: str) -> "Metrics":
        """The same collectors, labelled ``model`` (what each served model's runner and packer record to)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.model = model
        return view

    def http(self, model: str, endpoint: str, method: str, status: int, seconds: float) -> None:
        """One answered request (``status`` 0: none was sent, the client left or the request timed out)."""
        self.requests.labels(model, endpoint, method, str(status)).inc()
        self.request_seconds.labels(model, endpoint).observe(seconds)


class NullMetrics(Metrics):
    """Used when prometheus_client is unavailable: every call is a no-op."""

    def __init__(self, model: str = "") -> None:  # noqa: D401 - no super().__init__
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return _Null()

    def observe_run(self, *args: Any, **kwargs: Any) -> None:
        pass

    def http(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Null:
    def labels(self, *args: Any, **kwargs: Any) -> "_Null":
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


_instance: Metrics | None = None


def create() -> Metrics:
    """The process-wide metrics (prometheus collectors can be registered only once per process)."""
    global _instance
    if _instance is None:
        try:
            _instance = Metrics()
        except ImportError:
            _instance = NullMetrics()
    return _instance


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every worker's metrics (multiprocess mode under BentoML) and its media type."""
    import prometheus_client as pc
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = pc.CollectorRegistry()
        MultiProcessCollector(registry)
        return pc.generate_latest(registry), pc.CONTENT_TYPE_LATEST
    return pc.generate_latest(), pc.CONTENT_TYPE_LATEST
