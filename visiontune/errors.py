"""Errors that mean "the user asked for something that cannot be done", shown as one line by the CLI.

Kept apart from Python's own ValueError so a real bug still shows its traceback. All of them live here,
in a module that imports nothing heavy, so the CLI can catch them without loading torch (`--help` stays fast).
"""

from __future__ import annotations

import os


class UsageError(ValueError):
    """An option or setting that cannot be used as given; the message says what to use instead."""


class WeightsError(Exception):
    """Weights that cannot be found or do not fit the architecture; the message says what to do."""


class RunExistsError(Exception):
    """The chosen run folder already holds a run."""


class ImageError(Exception):
    """An image that cannot be used, with the file and a reason a user can act on."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DataError(Exception):
    """Data that cannot be used as given; the message says what to do."""


class WriteError(Exception):
    """A file that cannot be written (no room on the disk, a read-only or unwritable folder); the message
    names the file and what to do. Nothing is left half-written (visiontune/files.py)."""


class ArtifactError(Exception):
    """A classifier directory that cannot be loaded; the message says why."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: the run folder keeps its checkpoint, and this says how to continue it.
    `signum` is the signal that stopped it (the command exits 128 + signum, as a shell expects)."""

    def __init__(self, run: str | os.PathLike, signum: int = 2):
        self.run, self.signum = str(run), int(signum)
        super().__init__(f"interrupted; continue with: visiontune train --resume {self.run}")
