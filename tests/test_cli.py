"""The command line: train/eval on real digits, and every user mistake as one stderr line with exit code 2."""
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

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


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory):
    """A cifar_resnet8x4 teacher for the digits' 10 classes (its weights do not matter to these checks, but a recipe
    needs some: a teacher without weights is refused)."""
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), path)
    return str(path)


@pytest.mark.parametrize('overrides, fragment', [
    (['losses.fitnet.student_layer=9'], 'feature tap 9 is out of range: CifarResNet has 4 stages'),
    (['losses.fitnet.student_layer=layer7'], "feature tap 'layer7' is not a module of CifarResNet (did you mean 'layer3'?)"),
    (['losses.at.p=x'], "losses.at.p must be float, got 'x'"),
    (['losses.crd.negatives=1.5'], 'losses.crd.negatives must be int, got 1.5'),
    (['losses.kd.logit_standardization=3'], 'losses.kd.logit_standardization must be bool, got 3'),
    (['losses.dkd.temprature=4'], "unknown option losses.dkd.temprature (did you mean 'temperature'?)"),
    (['losses.fitnet.weight=abc'], "losses.fitnet: weight must be a number, got 'abc'"),
])
def test_bad_method_options(tmp_path, capsys, teacher_checkpoint, overrides, fragment):
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    _expect_error(capsys, ['train', recipe, 'teacher.name=cifar_resnet8x4', f'teacher.checkpoint={teacher_checkpoint}',
                           *overrides], fragment)
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').rglob('*.pt'))


def test_methods_lists_every_registered_method(capsys):
    assert main(['methods']) == 0
    out = capsys.readouterr().out
    for name, cls in distill.list_losses().items():
        if not name.startswith('test_'):
            assert f'| {name} | {cls.paper} | {cls.default_weight:g} |' in out
    assert '| crd | Tian et al., ICLR 2020 | 0.8 | embed_dim=128, negatives=16384' in out
    assert '| class labels, per-sample state, sample indices, teacher features | any |' in out  # crd
    assert '| temperature=4.0, logit_standardization=False | teacher logits | any |' in out  # kd


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
    (['trainer.grad_clip=-1'], 'trainer.grad_clip must be > 0, got -1'),
    (['optimizer.lr=nan'], 'optimizer.lr must be a finite number, got nan'),
    (['optimizer.lr=inf'], 'optimizer.lr must be a finite number, got inf'),
    (['trainer.seed=-1'], 'trainer.seed must be >= 0, got -1'),
    (['trainer.device=mps'], 'trainer.device=mps is not available on this machine'),
    (['data.mean=[0.5, 0.5]', 'data.std=[0.5, 0.5]'], 'data.mean needs one value per image channel (3 for RGB, 1 for grey)'),
    (['student.name=vit_tiny_patch16_224', 'data.image_size=32'],
     'student vit_tiny_patch16_224 cannot take 32x32 images (AssertionError'),
    (['teacher.name=cifar_resnet8x4', 'losses.kd=0.9'], 'teacher cifar_resnet8x4 has no weights (no '
     'teacher.checkpoint, teacher.pretrained=false, no teacher.recipe): it would be a random teacher; set '
     "teacher.checkpoint=<weights file>, teacher.pretrained=true (the name's own weights) or teacher.recipe=<recipe "
     "that trains it>"),
    (['teacher.name=hf-hub:timm/resnet18.a1_in1k', 'losses.kd=0.9'], 'teacher hf-hub:timm/resnet18.a1_in1k has no '
     'weights'),
    (['teacher.name=local-dir:/some/folder', 'losses.kd=0.9'], 'teacher local-dir:/some/folder has no weights'),
    (['student.name=hf-hub:'], "student.name 'hf-hub:': Model name 'hf-hub:' has no model id"),  # not a mapping
    (['trainer.accumulate_steps=0'], 'trainer.accumulate_steps must be > 0, got 0; set e.g. '
     'trainer.accumulate_steps=1 (no accumulation)'),
    (['data.in_memory=false', 'data.name=imagefolder', 'data.auto_augment=rand-zz'],
     "data.auto_augment='rand-zz': section 'zz' is not an option of RandAugment; RandAugment's sections are m<int>, "
     "n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>, t<weights|3aw|3a> (e.g. rand-m9-mstd0.5-inc1)"),
    (['data.in_memory=false', 'data.name=imagefolder', 'data.auto_augment=rand-m9-mstd0.5-incl'],
     "section 'incl' is not an option of RandAugment (did you mean 'inc'?)"),
    (['data.in_memory=false', 'data.name=imagefolder', 'data.workers=-1'], 'data.workers must be >= 0, got -1'),
    (['data.in_memory=false', 'data.name=imagefolder', 'data.eval_crop_pct=0'],
     'data.eval_crop_pct must be in (0, 1], got 0.0'),
])
def test_bad_train_inputs(tmp_path, capsys, overrides, fragment):
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    _expect_error(capsys, ['train', recipe, *overrides], fragment)
    assert not (tmp_path / 'runs').exists()  # nothing created


def test_an_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('not a folder')
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'file' / 'runs', epochs=1))
    _expect_error(capsys, ['train', recipe], f"{tmp_path / 'file'} is a file; set trainer.output_dir")


def kd_recipe(tmp_path, num_classes, **sections):
    """A 1-epoch KD recipe on digits (or ``sections``' data) from a random cifar_resnet8x4 saved as a checkpoint."""
    teacher = tmp_path / 'teacher.pth'
    torch.save(timm.create_model('cifar_resnet8x4', num_classes=num_classes).state_dict(), teacher)
    return write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1, losses={'ce': 0.1, 'kd': 0.9},
                                                           teacher={'name': 'cifar_resnet8x4',
                                                                    'checkpoint': str(teacher)}, **sections))


@pytest.mark.parametrize('mode', ['views', 'record'])
def test_a_teacher_cache_dir_under_a_file_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, mode):
    """The logits table (in-memory views) and a recording (streamed, written at the first epoch's end): both
    refused before the run starts."""
    from helpers import image_folder
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path / 'cache'))
    (tmp_path / 'file').write_text('not a folder')
    streamed = {'name': 'imagefolder', 'root': image_folder(tmp_path / 'images', per_class=4), 'in_memory': False,
                'workers': 0, 'image_size': 32, 'augment': 'random_resized_crop'}
    recipe = kd_recipe(tmp_path, 3 if mode == 'record' else 10, data=streamed if mode == 'record' else {},
                       teacher_cache={'enabled': True, 'mode': mode, 'dir': str(tmp_path / 'file' / 'sub')})
    folder = tmp_path / 'file'
    _expect_error(capsys, ['train', recipe], f"cannot create teacher cache folder {folder / 'sub'}: {folder} is a "
                                             f"file; set teacher_cache.dir to a writable folder")
    assert not (tmp_path / 'runs').exists()


@pytest.mark.slow
@pytest.mark.parametrize('overrides, line', [
    (['data.in_memory=false', 'data.name=imagefolder', 'data.workers=-1'],
     'data.workers must be >= 0, got -1 (the decoding processes of streamed data; 0 decodes in the training process)'),
    (['data.in_memory=false', 'data.name=imagefolder', 'data.eval_crop_pct=0'],
     "data.eval_crop_pct must be in (0, 1], got 0.0 (the centre crop's share of the resized validation image; timm's "
     "default 0.875)"),
    (['teacher_cache.enabled=true', 'teacher_cache.dir={tmp}/file/sub'],
     'cannot create teacher cache folder {tmp}/file/sub: {tmp}/file is a file; set teacher_cache.dir to a writable '
     'folder'),
])
def test_bad_inputs_in_a_real_process_are_one_line_and_write_nothing(tmp_path, overrides, line):
    (tmp_path / 'file').write_text('not a folder')
    recipe = kd_recipe(tmp_path, 10)
    result = subprocess.run([sys.executable, '-m', 'distill', 'train', recipe,
                             *(item.format(tmp=tmp_path) for item in overrides)], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, DISTILL_CACHE=str(tmp_path / 'cache')))
    expected = [f"distill: error: {line.format(tmp=tmp_path)}"]
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, expected)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_eval_rebuilds_the_student_of_its_recipe_and_the_export_follows_the_umask(tmp_path, capsys, umask):
    """A ViT trained with student.kwargs (a 32 px input, 4 px patches) is evaluated from its checkpoint with those
    kwargs; the exported student/ folder and its files get the modes the user's umask gives."""
    student = {'name': 'vit_tiny_patch16_224', 'kwargs': {'img_size': 32, 'patch_size': 4, 'depth': 1}}
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1, student=student, data={
        'image_size': 32, 'train_per_class': 5, 'val_per_class': 5}))
    previous = os.umask(umask)
    try:
        assert main(['train', recipe, '--quiet']) == 0
    finally:
        os.umask(previous)
    run = tmp_path / 'runs' / 'run'
    assert oct((run / 'student').stat().st_mode & 0o777) == oct(0o777 & ~umask)
    for path in (run / 'student').iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
    best = json.load(open(run / 'summary.json'))['best_top1']
    capsys.readouterr()
    assert main(['eval', str(run / 'checkpoints' / 'best.pt')]) == 0
    assert f"vit_tiny_patch16_224 on digits (50 images): top-1 {best:.2f}" in capsys.readouterr().out


def _tree(root, files):
    """An ImageFolder tree: ``files`` maps 'split/class/name' to bytes (or None for a real 8x8 JPEG)."""
    import numpy as np
    from PIL import Image
    pixels = np.random.RandomState(0)
    for name, payload in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if payload is None:
            Image.fromarray(pixels.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(payload)
    return str(root)


@pytest.mark.parametrize('broken', [b'not an image', None])
def test_a_bad_image_file_is_named_and_can_be_skipped(tmp_path, capsys, monkeypatch, broken):
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path / 'cache'))
    good = {f'{split}/{cls}/{i}.jpg': None for split in ('train', 'val') for cls in 'ab' for i in range(3)}
    root = _tree(tmp_path / 'images', good)
    bad = tmp_path / 'images' / 'train' / 'b' / 'bad.jpg'
    if broken is None:  # a truncated JPEG: its first 100 bytes
        bad.write_bytes((tmp_path / 'images' / 'train' / 'b' / '0.jpg').read_bytes()[:100])
    else:
        bad.write_bytes(broken)
    data = {'name': 'imagefolder', 'root': root, 'image_size': 8}
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1, data=data))
    _expect_error(capsys, ['train', recipe], f'{bad} is not a readable image')
    assert not (tmp_path / 'runs').exists()
    assert main(['train', recipe, 'data.skip_bad_images=true', '--quiet']) == 0
    assert 'left out 1 unreadable image files' in capsys.readouterr().out


def test_an_empty_class_folder_is_refused_unless_allowed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path / 'cache'))
    root = _tree(tmp_path / 'images', {f'{split}/{cls}/{i}.jpg': None for split in ('train', 'val') for cls in 'ab'
                                       for i in range(2)})
    (tmp_path / 'images' / 'train' / 'c').mkdir()
    (tmp_path / 'images' / 'val' / 'c').mkdir()
    data = {'name': 'imagefolder', 'root': root, 'image_size': 8}
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1, data=data))
    _expect_error(capsys, ['train', recipe], 'holds no images')
    assert main(['train', recipe, 'data.allow_empty_classes=true', '--quiet']) == 0


def test_invalid_yaml_in_grid_and_paper_files_is_one_line(tmp_path, capsys):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('recipes: [a.yaml\nseeds: {')
    _expect_error(capsys, ['grid', str(broken)], 'is not valid YAML')
    (tmp_path / 'runs').mkdir()
    _expect_error(capsys, ['table', str(tmp_path / 'runs'), '--paper', str(broken)], 'is not valid YAML')


def test_extract_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    _expect_error(capsys, ['extract', '--model', 'cifar_resnet8', '--data', 'digits', '--image-size', '8',
                           '--out', str(tmp_path / 'file' / 'f.safetensors')], 'cannot write')


def test_a_base_cycle_is_one_line(tmp_path, capsys):
    (tmp_path / 'a.yaml').write_text('base: b.yaml\ntrainer: {epochs: 1}\n')
    (tmp_path / 'b.yaml').write_text('base: [a.yaml]\n')
    _expect_error(capsys, ['train', str(tmp_path / 'a.yaml')], 'includes itself through base: (')


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
                  f'checkpoint {broken} is corrupt or truncated')
    _expect_error(capsys, ['eval', str(broken)], f'checkpoint {broken} is corrupt or truncated')  # not "--data"
    pickled = tmp_path / 'pickled.pt'
    torch.save({'model': {'w': torch.ones(1)}, 'payload': SimpleNamespace()}, pickled)  # a pickled object
    _expect_error(capsys, ['eval', str(pickled), '--model', 'cifar_resnet8', '--data', 'digits'],
                  'was refused: it is not a plain weights file')
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


INTERRUPT_DURING_IMPORT = """
import os, signal, sys, threading
sys.argv[0] = {argv0!r}
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # torch alone takes longer to import
import distill
print('imported')
"""


@pytest.mark.parametrize('argv0, code, stderr', [
    ('distill', 130, ['distill: interrupted while starting; nothing was written']),  # the console script
    ('-m', 130, ['distill: interrupted while starting; nothing was written']),  # python -m distill
])
def test_ctrl_c_while_the_command_starts_is_one_line(argv0, code, stderr):
    import signal
    # as from a terminal: Ctrl-C not ignored (a test runner started in the background passes SIG_IGN on)
    result = subprocess.run([sys.executable, '-c', INTERRUPT_DURING_IMPORT.format(argv0=argv0)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (result.returncode, result.stderr.strip().splitlines(), result.stdout) == (code, stderr, '')


def test_a_python_session_importing_the_package_keeps_pythons_ctrl_c():
    """Only the command installs the start-up handler (a session's Ctrl-C stays a KeyboardInterrupt)."""
    from distill import _startup
    assert not _startup.GUARDED and not _startup._started_as_command()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path):
    """A file-size limit (as `ulimit -f`) below a checkpoint's size: exit 2 naming the file, the previous last.pt
    intact and no temporary left; with space again, --resume finishes the run."""
    import resource
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(tmp_path / 'runs', epochs=1))
    command = [sys.executable, '-m', 'distill', 'train', recipe, '--quiet']
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    checkpoints = tmp_path / 'runs' / 'run' / 'checkpoints'
    before = tree_digest(checkpoints)
    limit = os.path.getsize(checkpoints / 'last.pt') // 2  # the logs fit, a checkpoint does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = subprocess.run(command + ['trainer.epochs=2', '--resume'], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=limited)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"distill: error: could not write {checkpoints}{os.sep}") and 'the last checkpoint' in line
    assert tree_digest(checkpoints) == before and not list(checkpoints.glob('*.tmp'))
    assert subprocess.run(command + ['trainer.epochs=2', '--resume'], cwd=REPO, capture_output=True).returncode == 0
    assert json.load(open(tmp_path / 'runs' / 'run' / 'summary.json'))['epochs'] == 2


@pytest.mark.slow
@pytest.mark.parametrize('key', [None, 'a' * 40])
def test_strict_wandb_without_a_server_exits_before_anything_is_written(tmp_path, key):
    pytest.importorskip('wandb')
    recipe = write_recipe(tmp_path / 'r.yaml', digits_config(
        tmp_path / 'runs', epochs=1, wandb={'mode': 'online', 'strict': True, 'init_timeout': 3}))
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(HOME=str(tmp_path / 'home'), WANDB_BASE_URL='http://127.0.0.1:9')  # no ~/.netrc key; no server
    if key:
        env['WANDB_API_KEY'] = key
    result = subprocess.run([sys.executable, '-m', 'distill', 'train', recipe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('distill: error: W&B is unreachable (') and 'wandb.strict=true' in line
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'wandb').exists()
