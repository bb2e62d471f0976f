"""The training process of a grid job: ``distill train`` forked from the job's process, which has imported distill
(torch and timm with it) to unpickle the job, so the training does not import them a second time. The child gets the
environment and the signal dispositions a fresh ``distill train`` process has, its stderr goes through a pipe to the
job's log, and it dies with the job."""
import contextlib
import multiprocessing
import os
import signal
import sys
from typing import IO, Any, Dict, Iterator, Optional, Tuple

import submitit

from ..errors import exit_code


def start_training(command: Dict[str, Any], env: Dict[str, Optional[str]]
                    ) -> Tuple[multiprocessing.process.BaseProcess, IO[str]]:
    """``stages.train(**command)`` in a forked child, its stderr through a pipe; the child and the pipe's reading
    end."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = multiprocessing.get_context('fork').Process(target=_train,
                                                        args=(command, env, os.getpid(), read_end, write_end),
                                                        name='distill train')
    child.start()
    os.close(write_end)
    return child, os.fdopen(read_end, errors='replace')


def _train(command: Dict[str, Any], env: Dict[str, Optional[str]], job_pid: int, read_end: int,
           write_end: int) -> None:
    """The child: stderr into the pipe, the signals and environment a fresh ``distill train`` process would have,
    then the command, which exits as ``distill train`` does (one line and 2 for a user mistake)."""
    os.close(read_end)
    os.dup2(write_end, sys.stderr.fileno())
    os.close(write_end)
    _child_signals(job_pid)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if env.get('OMP_NUM_THREADS'):  # OpenMP read the variable when the job process loaded it
        import torch
        torch.set_num_threads(int(env['OMP_NUM_THREADS']))
    from .stages import train
    sys.exit(exit_code(lambda: train(**command)))


def _child_signals(job_pid: int) -> None:
    """SLURM sends the preemption signal to every process of the job, and the task answers it (the child would die
    of it); submitit's handlers of the job process are not the child's; Ctrl-C (SIGINT) stops the child cleanly, also
    where the job's processes do not take it (``launch.run_local`` blocks it for them, or a background shell); the
    child dies with the job. The signals were blocked across the fork: they reach the child's own handlers, set here."""
    signal.signal(PREEMPTION, signal.SIG_IGN)
    for name in ('SIGTERM', 'SIGCONT'):
        signal.signal(signal.Signals[name], signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
    _die_with_parent(job_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the child is killed when the job process dies, even by SIGKILL (an orphan would go on writing the run
    while a rerun of the grid starts a second trainer on it). Every file of a run is written atomically, so the
    rerun resumes from the last checkpoint."""
    if sys.platform.startswith('linux'):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the job died before the request took effect
            os._exit(1)


PREEMPTION = signal.Signals['SIG' + submitit.JobEnvironment.USR_SIG]  # what SLURM and the local controller send
CHILD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGCONT, PREEMPTION}


@contextlib.contextmanager
def blocked(signals) -> Iterator[None]:
    """``signals`` held back in this thread (delivered when this ends), and blocked in the processes it starts: while a
    child is forked and recorded (the child starts with the job process's Python handlers, and the job's requeue
    handler must find the child it has to stop), and for the local jobs (Ctrl-C left to the training)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
