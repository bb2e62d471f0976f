"""Recipes, base inheritance, dotted overrides and the validation of every value."""
import os

import pytest
import yaml

from distill.config import load_config
from distill.errors import DistillError

REPO = os.path.join(os.path.dirname(__file__), '..')


@pytest.mark.parametrize('pair', ['resnet32x4-resnet8x4', 'vgg13-vgg8'])
def test_crd_recipes_resolve_to_the_crd_protocol(pair):
    cfg = load_config(os.path.join(REPO, 'experiments/cifar100/pairs.yaml'), pair=pair, method='kd')
    assert cfg.trainer.epochs == 240 and cfg.data.batch_size == 64 and cfg.data.name == 'cifar100'
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == \
        ('momentum', 0.05, 0.9, 5e-4)
    assert cfg.scheduler.milestones == [150, 180, 210] and cfg.scheduler.decay_rate == 0.1
    assert cfg.losses == {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}
    assert cfg.teacher.name.startswith('cifar_') and cfg.student.name.startswith('cifar_')


def test_overrides_and_base_inheritance(tmp_path):
    (tmp_path / 'base.yaml').write_text(yaml.safe_dump({'data': {'batch_size': 32}, 'losses': {'ce': 1.0, 'kd': 1.0}}))
    (tmp_path / 'child.yaml').write_text(yaml.safe_dump({'base': 'base.yaml', 'data': {'name': 'digits'},
                                                         'losses': {'ce': 1.0}}))
    cfg = load_config(str(tmp_path / 'child.yaml'), ['trainer.epochs=2', 'optimizer.lr=0.1', 'teacher=null',
                                                     'scheduler.milestones=[1, 2]', 'trainer.precision=bf16'])
    assert cfg.data.batch_size == 32 and cfg.data.name == 'digits'
    assert cfg.losses == {'ce': 1.0}  # a recipe's losses replace its base's
    assert cfg.trainer.epochs == 2 and cfg.optimizer.lr == 0.1 and cfg.teacher is None
    assert cfg.scheduler.milestones == [1, 2] and cfg.trainer.precision == 'bf16'
    assert cfg.trainer.run_name == 'child'


@pytest.mark.parametrize('override, message', [
    ('trainer.epoch=2', "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
    ('optimiser.lr=0.1', "unknown config key 'optimiser' (did you mean 'optimizer'?)"),
    ('data.batch_size=abc', "data.batch_size must be int, got 'abc'"),
    ('data.batch_size=0', 'data.batch_size must be > 0'),
    ('data.batch_size=-4', 'data.batch_size must be > 0'),
    ('trainer.precision=fp8', "trainer.precision must be one of ['fp32', 'bf16', 'fp16']"),
    ('wandb.mode=offlne', "did you mean 'offline'"),
    ('scheduler.milestones=5', 'scheduler.milestones must be a list'),
    ('trainer.epochs', 'must look like section.key=value'),
    ('data.auto_augment=randaug-m9', "'randaug' is not a timm augmentation (did you mean 'rand'?); start it with one "
                                     "of rand, augmix, original, originalr, v0, v0r, 3a"),
    ('data.auto_augment=rand-m9.5', "section 'm9.5' needs m<int>"),
    ('data.auto_augment=rand-inc2', "section 'inc2' needs inc<0|1>"),
    ('data.auto_augment=rand-tfoo', "section 'tfoo' needs t<weights|3aw|3a>"),  # timm: the default set, silently
    ('data.auto_augment=rand-m9-', "section '' is not an option of RandAugment"),
    ('data.auto_augment=augmix-m5-inc1', "section 'inc1' is not an option of AugMix; AugMix's sections are m<int>, "
                                         "w<int>, d<int>, a<float>, b<0|1>, mstd<float> (e.g. augmix-m5-w4-d2)"),
    ('data.auto_augment=original-m9', "section 'm9' is not an option of AutoAugment; AutoAugment's sections are "
                                      "mstd<float> (e.g. original-mstd0.5)"),
    ('teacher_cache.top_k=0', "teacher_cache.top_k must be > 0, got 0; set e.g. teacher_cache.top_k=10 (TinyViT's), "
                              "or null for every class"),
])
def test_bad_values_are_one_line_errors(tmp_path, override, message):
    (tmp_path / 'r.yaml').write_text('losses: {ce: 1.0}\n')
    with pytest.raises(DistillError) as info:
        load_config(str(tmp_path / 'r.yaml'), [override])
    assert message in str(info.value) and '\n' not in str(info.value)


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(DistillError, match='recipe not found'):
        load_config(str(tmp_path / 'nope.yaml'))
    (tmp_path / 'bad.yaml').write_text('data: [unclosed\n')
    with pytest.raises(DistillError, match='not valid YAML'):
        load_config(str(tmp_path / 'bad.yaml'))


@pytest.mark.parametrize('config', ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-p0.8-mmax12-inc0-tweights', 'rand-mstd101-t3aw',
                                    'augmix-m5-w4-d2-a1-b1-mstd0.5', 'original-mstd0.5', 'originalr', 'v0', 'v0r',
                                    '3a'])
def test_the_timm_augmentation_strings_that_are_accepted_build_in_timm(config):
    from distill.config.checks import check_auto_augment
    from distill.data.image_transforms import auto_augment_transform
    check_auto_augment(config)
    assert auto_augment_transform(config, 32, (0.5, 0.5, 0.5)) is not None
