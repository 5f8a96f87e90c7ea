"""Child processes that do not outlive their parent: a Popen ``preexec_fn`` (Linux PR_SET_PDEATHSIG) and the one
long-lived thread every such child must be started from.

Here, below the services, so that every process that starts children (``tandem serve``'s cluster, ``tandem router
--processes N``) uses the same mechanism without importing the command line.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` that makes the child receive `sig` when its parent dies (Linux prctl
    PR_SET_PDEATHSIG; it survives exec, so it covers redis-server too); None where there is no prctl.

    Why this and not a parent-pid watchdog in each child: it needs no cooperation from the child, cannot be
    missed by a busy or hung child, and costs nothing while the parent lives. Its catch: the signal comes when
    the *thread* that forked the child ends, so every child must be started from one long-lived thread
    (the main thread, or ``SpawnThread``). SIGKILL because nobody is left to wait for a graceful drain, and a
    hung child must not keep the port.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child runs as little as possible
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    args = [ctypes.c_ulong(v) for v in (sig, 0, 0, 0)]

    def set_parent_death_signal() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), *args)
        if os.getppid() != parent:  # the parent died before prctl: its signal will never come
            os.kill(os.getpid(), sig)

    return set_parent_death_signal


class SpawnThread:
    """Runs calls (process starts) on one daemon thread that lives as long as the process: PR_SET_PDEATHSIG
    fires when the forking *thread* ends, and the autoscaler starts workers from short-lived threads."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Callable[[], Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="tandem-spawn", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the spawn thread; its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        self._calls.put((done, fn))
        return done.result()

    def _serve(self) -> None:
        while True:
            done, fn = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                done.set_exception(exc)
