"""Every committed recipe parses and builds its teacher, student and loss terms (no training, no checkpoints)."""
import functools
import glob
import os

import pytest
import timm
import torch

import distill  # noqa: F401
from distill import Distiller, list_losses, load_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = sorted(path for path in glob.glob(os.path.join(REPO, 'experiments', '**', '*.yaml'), recursive=True)
                 if not os.path.basename(path).endswith('base.yaml') and os.path.basename(path) != 'paper.yaml'
                 and not os.path.basename(path).startswith('grid') and os.sep + 'methods' + os.sep not in path)


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int):
    """One instance per architecture: building a Distiller does not change the models' weights."""
    return timm.create_model(name, num_classes=num_classes)


def test_recipes_exist_and_have_distinct_run_names():
    names = [load_config(path).trainer.run_name for path in RECIPES]
    assert len(RECIPES) >= 20 and len(set(names)) == len(names)


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(REPO, 'experiments')))
def test_recipe_builds_its_models_and_losses(path):
    cfg = load_config(path)
    num_classes = cfg.data.num_classes or 10
    assert not cfg.student.kwargs and not (cfg.teacher and cfg.teacher.kwargs)
    student = _model(cfg.student.name, num_classes)
    teacher = _model(cfg.teacher.name, num_classes) if cfg.teacher else None
    distiller = Distiller(teacher, student, cfg.losses, input_size=(3, cfg.data.image_size, cfg.data.image_size),
                          train_targets=torch.arange(1000) % num_classes)
    assert set(distiller.loss_terms) == set(cfg.losses)


def test_every_same_architecture_pair_has_a_recipe_per_method_on_its_own_models():
    """The CRD/DKD same-architecture pairs: each method file of experiments/cifar100/methods/ applied to each pair's
    kd.yaml (FSP is absent for wrn_40_2 -> wrn_40_1, as in CRD Table 1); DKD's beta follows the DKD paper."""
    cifar = os.path.join(REPO, 'experiments', 'cifar100')
    methods = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(cifar, 'methods', '*.yaml')))
    registered = {name for name, term in list_losses().items() if term.requires_teacher and not name.startswith('test_')}
    assert registered <= set(methods), f'methods without a CIFAR-100 recipe: {sorted(registered - set(methods))}'
    betas = {'resnet32x4-resnet8x4': 8, 'resnet56-resnet20': 2, 'resnet110-resnet32': 2, 'wrn_40_2-wrn_16_2': 6,
             'wrn_40_2-wrn_40_1': 6, 'vgg13-vgg8': 6}
    for pair, beta in betas.items():
        teacher, student = ('cifar_' + name for name in pair.split('-'))
        for method in methods:
            path = os.path.join(cifar, pair, f'{method}.yaml')
            if method == 'fsp' and pair == 'wrn_40_2-wrn_40_1':
                assert not os.path.exists(path)
                continue
            cfg = load_config(path)
            assert (cfg.student.name, cfg.teacher.name) == (student, teacher), path
            if method not in ('dkd', 'sdd'):  # their DKD beta (and SDD's scales) are set per pair
                shared = load_config(os.path.join(cifar, 'methods', f'{method}.yaml'))
                assert cfg.losses == shared.losses, path
        assert load_config(os.path.join(cifar, pair, 'dkd.yaml')).losses['dkd']['beta'] == beta


def test_the_committed_grid_plans_every_method_recipe():
    from distill.grid import plan
    runs = plan(os.path.join(REPO, 'experiments', 'cifar100', 'grid_resnet32x4-resnet8x4.yaml'))
    names = {os.path.basename(run_dir) for _, _, run_dir in runs}
    pair_recipes = glob.glob(os.path.join(REPO, 'experiments', 'cifar100', 'resnet32x4-resnet8x4', '*.yaml'))
    assert len(runs) == 3 * (len(pair_recipes) - 1) and 'resnet32x4-resnet8x4-crd-kd-seed2' in names
    assert not any('teacher' in name for name in names)
