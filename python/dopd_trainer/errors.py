"""The trainer's one exception type."""


class UsageError(ValueError):
    """A bad option or input file; the message names the option. `dopd-train` reports it as a usage
    error, while any other exception keeps its traceback."""
