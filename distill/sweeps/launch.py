"""Grid runs as submitit jobs (``submitit.AutoExecutor``): ``local`` runs them on this machine (submitit's
LocalExecutor, at most ``--parallel`` at once) and waits for them; ``slurm`` submits them to a SLURM cluster as sbatch
job arrays and returns.

A job runs ``distill train`` in a child process forked from the job's (``child``: the job has imported distill,
torch and timm to unpickle itself, and a fresh interpreter would import them again, seconds per job). Each task of a
multi-GPU job runs one rank, with the env torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) taken from
SLURM's, so training takes the path it takes under torchrun. It resumes from the run's ``checkpoints/last.pt``
whenever one exists. Near the wall-clock limit, or on preemption, SLURM (or the local controller) signals the job;
submitit calls ``TrainJob.checkpoint``, which stops training (its last finished epoch is on disk) and requeues the
same job, which then resumes.

Each job's records in its run directory (``distill.sweeps.run_state`` reads them): ``job.json``, written here at
submission, and ``job_state.json``, written by the job's first task.
"""
import contextlib
import io
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from ..errors import DistillError, first_line, nearest
from ..files import atomic_write_json
from ..runs.directory import RunDir
from .child import CHILD_SIGNALS, blocked, start_training
from .run_state import STATE, SUBMITTED, describe_exit

EXECUTORS = ('local', 'slurm')
# submitit's shared parameters each executor honours; a slurm section also takes partition and slurm_<option>, any
# sbatch option submitit knows (slurm_account, slurm_qos, slurm_constraint, slurm_setup, slurm_array_parallelism...)
SHARED = {'local': ('timeout_min', 'gpus_per_node', 'tasks_per_node'),
          'slurm': ('timeout_min', 'gpus_per_node', 'tasks_per_node', 'nodes', 'cpus_per_task', 'mem_gb')}
REQUIRED = {'local': {}, 'slurm': {
    'partition': "the partition to submit to (`sinfo -s` lists them)",
    'timeout_min': "each job's wall-clock limit in minutes (a run that reaches it is requeued and resumes)"}}
WHOLE_NUMBERS = ('timeout_min', 'gpus_per_node', 'tasks_per_node', 'nodes', 'cpus_per_task', 'max_num_timeout')
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # a local run has no wall-clock limit unless the grid's local: section sets one
POLL_S = 0.5
MAX_ARRAY = 1000  # tasks per sbatch array: SLURM's default MaxArraySize is 1001


class ExecutorSpec(NamedTuple):
    name: str
    options: Dict[str, Any]  # the grid's section of that name
    source: str  # the grid file, for messages


def executor_spec(grid_path: str, grid: Dict[str, Any], name: Optional[str]) -> ExecutorSpec:
    """The executor ``--executor`` (else the grid's ``executor:``, else local) names, its grid section checked."""
    name = name or grid.get('executor') or 'local'
    if name not in EXECUTORS:
        raise DistillError(f"unknown executor {name!r}{nearest(name, EXECUTORS)}: choose local (this machine) or "
                           f"slurm (sbatch job arrays)")
    for section in EXECUTORS:
        _check_section(grid_path, section, grid.get(section))
    options = dict(grid.get(name) or {})
    for key, meaning in REQUIRED[name].items():
        if options.get(key) is None:
            raise DistillError(f"{grid_path}: --executor {name} needs {name}.{key}, {meaning}; add it to the grid's "
                               f"{name}: section")
    return ExecutorSpec(name, options, grid_path)


def _check_section(grid_path: str, name: str, section: Any) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise DistillError(f"{grid_path}: '{name}:' must be a mapping of options, got {type(section).__name__}")
    known = SHARED[name] + ('max_num_timeout',) + (('partition',) if name == 'slurm' else ())
    for key, value in section.items():
        if key not in known and not (name == 'slurm' and key.startswith('slurm_')):
            extra = ' and slurm_<sbatch option>' if name == 'slurm' else ''
            raise DistillError(f"{grid_path}: unknown {name} option {key!r}{nearest(key, known)}; {name}: takes "
                               f"{', '.join(known)}{extra}")
        if key in WHOLE_NUMBERS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DistillError(f"{grid_path}: {name}.{key} must be a whole number >= 1, got {value!r}")


def make_executor(spec: ExecutorSpec, folder: str, job_name: str, dependency: Optional[str] = None):
    """A submitit executor for ``spec`` writing its scripts and logs under ``folder`` (its options checked by
    submitit here, before anything is submitted)."""
    options = dict(spec.options)
    requeues = options.pop('max_num_timeout', 3)  # times a job that reached its wall-clock limit is requeued
    try:
        executor = submitit.AutoExecutor(folder, cluster=spec.name, **{f'{spec.name}_max_num_timeout': requeues})
    except RuntimeError:  # submitit's SlurmExecutor looks for srun
        raise DistillError("--executor slurm submits with sbatch and srun, which this machine does not have: run "
                           "distill grid on the cluster's login node") from None
    params: Dict[str, Any] = {'name': job_name}
    if spec.name == 'local':
        params['timeout_min'] = LOCAL_TIMEOUT_MIN
    else:  # one task per GPU, as torchrun --nproc_per_node starts one process per GPU
        params['gpus_per_node'] = options.get('gpus_per_node', 1)
        params['tasks_per_node'] = params['gpus_per_node']
        if dependency:
            params['slurm_dependency'] = dependency
    for key, value in options.items():
        params[key if key in SHARED[spec.name] or key.startswith('slurm_') else f'slurm_{key}'] = value
    try:
        executor.update_parameters(**params)
    except (AssertionError, NameError, TypeError, ValueError) as exc:
        raise DistillError(f"{spec.source}: {spec.name} options: {first_line(exc, 300)}; fix the grid's "
                           f"{spec.name}: section") from None
    return executor


class TrainJob(submitit.helpers.Checkpointable):
    """One run as a submitit job: ``command`` (the keyword arguments of ``stages.train``, i.e. ``distill train``)
    in a child process, resumed when the run has a checkpoint; ``env`` overrides the child's environment (None:
    unset)."""

    def __init__(self, command: Dict[str, Any], run_dir: RunDir, env: Optional[Dict[str, Optional[str]]] = None):
        self.command, self.run_dir, self.env = command, run_dir, env or {}
        self._child: Optional[multiprocessing.process.BaseProcess] = None

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        lead = job.global_rank == 0  # the task that records the job's state (rank 0 also writes the run's files)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        resume = os.path.isfile(self.run_dir.last)
        last = ''
        try:
            with blocked(CHILD_SIGNALS):  # a requeue signal now would find no child to stop
                self._child, stderr = start_training({**self.command, 'resume': resume}, self.env)
            if lead:
                self._record(job.job_id, 'running', host=socket.gethostname(), pid=os.getpid(),
                             training_pid=self._child.pid, resumed=resume)
            with stderr:
                for line in stderr:  # into the job's log, keeping the last line for distill grid --status
                    sys.stderr.write(line)
                    sys.stderr.flush()
                    last = line.strip() or last
            self._child.join()
            code = self._child.exitcode
        except BaseException as exc:
            if lead and not isinstance(exc, SystemExit):  # a requeue exits: checkpoint() recorded it
                self._record(job.job_id, 'ended', returncode=130 if isinstance(exc, KeyboardInterrupt) else None,
                             reason=first_line(exc))
            raise
        finally:
            self._stop_child()
        if lead:
            self._record(job.job_id, 'ended', returncode=code, reason=last)
        if code != 0:  # the job fails too (sacct: FAILED)
            raise RuntimeError(f"distill train exited with {describe_exit(code)}: {last}")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Preempted or near the time limit: stop training and requeue this job (it resumes from last.pt)."""
        self._stop_child()
        self._record(submitit.JobEnvironment().job_id, 'requeued')
        return super().checkpoint()

    def _stop_child(self) -> None:
        child, self._child = self._child, None  # a requeue pickles this job: without its process
        if child is not None and child.is_alive():
            os.kill(child.pid, signal.SIGINT)  # distill train stops cleanly: its checkpoints are written atomically
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join()

    def _record(self, job_id: str, state: str, **fields: Any) -> None:
        atomic_write_json(os.path.join(self.run_dir.path, STATE), {'job_id': job_id, 'state': state,
                                                                   'time': time.time(), **fields})


def record_submission(run_dir: RunDir, executor: str, job: submitit.Job, folder: str) -> None:
    atomic_write_json(os.path.join(run_dir.path, SUBMITTED), {
        'executor': executor, 'job_id': job.job_id, 'host': socket.gethostname(), 'submitted': time.time(),
        'folder': folder, 'stderr': str(job.paths.stderr)})


def run_local(jobs: List[TrainJob], spec: ExecutorSpec, folder: str, parallel: int) -> None:
    """Run ``jobs`` as local submitit jobs, at most ``parallel`` at once, and return when all have ended."""
    executor = make_executor(spec, folder, 'distill-grid')
    waiting, active = list(jobs), []
    try:
        while waiting or active:
            while waiting and len(active) < parallel:
                train_job = waiting.pop(0)
                # processes started with SIGINT blocked (submitit's local controller, through it each job's task)
                # keep it blocked: Ctrl-C goes to the training process alone, which stops cleanly and ends its job
                # (the controller would answer it with a traceback)
                with blocked({signal.SIGINT}):
                    active.append(executor.submit(train_job))
                record_submission(train_job.run_dir, 'local', active[-1], folder)
            time.sleep(POLL_S)
            active = [job for job in active if not job.done()]
    finally:  # Ctrl-C (or an error) here: the jobs started wait for their training processes (which Ctrl-C stops)
        for job in active:
            job.wait()


def submit_slurm(jobs: List[TrainJob], spec: ExecutorSpec, folder: str, job_name: str,
                 dependency: Optional[str] = None) -> List[str]:
    """Submit ``jobs`` as sbatch job arrays of at most ``MAX_ARRAY`` tasks (a single job when there is one); their
    job ids."""
    executor = make_executor(spec, folder, job_name, dependency)
    ids = []
    for start in range(0, len(jobs), MAX_ARRAY):
        chunk = jobs[start:start + MAX_ARRAY]
        try:
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # submitit echoes sbatch's errors
                submitted = [executor.submit(job) for job in chunk]
        except (FailedJobError, FailedSubmissionError) as exc:  # sbatch said no (its message), or something else
            raise DistillError(f"sbatch refused the jobs: {first_line(exc, 300)}; fix the grid's slurm: section and "
                               f"run the grid again (jobs already submitted are kept)") from None
        for train_job, job in zip(chunk, submitted):
            record_submission(train_job.run_dir, 'slurm', job, folder)
        ids += [job.job_id for job in submitted]
    return ids
