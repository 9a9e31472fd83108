"""A signal that asks a run to stop — SIGTERM from Kubernetes, SLURM, a spot VM's end, `docker stop`, or Ctrl-C
— stops it politely: the training step under way finishes, a checkpoint is written at that step, the
command prints how to continue, and the process exits 128 + the signal (143 for SIGTERM, 130 for Ctrl-C).

Why a flag inside the training loop and an exception outside it: the loop can only save an exact-resume
checkpoint between two steps, so there a signal only raises the flag (`requested`) and the loop stops at
the next step's end (`train/loop.py`); anywhere else (listing, caching, evaluating: work whose results are
written whole, so stopping at once loses nothing) it interrupts at once, as Ctrl-C always did. A second
signal while the first waits for its step interrupts at once too. In a torchrun job every process gets the
signal from torchrun; the ranks agree on the step to stop at (`agreed`), so none waits for another forever.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from collections.abc import Iterator

#: The signals that mean "stop, please".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopAsked(KeyboardInterrupt):
    """A polite stop: raised where the run can stop (after a step, with its checkpoint written)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


_state = {"requested": None, "between_steps": 0, "installed": False}


def _handle(signum: int, frame) -> None:
    if _state["between_steps"] and _state["requested"] is None:
        _state["requested"] = signum  # the loop stops after this step, with a checkpoint
        return
    raise StopAsked(signum)


def install() -> None:
    """Take SIGTERM and SIGINT for this process (the main thread of a command that trains)."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:  # e.g. SIGINT in a job started in the background
            continue
        signal.signal(signum, _handle)
    _state["installed"] = True


@contextmanager
def steps() -> Iterator[None]:
    """The training loop's steps: a stop signal inside waits for the step under way to end."""
    _state["between_steps"] += 1
    try:
        yield
    finally:
        _state["between_steps"] -= 1


def reset() -> None:
    """Forget a stop that was asked for and the handlers' installation (a caller that runs several commands in
    one process, e.g. the test suite, restores the signal handlers itself)."""
    _state.update(requested=None, installed=False)


def requested() -> int | None:
    """The signal that asked for a stop, once one did."""
    return _state["requested"]


def agreed(shared: bool) -> int | None:
    """The stop signal every process of the job acts on at this step (any rank's), or None."""
    if not shared:
        return requested()
    from visiontune import distributed

    (ranks_asking,) = distributed.total(1.0 if requested() else 0.0)
    return (requested() or signal.SIGTERM) if ranks_asking else None
