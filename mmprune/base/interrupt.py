"""SIGINT, SIGTERM and SIGHUP as an exception, so that the `except BaseException` cleanups of the
atomic writers (mmprune/base/output.py) remove their staging folders and files before the process ends.
`run_main` (mmprune/run/cli.py) turns the exception into one `error: interrupted ...` line, exit 130."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)
EXIT_STATUS = 130  # the shell's status for Ctrl-C; used for every interruption

_installed = False
_fired = False
_deferring = False
_pending = 0


class Interrupted(KeyboardInterrupt):
    """The run got SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


def _raise(signum, frame):
    global _fired, _pending
    if _fired:
        return  # already unwinding: a second signal must not cut the cleanup short
    if _deferring:
        _pending = _pending or signum
        return
    _fired = True
    raise Interrupted(signum)


@contextmanager
def signals_raise():
    """Within the block, the three signals raise Interrupted (once; later ones are ignored while
    the cleanup runs). Nested use and threads other than the main one leave handlers as they are."""
    global _installed, _fired
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    _installed, _fired = True, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed, _fired = False, False


@contextmanager
def signals_deferred():
    """Hold the three signals back until the end of the block (then raise Interrupted): for
    renames and removals that must not stop half way. A flag, not the signal mask: the mask is per
    thread, and torch's threads would still take the signal."""
    global _deferring, _pending, _fired
    if not _installed or _deferring:
        yield
        return
    _deferring, _pending = True, 0
    try:
        yield
    finally:
        _deferring = False
        signum, _pending = _pending, 0
    if signum and not _fired:
        _fired = True
        raise Interrupted(signum)
