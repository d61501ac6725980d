"""A worker process never outlives the ``bentoml serve`` process that started it.

``bentoml serve`` supervises its workers (circus, in the serving process).  Killed with SIGKILL,
it cannot stop them: an orphaned worker keeps the listening socket and keeps answering
``/readyz`` with 200, so a restarted server cannot bind its port and a load balancer keeps
sending traffic to a process nobody supervises.  Each worker therefore

* asks the kernel for SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and
* watches its parent pid from a thread (any POSIX system, and a backstop): once the parent is
  gone it sends itself SIGTERM (uvicorn's graceful shutdown: stop accepting, finish or fail the
  requests in flight, run the shutdown hooks) and exits outright ``grace_s`` seconds later.

Nothing is lost that a crash would not lose anyway: the key store's writes are atomic.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger("h33_bento.runners")

PR_SET_PDEATHSIG = 1


def exit_with_parent(grace_s: float = 10.0, poll_s: float = 0.5) -> None:
    """Make this process stop when its parent process dies (see the module docstring)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the parent watch",
                           ctypes.get_errno())
    threading.Thread(target=_watch_parent, args=(parent, grace_s, poll_s), name="h33-parent-watch",
                     daemon=True).start()


def _watch_parent(parent: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    logger.error("the serving process (pid %d) is gone: this worker (pid %d) stops", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    logger.error("graceful shutdown took longer than %.0f s: exiting now", grace_s)
    os._exit(1)
