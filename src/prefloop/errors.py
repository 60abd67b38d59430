"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class PrefloopError(Exception):
    """A user-facing problem: the message names the file, line or field, and the fix."""
