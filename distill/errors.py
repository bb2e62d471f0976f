"""The one exception type for user mistakes: the CLI prints it as a single line and exits with code 2."""
import sys
from typing import Callable


class DistillError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint, ...).

    The message names the problem and the fix on one line; no traceback is shown for it.
    """


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), cut at ``limit`` characters: what a
    one-line error quotes of the library error behind it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def nearest(name: str, choices, prefix: str = '') -> str:
    """' (did you mean PREFIX+X?)' for the closest X of ``choices``, or '' when none is close."""
    import difflib
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ''


def exit_code(command: Callable[[], None]) -> int:
    """Run a ``distill`` command: 0, or a DistillError as one line on stderr and 2, or Ctrl-C as one line and 130."""
    try:
        command()
    except DistillError as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0
