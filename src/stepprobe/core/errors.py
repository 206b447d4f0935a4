"""One exception type for bad input: the message names the file, key or value and what was expected."""


class StepprobeError(Exception):
    """Bad input or an inconsistent state; the CLI prints it and exits non-zero."""
