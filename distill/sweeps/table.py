"""``distill table``: runs against published numbers, as a markdown table (default), CSV or JSON.

Runs (directories holding ``summary.json`` or ``resolved.yaml``) are grouped by teacher -> student pair and method
(the loss terms other than ``ce``, joined with ``+``; ``student`` for a student trained alone, listed under every
pair with that student; transfer settings of the run's ``resolved.yaml``, if any, in brackets). Each cell gives the
number of finished seeds, best-epoch and last-epoch top-1 as mean +- std over them, the difference to KD on the same
pair (last epoch), the paper's number with its source and the metric that source reports (CRD reports the last
epoch, DKD the best), and our mean minus the paper's on that metric. A run that has not finished (no summary, or
fewer epochs than its config trains) is listed as such with its epochs, never averaged in. ``plot_table`` draws the
finished runs as a bar chart per pair.
"""
import contextlib
import csv
import glob
import io
import json
import os
import statistics
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import DistillError, nearest
from ..files import load_yaml_mapping
from ..runs.directory import RunDir
from .run_state import epochs_done


def method_name(losses: Dict[str, Any], resolved: Optional[Dict[str, Any]] = None) -> str:
    """``kd``, ``crd+kd``, ``student``... of a run's ``losses``; with its transfer settings in brackets when it used
    any."""
    # a term switched into a variant by a boolean option is its own method (KD vs KD with logit standardization)
    terms = [name + ''.join(f"[{option}]" for option, value in sorted(spec.items()) if value is True)
             if isinstance(spec, dict) else name for name, spec in losses.items() if name != 'ce']
    name = '+'.join(sorted(terms)) or 'student'
    tags = []
    if resolved:
        student, transfer = resolved.get('student') or {}, resolved.get('transfer') or {}
        if student.get('checkpoint') or student.get('pretrained'):
            tags.append('pretrained')
        if transfer.get('freeze', 'full') != 'full':
            tags.append(transfer['freeze'] + (f" {transfer.get('frozen_stages')}" if transfer['freeze'] == 'partial'
                                              else ''))
        if transfer.get('backbone_lr_scale', 1.0) != 1.0:
            tags.append(f"backbone lr x{transfer['backbone_lr_scale']:g}")
    return f"{name} ({', '.join(tags)})" if tags else name


def collect(runs_dir: str) -> List[Dict[str, Any]]:
    """One row per run directory under ``runs_dir`` (one holding ``summary.json`` or ``resolved.yaml``); ``finished``
    when its summary reports the epochs its config trains, and only then ``best`` and ``last``."""
    if not os.path.isdir(runs_dir):
        raise DistillError(f"runs directory not found: {runs_dir}")
    folders = sorted({os.path.dirname(path) for name in ('summary.json', 'resolved.yaml')
                      for path in glob.glob(os.path.join(runs_dir, '**', name), recursive=True)})
    rows = [_run_row(folder) for folder in folders]
    if not rows:
        raise DistillError(f"no finished runs (summary.json) nor started ones (resolved.yaml) under {runs_dir}")
    return rows


def _run_row(folder: str) -> Dict[str, Any]:
    summary_path, resolved_path = os.path.join(folder, 'summary.json'), os.path.join(folder, 'resolved.yaml')
    summary = None
    if os.path.isfile(summary_path):
        with _readable(summary_path), open(summary_path) as f:
            summary = json.load(f)
    resolved = load_yaml_mapping(resolved_path, 'resolved config') if os.path.isfile(resolved_path) else None
    trainer = (resolved or {}).get('trainer') or {}
    if summary is not None:
        teacher, student, losses, seed = summary.get('teacher'), summary['student'], summary.get('losses', {}), \
            summary.get('seed')
    else:  # started, not finished: what it trains is in its resolved config
        teacher, student = (resolved.get('teacher') or {}).get('name'), resolved['student']['name']
        losses, seed = resolved.get('losses', {}), trainer.get('seed')
    epochs = trainer.get('epochs') or summary['epochs']
    finished = summary is not None and summary['epochs'] >= epochs
    run_dir = RunDir(*os.path.split(folder))
    with _readable(run_dir.metrics):
        done = summary['epochs'] if finished else epochs_done(run_dir)
    return dict(teacher=teacher, student=student, method=method_name(losses, resolved), seed=seed,
                finished=finished, best=summary['best_top1'] if finished else None,
                last=summary['last_top1'] if finished else None, epochs_done=done, epochs=epochs, run=folder)


@contextlib.contextmanager
def _readable(path: str) -> Iterator[None]:
    """A run file that cannot be read (damaged, not UTF-8) is one line naming it."""
    try:
        yield
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DistillError(f"cannot read {path} ({exc}); delete or re-run that run") from None


def load_paper(path: Optional[str]) -> Dict[str, Any]:
    if path is None:
        return {'sources': {}, 'pairs': {}}
    if not os.path.isfile(path):
        raise DistillError(f"paper numbers not found: {path}")
    data = load_yaml_mapping(path, 'paper numbers file')
    for pair, methods in (data.get('pairs') or {}).items():
        for method, entry in methods.items():
            if entry.get('source') not in data.get('sources', {}):
                raise DistillError(f"{path}: {pair} {method} cites source {entry.get('source')!r}, which is not "
                                   f"under 'sources'")
    return data


def _stats(values: List[float]) -> Tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def grouped(rows: List[Dict[str, Any]]) -> List[Tuple[Optional[str], str, Dict[str, List[Dict[str, Any]]]]]:
    """(teacher, student, {method: runs}) per pair; a student trained alone appears under each of its pairs."""
    pairs = sorted({(r['teacher'], r['student']) for r in rows if r['teacher']})
    alone = {r['student'] for r in rows if not r['teacher']}
    pairs += sorted((None, s) for s in alone if not any(p[1] == s for p in pairs))
    out = []
    for teacher, student in pairs:
        group: Dict[str, List[Dict[str, Any]]] = {}
        for r in rows:
            if r['student'] == student and (r['teacher'] == teacher or not r['teacher']):
                group.setdefault(r['method'], []).append(r)
        out.append((teacher, student, {m: group[m] for m in sorted(group, key=lambda m: (m != 'student', m))}))
    return out


COLUMNS = ('teacher', 'student', 'method', 'seeds', 'best_mean', 'best_std', 'last_mean', 'last_std',
           'vs_kd_last', 'paper_top1', 'paper_source', 'paper_metric', 'ours_minus_paper', 'unfinished')


def cells(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One cell per (pair, method): ``COLUMNS`` over its finished runs, ``runs`` (each finished seed) and
    ``unfinished_runs`` (each run that has not finished, never averaged in)."""
    out = []
    for teacher, student, group in grouped(rows):
        published = (paper.get('pairs') or {}).get(f"{teacher}->{student}" if teacher else student, {})
        kd = [r['last'] for r in group.get('kd', []) if r['finished']]
        for method, runs in group.items():
            done = [r for r in runs if r['finished']]
            cell: Dict[str, Any] = dict.fromkeys(COLUMNS)
            cell.update(teacher=teacher, student=student, method=method, seeds=len(done),
                        unfinished=len(runs) - len(done),
                        runs=[{k: r[k] for k in ('seed', 'best', 'last', 'run')} for r in done],
                        unfinished_runs=[{k: r[k] for k in ('seed', 'epochs_done', 'epochs', 'run')}
                                         for r in runs if not r['finished']])
            if done:
                (cell['best_mean'], cell['best_std']), (cell['last_mean'], cell['last_std']) = \
                    _stats([r['best'] for r in done]), _stats([r['last'] for r in done])
                if kd and method != 'kd':
                    cell['vs_kd_last'] = cell['last_mean'] - statistics.mean(kd)
            entry = published.get(method)
            if entry:
                metric = paper['sources'][entry['source']].get('metric', 'last')
                cell.update(paper_top1=entry['top1'], paper_source=entry['source'], paper_metric=metric)
                if done:
                    cell['ours_minus_paper'] = cell[f'{metric}_mean'] - entry['top1']
            out.append(cell)
    return out


def _number(value: Optional[float], form: str) -> str:
    return '-' if value is None else format(value, form)


def build_table(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> str:
    lines = ['| teacher -> student | method | seeds | best top-1 | last top-1 | vs kd (last) | paper | ours - paper '
             '| not finished |', '|---|---|---|---|---|---|---|---|---|']
    for cell in cells(rows, paper):
        best, last = (f"{cell[f'{m}_mean']:.2f} +- {cell[f'{m}_std']:.2f}" if cell['seeds'] else '-'
                      for m in ('best', 'last'))
        paper_text = f"{cell['paper_top1']:.2f} ({cell['paper_source']}, {cell['paper_metric']})" \
            if cell['paper_top1'] is not None else '-'
        unfinished = ', '.join(f"seed {r['seed']} ({r['epochs_done']}/{r['epochs']} epochs)"
                               for r in cell['unfinished_runs']) or '-'
        lines.append(f"| {cell['teacher'] or '-'} -> {cell['student']} | {cell['method']} | {cell['seeds']} | {best} "
                     f"| {last} | {_number(cell['vs_kd_last'], '+.2f')} | {paper_text} | "
                     f"{_number(cell['ours_minus_paper'], '+.2f')} | {unfinished} |")
    sources = paper.get('sources') or {}
    if sources:
        lines.append('')
        lines += [f"{key}: {value['citation']}" for key, value in sources.items()]
    return '\n'.join(lines)


def csv_table(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> str:
    """``COLUMNS``, one line per cell (empty where there is no number)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(cells(rows, paper))
    return buffer.getvalue()


def json_table(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> str:
    """The cells with every run behind them, and the papers cited."""
    return json.dumps({'cells': cells(rows, paper), 'sources': paper.get('sources') or {}}, indent=2)


def plot_table(rows: List[Dict[str, Any]], path: str) -> None:
    """One horizontal bar chart per pair: last-epoch top-1 mean +- std of each method, KD and the student alone
    marked by vertical lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = grouped(rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.32 * sum(len(g) for *_, g in groups) + 1.2 * len(groups)),
                             squeeze=False)
    for ax, (teacher, student, group) in zip(axes[:, 0], groups):
        methods = list(group)
        stats = [_stats([r['last'] for r in group[m]]) for m in methods]
        colors = ['tab:gray' if m == 'student' else 'tab:orange' if m == 'kd' else 'tab:blue' for m in methods]
        ax.barh(range(len(methods)), [m for m, _ in stats], xerr=[s for _, s in stats], color=colors, capsize=2)
        ax.set_yticks(range(len(methods)), methods)
        ax.invert_yaxis()
        for reference, style in (('kd', '--'), ('student', ':')):
            if reference in group:
                ax.axvline(_stats([r['last'] for r in group[reference]])[0], color='k', linestyle=style, lw=1,
                           label=f'{reference} mean')
        low = min(m - s for m, s in stats)
        ax.set_xlim(max(0.0, low - 3), max(m + s for m, s in stats) + 1)
        ax.set_xlabel('last-epoch top-1 (%), mean +- std over seeds')
        ax.set_title(f"{teacher or '-'} -> {student}")
        ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FORMATS = {'markdown': build_table, 'csv': csv_table, 'json': json_table}


def table(runs_dir: str, paper_path: Optional[str] = None, plot_path: Optional[str] = None,
          fmt: str = 'markdown') -> str:
    if fmt not in FORMATS:
        raise DistillError(f"unknown table format {fmt!r}{nearest(fmt, FORMATS)}: choose {', '.join(FORMATS)}")
    paper = load_paper(paper_path)  # a broken file is reported before anything else
    rows = collect(runs_dir)
    if plot_path:
        finished = [row for row in rows if row['finished']]
        if not finished:
            raise DistillError(f"nothing to plot: no run under {runs_dir} has finished")
        plot_table(finished, plot_path)
    return FORMATS[fmt](rows, paper)
