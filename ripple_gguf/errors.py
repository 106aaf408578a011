"""The one exception type users see: the CLI prints it as a single `error: ...` line."""


class RippleError(Exception):
    """Bad input or environment; the message names the problem and the fix."""


class NotEnoughMemory(RippleError):
    """Not even what the process cannot give back fits the memory available; `split` is how it was
    counted (memory_budget.default_cache_budget's dict)."""

    def __init__(self, message: str, split: dict):
        super().__init__(message)
        self.split = split
