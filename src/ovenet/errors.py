"""User-facing errors.

Anything a user can cause (a bad file, a bad key, a bad value) raises an :class:`OvenetError` with a one-line
message naming the culprit and the fix. The CLI prints that line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class OvenetError(Exception):
    """An error caused by user input; its message is shown as-is, without a traceback."""


class DataError(OvenetError):
    """A dataset file or layout is missing, corrupt or inconsistent."""


class ConfigError(OvenetError):
    """A config key or value is unknown, mistyped or out of range."""


class CheckpointError(OvenetError):
    """A checkpoint cannot be read or does not fit the model."""
