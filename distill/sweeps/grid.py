"""``distill grid``: run recipes x seeds, or a pair table's pairs x methods x seeds, as submitit jobs on this
machine (``--executor local``, the default: at most ``--parallel`` at once) or on a SLURM cluster (``--executor
slurm``: sbatch job arrays), skipping finished and running runs and resuming interrupted ones.

A grid file lists recipe files::

    recipes: [experiments/cifar10_mini/*.yaml]    # paths or glob patterns, relative to the file
    exclude: [teacher.yaml]                       # optional file names to leave out
    seeds: [0, 1, 2]
    output_dir: runs/cifar10_mini-grid
    overrides: [trainer.epochs=240]               # applied to every run

or the runs of a pair table (``distill.config.recipes``)::

    table: pairs.yaml
    pairs: [resnet32x4-resnet8x4, vgg13-vgg8]     # optional: default every pair of the table
    methods: [kd, dkd, crd]                       # optional: default every method (a pair's skip list applies)
    seeds: [0, 1, 2]

Run ``<run_name>-seed<seed>`` gets ``trainer.seed=<seed>``. A run whose ``summary.json`` reports all its
epochs is skipped, and so is one whose job is queued or running; one with ``checkpoints/last.pt`` resumes; others
start (``distill.sweeps.launch`` keeps each run's job record). ``distill grid GRID --status`` tabulates the runs'
states, ``distill table <output_dir>`` their results. Executor options (``distill.sweeps.launch``)::

    slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 720, cpus_per_task: 8, mem_gb: 32, slurm_account: abc}
    local: {tasks_per_node: 2}                    # optional: e.g. two ranks per run (torch.distributed, gloo on CPU)

On SLURM, a teacher the runs train first (``teacher.recipe`` without weights) is a job of its own, and the runs
that need it wait for it (``--dependency=afterok``) instead of holding GPUs while it trains.
"""
import collections
import contextlib
import glob
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..config import Config, config_of, load_config
from ..config.checks import check_teacher_weights
from ..config.recipes import PairTable, recipe_data
from ..errors import DistillError, nearest
from ..files import load_yaml_mapping
from ..runs.directory import FINISHED, INTERRUPTED, NEW, RunDir
from .launch import ExecutorSpec, TrainJob, executor_spec, run_local, submit_slurm
from .run_state import FAILED, RUNNING, RunStatus, statuses

GRID_KEYS = ('recipes', 'exclude', 'table', 'pairs', 'methods', 'seeds', 'output_dir', 'overrides', 'executor',
             'local', 'slurm')


class Run(NamedTuple):
    recipe: str
    pair: Optional[str]
    method: Optional[str]
    overrides: List[str]
    config: Config

    @property
    def run_dir(self) -> RunDir:
        return RunDir.of(self.config)

    def command(self) -> Dict[str, Any]:
        """The arguments of ``stages.train`` (``distill train``) that train this run."""
        return {'recipe': self.recipe, 'overrides': self.overrides, 'pair': self.pair, 'method': self.method,
                'quiet': True}


def _selected(grid_path: str, grid: Dict[str, Any], key: str, known: List[str]) -> List[str]:
    chosen = grid.get(key) or known
    for name in chosen:
        if name not in known:
            raise DistillError(f"{grid_path}: unknown {key[:-1]} {name!r}{nearest(name, known)}; the table has "
                               f"{', '.join(known)}")
    return chosen


def _recipes(grid_path: str, grid: Dict[str, Any]) -> List[Tuple[str, Optional[str], Optional[str], Dict[str, Any],
                                                                  str]]:
    """``(recipe, pair, method, mapping, default run name)`` of every run of the grid, before seeds."""
    base = os.path.dirname(os.path.abspath(grid_path))
    if grid.get('table'):
        if grid.get('recipes'):
            raise DistillError(f"{grid_path}: give either 'table' (pairs x methods) or 'recipes', not both")
        table = PairTable(os.path.join(base, grid['table']))
        return [(table.path, pair, method, *recipe_data(table.path, pair, method, table))
                for pair in _selected(grid_path, grid, 'pairs', list(table.pairs))
                for method in _selected(grid_path, grid, 'methods', table.all_methods) if method in table.methods(pair)]
    recipes = []
    for pattern in grid.get('recipes') or []:
        matches = sorted(glob.glob(os.path.join(base, pattern)))
        if not matches:
            raise DistillError(f"{grid_path}: recipe pattern {pattern!r} matches no file")
        recipes += [(m, None, None, *recipe_data(m)) for m in matches
                    if os.path.basename(m) not in (grid.get('exclude') or [])]
    if not recipes:
        raise DistillError(f"{grid_path}: no runs; list recipe files under 'recipes:' or name a pair table under "
                           f"'table:'")
    return recipes


def read_grid(grid_path: str) -> Dict[str, Any]:
    if not os.path.isfile(grid_path):
        raise DistillError(f"grid file not found: {grid_path}")
    grid: Dict[str, Any] = load_yaml_mapping(grid_path, 'grid file')
    unknown = [key for key in grid if key not in GRID_KEYS]
    if unknown:
        raise DistillError(f"{grid_path}: unknown key {unknown[0]!r}{nearest(unknown[0], GRID_KEYS)}; a grid has "
                           f"{', '.join(GRID_KEYS)}")
    return grid


def plan(grid_path: str, grid: Optional[Dict[str, Any]] = None) -> List[Run]:
    """Every run of the grid, in order; every run's config is checked before the first one starts."""
    grid = read_grid(grid_path) if grid is None else grid
    output_dir, seeds = _output_dir(grid), _seeds(grid_path, grid)
    runs: Dict[str, Run] = {}  # by run directory
    for recipe, pair, method, data, default_name in _recipes(grid_path, grid):
        for seed in seeds:
            run_name = f"{config_of(data, default_name).trainer.run_name}-seed{seed}"
            overrides = list(grid.get('overrides') or []) + [f'trainer.seed={seed}', f'trainer.output_dir={output_dir}',
                                                             f'trainer.run_name={run_name}']
            run = Run(recipe, pair, method, overrides, config_of(data, default_name, overrides))
            check_teacher_weights(run.config, f"{grid_path}: run {run_name}: ")
            other = runs.setdefault(os.path.abspath(run.run_dir.path), run)
            if other is not run:
                raise DistillError(f"{grid_path}: {_source(other)} and {_source(run)} both train into "
                                   f"{run.run_dir.path}; give each recipe its own trainer.run_name (or file name)")
    return list(runs.values())


def _seeds(grid_path: str, grid: Dict[str, Any]) -> List[int]:
    seeds = grid.get('seeds') or [0]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in seeds):
        raise DistillError(f"{grid_path}: seeds must be a list of whole numbers >= 0, e.g. seeds: [0, 1, 2]; got "
                           f"{seeds!r}")
    repeated = [seed for seed, count in collections.Counter(seeds).items() if count > 1]
    if repeated:
        raise DistillError(f"{grid_path}: seeds lists {repeated[0]} more than once: its runs would share a run "
                           f"directory; list each seed once")
    return seeds


def _source(run: Run) -> str:
    """Where a run comes from, for messages: its recipe file, or its table's pair and method."""
    return f"{run.pair} x {run.method}" if run.pair else os.path.relpath(run.recipe)


def teacher_runs(runs: List[Run]) -> Dict[str, Run]:
    """The teachers the runs train first (``teacher.recipe`` without weights: ``distill.sweeps.stages`` trains that
    recipe as it is), by recipe, each a run of its own."""
    teachers: Dict[str, Run] = {}
    for run in runs:
        teacher = run.config.teacher
        if teacher and teacher.recipe and not (teacher.checkpoint or teacher.pretrained) and \
                teacher.recipe not in teachers:
            teachers[teacher.recipe] = Run(teacher.recipe, None, None, [], load_config(teacher.recipe))
    return teachers


def _statuses(runs: List[Run]) -> List[RunStatus]:
    return statuses([(run.run_dir, run.config.trainer.epochs) for run in runs])


def run_grid(grid_path: str, parallel: int = 1, dry_run: bool = False, executor: Optional[str] = None,
             status: bool = False) -> Dict[str, int]:
    """List every run with its state, then run (local) or submit (slurm) those neither finished nor running;
    ``status``: print the table of states instead. Every input is checked before anything is submitted."""
    if parallel < 1:
        raise DistillError(f"--parallel must be >= 1 (the runs at once on this machine), got {parallel}")
    grid = read_grid(grid_path)
    spec = executor_spec(grid_path, grid, executor)
    runs = plan(grid_path, grid)
    teachers = teacher_runs(runs) if spec.name == 'slurm' or status else {}
    listed = list(teachers.values()) + runs
    current = _statuses(listed)
    counts = dict(collections.Counter(s.state for s in current))
    if status:
        print(status_table(listed, current, len(teachers)))
        return counts
    for run, state in zip(listed, current):
        print(f"{state.state:11s} {run.run_dir.path}")
    todo = [run for run, state in zip(runs, current[len(teachers):]) if state.state not in (FINISHED, RUNNING)]
    if dry_run or not todo:
        return counts
    folder = os.path.join(os.path.abspath(os.path.expanduser(_output_dir(grid))), '.submitit', '%j')  # jobs' logs
    if spec.name == 'slurm':
        _submit(todo, dict(zip(teachers, zip(teachers.values(), current))), spec, folder, grid_path)
    else:
        _run_here(todo, spec, folder, parallel, grid_path)
    return counts


def _output_dir(grid: Dict[str, Any]) -> str:
    return grid.get('output_dir', 'runs/grid')


def _run_here(todo: List[Run], spec: ExecutorSpec, folder: str, parallel: int, grid_path: str) -> None:
    """Run ``todo`` on this machine, ``parallel`` at once; one line naming the runs that did not finish."""
    # submitit's local controller shows a job the GPUs its gpus_per_node asks for, none by default: without that
    # option a run sees this machine's GPUs, as distill train does
    env = {} if 'gpus_per_node' in spec.options else {'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES')}
    if parallel > 1 and 'OMP_NUM_THREADS' not in os.environ:  # parallel runs share the cores, not oversubscribe
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // parallel))
    try:
        run_local([TrainJob(run.command(), run.run_dir, env) for run in todo], spec, folder, parallel)
    finally:  # submitit's local controller also creates the folder under its literal name (.submitit/%j), empty
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    failed = [(os.path.basename(run.run_dir.path), state) for run, state in zip(todo, _statuses(todo))
              if state.state != FINISHED]
    if failed:
        names = ', '.join(name for name, _ in failed[:3]) + (', ...' if len(failed) > 3 else '')
        raise DistillError(f"{len(failed)} of {len(todo)} runs did not finish ({names}; {failed[0][0]}: "
                           f"{failed[0][1].note or failed[0][1].state}); `distill grid {grid_path} --status` lists "
                           f"them, and running the grid again resumes them")


def _submit(todo: List[Run], teachers: Dict[str, Tuple[Run, RunStatus]], spec: ExecutorSpec, folder: str,
            grid_path: str) -> None:
    """Submit the teachers ``todo`` needs that are neither finished nor running (a job each), then ``todo`` as job
    arrays: one per teacher, after that teacher's job (``afterok``), and one for the runs that wait for none."""
    name = f"distill-{os.path.splitext(os.path.basename(grid_path))[0]}"
    waits_for: Dict[Optional[str], List[Run]] = {}
    for run in todo:
        recipe = run.config.teacher.recipe if run.config.teacher else None
        waits_for.setdefault(recipe if recipe in teachers else None, []).append(run)
    lines = []
    for recipe in [r for r in waits_for if r is not None]:
        teacher, state = teachers[recipe]
        if state.state == FINISHED:
            waits_for.setdefault(None, []).extend(waits_for.pop(recipe))
            continue
        if state.state == RUNNING and state.executor != 'slurm':
            raise DistillError(f"teacher {teacher.run_dir.path} is training in {state.job}, not on SLURM: submit "
                               f"after it has finished")
        if state.state == RUNNING:
            job_id = state.job_id
        else:
            job_id = submit_slurm([TrainJob(teacher.command(), teacher.run_dir)], spec, folder,
                                  os.path.basename(teacher.run_dir.path))[0]
            lines.append(f"teacher {teacher.run_dir.path}: job {job_id}")
        ids = submit_slurm([TrainJob(run.command(), run.run_dir) for run in waits_for[recipe]], spec, folder, name,
                           f'afterok:{job_id}')
        lines.append(f"{_span(ids)} after it")
    if waits_for.get(None):
        lines.append(_span(submit_slurm([TrainJob(run.command(), run.run_dir) for run in waits_for[None]], spec,
                                        folder, name)))
    print(f"submitted to SLURM ({'; '.join(lines)}); logs under {os.path.dirname(folder)}; "
          f"`distill grid {grid_path} --status` follows them")


def _span(job_ids: List[str]) -> str:
    """'1 run: job 4242' or '12 runs: job array 4243 (12 tasks)'."""
    if len(job_ids) == 1:
        return f"1 run: job {job_ids[0]}"
    arrays = list(dict.fromkeys(job_id.split('_')[0] for job_id in job_ids))
    return f"{len(job_ids)} runs: job array{'s' * (len(arrays) > 1)} {', '.join(arrays)} ({len(job_ids)} tasks)"


def status_table(runs: List[Run], current: List[RunStatus], teachers: int = 0) -> str:
    """One aligned line per run (the first ``teachers`` are teachers): name, state, epochs done, job, and for a
    failure the last line its job wrote."""
    rows = [('run', 'state', 'epochs', 'job', 'last log line')]
    for index, (run, state) in enumerate(zip(runs, current)):
        name = os.path.basename(run.run_dir.path) + (' (teacher)' if index < teachers else '')
        rows.append((name, state.state, f"{state.epochs}/{run.config.trainer.epochs}", state.job, state.note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) + '  ' + row[4] for row in rows]
    counts = collections.Counter(state.state for state in current)
    order = (FINISHED, RUNNING, FAILED, INTERRUPTED, NEW)
    lines.append(f"{len(runs)} runs: " + ', '.join(f"{counts[s]} {s}" for s in order if counts[s]))
    return '\n'.join(line.rstrip() for line in lines)
