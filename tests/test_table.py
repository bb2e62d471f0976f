"""`distill table` on synthetic summary.json files: grouping, mean/std over seeds, paper numbers and deltas."""
import json
import os

import pytest

from distill import DistillError
from distill.cli import main

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def write_run(root, name, teacher, student, losses, seed, best, last):
    os.makedirs(root / name)
    (root / name / 'summary.json').write_text(json.dumps(dict(
        teacher=teacher, student=student, losses=losses, seed=seed, best_top1=best, last_top1=last, epochs=240)))


@pytest.mark.slow
def test_table_gives_means_stds_and_deltas_against_the_paper(tmp_path, capsys):
    pair = ('cifar_resnet32x4', 'cifar_resnet8x4')
    for seed, (best, last) in enumerate([(74.0, 73.0), (75.0, 74.0), (76.0, 75.0)]):
        write_run(tmp_path, f'kd{seed}', *pair, {'ce': 0.1, 'kd': 0.9}, seed, best, last)
        write_run(tmp_path, f'crdkd{seed}', *pair, {'ce': 1.0, 'kd': 1.0, 'crd': 0.8}, seed, best + 2, last + 2)
    write_run(tmp_path, 'base', None, 'cifar_resnet8x4', {'ce': 1.0}, 0, 72.0, 71.5)
    write_run(tmp_path, 'dkd', *pair, {'ce': 1.0, 'dkd': 1.0}, 0, 76.5, 76.0)
    write_run(tmp_path, 'kd_ls', *pair, {'ce': 0.1, 'kd': {'weight': 9.0, 'logit_standardization': True}}, 0, 75.0, 74.5)
    plot = tmp_path / 'methods.png'
    assert main(['table', str(tmp_path), '--paper', os.path.join(REPO, 'experiments', 'cifar100', 'paper.yaml'),
                 '--plot', str(plot)]) == 0
    out = capsys.readouterr().out
    # KD: last 73, 74, 75 -> 74.00 +- 1.00 against CRD's 73.33 (a last-epoch number): +0.67
    assert '| cifar_resnet32x4 -> cifar_resnet8x4 | kd | 3 | 75.00 +- 1.00 | 74.00 +- 1.00 | - | 73.33 (crd, last) | +0.67 |' in out
    # CRD+KD is 2 points above KD on the last epoch
    assert '| crd+kd | 3 | 77.00 +- 1.00 | 76.00 +- 1.00 | +2.00 | 75.46 (crd, last) | +0.54 |' in out
    # DKD is compared on the best epoch, as the DKD paper reports: 76.50 - 76.32
    assert '| dkd | 1 | 76.50 +- 0.00 | 76.00 +- 0.00 | +2.00 | 76.32 (dkd, best) | +0.18 |' in out
    # not pooled with KD; compared with the logit-standardization paper's KD+Ours (best epoch): 75.00 - 76.62
    assert '| kd[logit_standardization] | 1 | 75.00 +- 0.00 | 74.50 +- 0.00 | +0.50 | 76.62 (ls, best) | -1.62 |' in out
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and plot.stat().st_size > 10000
    # the student alone appears in the pair's block, first
    lines = [line for line in out.splitlines() if line.startswith('| cifar_resnet32x4')]
    assert lines[0].startswith('| cifar_resnet32x4 -> cifar_resnet8x4 | student | 1 | 72.00 +- 0.00 | 71.50')
    assert 'crd: Tian, Krishnan & Isola' in out


def test_table_errors_are_one_line(tmp_path, capsys):
    assert main(['table', str(tmp_path / 'missing')]) == 2
    assert 'runs directory not found' in capsys.readouterr().err
    assert main(['table', str(tmp_path)]) == 2
    assert 'no finished runs (summary.json)' in capsys.readouterr().err
    bad = tmp_path / 'paper.yaml'
    bad.write_text('sources: {}\npairs: {a: {kd: {top1: 1.0, source: nope}}}\n')
    write_run(tmp_path, 'r', None, 's', {'ce': 1.0}, 0, 1.0, 1.0)
    with pytest.raises(DistillError, match="cites source 'nope'"):
        from distill.sweeps.table import load_paper
        load_paper(str(bad))


@pytest.mark.parametrize('damaged', ['metrics.jsonl', 'resolved.yaml', 'summary.json'])
def test_a_run_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys, damaged):
    write_unfinished(tmp_path, 'kd0', 'cifar_resnet32x4', 'cifar_resnet8x4', {'ce': 0.1, 'kd': 0.9}, 0, 3,
                     summary_epochs=3 if damaged == 'summary.json' else None)
    (tmp_path / 'kd0' / damaged).write_bytes(b'\xff\xfe\x00garbage\n')
    assert main(['table', str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distill: error: cannot read ") and str(tmp_path / 'kd0' / damaged) in line, line
    assert "'utf-8' codec can't decode byte 0xff" in line and 'Traceback' not in line


def test_transfer_runs_are_labelled_by_their_settings(tmp_path, capsys):
    import yaml
    write_run(tmp_path, 'ft', None, 'cifar_resnet20', {'ce': 1.0}, 0, 68.0, 67.0)
    (tmp_path / 'ft' / 'resolved.yaml').write_text(yaml.safe_dump({
        'student': {'checkpoint': 'w.safetensors'}, 'transfer': {'freeze': 'partial', 'frozen_stages': 2,
                                                                 'backbone_lr_scale': 0.1}}))
    write_run(tmp_path, 'scratch', None, 'cifar_resnet20', {'ce': 1.0}, 0, 63.0, 62.0)
    assert main(['table', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '| - -> cifar_resnet20 | student (pretrained, partial 2, backbone lr x0.1) | 1 | 68.00' in out
    assert '| - -> cifar_resnet20 | student | 1 | 63.00' in out


def write_unfinished(root, name, teacher, student, losses, seed, epochs_done, summary_epochs=None):
    """A run that started (resolved.yaml, metrics.jsonl) and has not finished its 240 epochs; with
    ``summary_epochs``, one whose summary reports fewer epochs (a run asked later for more)."""
    import yaml
    os.makedirs(root / name)
    (root / name / 'resolved.yaml').write_text(yaml.safe_dump({
        'student': {'name': student}, 'teacher': {'name': teacher}, 'losses': losses,
        'trainer': {'seed': seed, 'epochs': 240}}))
    (root / name / 'metrics.jsonl').write_text(''.join(json.dumps({'epoch': e + 1}) + '\n' for e in range(epochs_done)))
    if summary_epochs:
        (root / name / 'summary.json').write_text(json.dumps(dict(
            teacher=teacher, student=student, losses=losses, seed=seed, best_top1=99.0, last_top1=99.0,
            epochs=summary_epochs)))


def test_unfinished_runs_are_listed_never_averaged_and_the_table_comes_as_csv_and_json(tmp_path, capsys):
    import csv
    pair, kd = ('cifar_resnet32x4', 'cifar_resnet8x4'), {'ce': 0.1, 'kd': 0.9}
    for seed, (best, last) in enumerate([(74.0, 73.0), (75.0, 74.0), (76.0, 75.0)]):
        write_run(tmp_path, f'kd{seed}', *pair, kd, seed, best, last)
    write_unfinished(tmp_path, 'kd3', *pair, kd, 3, epochs_done=120)
    write_unfinished(tmp_path, 'kd4', *pair, kd, 4, epochs_done=100, summary_epochs=100)
    write_unfinished(tmp_path, 'dkd0', *pair, {'ce': 1.0, 'dkd': 1.0}, 0, epochs_done=7)
    paper = os.path.join(REPO, 'experiments', 'cifar100', 'paper.yaml')
    assert main(['table', str(tmp_path), '--paper', paper]) == 0
    out = capsys.readouterr().out
    # the same numbers as the three finished seeds alone, and the two others named with their epochs
    assert ('| cifar_resnet32x4 -> cifar_resnet8x4 | kd | 3 | 75.00 +- 1.00 | 74.00 +- 1.00 | - | 73.33 (crd, last) '
            '| +0.67 | seed 3 (120/240 epochs), seed 4 (100/240 epochs) |') in out
    assert '| dkd | 0 | - | - | - | 76.32 (dkd, best) | - | seed 0 (7/240 epochs) |' in out
    assert main(['table', str(tmp_path), '--paper', paper, '--output', str(tmp_path / 'table.csv')]) == 0
    assert capsys.readouterr().out.strip() == f"csv table of {tmp_path} -> {tmp_path / 'table.csv'}"
    cells = {row['method']: row for row in csv.DictReader(open(tmp_path / 'table.csv'))}
    assert {k: cells['kd'][k] for k in ('seeds', 'unfinished', 'best_mean', 'best_std', 'last_mean', 'last_std',
                                        'paper_top1', 'paper_source', 'paper_metric')} == {
        'seeds': '3', 'unfinished': '2', 'best_mean': '75.0', 'best_std': '1.0', 'last_mean': '74.0',
        'last_std': '1.0', 'paper_top1': '73.33', 'paper_source': 'crd', 'paper_metric': 'last'}
    assert abs(float(cells['kd']['ours_minus_paper']) - 0.67) < 1e-9
    assert (cells['dkd']['seeds'], cells['dkd']['last_mean'], cells['dkd']['paper_metric']) == ('0', '', 'best')
    assert main(['table', str(tmp_path), '--paper', paper, '--format', 'json']) == 0
    table = json.loads(capsys.readouterr().out)
    kd_cell = next(cell for cell in table['cells'] if cell['method'] == 'kd')
    assert [run['last'] for run in kd_cell['runs']] == [73.0, 74.0, 75.0] and kd_cell['best_std'] == 1.0
    assert [(run['seed'], run['epochs_done'], run['epochs']) for run in kd_cell['unfinished_runs']] == [
        (3, 120, 240), (4, 100, 240)]
    assert table['sources']['dkd']['metric'] == 'best'
    assert main(['table', str(tmp_path), '--format', 'xlsx']) == 2
    assert "unknown table format 'xlsx': choose markdown, csv, json" in capsys.readouterr().err
