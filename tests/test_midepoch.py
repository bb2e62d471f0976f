"""Checkpoints inside an epoch (distill/training/midepoch.py): a run killed or stopped between two batches resumes and ends
bit-equal to the uninterrupted run, on the streamed recording path and on the in-memory one."""
import json
import os
import signal
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from distill.runs.checkpoint import load_checkpoint
from distill.config import from_dict
from distill.training.midepoch import StopRequest
from distill.training.trainer import Trainer
from helpers import digits_config, image_folder, strip_times

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def teacher_weights(path, num_classes):
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=num_classes).state_dict(), str(path))
    return str(path)


@pytest.fixture
def default_signal_handlers():
    """Python's own SIGINT and SIGTERM handling, also where the test runner was started ignoring them (``nohup``,
    a background job): a stop request is listened for only where those are in place."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return strip_times([json.loads(line) for line in f])


def assert_same_run(a, b):
    """Two run directories hold the same metrics, student and EMA."""
    assert read_metrics(a) == read_metrics(b)
    last_a, last_b = (load_checkpoint(os.path.join(run, 'checkpoints', 'last.pt')) for run in (a, b))
    assert last_a['epoch_progress'] is None and last_b['epoch_progress'] is None
    for key in ('model', 'model_ema'):
        if last_a[key] is not None:
            for name, tensor in last_a[key].items():
                assert torch.equal(tensor, last_b[key][name]), (key, name)


KILLED_INSIDE_AN_EPOCH = """
import os, sys
from distill.training import trainer
from distill.config import load_config
real = trainer.atomic_save


def save(state, path):  # SIGKILL right after the checkpoint 4 batches into epoch 2
    real(state, path)
    if state['epoch'] == 1 and (state['epoch_progress'] or {}).get('step') == 4:
        os.kill(os.getpid(), 9)


trainer.atomic_save = save
trainer.Trainer(load_config(sys.argv[1]), quiet=True).fit()
"""


@pytest.mark.slow
def test_a_recording_run_killed_inside_an_epoch_resumes_to_the_same_student_and_the_same_recording(tmp_path):
    """Streamed RandAugment images, random erasing, mixup + CutMix, EMA, 2-batch accumulation and a top-2 float16
    recording of the teacher, with ``trainer.checkpoint_every: 1``: SIGKILLed right after the checkpoint 4 of 5
    batches into epoch 2, then resumed: the same metrics, student, EMA and recorded shards as an uninterrupted run
    (the resumed epoch redraws its order and seed, regenerates its last batch's pixels and keeps the recording's
    buffers of its first 4 batches)."""
    folder = image_folder(tmp_path / 'folder')
    teacher = teacher_weights(tmp_path / 'teacher.safetensors', 3)

    def config(name):
        cfg = digits_config(tmp_path / 'runs', name, epochs=2, student={'name': 'cifar_resnet8'},
                            teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher}, losses={'ce': 0.1, 'kd': 0.9},
                            trainer={'accumulate_steps': 2, 'checkpoint_every': 1}, ema={'enabled': True},
                            teacher_cache={'enabled': True, 'mode': 'record', 'top_k': 2,
                                           'dir': str(tmp_path / f'records_{name}')})
        cfg['data'] = {'name': 'imagefolder', 'root': folder, 'in_memory': False, 'workers': 0, 'image_size': 32,
                       'augment': 'random_resized_crop', 'auto_augment': 'rand-m9-mstd0.5-inc1', 'batch_size': 8,
                       'mixup': 0.8, 'cutmix': 1.0, 'reprob': 0.25}
        path = tmp_path / f'{name}.yaml'
        path.write_text(yaml.safe_dump(cfg))
        return str(path), from_dict(cfg)

    killed_recipe, killed_cfg = config('killed')
    killed = subprocess.run([sys.executable, '-c', KILLED_INSIDE_AN_EPOCH, killed_recipe], cwd=REPO)
    assert killed.returncode == -9
    run = tmp_path / 'runs' / 'killed'
    inside = load_checkpoint(str(run / 'checkpoints' / 'last.pt'))
    assert inside['epoch'] == 1 and inside['epoch_progress']['step'] == 4
    assert inside['epoch_progress']['teacher']['seen'].sum() == 32  # 4 batches of 8 recorded before the kill
    assert len(read_metrics(run)) == 1
    Trainer(killed_cfg, resume=True, quiet=True).fit()

    Trainer(config('full')[1], quiet=True).fit()
    assert_same_run(run, tmp_path / 'runs' / 'full')
    metas = [json.load(open(path)) for name in ('killed', 'full')
             for path in (tmp_path / f'records_{name}').glob('*/meta.json')]
    assert len(metas) == 2 and metas[0]['epochs'] == metas[1]['epochs'] and len(metas[0]['epochs']) == 2


@pytest.mark.slow  # an interrupted, a resumed and an uninterrupted training process (~20 s each case)
@pytest.mark.parametrize('signum, step_on_epochs', [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_signal_checkpoints_after_the_current_step_and_the_resumed_run_ends_the_same(tmp_path, signum,
                                                                                             step_on_epochs,
                                                                                             default_signal_handlers):
    """In-memory digits with crop views and a live KD teacher: SIGTERM (torchrun, SLURM) or SIGINT (Ctrl-C,
    distill grid's requeue) during the 5th step of epoch 2 stops the run after that step with a checkpoint inside
    the epoch; resumed, it ends bit-equal to an uninterrupted run, metrics included (with a per-update schedule the
    resumed epoch still reports its starting lr). The signal handlers are put back afterwards."""
    teacher = teacher_weights(tmp_path / 'teacher.safetensors', 10)

    def config(name):
        return from_dict(digits_config(tmp_path, name, epochs=2, losses={'ce': 0.1, 'kd': 0.9},
                                       teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher},
                                       scheduler={'name': 'cosine', 'step_on_epochs': step_on_epochs}))

    stopped = Trainer(config('stopped'), quiet=True)
    steps_per_epoch = len(stopped.data.train)
    calls = []

    def signal_at_step(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == steps_per_epoch + 5:
                os.kill(os.getpid(), signum)

    stopped.distiller.student.register_forward_pre_hook(signal_at_step)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert len(calls) == steps_per_epoch + 5  # stopped right after the step the signal came in
    inside = load_checkpoint(str(tmp_path / 'stopped' / 'checkpoints' / 'last.pt'))
    assert inside['epoch'] == 1 and inside['epoch_progress']['step'] == 5
    log = open(tmp_path / 'stopped' / 'log.txt').read()
    assert f"stopped ({signal.Signals(signum).name})" in log and '5 batches into epoch 2; resume with --resume' in log
    Trainer(config('stopped'), resume=True, quiet=True).fit()
    assert ', 5 batches into epoch 2' in open(tmp_path / 'stopped' / 'log.txt').read()
    Trainer(config('full'), quiet=True).fit()
    assert_same_run(tmp_path / 'stopped', tmp_path / 'full')


def test_a_quiet_run_still_says_where_it_stopped(tmp_path, capsys, default_signal_handlers):
    """--quiet drops the per-epoch lines, never the one saying where a stopped run stands and how to resume it."""
    run = Trainer(from_dict(digits_config(tmp_path, 'quiet', epochs=1)), quiet=True)
    calls = []

    def signal_once(module, args):
        if module.training and not calls:
            calls.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    run.distiller.student.register_forward_pre_hook(signal_once)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    [line] = capsys.readouterr().out.splitlines()
    assert line == (f"stopped (SIGTERM): {tmp_path / 'quiet' / 'checkpoints' / 'last.pt'} holds the run 1 batches "
                    f"into epoch 1; resume with --resume")


def test_a_second_signal_stops_at_once(default_signal_handlers):
    stop = StopRequest()
    stop.listen()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


SIGNAL_ON_RANK_1 = """
import os, signal, sys
from distill.training import trainer
from distill.config import load_config
run = trainer.Trainer(load_config(sys.argv[1]), quiet=True)
calls = []


def signal_rank_1(module, args):  # only rank 1 is signalled, during the 5th step of epoch 2
    if module.training and run.dist.rank == 1:
        calls.append(1)
        if len(calls) == len(run.data.train) + 5:
            os.kill(os.getpid(), signal.SIGTERM)


run.distiller.student.register_forward_pre_hook(signal_rank_1)
try:
    run.fit()
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.slow
def test_under_torchrun_the_ranks_agree_on_the_step_to_stop_and_the_resumed_run_ends_the_same(tmp_path):
    """Two gloo ranks; SIGTERM reaches rank 1 alone during the 5th step of epoch 2: both ranks stop after that step
    (rank 0 learns of it from the all-reduced request), rank 0 writes the checkpoint inside the epoch, and the run
    resumed under torchrun ends with the student of an uninterrupted 2-rank run, bit for bit, and its metrics (the
    epoch's loss sums, carried over from every rank, are added in another order)."""
    teacher = teacher_weights(tmp_path / 'teacher.safetensors', 10)
    recipes = {}
    for name in ('stopped', 'full'):
        cfg = digits_config(tmp_path, name, epochs=2, losses={'ce': 0.1, 'kd': 0.9}, data={'batch_size': 100},
                            teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher})
        recipes[name] = tmp_path / f'{name}.yaml'
        recipes[name].write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}

    def run(*args):
        return subprocess.run(torchrun + list(args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)

    (tmp_path / 'signal_rank_1.py').write_text(SIGNAL_ON_RANK_1)
    stopped = run(str(tmp_path / 'signal_rank_1.py'), str(recipes['stopped']))
    assert stopped.returncode != 0, stopped.stderr[-2000:]
    inside = load_checkpoint(str(tmp_path / 'stopped' / 'checkpoints' / 'last.pt'))
    assert inside['epoch'] == 1 and inside['epoch_progress']['step'] == 5, stopped.stderr[-2000:]
    assert 'stopped (another rank)' in open(tmp_path / 'stopped' / 'log.txt').read()  # rank 0's log
    for args in (['-m', 'distill', 'train', str(recipes['stopped']), '--resume'],
                 ['-m', 'distill', 'train', str(recipes['full'])]):
        finished = run(*args)
        assert finished.returncode == 0, finished.stderr[-2000:]
    resumed, full = (load_checkpoint(str(tmp_path / name / 'checkpoints' / 'last.pt')) for name in ('stopped', 'full'))
    for name, tensor in full['model'].items():
        assert torch.equal(tensor, resumed['model'][name]), name
    for a, b in zip(read_metrics(tmp_path / 'stopped'), read_metrics(tmp_path / 'full')):
        assert a.keys() == b.keys() and all(a[key] == pytest.approx(b[key], rel=1e-6) for key in a), (a, b)
