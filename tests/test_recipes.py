"""Every committed recipe parses and builds its teacher, student and loss terms (no training, no checkpoints)."""
import functools
import glob
import os

import pytest
import timm
import torch

import distill  # noqa: F401
from distill import Distiller, load_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = sorted(path for path in glob.glob(os.path.join(REPO, 'experiments', '**', '*.yaml'), recursive=True)
                 if not os.path.basename(path).endswith('base.yaml') and os.path.basename(path) != 'paper.yaml'
                 and not os.path.basename(path).startswith('grid'))


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


def test_the_committed_grid_plans_every_method_recipe():
    from distill.grid import plan
    runs = plan(os.path.join(REPO, 'experiments', 'cifar100', 'grid_resnet32x4-resnet8x4.yaml'))
    names = {os.path.basename(run_dir) for _, _, run_dir in runs}
    assert len(runs) == 3 * 23 and 'resnet32x4-resnet8x4-crd-kd-seed2' in names
    assert not any('teacher' in name for name in names)
