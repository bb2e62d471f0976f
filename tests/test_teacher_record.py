"""teacher_cache.mode record / replay on a streamed ImageFolder run (distill/teaching/record.py)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from distill.config import from_dict
from distill.errors import DistillError
from distill.teaching.record import dense_logits, record_values
from distill.training.trainer import Trainer
from helpers import digits_config, image_folder

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A 3-class streamed ImageFolder tree of real digits images and a fixed teacher."""
    root = tmp_path_factory.mktemp('record')
    folder = image_folder(root / 'folder')
    torch.manual_seed(1)
    teacher = str(root / 'teacher.safetensors')
    save_file(timm.create_model('cifar_resnet8x4', num_classes=3).state_dict(), teacher)
    return folder, teacher


def run_config(*args, **kwargs):
    return from_dict(config_dict(*args, **kwargs))


def config_dict(tmp_path, setup, run_name, mode, seed=0, epochs=2, top_k=None, dtype='float32', **data):
    folder, teacher = setup
    cfg = digits_config(tmp_path, run_name, epochs=epochs, student={'name': 'cifar_resnet8'},
                        teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher}, losses={'ce': 0.1, 'kd': 0.9},
                        scheduler={'name': 'none'}, trainer={'seed': seed},
                        teacher_cache={'enabled': True, 'mode': mode, 'dir': str(tmp_path / 'records'),
                                       'top_k': top_k, 'dtype': dtype})
    cfg['data'] = {'name': 'imagefolder', 'root': folder, 'in_memory': False, 'workers': 0, 'image_size': 32,
                   'augment': 'random_resized_crop', 'auto_augment': 'rand-m9-mstd0.5-inc1', 'batch_size': 8, **data}
    return cfg


def train_epochs(trainer, epochs):
    for epoch in range(epochs):
        trainer.train_one_epoch(epoch)
    return trainer


def test_a_dense_replay_trains_what_the_recording_run_trained_without_running_the_teacher(tmp_path, setup):
    """Every class recorded in float32: a replay run with the recording's seed gets the same batches (the loader
    follows the recorded order and epoch seeds, regenerating the RandAugment pixels) and the teacher's exact logits,
    so its student ends bit-equal, and the teacher model is never called in training; a run of another seed
    replays the same stream."""
    recorder = train_epochs(Trainer(run_config(tmp_path, setup, 'record', 'record'), quiet=True), 2)
    folder = recorder.distiller.teacher.recording.folder
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    assert sorted(meta['epochs']) == ['0', '1'] and meta['top_k'] == 3 and meta['seed'] == 0
    replay = Trainer(run_config(tmp_path, setup, 'replay', 'replay'), quiet=True)
    calls = []
    replay.distiller.teacher.model.register_forward_hook(lambda *args: calls.append(1))
    train_epochs(replay, 2)
    assert calls == []
    for (name, a), b in zip(recorder.distiller.student.state_dict().items(),
                            replay.distiller.student.state_dict().values()):
        assert torch.equal(a, b), name
    other_seed = Trainer(run_config(tmp_path, setup, 'seed1', 'replay', seed=1), quiet=True)
    train_epochs(other_seed, 1)
    assert torch.equal(other_seed.data.train.epoch_order, recorder.distiller.teacher.recording.epoch(0)['order'].long())


def test_replay_refuses_missing_epochs_other_weights_data_or_augmentation_a_corrupt_shard_and_another_record_seed(
        tmp_path, setup):
    train_epochs(Trainer(run_config(tmp_path, setup, 'record', 'record'), quiet=True), 2)
    with pytest.raises(DistillError, match='holds epochs 1-2 but the run asks for 3'):
        Trainer(run_config(tmp_path, setup, 'more', 'replay', epochs=3), quiet=True)
    with pytest.raises(DistillError, match=r'no recording of this teacher, data and augmentation under .* \(the '
                                           r'nearest one differs in auto_augment\)'):
        Trainer(run_config(tmp_path, setup, 'other', 'replay', auto_augment='rand-m5'), quiet=True)
    folder, teacher = setup
    torch.manual_seed(2)
    other_teacher = str(tmp_path / 'other_teacher.safetensors')
    save_file(timm.create_model('cifar_resnet8x4', num_classes=3).state_dict(), other_teacher)
    with pytest.raises(DistillError, match=r'\(the nearest one differs in teacher_weights\)'):
        Trainer(run_config(tmp_path, (folder, other_teacher), 'weights', 'replay'), quiet=True)
    other_data = image_folder(tmp_path / 'other_folder', per_class=10)
    with pytest.raises(DistillError, match=r'\(the nearest one differs in num_images, train_files\)'):
        Trainer(run_config(tmp_path, (other_data, teacher), 'data', 'replay'), quiet=True)
    with pytest.raises(DistillError, match='was drawn with trainer.seed=0; record with that seed'):
        Trainer(run_config(tmp_path, setup, 'reseed', 'record', seed=1), quiet=True)
    with pytest.raises(DistillError, match='record and replay follow a streamed run'):
        Trainer(run_config(tmp_path, setup, 'memory', 'replay', in_memory=True, augment='crop_flip',
                           auto_augment=None), quiet=True)
    replay = Trainer(run_config(tmp_path, setup, 'replay', 'replay'), quiet=True)
    older = tmp_path / 'older'  # the recording as distill 2's key, without top_k and dtype, would file it
    shutil.copytree(replay.distiller.teacher.recording.folder, older / 'recording')
    meta = json.load(open(older / 'recording' / 'meta.json'))
    meta['key'] = {**{k: v for k, v in meta['key'].items() if k not in ('top_k', 'dtype')}, 'version': 2}
    json.dump(meta, open(older / 'recording' / 'meta.json', 'w'))
    older_config = config_dict(tmp_path, setup, 'older', 'replay')
    older_config['teacher_cache']['dir'] = str(older)
    with pytest.raises(DistillError, match=r'\(the nearest one was made by another distill version'):
        Trainer(from_dict(older_config), quiet=True)
    shard = os.path.join(replay.distiller.teacher.recording.folder, 'epoch_0001.safetensors')
    payload = bytearray(open(shard, 'rb').read())
    payload[-1] ^= 0xFF
    open(shard, 'wb').write(bytes(payload))
    replay.train_one_epoch(0)
    with pytest.raises(DistillError, match=r'epoch_0001.safetensors is corrupt or truncated .* record it again'):
        replay.train_one_epoch(1)


def test_top_k_logits_give_tinyvits_soft_labels():
    """k < C: softmax of the rebuilt logits is the top-k probabilities, the rest spread evenly (TinyViT); k = C
    rebuilds the logits themselves."""
    torch.manual_seed(0)
    logits = torch.randn(6, 10) * 3
    top = logits.topk(4, dim=1)
    rebuilt = dense_logits(top.values.half(), top.indices.short(), logits.logsumexp(1), 10)
    probabilities = top.values.half().float().sub(logits.logsumexp(1, keepdim=True)).exp()
    tinyvit = torch.full((6, 10), 0.0).add((1 - probabilities.sum(1, keepdim=True)) / 6)
    tinyvit.scatter_(1, top.indices, probabilities)
    torch.testing.assert_close(rebuilt.softmax(1), tinyvit, rtol=1e-5, atol=1e-7)
    every = logits.topk(10, dim=1)
    assert torch.equal(dense_logits(every.values, every.indices, logits.logsumexp(1), 10), logits)


def test_a_sparse_float16_recording_replays_the_teachers_top_k(tmp_path, setup):
    """top_k 2 of 3 classes in float16: the replayed logits of a batch (the recorded stream's pixels) rank the
    teacher's top 2 classes as the teacher does, with its log-probabilities up to float16 rounding."""
    train_epochs(Trainer(run_config(tmp_path, setup, 'record', 'record', top_k=2, dtype='float16'), quiet=True), 1)
    replay = Trainer(run_config(tmp_path, setup, 'replay', 'replay', epochs=1, top_k=2, dtype='float16'), quiet=True)
    replay.data.train.set_epoch(0)
    batch = next(iter(replay.data.train))
    replayed = replay.distiller.teacher(batch)[0]
    with torch.no_grad():
        live = replay.distiller.teacher.model(batch.images)
    top = live.topk(2, dim=1).indices
    assert torch.equal(replayed.topk(2, dim=1).indices, top)
    torch.testing.assert_close(replayed.log_softmax(1).gather(1, top), live.log_softmax(1).gather(1, top),
                               rtol=0, atol=2e-3)
    assert torch.isfinite(torch.tensor(replay.train_one_epoch(0)['train_loss']))


def test_recordings_of_other_top_k_or_dtype_sit_side_by_side_and_a_replay_gets_the_one_it_asks_for(tmp_path,
                                                                                                      setup):
    """A dense float32 recording of 2 epochs, then a top-2 float16 one of 1 epoch into the same teacher_cache.dir:
    two folders, each meta.json true to every shard it lists (size, sha256, k, dtype); a replay asking for either
    storage reads that folder, one asking for an unrecorded storage says which one is there; a recording run of
    another precision into a folder is refused."""
    dense = train_epochs(Trainer(run_config(tmp_path, setup, 'dense', 'record'), quiet=True), 2)
    sparse = train_epochs(Trainer(run_config(tmp_path, setup, 'sparse', 'record', epochs=1, top_k=2, dtype='float16'),
                                  quiet=True), 1)
    folders = [trainer.distiller.teacher.recording.folder for trainer in (dense, sparse)]
    assert folders[0] != folders[1]
    assert sorted(os.listdir(tmp_path / 'records')) == sorted(map(os.path.basename, folders))
    for folder, (top_k, dtype, epochs) in zip(folders, ((3, 'float32', ['0', '1']), (2, 'float16', ['0']))):
        meta = json.load(open(os.path.join(folder, 'meta.json')))
        assert (meta['top_k'], meta['dtype']) == (meta['key']['top_k'], meta['key']['dtype']) == (top_k, dtype)
        assert sorted(meta['epochs']) == epochs
        for epoch, entry in meta['epochs'].items():
            payload = open(os.path.join(folder, f'epoch_{int(epoch):04d}.safetensors'), 'rb').read()
            assert (len(payload), hashlib.sha256(payload).hexdigest()) == (entry['bytes'], entry['sha256'])
            values = load_file(os.path.join(folder, f'epoch_{int(epoch):04d}.safetensors'))['values']
            assert values.shape == (36, top_k) and str(values.dtype) == f'torch.{dtype}'
    asked = {(None, 'float32'): folders[0], (3, 'float32'): folders[0], (2, 'float16'): folders[1]}
    for (top_k, dtype), folder in asked.items():
        replay = Trainer(run_config(tmp_path, setup, f'replay-{top_k}-{dtype}', 'replay', epochs=1, top_k=top_k,
                                    dtype=dtype), quiet=True)
        assert replay.distiller.teacher.recording.folder == folder
        replay.data.train.set_epoch(0)
        batch = next(iter(replay.data.train))
        with torch.no_grad():
            live = replay.distiller.teacher.model(batch.images)
        replayed = replay.distiller.teacher(batch)[0]
        assert torch.equal(replayed, live) if dtype == 'float32' else \
            torch.equal(replayed.topk(2, dim=1).indices, live.topk(2, dim=1).indices)
    with pytest.raises(DistillError, match=r'\(one holds top_k=[23] in float(16|32): set teacher_cache.top_k and '
                                           r'teacher_cache.dtype to replay it\)'):
        Trainer(run_config(tmp_path, setup, 'unrecorded', 'replay', epochs=1, top_k=2, dtype='float32'), quiet=True)
    meta = json.load(open(os.path.join(folders[1], 'meta.json')))
    json.dump({**meta, 'teacher_precision': 'bf16'}, open(os.path.join(folders[1], 'meta.json'), 'w'))
    with pytest.raises(DistillError, match='was recorded with trainer.precision=bf16; record with that precision'):
        Trainer(run_config(tmp_path, setup, 'fp32', 'record', top_k=2, dtype='float16'), quiet=True)


def tinyvit_soft_labels(probabilities, top, num_classes=1000):
    """TinyViT's soft labels from top-k probabilities: the rest of the mass spread evenly over the other classes."""
    rest = (1 - probabilities.sum(1, keepdim=True)) / (num_classes - top.shape[1])
    return rest.expand(-1, num_classes).clone().scatter_(1, top, probabilities)


@pytest.mark.parametrize('magnitude', [50, 17])
def test_float16_soft_labels_stay_within_tinyvits_float16_probabilities_error(magnitude):
    """Top-10 of 1000 classes in float16, on logits of magnitude ~50 and ~17 (peaked: top logit ~magnitude; flat:
    every logit ~magnitude): the soft labels (probabilities at T = 1) rebuilt from a recording err at most 1.5x as
    much as TinyViT's float16 top-k probabilities (save_logits.py) against the exact ones, where float16 raw logits
    err 10x more."""
    torch.manual_seed(0)
    peaked = torch.randn(2048, 1000) * (magnitude / 3.4)
    flat = magnitude + torch.randn(2048, 1000) * 2
    for logits in (peaked, flat):
        top = logits.topk(10, dim=1).indices
        exact = logits.double().softmax(1)
        reference = tinyvit_soft_labels(exact.gather(1, top), top)
        tinyvit = tinyvit_soft_labels(exact.gather(1, top).half().double(), top)
        values, classes, lse = record_values(logits, 10, torch.float16)
        assert values.dtype == torch.float16 and torch.equal(classes, top)
        ours = dense_logits(values, classes, lse, 1000).double().softmax(1)
        raw = dense_logits(logits.gather(1, top).half(), top, logits.logsumexp(1), 1000).double().softmax(1)
        error = {name: (soft - reference).abs().max().item() for name, soft in
                 (('ours', ours), ('tinyvit', tinyvit), ('raw', raw))}
        assert error['ours'] <= 1.5 * error['tinyvit'] and error['raw'] > 10 * error['tinyvit'], error


def damaged_recording(tmp_path, setup):
    """A 3-epoch recording whose last shard has a flipped byte: (its folder, first shard, last shard)."""
    train_epochs(Trainer(run_config(tmp_path, setup, 'record', 'record', epochs=3), quiet=True), 3)
    [folder] = (tmp_path / 'records').iterdir()
    last, first = folder / 'epoch_0002.safetensors', folder / 'epoch_0000.safetensors'
    payload = bytearray(last.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    last.write_bytes(bytes(payload))
    return folder, first, last


def test_a_replay_checks_every_shard_before_its_run_directory_is_created(tmp_path, setup):
    """A flipped byte in the last of 3 shards, then a truncated first shard (and the last restored): the replay's
    Trainer stops before it creates its run directory."""
    folder, first, last = damaged_recording(tmp_path, setup)
    with pytest.raises(DistillError, match=r'epoch_0002.safetensors is corrupt or truncated \(its sha256 differs'):
        Trainer(run_config(tmp_path, setup, 'corrupt_last', 'replay', epochs=3), quiet=True)
    assert not (tmp_path / 'corrupt_last').exists()
    payload = bytearray(last.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    last.write_bytes(bytes(payload))
    first.write_bytes(first.read_bytes()[:-100])
    with pytest.raises(DistillError, match=r'epoch_0000.safetensors is corrupt or truncated \(\d+ bytes, meta.json '
                                           r'says \d+\)'):
        Trainer(run_config(tmp_path, setup, 'truncated_first', 'replay', epochs=3), quiet=True)
    assert not (tmp_path / 'truncated_first').exists()


def replay_cli(tmp_path, setup, name):
    recipe = tmp_path / f'{name}.yaml'
    recipe.write_text(yaml.safe_dump(config_dict(tmp_path, setup, name, 'replay', epochs=3)))
    return subprocess.run([sys.executable, '-m', 'distill', 'train', str(recipe)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)


@pytest.mark.slow
def test_distill_train_of_a_replay_with_a_corrupt_or_truncated_shard_exits_2_in_one_line_creating_nothing(
        tmp_path, setup):
    """`distill train` of a 3-epoch replay: a flipped byte in the last shard and a truncated first shard each end
    in one line and exit 2, with no run directory (no epoch trained, no checkpoint written)."""
    folder, first, last = damaged_recording(tmp_path, setup)
    result = replay_cli(tmp_path, setup, 'corrupt_last')
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"distill: error: recording shard {last} is corrupt or truncated (its sha256 differs from meta.json's); "
        f"delete {folder} and record it again (teacher_cache.mode=record)"]
    assert not (tmp_path / 'corrupt_last').exists()
    first.write_bytes(first.read_bytes()[:-100])
    result = replay_cli(tmp_path, setup, 'truncated_first')
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"distill: error: recording shard {first} is corrupt or truncated (") and 'bytes, ' \
        'meta.json says' in line and line.endswith('record it again (teacher_cache.mode=record)')
    assert not (tmp_path / 'truncated_first').exists()


@pytest.mark.slow
def test_two_torchrun_ranks_record_what_one_process_records_and_replay_it(tmp_path, setup):
    """Each gloo rank records the images of its half of every batch; rank 0 writes the summed buffers: the shard
    holds every image, with the order, seed, top-k classes and logits of a one-process recording (logits up to the
    float rounding of half batches), also with checkpoints inside the epoch. A 2-rank replay of it trains; a batch
    size whose last batch torchrun would drop is refused before training."""
    Trainer(run_config(tmp_path, setup, 'single', 'record', epochs=1, dtype='float16'), quiet=True).fit()
    recipe = tmp_path / 'ddp.yaml'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m',
                'distill', 'train', str(recipe)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for name, mode in (('ddp_record', 'record'), ('ddp_replay', 'replay')):
        cfg = config_dict(tmp_path, setup, name, mode, epochs=1, dtype='float16')
        cfg['teacher_cache']['dir'] = str(tmp_path / 'ddp_records')
        cfg['trainer']['checkpoint_every'] = 2  # checkpoints inside the epoch gather the ranks' buffers too
        recipe.write_text(yaml.safe_dump(cfg))
        result = subprocess.run(torchrun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = (load_file(str(next((tmp_path / folder).glob('*/epoch_0000.safetensors'))))
                   for folder in ('records', 'ddp_records'))
    assert single.keys() == ddp.keys() and len(ddp['values']) == 36
    for name in ('order', 'seed', 'classes'):
        assert torch.equal(single[name], ddp[name]), name
    for name in ('values', 'lse'):
        torch.testing.assert_close(ddp[name].float(), single[name].float(), rtol=2e-3, atol=2e-3)
    assert json.load(open(tmp_path / 'ddp_replay' / 'summary.json'))['epochs'] == 1
    cfg = config_dict(tmp_path, setup, 'dropped', 'record', epochs=1, batch_size=7)  # 36 = 5 x 7 + 1
    recipe.write_text(yaml.safe_dump(cfg))
    refused = subprocess.run(torchrun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and 'the last batch of 1 images is dropped (2 processes)' in refused.stderr


def test_only_a_loader_with_recorded_epochs_takes_a_recording(tmp_path):
    """Record and replay read a loader's files, epoch order and seed (``RecordableLoader``): the streamed loader has
    them; any other loader is refused in one line, not with an AttributeError mid-run."""
    from distill.data import BatchLoader, ImageSplit
    from distill.data.batching import RecordableLoader
    from distill.data.streaming import StreamingLoader
    from distill.teaching.recorded import recorded_teacher
    assert set(RecordableLoader.__annotations__) == {'folder', 'epoch_order', 'epoch_seed', 'replay'}
    image_folder(tmp_path / 'tree', per_class=2)
    streamed = StreamingLoader(str(tmp_path / 'tree' / 'train'), 2, torch.zeros(3), torch.ones(3), True, 'crop', 8, 1,
                               0, 0.875)
    assert isinstance(streamed, RecordableLoader)
    split = ImageSplit(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ['a', 'b'])
    in_memory = BatchLoader(split, 2, torch.zeros(3), torch.ones(3), True)
    cfg = from_dict(digits_config(tmp_path, 'r', teacher={'name': 'cifar_resnet8', 'checkpoint': 'unused'},
                                  teacher_cache={'enabled': True, 'mode': 'record'}, losses={'ce': 0.1, 'kd': 0.9}))
    with pytest.raises(DistillError, match='follows a loader.s recorded epochs, and BatchLoader records none'):
        recorded_teacher(timm.create_model('cifar_resnet8', num_classes=2), None, cfg, in_memory, 2, 'fp32',
                         str(tmp_path / 'records'))
