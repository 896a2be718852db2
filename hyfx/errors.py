"""The one exception type hyfx raises for bad input: its message is a single line saying what to do."""


class HyfxError(Exception):
    """A user-facing error; the CLI prints its message alone, without a traceback."""
