"""Every committed recipe, and every run of the CIFAR-100 pair table, parses and builds its teacher, student and
loss terms (no training, no checkpoints); the pair table holds the reference code's per-pair exceptions."""
import functools
import glob
import os

import pytest
import timm
import torch
import yaml

import distill  # noqa: F401
from distill import Distiller, list_losses, load_config
from distill.cli import main
from distill.config.recipes import PairTable
from helpers import quick_sample

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CIFAR100 = os.path.join(REPO, 'experiments', 'cifar100')
TABLE = os.path.join(CIFAR100, 'pairs.yaml')
SKIPPED = ('base.yaml', 'paper.yaml', 'pairs.yaml')
RECIPES = sorted(path for path in glob.glob(os.path.join(REPO, 'experiments', '**', '*.yaml'), recursive=True)
                 if not os.path.basename(path).endswith(SKIPPED) and not os.path.basename(path).startswith('grid')
                 and os.sep + 'methods' + os.sep not in path)
TABLES = sorted(glob.glob(os.path.join(REPO, 'experiments', '**', 'pairs.yaml'), recursive=True))
TABLE_RUNS = [(table, pair, method) for table in TABLES for pair in PairTable(table).pairs
              for method in PairTable(table).methods(pair)]


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int, kwargs=()):
    """One instance per architecture: building a Distiller does not change the models' weights."""
    return timm.create_model(name, num_classes=num_classes, **dict(kwargs))


def _builds(cfg):
    num_classes = cfg.data.num_classes or 10
    student = _model(cfg.student.name, num_classes, tuple(sorted(cfg.student.kwargs.items())))
    teacher = _model(cfg.teacher.name, num_classes, tuple(sorted(cfg.teacher.kwargs.items()))) if cfg.teacher else None
    channels = 1 if cfg.data.name == 'mnist' else 3
    distiller = Distiller(teacher, student, cfg.losses, input_size=(channels, cfg.data.image_size,
                                                                    cfg.data.image_size),
                          train_targets=torch.arange(1000) % num_classes)
    assert set(distiller.loss_terms) == set(cfg.losses)


def test_recipes_exist_and_have_distinct_run_names():
    names = [load_config(path).trainer.run_name for path in RECIPES]
    names += [load_config(table, pair=pair, method=method).trainer.run_name for table, pair, method in TABLE_RUNS]
    assert len(RECIPES) >= 10 and len(TABLE_RUNS) >= 13 * 20 and len(set(names)) == len(names)


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(REPO, 'experiments')))
def test_recipe_builds_its_models_and_losses(path):
    _builds(load_config(path))


@pytest.mark.parametrize('table, pair, method', quick_sample(TABLE_RUNS, lambda run: run[::2], lambda run: run[:2]),
                         ids=[f'{os.path.basename(os.path.dirname(t))}-{p}-{m}' for t, p, m in TABLE_RUNS])
def test_pair_table_run_builds_its_models_and_losses(table, pair, method):
    _builds(load_config(table, pair=pair, method=method))


def test_every_pair_runs_every_method_with_the_reference_exceptions():
    """Each method file of experiments/cifar100/methods/ on each pair, on the pair's own models and the teacher its
    teacher recipe trains; FSP only where CRD reports it; lr 0.01 for MobileNetV2/ShuffleNet students; DKD's beta
    from the DKD paper (same-architecture pairs) and mdistiller's configs; SDD's scales from its run scripts;
    logit standardization's base temperature and weight from the names of the official logs."""
    table = PairTable(TABLE)
    methods = table.all_methods
    # deit trains a distilled DeiT's token: the CIFAR-100 students have none (its recipes: experiments/imagenet/deit)
    registered = {name for name, term in list_losses().items()
                  if term.requires_teacher and not name.startswith('test_') and term.student_head == 'logits'}
    assert registered <= set(methods), f'methods without a CIFAR-100 recipe: {sorted(registered - set(methods))}'
    same_architecture = {'resnet56-resnet20': 2, 'resnet110-resnet32': 2, 'resnet32x4-resnet8x4': 8,
                         'wrn_40_2-wrn_16_2': 6, 'wrn_40_2-wrn_40_1': 6, 'vgg13-vgg8': 6}
    other = {'vgg13-mobilenetv2': 6, 'resnet50-mobilenetv2': 8, 'resnet50-vgg8': 8, 'resnet32x4-shufflenetv1': 8,
             'resnet32x4-shufflenetv2': 8, 'wrn_40_2-shufflenetv1': 8}
    # logs/KD/kd,T,S,<T>,<weight>; logs/DKD/dkd,T,S,<T>,<weight>[,<beta>] (alpha = weight, beta x weight);
    # logs/MLKD/mlkd,T,S,2,<weight>
    kd_ls = {'vgg13-vgg8': (3, 9), 'vgg13-mobilenetv2': (3, 9), 'resnet50-mobilenetv2': (3, 1)}
    dkd_ls = {'resnet56-resnet20': (3, 18, 2), 'resnet110-resnet32': (2, 15, 2), 'wrn_40_2-wrn_16_2': (2, 12, 2),
              'wrn_40_2-wrn_40_1': (2, 12, 2), 'vgg13-vgg8': (2, 15, 2), 'resnet50-mobilenetv2': (2, 15, 2),
              'vgg13-mobilenetv2': (3, 9, 2)}
    mlkd_ls = {'vgg13-vgg8': 6, 'vgg13-mobilenetv2': 6, 'resnet32x4-shufflenetv2': 6}
    assert set(table.pairs) == set(same_architecture) | set(other)
    for pair, beta in {**same_architecture, **other}.items():
        teacher, student = pair.split('-')
        with_fsp = pair in same_architecture and pair != 'wrn_40_2-wrn_40_1'
        assert table.methods(pair) == [m for m in methods if m != 'fsp' or with_fsp]
        for method in table.methods(pair):
            cfg = load_config(TABLE, pair=pair, method=method)
            assert cfg.student.name == f'cifar_{student}' and cfg.trainer.run_name.startswith(pair)
            assert cfg.optimizer.lr == (0.01 if student.startswith(('mobilenet', 'shufflenet')) else 0.05)
            assert (cfg.trainer.epochs, cfg.data.batch_size) == (240, 64)
            if method == 'baseline':
                assert cfg.teacher is None and cfg.losses == {'ce': 1.0}
                continue
            assert cfg.teacher.name == f'cifar_{teacher}' == load_config(cfg.teacher.recipe).student.name
            expected = load_config(os.path.join(CIFAR100, 'methods', f'{method}.yaml')).losses
            if method in ('dkd', 'sdd'):
                expected[method] = {**expected[method], 'beta': beta}
            if method == 'sdd' and pair in ('resnet32x4-resnet8x4', 'vgg13-vgg8'):
                expected[method]['scales'] = [1, 2]
            if method == 'kd_ls':
                temperature, weight = kd_ls.get(pair, (2, 9))
                expected['kd'] = {**expected['kd'], 'temperature': temperature, 'weight': weight}
            if method == 'dkd_ls':
                temperature, weight, dkd_beta = dkd_ls.get(pair, (2, 9, 8))
                expected['dkd'] = {**expected['dkd'], 'temperature': temperature, 'alpha': weight,
                                   'beta': dkd_beta * weight}
            if method == 'mlkd_ls':
                expected['mlkd'] = {**expected['mlkd'], 'kd_weight': mlkd_ls.get(pair, 9)}
            assert cfg.losses == expected, (pair, method)


@pytest.mark.parametrize('grid, pairs', [('grid.yaml', 12), ('grid_resnet32x4-resnet8x4.yaml', 1)])
def test_the_committed_grids_plan_pairs_x_methods_x_seeds(grid, pairs):
    from distill.sweeps.grid import plan
    runs = plan(os.path.join(CIFAR100, grid))
    names = {os.path.basename(run.run_dir.path) for run in runs}
    expected = [(p, m) for t, p, m in TABLE_RUNS if t == TABLE and (pairs == 12 or p == 'resnet32x4-resnet8x4')]
    assert len(runs) == len(names) == 3 * len(expected) and 'resnet32x4-resnet8x4-crd-kd-seed2' in names
    assert not any('teacher' in name for name in names)


@pytest.mark.parametrize('args, message', [
    ([], "pairs.yaml is a pair table: choose --pair (one of resnet56-resnet20, "),
    (['--pair', 'resnet32x4-resnet8x', '--method', 'kd'], "unknown pair 'resnet32x4-resnet8x' in "),
    (['--pair', 'resnet32x4-resnet8x4'], "choose --method: one of ab, at, baseline, "),
    (['--pair', 'resnet32x4-resnet8x4', '--method', 'dkdd'], "choose --method (did you mean 'dkd'?): one of"),
    (['--pair', 'wrn_40_2-wrn_40_1', '--method', 'fsp'], "pair wrn_40_2-wrn_40_1 does not run fsp"),
])
def test_a_wrong_pair_table_selection_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(['train', TABLE, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_pair_table_mistakes_are_one_line(tmp_path, capsys):
    recipe = os.path.join(CIFAR100, 'teachers', 'vgg13.yaml')
    assert main(['train', recipe, '--pair', 'vgg13-vgg8']) == 2
    assert 'is a plain recipe (drop them)' in capsys.readouterr().err
    table = {'protocol': '../crd_base.yaml', 'methods': os.path.join(CIFAR100, 'methods'),
             'pairs': {'a-b': {'teacher': os.path.join(CIFAR100, 'teachers', 'vgg13.yaml'), 'student': 'cifar_vgg8'}}}
    for change, message in [({'pairs': {'a-b': {'teacher': 't.yaml', 'studnet': 'x'}}}, "needs 'teacher'"),
                            ({'pairs': {'a-b': {**table['pairs']['a-b'], 'skips': ['fsp']}}},
                             "unknown key 'a-b.skips' (did you mean 'skip'?)"),
                            ({'pairs': {'a-b': {**table['pairs']['a-b'], 'skip': ['fspp']}}},
                             "names unknown method 'fspp' (did you mean 'fsp'?)"),
                            ({'method': 'methods'}, "unknown key 'method' (did you mean 'methods'?)"),
                            ({'methods': 'none'}, 'holds no <method>.yaml')]:
        path = tmp_path / 'pairs.yaml'
        path.write_text(yaml.safe_dump({**table, **change}))
        assert main(['train', str(path), '--pair', 'a-b', '--method', 'kd']) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
