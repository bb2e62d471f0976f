"""``distill grid``: run recipes x seeds, or a pair table's pairs x methods x seeds, sequentially or as parallel
processes, skipping finished runs and resuming interrupted ones.

A grid file lists recipe files::

    recipes: [experiments/cifar10_mini/*.yaml]    # paths or glob patterns, relative to the file
    exclude: [teacher.yaml]                       # optional file names to leave out
    seeds: [0, 1, 2]
    output_dir: runs/cifar10_mini-grid
    overrides: [trainer.epochs=240]               # applied to every run

or the runs of a pair table (``distill.recipes``)::

    table: pairs.yaml
    pairs: [resnet32x4-resnet8x4, vgg13-vgg8]     # optional: default every pair of the table
    methods: [kd, dkd, crd]                       # optional: default every method (a pair's skip list applies)
    seeds: [0, 1, 2]

Run ``<run_name>-seed<seed>`` gets ``trainer.seed=<seed>``. A run whose ``summary.json`` reports all its
epochs is skipped; one with ``checkpoints/last.pt`` resumes; others start. ``distill table <output_dir>`` then
summarises the grid.
"""
import glob
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .config import Config, config_of
from .errors import DistillError, nearest
from .files import load_yaml_mapping
from .recipes import PairTable, recipe_data
from .run_dir import RunDir

GRID_KEYS = ('recipes', 'exclude', 'table', 'pairs', 'methods', 'seeds', 'output_dir', 'overrides')


class Run(NamedTuple):
    recipe: str
    pair: Optional[str]
    method: Optional[str]
    overrides: List[str]
    config: Config

    @property
    def run_dir(self) -> RunDir:
        return RunDir.of(self.config)

    def command(self) -> List[str]:
        selection = ['--pair', self.pair, '--method', self.method] if self.pair else []
        return [sys.executable, '-m', 'distill', 'train', self.recipe, *selection, *self.overrides, '--quiet']


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


def plan(grid_path: str) -> List[Run]:
    """Every run of the grid, in order; every run's config is checked before the first one starts."""
    if not os.path.isfile(grid_path):
        raise DistillError(f"grid file not found: {grid_path}")
    grid: Dict[str, Any] = load_yaml_mapping(grid_path, 'grid file')
    unknown = [key for key in grid if key not in GRID_KEYS]
    if unknown:
        raise DistillError(f"{grid_path}: unknown key {unknown[0]!r}{nearest(unknown[0], GRID_KEYS)}; a grid has "
                           f"{', '.join(GRID_KEYS)}")
    output_dir = grid.get('output_dir', 'runs/grid')
    runs = []
    for recipe, pair, method, data, default_name in _recipes(grid_path, grid):
        for seed in grid.get('seeds') or [0]:
            run_name = f"{config_of(data, default_name).trainer.run_name}-seed{seed}"
            overrides = list(grid.get('overrides') or []) + [f'trainer.seed={seed}', f'trainer.output_dir={output_dir}',
                                                             f'trainer.run_name={run_name}']
            runs.append(Run(recipe, pair, method, overrides, config_of(data, default_name, overrides)))
    return runs


def run_grid(grid_path: str, parallel: int = 1, dry_run: bool = False) -> Dict[str, int]:
    runs = plan(grid_path)
    todo = []
    counts = {'finished': 0, 'interrupted': 0, 'new': 0}
    for run in runs:
        status = run.run_dir.state(run.config.trainer.epochs)
        counts[status] += 1
        print(f"{status:11s} {run.run_dir.path}")
        if status != 'finished':
            todo.append((run, status == 'interrupted'))
    if dry_run or not todo:
        return counts

    def launch(job) -> int:
        run, resume = job
        return subprocess.run(run.command() + ['--resume'] * resume, env=env).returncode

    env = dict(os.environ)
    if parallel > 1 and 'OMP_NUM_THREADS' not in env:  # parallel runs share the cores instead of oversubscribing
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // parallel))

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        codes = list(pool.map(launch, todo))
    failed = [job[0].run_dir.path for job, code in zip(todo, codes) if code != 0]
    if failed:
        raise DistillError(f"{len(failed)} of {len(todo)} runs failed (see their log.txt): {failed[:3]}; run the "
                           f"grid again to resume them")
    return counts
