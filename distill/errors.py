"""The one exception type for user mistakes: the CLI prints it as a single line and exits with code 2."""


class DistillError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint, ...).

    The message names the problem and the fix on one line; no traceback is shown for it.
    """
