"""Ctrl-C that never lands inside a C->Python callback.

llama.cpp calls back into Python (the graph-eval callback, the log callback) from inside
llama_decode/model loading. A KeyboardInterrupt raised there is swallowed by ctypes ("Exception
ignored") and the C call carries on with half its work undone. So while such a call runs, SIGINT
(and SIGTERM) only set a flag, and the interrupt is raised as soon as the call returns.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

_depth = 0
_pending = False


def _handler(signum, frame):
    global _pending
    if _depth > 0:
        _pending = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT/SIGTERM through the deferring handler (CLI entry point only)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred():
    """Run a C call that may call back into Python; a Ctrl-C during it is raised afterwards."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            _pending = False
            raise KeyboardInterrupt
