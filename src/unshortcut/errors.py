"""One exception type for every mistake a user can make.

The CLI turns an :class:`UnshortcutError` into a one-line message and a non-zero
exit; anything else is a bug and keeps its traceback. Library code raises it with
a message that names the file (or option) and the problem.
"""


class UnshortcutError(Exception):
    """A problem with the user's input, reported without a traceback."""
