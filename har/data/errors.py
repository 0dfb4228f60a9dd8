"""The one error type for problems with the user's data, so callers can report them without a traceback."""


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file and the fix."""
