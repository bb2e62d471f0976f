"""Ctrl-C while the ``distill`` command is still importing torch and timm (seconds, before anything is written):
one line and exit code 130 instead of a traceback from inside the import machinery. Only for the command itself
(``distill ...`` or ``python -m distill ...``); a Python session importing the package keeps Python's handler."""
import os
import signal
import sys
import threading


def _started_as_command() -> bool:
    # `python -m distill`: argv[0] is '-m' while the package is located and imported
    first = sys.argv[0] if sys.argv else ''
    return first == '-m' or os.path.basename(first) == 'distill'


def _interrupted(signum, frame) -> None:
    sys.stderr.write("distill: interrupted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


# only where Ctrl-C would raise KeyboardInterrupt (not where the parent made the process ignore it, e.g. `nohup`)
GUARDED = (_started_as_command() and threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if GUARDED:
    signal.signal(signal.SIGINT, _interrupted)


def done() -> None:
    """The package is imported: Ctrl-C raises KeyboardInterrupt again (the command reports it in one line)."""
    if GUARDED:
        signal.signal(signal.SIGINT, signal.default_int_handler)
