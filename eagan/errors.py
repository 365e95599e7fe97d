"""The one exception type for mistakes a user can fix (a bad config, a missing file)."""


class UserError(Exception):
    """A problem with what the user gave us.

    The message is a single line naming the file, key or path and what was expected; the CLI
    prints it without a traceback and exits with code 2.
    """
