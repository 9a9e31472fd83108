"""Errors that mean "the user asked for something that cannot be done", shown as one line by the CLI.

Kept apart from Python's own ValueError so a real bug still shows its traceback.
"""


class UsageError(ValueError):
    """An option or setting that cannot be used as given; the message says what to use instead."""
