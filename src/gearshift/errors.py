"""One exception type for everything a user can get wrong.

The CLI prints a GearshiftError as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class GearshiftError(Exception):
    """A problem with the user's input or environment, explained in one line."""
