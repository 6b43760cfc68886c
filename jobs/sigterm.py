"""SIGTERM, the way Kubernetes stops a pod (preemption, eviction, `kubectl delete`): every job exits 143.

`install()` runs first thing in every job. From then on a SIGTERM ends the job at once, by raising
SystemExit(143) in the main thread: every output is written whole or not at all (jobs/atomic.py), so
nothing is lost, and `finally` blocks still run (the inference writer finishes its queued batch).
Python as a container's PID 1 would otherwise ignore the signal, and elsewhere die without cleanup.

Inside `deferred()` (the training loop) the signal only sets a flag, which the loop reads at a step
boundary to save a checkpoint before it exits. Under a multi-process launcher, torch's elastic
agent takes the launcher's SIGTERM and forwards it to every worker (jobs/launch.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from jobs.errors import PREEMPTED_EXIT_CODE

_deferring = False
_received = False


def _handle(signum: int, frame: object) -> None:
    global _received
    _received = True
    if not _deferring:
        raise SystemExit(PREEMPTED_EXIT_CODE)


def install() -> None:
    global _received
    _received = False
    signal.signal(signal.SIGTERM, _handle)


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block a SIGTERM waits for `received()` to be read; one that came before still counts."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


def received() -> bool:
    return _received
