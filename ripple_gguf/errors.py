"""The one exception type users see: the CLI prints it as a single `error: ...` line."""


class RippleError(Exception):
    """Bad input or environment; the message names the problem and the fix."""
