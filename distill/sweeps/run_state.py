"""A grid run's state from its directory alone: finished, running (its job queued or training), failed, interrupted
(resumable) or new, with its job and, for a failure, how the job ended and the last line it wrote.

A run submitted by ``distill grid`` (``distill.sweeps.launch``) has two job records beside its files::

    job.json         written at submission: executor, job id, host, submitit's log folder
    job_state.json   written by the job's first task: running, requeued, or ended (exit code, last stderr line)

A job that ended without a word (killed, its node failed) is told from a running one by its controller process (a
local job of this host; one of another host counts as running) or by one sacct call for all such SLURM jobs (none
where sacct is missing: such a job counts as running).
"""
import functools
import json
import os
import shutil
import signal
import socket
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..errors import DistillError
from ..runs.directory import FINISHED, RunDir

SUBMITTED, STATE = 'job.json', 'job_state.json'
RUNNING, FAILED = 'running', 'failed'


class RunStatus(NamedTuple):
    state: str  # finished, running (queued or training), failed, interrupted (resumable) or new (never started)
    epochs: int  # epochs done
    executor: str  # of its last submission ('' when none): local or slurm
    job_id: str
    note: str  # a failure: how the job ended and the last line it wrote

    @property
    def job(self) -> str:
        return f"{self.executor} {self.job_id}".strip()


def statuses(runs: List[Tuple[RunDir, int]]) -> List[RunStatus]:
    """The status of each ``(run directory, epochs it trains)``, from the run directories alone (and, for SLURM jobs
    that never reported their end, one sacct call)."""
    submitted = [_read_json(os.path.join(run_dir.path, SUBMITTED)) for run_dir, _ in runs]
    reported = [_read_json(os.path.join(run_dir.path, STATE)) for run_dir, _ in runs]
    # only what the job of the last submission reported counts
    reported = [r if s and r and r.get('job_id') == s['job_id'] else None for s, r in zip(submitted, reported)]
    in_flight = [s for s, r in zip(submitted, reported) if s and (r is None or r['state'] != 'ended')]
    vanished = _vanished(in_flight)
    return [_status(run_dir, epochs, s, r, vanished) for (run_dir, epochs), s, r in zip(runs, submitted, reported)]


def _status(run_dir: RunDir, epochs: int, submitted: Optional[Dict[str, Any]], reported: Optional[Dict[str, Any]],
            vanished: Dict[str, str]) -> RunStatus:
    state = run_dir.state(epochs)
    job = (submitted['executor'], submitted['job_id']) if submitted else ('', '')
    status = functools.partial(RunStatus, epochs=epochs_done(run_dir), executor=job[0], job_id=job[1])
    if state == FINISHED or submitted is None:
        return status(state, note='')
    if reported is None or reported['state'] != 'ended':  # queued, training, or requeued
        how = vanished.get(submitted['job_id'])
        if how is None:
            return status(RUNNING, note='')
        return status(FAILED, note=_joined(f"the job ended without reporting ({how})", _last_words(run_dir, submitted)))
    if reported['returncode'] in (0, 130):  # ended, or stopped by Ctrl-C: resumable
        return status(state, note='')
    return status(FAILED, note=_joined(describe_exit(reported['returncode']),
                                       reported.get('reason') or _last_words(run_dir, submitted)))


def _last_words(run_dir: RunDir, submitted: Dict[str, Any]) -> str:
    """The run's last log line, else (it never started: e.g. the job's setup failed) its job's last stderr line."""
    return last_line(run_dir.log) or last_line(submitted['stderr'])


def _joined(how: str, line: str) -> str:
    return f"{how}: {line}" if line else how


def _vanished(records: List[Dict[str, Any]]) -> Dict[str, str]:
    """``{job id: how it ended}`` of the jobs among ``records`` that ended without reporting (killed, a failed
    node): a local job of this host whose controller process is gone, a SLURM job sacct reports ended."""
    out = {r['job_id']: 'killed' for r in records if r['executor'] == 'local' and r['host'] == socket.gethostname()
           and not _alive(int(r['job_id']))}
    slurm = [r for r in records if r['executor'] == 'slurm']
    if slurm and shutil.which('sacct'):  # elsewhere (no sacct) a recorded SLURM job counts as running
        import submitit
        jobs = [submitit.SlurmJob(folder=r['folder'], job_id=r['job_id']) for r in slurm]  # one sacct call for all
        out.update({job.job_id: f"SLURM state {job.state}" for job in jobs if job.done()})
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # written atomically: only a hand edit breaks it
        raise DistillError(f"cannot read the job record {path}: not JSON; delete it (distill grid then resubmits "
                           f"the run unless it finished)") from None


def epochs_done(run_dir: RunDir) -> int:
    """Epochs on record: one line each in metrics.jsonl (rewritten to the checkpoint's history on resume)."""
    try:
        with open(run_dir.metrics) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def last_line(path: str) -> str:
    """The last non-empty line of a text file ('' when there is none)."""
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [line.strip() for line in f.read().decode(errors='replace').splitlines() if line.strip()]
    except FileNotFoundError:
        return ''
    return lines[-1] if lines else ''


def describe_exit(code: Optional[int]) -> str:
    if code is None:  # the job itself stopped (e.g. requeued too many times)
        return 'stopped'
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
