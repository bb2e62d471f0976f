"""`distill grid`: recipes x seeds as processes; finished runs are skipped, interrupted ones resumed."""
import json
import os

import yaml

from distill.cli import main
from helpers import digits_config


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
    runs = sorted(os.listdir(tmp_path / 'runs'))
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
