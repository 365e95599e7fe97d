"""The one exception type for mistakes a user can fix (a bad config, a missing file)."""


class UserError(Exception):
    """A problem with what the user gave us.

    The message is a single line naming the file, key or path and what was expected; the CLI
    prints it without a traceback and exits with code 2.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message for a one-line report, or its type's name when
    it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
