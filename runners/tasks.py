"""Long encrypted runs as tasks: submit, poll the progress, fetch the result later.

A task is an /infer request answered in three calls instead of one.  ``POST /tasks`` takes the
same body through the same gate checks, queues the checked envelope on the lane packer like
/infer (so it runs on the engine thread, packed with the tenant's other requests of that key) and
answers 202 at once; ``GET /tasks/{task_id}`` reports its state and the steps of the program done
so far (the engine reports each step); ``GET /tasks/{task_id}/result`` answers what /infer would
have: the output envelope, or the same error.  No HTTP request waits for the run, so neither
BentoML's request timeout nor an ingress's read timeout bounds it.

Tasks live in the worker's memory, bound to the tenant that submitted them.  A finished task is
kept for ``task_ttl_s``; at most ``max_tasks`` are kept (the oldest finished one makes room, and
when none has finished a submission gets 429), and a tenant may have ``max_tenant_tasks``
unfinished at once.  An id that expired or was evicted answers 410 for a while after (it
leaves a tombstone), an id this worker never issued 404.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .engines import InferResult
from .http_errors import HTTPError, log_error

TaskState = Literal["queued", "running", "completed", "failed"]
TASK_ID = re.compile(r"[0-9a-f]{32}")


def unknown_task(task_id: str) -> HTTPError:
    return HTTPError(404, "unknown_task", f"no task {task_id!r} on this server (task ids come from POST /tasks; "
                                          "a task lives in the memory of the replica that accepted it)")


@dataclass
class Task:
    """One submitted run: who owns it, how far it got, and its answer once finished."""

    task_id: str
    tenant: str
    key_id: str
    total: int
    done: int = 0
    state: TaskState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    finished: float | None = None  # monotonic, for expiry
    result: InferResult | None = None

    def progress(self, done: int, total: int) -> None:
        """The engine's report (engine thread): ``done`` of ``total`` steps of the program."""
        if self.started_at is None:
            self.started_at = time.time()
            self.state = "running"
        self.done, self.total = done, total

    def public(self, ttl_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "state": self.state, "done": self.done, "total": self.total,
                               "key_id": self.key_id, "created_at": self.created_at, "started_at": self.started_at,
                               "finished_at": self.finished_at}
        if self.finished_at is not None:
            out["expires_at"] = self.finished_at + ttl_s
        if self.result is not None and self.result.error is not None:
            err = self.result.error
            out["error"] = {"status": err.status, "code": err.code, "message": err.message}
        return out


class TaskStore:
    """The worker's tasks, bounded in time (``ttl_s`` after finishing) and count (``max_tasks``)."""

    def __init__(self, ttl_s: float, max_tasks: int, max_tenant_tasks: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_tasks = max_tasks
        self.max_tenant_tasks = max_tenant_tasks
        self._clock = clock
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # task id -> (tenant, why it is gone)

    @property
    def unfinished(self) -> int:
        return sum(t.finished is None for t in self._tasks.values())

    def __len__(self) -> int:
        self._expire()
        return len(self._tasks)

    def create(self, tenant: str, key_id: str, total: int) -> Task:
        """A new queued task of ``tenant``; 429 ``too_many_tasks`` when its or the worker's cap is reached."""
        self._expire()
        mine = sum(t.tenant == tenant and t.finished is None for t in self._tasks.values())
        if mine >= self.max_tenant_tasks:
            raise _too_many(f"this tenant has {mine} unfinished tasks (at most {self.max_tenant_tasks})")
        if len(self._tasks) >= self.max_tasks:
            oldest = next((t for t in sorted(self._tasks.values(), key=lambda t: t.finished or float("inf"))
                           if t.finished is not None), None)
            if oldest is None:
                raise _too_many(f"this server runs {len(self._tasks)} unfinished tasks (at most {self.max_tasks})")
            self._drop(oldest, f"its result was evicted to make room for newer tasks (at most {self.max_tasks} "
                               "are kept)")
        task = Task(secrets.token_hex(16), tenant, key_id, total)
        self._tasks[task.task_id] = task
        return task

    def watch(self, task: Task, pending: asyncio.Future) -> None:
        """Finish ``task`` with the lane packer's answer when it comes (on the event loop)."""

        def done(fut: asyncio.Future) -> None:
            result = (InferResult(error=HTTPError(503, "shutting_down", "the server stopped before the task ran"))
                      if fut.cancelled() else fut.result())
            if result.error is not None:
                log_error(result.error)
            task.result, task.finished_at, task.finished = result, time.time(), self._clock()
            task.state = "failed" if result.error is not None else "completed"

        pending.add_done_callback(done)

    def get(self, task_id: str, tenant: str) -> Task:
        """``tenant``'s task; 404 unknown, 403 another tenant's, 410 expired or evicted."""
        self._expire()
        task = self._tasks.get(task_id) if TASK_ID.fullmatch(task_id) else None
        if task is None:
            gone = self._gone.get(task_id)
            if gone is None:
                raise unknown_task(task_id)
            owner, why = gone
            if owner != tenant:
                raise _foreign(task_id)
            raise HTTPError(410, "task_expired", f"task {task_id} is gone: {why}")
        if task.tenant != tenant:
            raise _foreign(task_id)
        return task

    def _expire(self) -> None:
        now = self._clock()
        for task in [t for t in self._tasks.values() if t.finished is not None and now - t.finished > self.ttl_s]:
            self._drop(task, f"its result was kept for {self.ttl_s:.0f} s after it finished (H33_TASK_TTL_S)")

    def _drop(self, task: Task, why: str) -> None:
        del self._tasks[task.task_id]
        self._gone[task.task_id] = (task.tenant, why)
        while len(self._gone) > 16 * self.max_tasks:
            self._gone.popitem(last=False)


def _too_many(why: str) -> HTTPError:
    return HTTPError(429, "too_many_tasks", f"{why}; fetch or wait for finished ones and retry", {"Retry-After": "5"})


def _foreign(task_id: str) -> HTTPError:
    return HTTPError(403, "forbidden_task", f"task {task_id} belongs to another tenant")


__all__ = ["Task", "TaskStore"]
