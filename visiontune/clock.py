"""Wall-clock accounting: a `--budget` counts from the moment the command started, and the run's ETA
adds what is predicted for the work after the current training phase."""

from __future__ import annotations

import os
import time

_IMPORTED_AT = time.perf_counter()


def seconds_since_process_start() -> float:
    """Seconds since this process started (Linux /proc), else since visiontune was imported.

    Interpreter start-up and `import torch` take seconds on a small CPU; a budget that ignored them
    would overrun by that much.
    """
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_after_phase_s = 0.0


def expect_after_phase(seconds: float) -> None:
    """Record the predicted seconds of work after the current training phase (for the run's ETA)."""
    global _after_phase_s
    _after_phase_s = max(0.0, float(seconds))


def expected_after_phase() -> float:
    return _after_phase_s
