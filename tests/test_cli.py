"""The command line: train/eval on real digits, and every user mistake as one stderr line with exit code 2."""
import hashlib
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml

import distill  # noqa: F401
from distill.cli import main
from helpers import digits_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def write_recipe(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def tree_digest(root):
    """Hash of every file under ``root``: proves a failed command damaged nothing."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            digest.update(name.encode())
            digest.update(open(os.path.join(folder, name), 'rb').read())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """One finished 2-epoch digits run and its recipe."""
    root = tmp_path_factory.mktemp('cli')
    recipe = write_recipe(root / 'recipe.yaml', digits_config(root / 'runs', 'base', epochs=2))
    assert main(['train', recipe, '--quiet']) == 0
    return root, recipe


@pytest.mark.slow
def test_eval_reproduces_the_runs_final_accuracy(finished_run, capsys):
    root, _ = finished_run
    summary = yaml.safe_load(open(root / 'runs' / 'base' / 'summary.json'))
    assert main(['eval', str(root / 'runs' / 'base' / 'checkpoints' / 'last.pt')]) == 0
    assert f"top-1 {summary['last_top1']:.2f}" in capsys.readouterr().out
    # safetensors export + explicit model and data
    assert main(['eval', str(root / 'runs' / 'base' / 'student_last.safetensors'), '--model', 'cifar_resnet8',
                 '--data', 'digits']) == 0
    out = capsys.readouterr().out
    assert 'cifar_resnet8 on digits (359 images)' in out


def _expect_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('distill: error: ') and err.count('\n') == 1, err
    assert fragment in err and 'Traceback' not in err, err
    return err


@pytest.mark.parametrize('overrides, fragment', [
    (['losses.fitnet.student_layer=9'], 'feature tap 9 is out of range: CifarResNet has 4 stages'),
    (['losses.fitnet.student_layer=layer7'], "feature tap 'layer7' is not a module of CifarResNet (did you mean 'layer3'?)"),
    (['losses.at.p=x'], "losses.at.p must be float, got 'x'"),
    (['losses.crd.negatives=1.5'], 'losses.crd.negatives must be int, got 1.5'),
    (['losses.kd.logit_standardization=3'], 'losses.kd.logit_standardization must be bool, got 3'),
    (['losses.dkd.temprature=4'], "unknown option losses.dkd.temprature (did you mean 'temperature'?)"),
    (['losses.fitnet.weight=abc'], "losses.fitnet: weight must be a number, got 'abc'"),
])
def test_bad_method_options(tmp_path, capsys, overrides, fragment):
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    _expect_error(capsys, ['train', recipe, 'teacher.name=cifar_resnet8x4', *overrides], fragment)
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').rglob('*.pt'))


def test_methods_lists_every_registered_method(capsys):
    assert main(['methods']) == 0
    out = capsys.readouterr().out
    for name, cls in distill.list_losses().items():
        if not name.startswith('test_'):
            assert f'| {name} | {cls.paper} | {cls.default_weight:g} |' in out
    assert '| crd | Tian et al., ICLR 2020 | 0.8 | embed_dim=128, negatives=16384' in out
    assert 'teacher, features, adapters, indices, labels |' in out


@pytest.mark.parametrize('overrides, fragment', [
    (['trainer.epoch=3'], "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
    (['optimizer.lr=fast'], "optimizer.lr must be float, got 'fast'"),
    (['student.name=cifar_resnet8x5'], "unknown model 'cifar_resnet8x5' for student.name (did you mean 'cifar_resnet8x4'?)"),
    (['data.batch_size=0'], 'data.batch_size must be > 0'),
    (['data.batch_size=-1'], 'data.batch_size must be > 0'),
    (['trainer.precision=fp16'], 'trainer.precision=fp16 needs a CUDA device'),
    (['data.name=imagefolder', 'data.root=/nonexistent/images'], 'data directory not found: /nonexistent/images'),
    (['teacher.name=cifar_resnet8x4', 'teacher.checkpoint=/nonexistent/t.pth', 'losses.kd=0.9'],
     'teacher.checkpoint not found: /nonexistent/t.pth'),
    (['losses.kd=0.9'], "loss terms ['kd'] need a teacher"),
    (['losses.kdd=0.9'], "unknown loss 'kdd' (did you mean 'kd'?)"),
    (['data.num_classes=100'], 'data.num_classes=100 but digits'),
    (['optimizer.name=sgdd'], "unknown optimizer.name 'sgdd' (did you mean 'sgd'?)"),
    (['student.checkpoint=/nonexistent/w.safetensors'], 'student.checkpoint not found: /nonexistent/w.safetensors'),
    (['transfer.freeze=linear'], "transfer.freeze must be one of ['full', 'partial', 'linear_probe']"),
    (['transfer.freeze=partial', 'transfer.frozen_stages=4'], 'transfer.frozen_stages=4 but CifarResNet has 3 stages'),
    (['transfer.init_from=/nonexistent/t.pt'], 'transfer.init_from not found: /nonexistent/t.pt'),
    (['data.classes=[cat]'], "data.classes ['cat'] not in digits"),
])
def test_bad_train_inputs(tmp_path, capsys, overrides, fragment):
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    _expect_error(capsys, ['train', recipe, *overrides], fragment)


def test_teacher_with_the_wrong_class_count_is_refused(tmp_path, capsys):
    path = tmp_path / 'ckpt_epoch_240.pth'
    torch.save({'model': timm.create_model('cifar_resnet8x4', num_classes=100).state_dict()}, path)
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(
        tmp_path / 'runs', epochs=1, teacher={'name': 'cifar_resnet8x4', 'checkpoint': str(path)},
        losses={'ce': 0.1, 'kd': 0.9}))
    _expect_error(capsys, ['train', recipe], 'classifier has 100 classes but the data has 10')


@pytest.mark.slow
def test_resume_errors_leave_the_run_untouched(finished_run, capsys):
    root, recipe = finished_run
    run_dir = root / 'runs' / 'base'
    before = tree_digest(run_dir)
    _expect_error(capsys, ['train', recipe], 'already holds a run; add --resume')
    _expect_error(capsys, ['train', recipe, '--resume', 'optimizer.lr=0.2'],
                  "config differs from the run's (optimizer.lr: 0.05 -> 0.2)")
    _expect_error(capsys, ['train', recipe, '--resume', 'trainer.run_name=other'], 'nothing to resume')
    assert tree_digest(run_dir) == before


@pytest.mark.slow
def test_corrupt_checkpoints_are_one_line_errors(finished_run, tmp_path, capsys):
    root, recipe = finished_run
    broken = tmp_path / 'broken.pt'
    broken.write_bytes(open(root / 'runs' / 'base' / 'checkpoints' / 'last.pt', 'rb').read()[:5000])
    _expect_error(capsys, ['eval', str(broken), '--model', 'cifar_resnet8', '--data', 'digits'],
                  'corrupt, truncated or not a checkpoint')
    _expect_error(capsys, ['eval', str(tmp_path / 'missing.pt'), '--model', 'cifar_resnet8', '--data', 'digits'],
                  'checkpoint not found')
    _expect_error(capsys, ['eval', str(root / 'runs' / 'base' / 'student_last.safetensors'), '--data', 'digits'],
                  '--model NAME is required')


@pytest.mark.slow
def test_real_process_exit_code_and_clean_stderr(tmp_path):
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    result = subprocess.run([sys.executable, '-m', 'distill', 'train', recipe, 'data.batch_size=0'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ['distill: error: data.batch_size must be > 0, got 0; set e.g. '
                                                  'data.batch_size=64']
    assert not (tmp_path / 'runs').exists()
