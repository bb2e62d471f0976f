"""``distill table``: a markdown table of finished runs (their ``summary.json``) against published numbers.

Runs are grouped by teacher -> student pair and method (the loss terms other than ``ce``, joined with ``+``;
``student`` for a student trained alone, listed under every pair with that student; transfer settings of the
run's ``resolved.yaml``, if any, in brackets). Each row gives the number of
seeds, best-epoch and last-epoch top-1 as mean +- std, the difference to KD on the same pair (last epoch), the
paper's number with its source, and our mean minus the paper's on the metric that source reports (CRD reports
the last epoch, DKD the best). ``plot_table`` draws the same numbers as a bar chart per pair.
"""
import glob
import json
import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .files import load_yaml_mapping
from .errors import DistillError


def method_name(summary: Dict[str, Any], resolved: Optional[Dict[str, Any]] = None) -> str:
    """``kd``, ``crd+kd``, ``student``...; with the run's transfer settings in brackets when it used any."""
    losses = summary.get('losses', {})
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
    if not os.path.isdir(runs_dir):
        raise DistillError(f"runs directory not found: {runs_dir}")
    rows = []
    for path in sorted(glob.glob(os.path.join(runs_dir, '**', 'summary.json'), recursive=True)):
        try:
            summary = json.load(open(path))
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot read {path} ({exc}); delete or re-run that run") from None
        resolved_path = os.path.join(os.path.dirname(path), 'resolved.yaml')
        resolved = yaml.safe_load(open(resolved_path)) if os.path.isfile(resolved_path) else None
        rows.append(dict(teacher=summary.get('teacher'), student=summary['student'],
                         method=method_name(summary, resolved),
                         seed=summary.get('seed'), best=summary['best_top1'], last=summary['last_top1'],
                         run=os.path.dirname(path)))
    if not rows:
        raise DistillError(f"no finished runs (summary.json) under {runs_dir}")
    return rows


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


def build_table(rows: List[Dict[str, Any]], paper: Dict[str, Any]) -> str:
    lines = ['| teacher -> student | method | seeds | best top-1 | last top-1 | vs kd (last) | paper | ours - paper |',
             '|---|---|---|---|---|---|---|---|']
    for teacher, student, group in grouped(rows):
        pair_key = f"{teacher}->{student}" if teacher else student
        published = (paper.get('pairs') or {}).get(pair_key, {})
        kd_last = _stats([r['last'] for r in group['kd']])[0] if 'kd' in group else None
        for method, runs in group.items():
            best, last = _stats([r['best'] for r in runs]), _stats([r['last'] for r in runs])
            versus_kd = f"{last[0] - kd_last:+.2f}" if kd_last is not None and method != 'kd' else '-'
            entry = published.get(method)
            paper_text, delta_text = '-', '-'
            if entry:
                source = paper['sources'][entry['source']]
                ours = best[0] if source.get('metric') == 'best' else last[0]
                paper_text = f"{entry['top1']:.2f} ({entry['source']}, {source.get('metric', 'last')})"
                delta_text = f"{ours - entry['top1']:+.2f}"
            lines.append(f"| {teacher or '-'} -> {student} | {method} | {len(runs)} | {best[0]:.2f} +- {best[1]:.2f} "
                         f"| {last[0]:.2f} +- {last[1]:.2f} | {versus_kd} | {paper_text} | {delta_text} |")
    sources = paper.get('sources') or {}
    if sources:
        lines.append('')
        lines += [f"{key}: {value['citation']}" for key, value in sources.items()]
    return '\n'.join(lines)


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


def table(runs_dir: str, paper_path: Optional[str] = None, plot_path: Optional[str] = None) -> str:
    paper = load_paper(paper_path)  # a broken file is reported before anything else
    rows = collect(runs_dir)
    if plot_path:
        plot_table(rows, plot_path)
    return build_table(rows, paper)
