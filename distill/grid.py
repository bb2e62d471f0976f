"""``distill grid``: run recipes x seeds, sequentially or as parallel processes, skipping finished runs and
resuming interrupted ones.

A grid file::

    recipes: [experiments/cifar100/resnet32x4-resnet8x4/*.yaml]   # paths or glob patterns, relative to the file
    exclude: [teacher.yaml]                                          # optional file names to leave out
    seeds: [0, 1, 2]
    output_dir: runs/cifar100-grid
    overrides: [trainer.epochs=240]                                  # applied to every run

Run ``<recipe run_name>-seed<seed>`` gets ``trainer.seed=<seed>``. A run whose ``summary.json`` reports all its
epochs is skipped; one with ``checkpoints/last.pt`` resumes; others start. ``distill table <output_dir>`` then
summarises the grid.
"""
import glob
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Tuple

from .config import load_config
from .files import load_yaml_mapping
from .errors import DistillError
from .run_dir import RunDir


def plan(grid_path: str) -> List[Tuple[str, List[str], str]]:
    """``(recipe, overrides, run_dir)`` for every run of the grid, in order."""
    if not os.path.isfile(grid_path):
        raise DistillError(f"grid file not found: {grid_path}")
    grid: Dict[str, Any] = load_yaml_mapping(grid_path, 'grid file')
    unknown = set(grid) - {'recipes', 'exclude', 'seeds', 'output_dir', 'overrides'}
    if unknown:
        raise DistillError(f"{grid_path}: unknown keys {sorted(unknown)}; a grid has recipes, exclude, seeds, "
                           f"output_dir, overrides")
    base = os.path.dirname(os.path.abspath(grid_path))
    recipes = []
    for pattern in grid.get('recipes') or []:
        matches = sorted(glob.glob(os.path.join(base, pattern)))
        if not matches:
            raise DistillError(f"{grid_path}: recipe pattern {pattern!r} matches no file")
        recipes += [m for m in matches if os.path.basename(m) not in (grid.get('exclude') or [])]
    if not recipes:
        raise DistillError(f"{grid_path}: no recipes; list them under 'recipes:'")
    output_dir = grid.get('output_dir', 'runs/grid')
    runs = []
    for recipe in recipes:
        for seed in grid.get('seeds') or [0]:
            run_name = f"{load_config(recipe).trainer.run_name}-seed{seed}"
            overrides = list(grid.get('overrides') or []) + [f'trainer.seed={seed}', f'trainer.output_dir={output_dir}',
                                                             f'trainer.run_name={run_name}']
            load_config(recipe, overrides)  # every run's config is checked before the first one starts
            runs.append((recipe, overrides, os.path.join(output_dir, run_name)))
    return runs


def state(recipe: str, overrides: List[str], run_dir: str) -> str:
    """'finished', 'interrupted' or 'new'."""
    cfg = load_config(recipe, overrides)
    return RunDir.of(cfg).state(cfg.trainer.epochs)


def run_grid(grid_path: str, parallel: int = 1, dry_run: bool = False) -> Dict[str, int]:
    runs = plan(grid_path)
    todo = []
    counts = {'finished': 0, 'interrupted': 0, 'new': 0}
    for recipe, overrides, run_dir in runs:
        status = state(recipe, overrides, run_dir)
        counts[status] += 1
        print(f"{status:11s} {run_dir}")
        if status != 'finished':
            todo.append((recipe, overrides, status == 'interrupted'))
    if dry_run or not todo:
        return counts

    def launch(job) -> int:
        recipe, overrides, resume = job
        command = [sys.executable, '-m', 'distill', 'train', recipe, *overrides, '--quiet'] + (['--resume'] * resume)
        return subprocess.run(command, env=env).returncode

    env = dict(os.environ)
    if parallel > 1 and 'OMP_NUM_THREADS' not in env:  # parallel runs share the cores instead of oversubscribing
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // parallel))

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        codes = list(pool.map(launch, todo))
    failed = [job[0] for job, code in zip(todo, codes) if code != 0]
    if failed:
        raise DistillError(f"{len(failed)} of {len(todo)} runs failed (see their log.txt): {failed[:3]}; run the "
                           f"grid again to resume them")
    return counts
