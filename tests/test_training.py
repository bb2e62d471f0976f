"""Real (short) training runs on scikit-learn's digits: determinism, exact resume after a kill, atomic
checkpoints, exports, W&B offline files, NaN stops, precision settings, and KD beating the baseline."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import distill  # noqa: F401
from distill.runs.checkpoint import load_checkpoint
from distill.config import from_dict
from distill.tools.demo import run_demo
from distill.errors import DistillError
from distill.losses import LossTerm, register_loss
from distill.training.trainer import Trainer
from helpers import digits_config, strip_times

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def make_teacher_weights(path):
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), str(path))
    return str(path)


@pytest.mark.slow
def test_fixed_seed_gives_bit_identical_metrics_and_all_run_files(tmp_path):
    summaries = [Trainer(from_dict(digits_config(tmp_path, f'run{i}', epochs=2)), quiet=True).fit() for i in range(2)]
    first, second = (read_metrics(tmp_path / f'run{i}') for i in range(2))
    assert strip_times(first) == strip_times(second)
    assert len(first) == 2 and {'lr', 'train_loss', 'train_ce', 'val_top1', 'val_top5'} <= set(first[0])
    summary = json.load(open(tmp_path / 'run0' / 'summary.json'))
    assert summary['best_top1'] == max(r['val_top1'] for r in first) == summaries[0]['best_top1']
    assert summary['last_top1'] == first[-1]['val_top1'] and summary['epochs'] == 2
    resolved = yaml.safe_load(open(tmp_path / 'run0' / 'resolved.yaml'))
    assert resolved['trainer']['epochs'] == 2 and resolved['student']['name'] == 'cifar_resnet8'
    # exported safetensors hold the student exactly as in the checkpoints
    last = load_checkpoint(str(tmp_path / 'run0' / 'checkpoints' / 'last.pt'))
    exported = load_file(str(tmp_path / 'run0' / 'student_last.safetensors'))
    assert exported.keys() == last['model'].keys()
    assert all(torch.equal(exported[k], last['model'][k]) for k in exported)
    assert load_checkpoint(str(tmp_path / 'run0' / 'checkpoints' / 'best.pt'))['epoch'] == summary['best_epoch']
    # the checkpoint holds every state a resume needs
    assert {'optimizer', 'scheduler', 'scaler', 'epoch', 'rng', 'data_generator', 'config'} <= set(last)
    assert {'torch', 'numpy', 'python'} <= set(last['rng'])


def test_existing_run_is_never_overwritten(tmp_path):
    Trainer(from_dict(digits_config(tmp_path, epochs=1)), quiet=True).fit()
    before = open(tmp_path / 'run' / 'checkpoints' / 'last.pt', 'rb').read()
    with pytest.raises(DistillError, match='already holds a run; add --resume'):
        Trainer(from_dict(digits_config(tmp_path, epochs=1)), quiet=True)
    assert open(tmp_path / 'run' / 'checkpoints' / 'last.pt', 'rb').read() == before


def _write_recipe(tmp_path, cfg):
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _distill(*args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'distill', *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_kill_and_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    """A KD run is SIGKILLed after its second epoch, resumed with --resume, and must end with the same
    metrics, history and weights as the same run done in one go."""
    teacher = make_teacher_weights(tmp_path / 'teacher.safetensors')
    epochs = 6
    common = dict(teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher},
                  losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}},
                  scheduler={'name': 'multistep', 'milestones': [3, 5]})
    full = _write_recipe(tmp_path, digits_config(tmp_path / 'out', 'full', epochs=epochs, **common))
    assert _distill('train', full, '--quiet').wait() == 0

    killed_cfg = digits_config(tmp_path / 'out', 'killed', epochs=epochs, **common)
    killed = str(tmp_path / 'killed.yaml')
    open(killed, 'w').write(yaml.safe_dump(killed_cfg))
    proc = _distill('train', killed, '--quiet')
    metrics_path = tmp_path / 'out' / 'killed' / 'metrics.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(str(tmp_path / 'out' / 'killed' / 'checkpoints' / 'last.pt'))['epoch']
    assert 2 <= interrupted_at < epochs

    resumed = _distill('train', killed, '--resume', '--quiet')
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert strip_times(read_metrics(tmp_path / 'out' / 'killed')) == strip_times(read_metrics(tmp_path / 'out' / 'full'))
    a = load_file(str(tmp_path / 'out' / 'full' / 'student_last.safetensors'))
    b = load_file(str(tmp_path / 'out' / 'killed' / 'student_last.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary_a = json.load(open(tmp_path / 'out' / 'full' / 'summary.json'))
    summary_b = json.load(open(tmp_path / 'out' / 'killed' / 'summary.json'))
    assert {k: v for k, v in summary_a.items() if k != 'train_time_s'} == \
        {k: v for k, v in summary_b.items() if k != 'train_time_s'}


def test_resume_refuses_an_incompatible_config_and_a_corrupt_checkpoint(tmp_path):
    Trainer(from_dict(digits_config(tmp_path, epochs=1)), quiet=True).fit()
    with pytest.raises(DistillError, match=r"config differs from the run's \(optimizer.lr: 0.05 -> 0.1\)"):
        Trainer(from_dict(digits_config(tmp_path, epochs=2, optimizer={'lr': 0.1})), resume=True, quiet=True)
    # more epochs is a legitimate resume
    Trainer(from_dict(digits_config(tmp_path, epochs=2)), resume=True, quiet=True).fit()
    assert len(read_metrics(tmp_path / 'run')) == 2
    last = tmp_path / 'run' / 'checkpoints' / 'last.pt'
    last.write_bytes(last.read_bytes()[:4096])
    with pytest.raises(DistillError, match='corrupt or truncated'):
        Trainer(from_dict(digits_config(tmp_path, epochs=3)), resume=True, quiet=True)
    with pytest.raises(DistillError, match='nothing to resume'):
        Trainer(from_dict(digits_config(tmp_path, 'fresh', epochs=3)), resume=True, quiet=True)


def test_a_moved_and_renamed_run_resumes(tmp_path):
    Trainer(from_dict(digits_config(tmp_path / 'old', 'first', epochs=1)), quiet=True).fit()
    os.rename(tmp_path / 'old', tmp_path / 'new')
    os.rename(tmp_path / 'new' / 'first', tmp_path / 'new' / 'second')
    summary = Trainer(from_dict(digits_config(tmp_path / 'new', 'second', epochs=2)), resume=True, quiet=True).fit()
    assert summary['epochs'] == 2 and len(read_metrics(tmp_path / 'new' / 'second')) == 2


def test_a_run_from_before_a_new_setting_existed_resumes(tmp_path):
    Trainer(from_dict(digits_config(tmp_path, epochs=1)), quiet=True).fit()
    last = tmp_path / 'run' / 'checkpoints' / 'last.pt'
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint['config']['data']['skip_bad_images']  # as written before the setting existed
    torch.save(checkpoint, last)
    assert Trainer(from_dict(digits_config(tmp_path, epochs=2)), resume=True, quiet=True).fit()['epochs'] == 2


ATOMIC_WRITER = """
import sys, torch
from distill.files import atomic_save
atomic_save({'model': {'w': torch.ones(3)}, 'epoch': 1}, sys.argv[1])
print('first', flush=True)
while True:
    atomic_save({'model': {'w': torch.zeros(60_000_000)}, 'epoch': 2}, sys.argv[1])
"""


@pytest.mark.slow
def test_atomic_checkpoint_survives_a_kill_during_writing(tmp_path):
    target = tmp_path / 'last.pt'
    proc = subprocess.Popen([sys.executable, '-c', ATOMIC_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'first'
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / 'last.pt.*.tmp')) and time.time() < deadline:
        time.sleep(0.001)
    proc.kill()  # mid-write of the 240 MB checkpoint
    proc.wait()
    checkpoint = load_checkpoint(str(target))  # the previous (or a complete new) checkpoint, never a partial one
    assert checkpoint['epoch'] in (1, 2)
    assert checkpoint['model']['w'].numel() == (3 if checkpoint['epoch'] == 1 else 60_000_000)


KILLED_BETWEEN_CHECKPOINTS = """
import os, sys, yaml
from distill.training import trainer
from distill.config import load_config
real, writes = trainer.atomic_save, []


def save(state, path):  # a SIGKILL right after the first checkpoint file of epoch 2 is written
    real(state, path)
    writes.append(path)
    if state['epoch'] == 2 and len(writes) == 3:
        os.kill(os.getpid(), 9)


trainer.atomic_save = save
trainer.Trainer(load_config(sys.argv[1]), quiet=True).fit()
"""


@pytest.mark.slow
def test_a_kill_between_the_two_checkpoints_of_an_improving_epoch_keeps_best_and_summary_consistent(tmp_path):
    """Epoch 2 improves, so it writes best.pt and last.pt; a kill after the first of the two writes, then a
    resume, must end with the best epoch of summary.json, best.pt and student_best.safetensors all the same."""
    recipe = _write_recipe(tmp_path, digits_config(tmp_path / 'out', 'run', epochs=2))
    killed = subprocess.run([sys.executable, '-c', KILLED_BETWEEN_CHECKPOINTS, recipe], cwd=REPO)
    assert killed.returncode == -9
    checkpoints = tmp_path / 'out' / 'run' / 'checkpoints'
    assert load_checkpoint(str(checkpoints / 'best.pt'))['epoch'] == 2  # epoch 2 improved (written first)
    (checkpoints / 'last.pt.leftover.tmp').write_bytes(b'partial')  # what a kill mid-write leaves
    resumed = _distill('train', recipe, '--resume', '--quiet')
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    summary = json.load(open(tmp_path / 'out' / 'run' / 'summary.json'))
    best = load_checkpoint(str(checkpoints / 'best.pt'))
    assert summary['best_epoch'] == best['epoch'] == best['best_epoch'] == 2
    exported = load_file(str(tmp_path / 'out' / 'run' / 'student_best.safetensors'))
    assert all(torch.equal(exported[k], v) for k, v in best['model'].items())
    assert not glob.glob(str(checkpoints / '*.tmp'))
    assert os.stat(checkpoints / 'last.pt').st_mode & 0o777 == 0o666 & ~_umask()  # the user's umask, not 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_wandb_offline_writes_a_run_with_the_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    cfg = digits_config(tmp_path, epochs=2, wandb={'mode': 'offline', 'project': 'distill-test'})
    Trainer(from_dict(cfg), quiet=True).fit()
    runs = glob.glob(str(tmp_path / 'run' / 'wandb' / 'offline-run-*'))
    assert len(runs) == 1, os.listdir(tmp_path / 'run')
    records = glob.glob(os.path.join(runs[0], 'run-*.wandb'))
    assert len(records) == 1, os.listdir(runs[0])
    keys = (b'val_top1', b'val_top5', b'train_loss', b'train_ce', b'best_top1')
    deadline = time.time() + 30  # wandb's service process writes the file; under load it may trail finish()
    while True:
        payload = open(records[0], 'rb').read()
        if all(key in payload for key in keys) or time.time() > deadline:
            break
        time.sleep(0.2)
    for key in keys:
        assert key in payload, (key, len(payload), os.listdir(runs[0]))


@pytest.mark.slow
def test_wandb_online_without_a_reachable_server_waits_briefly_then_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')  # nothing listens there
    cfg = digits_config(tmp_path, epochs=1, wandb={'mode': 'online', 'project': 'distill-test', 'init_timeout': 3})
    started = time.time()
    assert Trainer(from_dict(cfg), quiet=True).fit()['epochs'] == 1
    assert time.time() - started < 90
    assert 'W&B is unreachable' in open(tmp_path / 'run' / 'log.txt').read()
    assert len(glob.glob(str(tmp_path / 'run' / 'wandb' / 'offline-run-*'))) == 1


@register_loss('test_nan_after')
class NanAfter(LossTerm):
    """Test-only term: finite until the given global step, then NaN."""

    def __init__(self, step: int = 0):
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, step):
        self.calls += 1
        value = step.student_logits.float().mean() * 0
        return value + float('nan') if self.calls > self.step else value


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path):
    steps_per_epoch = 23  # 1437 digits / 64
    cfg = digits_config(tmp_path, epochs=3, losses={'ce': 1.0, 'test_nan_after': {'step': steps_per_epoch + 4}})
    trainer = Trainer(from_dict(cfg), quiet=True)
    with pytest.raises(DistillError) as info:
        trainer.fit()
    message = str(info.value)
    assert 'at epoch 2, step 5' in message and "'test_nan_after'" in message and 'is kept' in message
    assert '\n' not in message
    assert load_checkpoint(str(tmp_path / 'run' / 'checkpoints' / 'last.pt'))['epoch'] == 1
    assert len(read_metrics(tmp_path / 'run')) == 1


@pytest.mark.slow
def test_bf16_trains_on_cpu_and_fp16_is_refused(tmp_path):
    summary = Trainer(from_dict(digits_config(tmp_path, 'bf16', epochs=1, trainer={'precision': 'bf16'})),
                      quiet=True).fit()
    assert summary['last_top1'] > 30  # learns, with fp32 losses under bf16 autocast
    with pytest.raises(DistillError, match='fp16 needs a CUDA device'):
        Trainer(from_dict(digits_config(tmp_path, 'fp16', trainer={'precision': 'fp16'})), quiet=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_cuda_precisions_train(tmp_path, precision):
    teacher = make_teacher_weights(tmp_path / 'teacher.safetensors')
    cfg = digits_config(tmp_path, precision, epochs=2, trainer={'precision': precision, 'device': 'cuda'},
                        teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher},
                        losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}})
    trainer = Trainer(from_dict(cfg), quiet=True)
    summary = trainer.fit()
    assert summary['last_top1'] > 50
    assert trainer.scaler.is_enabled() == (precision == 'fp16')


@pytest.mark.slow
def test_step_and_cosine_schedules_follow_the_recipe(tmp_path):
    cfg = digits_config(tmp_path, 'step', epochs=4, optimizer={'lr': 0.1},
                        scheduler={'name': 'multistep', 'milestones': [1, 3], 'decay_rate': 0.1})
    Trainer(from_dict(cfg), quiet=True).fit()
    assert [r['lr'] for r in read_metrics(tmp_path / 'step')] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    cfg = digits_config(tmp_path, 'cosine', epochs=4, optimizer={'lr': 0.1},
                        scheduler={'name': 'cosine', 'warmup_epochs': 1, 'warmup_lr': 0.001, 'min_lr': 0.0})
    Trainer(from_dict(cfg), quiet=True).fit()
    lrs = [r['lr'] for r in read_metrics(tmp_path / 'cosine')]
    assert lrs[0] == pytest.approx(0.001) and lrs[1] > lrs[2] > lrs[3] > 0


@pytest.mark.slow
def test_kd_beats_the_student_alone_on_real_digits(tmp_path):
    summaries = run_demo(output_dir=str(tmp_path), epochs=20, seed=0)
    teacher, student, kd = (summaries[k]['best_top1'] for k in ('teacher', 'student', 'student+KD'))
    assert teacher > 95
    assert kd > student + 2, (teacher, student, kd)
    assert os.path.getsize(tmp_path / 'demo_curves.png') > 10_000


def test_a_run_whose_first_epoch_never_finished_starts_afresh(tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'resolved.yaml').write_text('{}\n')
    (run_dir / 'metrics.jsonl').write_text('{"epoch": 1, "stale": true}\n')
    Trainer(from_dict(digits_config(tmp_path, epochs=1)), quiet=True).fit()
    records = read_metrics(run_dir)
    assert len(records) == 1 and 'stale' not in records[0]


@pytest.mark.slow
def test_tensorboard_events_hold_every_logged_scalar_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sections = dict(logging={'tensorboard': True}, losses={'ce': 1.0})
    Trainer(from_dict(digits_config(tmp_path, epochs=1, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, epochs=3, **sections)), resume=True, quiet=True).fit()
    records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    events = EventAccumulator(str(tmp_path / 'run' / 'tensorboard'))
    events.Reload()
    assert {'val_top1', 'val_top5', 'train_loss', 'train_ce', 'lr'} <= set(events.Tags()['scalars'])
    for key in ('val_top1', 'train_loss', 'lr'):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
