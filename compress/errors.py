"""The one exception type for bad user input.

The CLI turns a ``CompressError`` into a single line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""


class CompressError(ValueError):
    """Bad input from the user: a path, a plan entry, a number out of range. The message names it."""
