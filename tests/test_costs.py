"""Measured primitive costs: sampled to resist a busy machine, cached per machine and parameter set."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

from h33_bento import compile
from h33_bento.ckks import timing
from h33_bento.ckks.params import select_params


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cost cache of this test's own."""
    monkeypatch.setenv("H33_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).eval()


def _entries(cache) -> list:
    return sorted((cache / "costs").glob("*.json"))


def test_the_fastest_sample_within_the_budget():
    calls = []

    def op(i: int) -> None:  # every other call is slowed down, as by another process on the core
        calls.append(i)
        time.sleep(0.03 if i % 2 else 0.005)

    ms = timing._fastest_ms(op, budget_s=0.0, batch=1, least=2, most=9)
    assert len(calls) == 3  # out of budget: the warm-up and the two samples every primitive gets
    assert 5 <= ms < 20  # the unslowed call, not the median or mean of the three
    calls.clear()
    timing._fastest_ms(op, budget_s=10.0, batch=1, least=2, most=4)
    assert len(calls) == 5  # within budget: the warm-up and `most` samples


def test_second_compile_reads_the_cache_and_remeasure_replaces_it(cache, small):
    first = compile(small, (16,))
    assert first.summary()["costs"] == "measured" and len(_entries(cache)) == 1
    second = compile(small, (16,))
    assert second.summary()["costs"] == "cached" and second.costs.ms == first.costs.ms  # nothing measured
    assert "from this machine's cost cache" in second.report and first.costs.measured_at in second.report
    again = compile(small, (16,), remeasure_costs=True)
    assert again.summary()["costs"] == "measured" and again.costs.ms != first.costs.ms  # timings never repeat
    assert compile(small, (16,)).costs.ms == again.costs.ms  # the new measurement replaced the entry


def test_unreadable_or_foreign_cache_entries_are_measured_again_with_a_warning(cache, small):
    compile(small, (16,))
    (entry,) = _entries(cache)
    good = json.loads(entry.read_text())
    for bad in ("{not json", json.dumps([1, 2]), json.dumps({**good, "params": "other"}),
                json.dumps({**good, "ms": {"levels": [0]}})):
        entry.write_text(bad)
        with pytest.warns(RuntimeWarning, match="cost cache entry"):
            compiled = compile(small, (16,))
        assert compiled.summary()["costs"] == "measured" and compiled.costs.params == good["params"]
        assert json.loads(entry.read_text())["params"] == good["params"]  # rewritten whole


def test_an_unwritable_cache_does_not_stop_a_compile(tmp_path, monkeypatch, small):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("H33_CACHE_DIR", str(tmp_path / "file"))  # a file where the directory would be
    with pytest.warns(RuntimeWarning, match="could not write"):
        assert compile(small, (16,)).summary()["costs"] == "measured"


def test_cache_is_keyed_by_machine_and_parameters(cache, monkeypatch):
    params = select_params(2, 16)
    path = timing.cache_path("costs", params.cost_key)
    assert path.parent == cache / "costs"
    assert timing.cache_path("costs", select_params(3, 16).cost_key) != path
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # another thread count times differently
    assert timing.cache_path("costs", params.cost_key) != path
    monkeypatch.setenv("H33_CACHE_DIR", "")
    assert timing.cache_path("costs", params.cost_key) is None


def test_series_degrees_a_cached_table_lacks_are_measured_and_added(cache):
    params = select_params(3, 16)
    base = timing.cached_primitives(params)
    more = timing.cached_primitives(params, (3,))
    assert more.origin == "cached" and "chebyshev_3" in more.ms
    assert {k: v for k, v in more.ms.items() if k != "chebyshev_3"} == dict(base.ms)
    assert timing.cached_primitives(params, (3,)).ms == more.ms  # stored with the new degree


def test_a_table_measured_on_a_busy_machine_says_so(small):
    compiled = compile(small, (16,), measure_costs=False)
    cores = os.cpu_count() or 1
    quiet = compiled.with_costs(timing.PrimitiveCosts("p", load=cores - 0.5))
    busy = compiled.with_costs(timing.PrimitiveCosts("p", load=cores + 2.0))
    assert not quiet.costs.busy and busy.costs.busy
    assert "busy" not in quiet.report and f"busy (load average {cores + 2.0:g})" in busy.report


def test_no_primitive_costs_more_at_a_deeper_level():
    """Fewer towers never take longer: a load spike while one level is timed is bounded by the level before."""
    costs = timing.measure_primitives(select_params(4, 16), budget_s=2.0)
    for name in timing.PER_LEVEL:
        assert all(a >= b for a, b in zip(costs.ms[name], costs.ms[name][1:])), (name, costs.ms[name])
