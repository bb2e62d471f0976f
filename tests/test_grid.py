"""`distill grid`: recipes x seeds as processes; finished runs are skipped, interrupted ones resumed."""
import json
import os

import pytest
import yaml

from distill.cli import main
from helpers import digits_config


@pytest.mark.slow
def test_grid_runs_skips_finished_and_resumes_interrupted_runs(tmp_path, capsys):
    for name, augment in (('a', 'crop'), ('b', 'none')):  # two recipes (their run names: their file names)
        cfg = digits_config(tmp_path / 'unused', name, epochs=2, data={'augment': augment})
        del cfg['trainer']['output_dir'], cfg['trainer']['run_name']
        (tmp_path / f'{name}.yaml').write_text(yaml.safe_dump(cfg))
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['*.yaml'], 'exclude': ['grid.yaml'], 'seeds': [0, 1],
                                    'output_dir': str(tmp_path / 'runs'), 'overrides': ['trainer.epochs=2']}))
    # an interrupted run: seed 1 of recipe a, one of its two epochs done
    assert main(['train', str(tmp_path / 'a.yaml'), 'trainer.epochs=1', 'trainer.seed=1',
                 f'trainer.output_dir={tmp_path / "runs"}', 'trainer.run_name=a-seed1', '--quiet']) == 0
    os.remove(tmp_path / 'runs' / 'a-seed1' / 'summary.json')
    capsys.readouterr()
    assert main(['grid', str(grid), '--dry-run']) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert states == ['new', 'interrupted', 'new', 'new']  # a-seed0, a-seed1, b-seed0, b-seed1
    assert main(['grid', str(grid), '--parallel', '2']) == 0
    runs = sorted(name for name in os.listdir(tmp_path / 'runs') if name != '.submitit')  # the jobs' logs
    assert not (tmp_path / 'runs' / '.submitit' / '%j').exists()  # submitit's log folder pattern, never a folder
    assert runs == ['a-seed0', 'a-seed1', 'b-seed0', 'b-seed1']
    for run in runs:
        summary = json.load(open(tmp_path / 'runs' / run / 'summary.json'))
        assert summary['epochs'] == 2 and summary['seed'] == int(run[-1])
    assert 'resumed' in open(tmp_path / 'runs' / 'a-seed1' / 'log.txt').read()
    capsys.readouterr()
    assert main(['grid', str(grid)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ['finished'] * 4
    assert main(['table', str(tmp_path / 'runs')]) == 0
    assert '| - -> cifar_resnet8 | student | 4 |' in capsys.readouterr().out


def test_grid_errors_are_one_line(tmp_path, capsys):
    assert main(['grid', str(tmp_path / 'none.yaml')]) == 2
    assert 'grid file not found' in capsys.readouterr().err
    grid = tmp_path / 'g.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['nothing*.yaml']}))
    assert main(['grid', str(grid)]) == 2
    assert "recipe pattern 'nothing*.yaml' matches no file" in capsys.readouterr().err


def test_a_grid_whose_runs_would_misrun_or_collide_is_refused_before_anything_is_submitted(tmp_path, capsys):
    cfg = digits_config(tmp_path / 'unused', epochs=1)
    del cfg['trainer']['output_dir'], cfg['trainer']['run_name']
    os.makedirs(tmp_path / 'other')
    for path in ('a.yaml', 'other/a.yaml'):  # one file name: one run name
        (tmp_path / path).write_text(yaml.safe_dump(cfg))
    (tmp_path / 't.yaml').write_text(yaml.safe_dump({**cfg, 'teacher': {'name': 'cifar_resnet8x4'},
                                                     'losses': {'ce': 0.1, 'kd': 0.9}}))
    grid, runs = tmp_path / 'grid.yaml', tmp_path / 'runs'
    for change, args, message in [
            ({'seeds': 3}, [], 'seeds must be a list of whole numbers >= 0, e.g. seeds: [0, 1, 2]; got 3'),
            ({'seeds': [0, 1, 0]}, [], 'seeds lists 0 more than once: its runs would share a run directory; list '
                                       'each seed once'),
            ({'recipes': ['a.yaml', 'other/a.yaml']}, [], f"both train into {runs / 'a-seed0'}; give each recipe "
                                                          f"its own trainer.run_name (or file name)"),
            ({'recipes': ['t.yaml']}, [], f"{grid}: run t-seed0: teacher cifar_resnet8x4 has no weights"),
            ({}, ['--parallel', '0'], '--parallel must be >= 1 (the runs at once on this machine), got 0')]:
        grid.write_text(yaml.safe_dump({'recipes': ['a.yaml'], 'output_dir': str(runs), **change}))
        assert main(['grid', str(grid), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists()


@pytest.mark.slow
def test_a_grid_over_a_pair_table_runs_pairs_x_methods_x_seeds(tmp_path, capsys):
    os.makedirs(tmp_path / 'methods')
    protocol = digits_config(tmp_path / 'unused', 'unused', epochs=1)
    for key in ('student', 'losses'):
        del protocol[key]
    del protocol['trainer']['run_name']
    (tmp_path / 'protocol.yaml').write_text(yaml.safe_dump(protocol))
    (tmp_path / 'teacher.yaml').write_text(yaml.safe_dump({'base': 'protocol.yaml', 'student': {'name': 'cifar_resnet14'},
                                                            'losses': {'ce': 1.0}}))
    (tmp_path / 'methods' / 'baseline.yaml').write_text(yaml.safe_dump({'teacher': None, 'losses': {'ce': 1.0}}))
    (tmp_path / 'methods' / 'kd.yaml').write_text(yaml.safe_dump({'losses': {'ce': 0.1, 'kd': 0.9}}))
    (tmp_path / 'pairs.yaml').write_text(yaml.safe_dump({'protocol': 'protocol.yaml', 'methods': 'methods', 'pairs': {
        'r14-r8': {'teacher': 'teacher.yaml', 'student': 'cifar_resnet8'},
        'r14-r14': {'teacher': 'teacher.yaml', 'student': 'cifar_resnet14', 'lr': 0.02, 'skip': ['kd']}}},
        sort_keys=False))
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'table': 'pairs.yaml', 'seeds': [0, 1], 'output_dir': str(tmp_path / 'runs')}))
    assert main(['grid', str(grid), '--dry-run']) == 0
    assert [line.split()[1].rsplit(os.sep, 1)[1] for line in capsys.readouterr().out.splitlines()] == [
        'r14-r8-baseline-seed0', 'r14-r8-baseline-seed1', 'r14-r8-kd-seed0', 'r14-r8-kd-seed1',
        'r14-r14-baseline-seed0', 'r14-r14-baseline-seed1']  # r14-r14 skips kd
    grid.write_text(yaml.safe_dump({'table': 'pairs.yaml', 'pairs': ['r14-r14'], 'methods': ['baseline'],
                                    'seeds': [1], 'output_dir': str(tmp_path / 'runs')}))
    assert main(['grid', str(grid)]) == 0  # a real process: distill train pairs.yaml --pair ... --method ...
    resolved = yaml.safe_load(open(tmp_path / 'runs' / 'r14-r14-baseline-seed1' / 'resolved.yaml'))
    assert (resolved['student']['name'], resolved['optimizer']['lr'], resolved['trainer']['seed']) == \
        ('cifar_resnet14', 0.02, 1) and resolved['teacher'] is None
    assert json.load(open(tmp_path / 'runs' / 'r14-r14-baseline-seed1' / 'summary.json'))['epochs'] == 1
    for change, message in [({'methods': ['kdd']}, "unknown method 'kdd' (did you mean 'kd'?)"),
                            ({'pairs': ['r14-r9']}, "unknown pair 'r14-r9' (did you mean 'r14-r8'?)"),
                            ({'recipes': ['*.yaml']}, "give either 'table' (pairs x methods) or 'recipes'"),
                            ({'tables': 'x'}, "unknown key 'tables' (did you mean 'table'?)")]:
        grid.write_text(yaml.safe_dump({'table': 'pairs.yaml', **change}))
        assert main(['grid', str(grid)]) == 2
        assert message in capsys.readouterr().err
