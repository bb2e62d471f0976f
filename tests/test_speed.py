"""The speed features change nothing they should not: view ids reproduce the augmentation, the teacher cache gives
the live teacher's logits, the fast settings keep CPU metrics, and a 2-process torchrun (gloo) run matches one
process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import distill  # noqa: F401
from distill.config import DataConfig, from_dict
from distill.data import apply_views, augment_batch, build_data, draw_views, view_count
from distill.errors import DistillError
from distill.teaching.cache import TeacherCache
from distill.training.trainer import Trainer
from helpers import digits_config, image_folder

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def teacher_weights(tmp_path, name='cifar_resnet8x4', num_classes=10):
    torch.manual_seed(1)
    path = str(tmp_path / 'teacher.safetensors')
    save_file(timm.create_model(name, num_classes=num_classes).state_dict(), path)
    return path


def kd_config(tmp_path, run_name, teacher_path, epochs=1, **sections):
    sections = {'teacher': {'name': 'cifar_resnet8x4', 'checkpoint': teacher_path},
                'losses': {'ce': 0.1, 'kd': 0.9}, **sections}
    return digits_config(tmp_path, run_name, epochs=epochs, **sections)


def test_view_ids_reproduce_the_crop_and_flip_of_each_sample():
    assert view_count('crop_flip', 4) == 162 and view_count('crop', 4) == 81 and view_count('none', 4) == 1
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    views = draw_views(40, 2, True, torch.Generator().manual_seed(5))
    assert views.min() >= 0 and views.max() < view_count('crop_flip', 2) and len(views.unique()) > 10
    assert torch.equal(apply_views(images, views, 2, True), augment_batch(images, 2, True, torch.Generator().manual_seed(5)))
    # view 2 * (p * (2p+1) + p) is the centre crop without flip: the image itself; +1 flips it
    centre = 2 * (2 * 5 + 2)
    assert torch.equal(apply_views(images, torch.full((40,), centre), 2, True), images)
    assert torch.equal(apply_views(images, torch.full((40,), centre + 1), 2, True), images.flip(-1))
    # the loader's augmented batch is its raw images seen through the views it reports
    data = build_data(DataConfig(name='digits', image_size=8, augment='crop_flip', crop_padding=1), seed=0)
    batch = next(iter(data.train))
    raw = data.train.split.images[batch.indices]
    expected = data.train._normalize(apply_views(raw, batch.views, 1, True))
    assert torch.equal(batch.images, expected)
    crop_only = draw_views(500, 1, False, torch.Generator().manual_seed(0))
    assert sorted(crop_only.unique().tolist()) == list(range(view_count('crop', 1)))  # dense ids without flips
    assert torch.equal(apply_views(images, draw_views(40, 1, False, torch.Generator().manual_seed(0)), 1, False),
                       augment_batch(images, 1, False, torch.Generator().manual_seed(0)))


def _teacher_fn(tmp_path):
    teacher = timm.create_model('cifar_resnet8x4', num_classes=10)
    teacher.load_state_dict(__import__('safetensors.torch', fromlist=['load_file']).load_file(teacher_weights(tmp_path)))
    return teacher.eval()


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', 'float16'])
@torch.no_grad()
def test_cached_logits_equal_the_live_teacher_for_the_same_views(tmp_path, dtype):
    """Fill the table over one epoch, then read it over another epoch (other batches, other views): every lookup
    equals the live teacher on that exact augmented image (fp16: its rounding of the live logits)."""
    teacher = _teacher_fn(tmp_path)
    data = build_data(DataConfig(name='digits', image_size=8, augment='crop_flip', crop_padding=1,
                                 batch_size=128), seed=0)
    loader = data.train
    folder = str(tmp_path / 'cache')
    cache = TeacherCache(folder, len(loader.split), loader.num_views, 10, dtype, torch.device('cpu'), meta={})
    compared = 0
    for epoch in range(3):
        for batch in loader:
            live = teacher(batch.images)
            cached = cache.lookup(batch.indices, batch.views, batch.images, teacher)
            if dtype == 'float32':
                torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(cached, live.half().float(), rtol=1e-3, atol=2e-3)
            compared += len(batch.indices)
    assert compared == 3 * len(loader.split) and cache.computed < compared  # later epochs hit filled views
    cache.flush()
    # a later run reopens the files and reads them without running the teacher where they are filled
    reopened = TeacherCache(folder, len(loader.split), loader.num_views, 10, dtype, torch.device('cpu'), meta={})
    assert reopened.filled_count == cache.filled_count == cache.computed > 0
    filled = torch.nonzero(reopened.filled)
    images = loader._normalize(apply_views(loader.split.images[filled[:64, 0]], filled[:64, 1], 1, True))

    def no_teacher(_):
        raise AssertionError('a filled view must not run the teacher')
    torch.testing.assert_close(reopened.lookup(filled[:64, 0], filled[:64, 1], images, no_teacher),
                               cache.logits[filled[:64, 0], filled[:64, 1]].float())
    # a table of another shape under the same folder is rebuilt, never read
    other = TeacherCache(folder, len(loader.split), loader.num_views, 5, dtype, torch.device('cpu'), meta={})
    assert other.filled_count == 0


@torch.no_grad()
def test_a_table_holds_the_same_bits_whichever_run_filled_it_and_in_what_batches(tmp_path):
    """One run fills a table in whole batches; another finds most views already filled by a run with another order
    and computes the rest a few at a time: both tables are byte-identical (the teacher fills in chunks of
    TEACHER_ROWS images). Computed one or three at a time, this teacher's logits differ in the last bits on x86 CPUs
    (kernels for a few rows sum in another order): without the chunks the tables differ there."""
    teacher = timm.create_model('mnist_mlp_1200', num_classes=10).eval()
    images = torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    views = torch.zeros(300, dtype=torch.long)

    def table(folder, batches):
        cache = TeacherCache(str(tmp_path / folder), 300, 1, 10, 'float32', torch.device('cpu'), meta={})
        for batch in batches:
            cache.lookup(batch, views[batch], images[batch], teacher)
        assert cache.fill_ratio == 1.0
        return cache.logits.clone()

    whole = table('whole', torch.arange(300).split(100))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    others_first = list(order[:290].split(97)) + [torch.arange(start, 300, 10) for start in range(10)]
    assert torch.equal(whole, table('piecemeal', others_first))


@pytest.mark.slow
def test_kd_with_the_teacher_cache_trains_like_the_live_teacher_and_later_runs_skip_it(tmp_path):
    teacher_path = teacher_weights(tmp_path)
    cache = {'enabled': True, 'dir': str(tmp_path / 'cache'), 'dtype': 'float32'}
    live = Trainer(from_dict(kd_config(tmp_path, 'live', teacher_path, epochs=2)), quiet=True).fit()
    first = Trainer(from_dict(kd_config(tmp_path, 'cached', teacher_path, epochs=2, teacher_cache=cache)),
                    quiet=True)
    cached = first.fit()
    assert cached['epochs'] == live['epochs'] == 2  # (top-1 after 2 epochs is chaotic: compare losses)
    live_loss, cached_loss = metrics(tmp_path / 'live')[-1]['train_loss'], metrics(tmp_path / 'cached')[-1]['train_loss']
    assert abs(live_loss - cached_loss) < 1e-3 * abs(live_loss)
    filled = [r['teacher_cache_filled'] for r in metrics(tmp_path / 'cached')]
    assert 0 < filled[0] < filled[1] < 1  # 18 views per digit: two epochs see part of them
    # a second seed reads what the first stored and computes only unseen views
    second = Trainer(from_dict(kd_config(tmp_path, 'seed1', teacher_path, epochs=1, teacher_cache=cache,
                                         trainer={'seed': 1})), quiet=True)
    assert 'teacher cache' in ' '.join(second.model_notes) and f"{100 * filled[1]:.1f}% filled" in second.model_notes[-1]
    second.fit()
    assert second.distiller.teacher.cache.computed < len(second.data.train.split) * (1 - filled[1]) + 200
    # without augmentation there is one view: after one epoch the teacher never runs again
    plain = Trainer(from_dict(kd_config(tmp_path, 'plain', teacher_path, epochs=2, teacher_cache=cache,
                                        data={'augment': 'none'})), quiet=True)
    plain.fit()
    assert plain.distiller.teacher.cache.computed == len(plain.data.train.split) and plain.distiller.teacher.cache.fill_ratio == 1.0


@pytest.mark.parametrize('losses, reason', [
    ({'ce': 0.1, 'kd': 0.9, 'fitnet': 100}, "read teacher features"),
    ({'ce': 0.1, 'mlkd': 0.9}, "no finite set of views"),
    ({'ce': 1.0}, "no loss term uses the teacher"),
])
def test_the_teacher_cache_refuses_what_it_cannot_reproduce(tmp_path, losses, reason):
    cfg = kd_config(tmp_path, 'refused', teacher_weights(tmp_path), teacher_cache={'enabled': True},
                    losses=losses)
    with pytest.raises(DistillError, match=f"cannot be exact here: .*{reason}.*teacher_cache.enabled=false"):
        Trainer(from_dict(cfg), quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize('setting', [{'trainer': {'channels_last': True}}, {'optimizer': {'fused': True}},
                                     {'trainer': {'check_finite_every': 7}}])
def test_fast_settings_change_nothing_on_cpu_beyond_tolerance(tmp_path, setting):
    teacher_path = teacher_weights(tmp_path)
    base = Trainer(from_dict(kd_config(tmp_path, 'base', teacher_path)), quiet=True).fit()
    cfg = kd_config(tmp_path, 'fast', teacher_path)
    for section, values in setting.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    fast = Trainer(from_dict(cfg), quiet=True).fit()
    base_loss, fast_loss = metrics(tmp_path / 'base')[0]['train_loss'], metrics(tmp_path / 'fast')[0]['train_loss']
    assert abs(base_loss - fast_loss) <= 1e-3 * base_loss  # summation order differs, 23 steps drift
    if 'check_finite_every' in setting['trainer'] if 'trainer' in setting else False:
        assert fast['last_top1'] == base['last_top1'] and fast_loss == base_loss  # the same arithmetic


def test_a_deferred_finite_check_still_names_the_first_bad_step(tmp_path):
    from test_training import NanAfter  # noqa: F401 (registers the test-only term)
    cfg = digits_config(tmp_path, epochs=2, losses={'ce': 1.0, 'test_nan_after': {'step': 4}},
                        trainer={'check_finite_every': 10})
    with pytest.raises(DistillError, match="at epoch 1, step 5 .*'test_nan_after'"):
        Trainer(from_dict(cfg), quiet=True).fit()
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / 'last.pt')


@pytest.mark.slow
def test_compile_computes_what_eager_computes_on_cpu(tmp_path):
    """One training step of a compiled student equals the eager one (loss and gradients); a compiled run through
    the trainer learns, here in the CUDA-graph mode (on CPU inductor skips the graphs; each step still marks a new
    graph step). (Whole runs drift apart as any change of summation order makes them.)"""
    torch.manual_seed(0)
    eager = timm.create_model('cifar_resnet8', num_classes=10)
    compiled = timm.create_model('cifar_resnet8', num_classes=10)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = [torch.nn.functional.cross_entropy(model(images), labels) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    trainer = Trainer(from_dict(digits_config(tmp_path, 'compiled', epochs=1, trainer={
        'compile': True, 'compile_mode': 'reduce-overhead'})), quiet=True)
    assert trainer.forward.cuda_graphs
    assert trainer.fit()['last_top1'] > 30 and trainer.forward.active
    assert 'compiled' in open(tmp_path / 'compiled' / 'log.txt').read()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """gloo on CPU: a LayerNorm student (per-sample arithmetic, unlike BatchNorm) distilled from a CNN teacher; two
    ranks each take half of every global batch, so the run equals one process up to summation order."""
    teacher_path = teacher_weights(tmp_path)
    student = {'name': 'vit_tiny_patch16_224', 'kwargs': {'img_size': 8, 'patch_size': 4, 'depth': 1,
                                                          'embed_dim': 64, 'num_heads': 2}}
    cfg = kd_config(tmp_path, 'single', teacher_path, epochs=3, student=student, data={'batch_size': 100},
                    optimizer={'name': 'adamw', 'lr': 3e-3, 'weight_decay': 0.05}, losses={'ce': 1.0, 'kd': 0.5})
    single = Trainer(from_dict(cfg), quiet=True).fit()
    recipe = tmp_path / 'ddp.yaml'
    recipe.write_text(yaml.safe_dump({**cfg, 'trainer': {**cfg['trainer'], 'run_name': 'ddp'}}))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             '-m', 'distill', 'train', str(recipe)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'x 2 processes' in open(tmp_path / 'ddp' / 'log.txt').read()
    ddp = json.load(open(tmp_path / 'ddp' / 'summary.json'))
    one, two = metrics(tmp_path / 'single'), metrics(tmp_path / 'ddp')
    assert len(two) == 3 and single['last_top1'] > 35 and ddp['epochs'] == 3  # losses below, not a chaotic top-1
    for a, b in zip(one, two):
        assert abs(a['train_loss'] - b['train_loss']) < 1e-3 * a['train_loss'], (a, b)
        assert abs(a['val_loss'] - b['val_loss']) < 2e-3 * a['val_loss'], (a, b)
    # CRD's memory banks are per-rank state: refused under torchrun with a clear line
    crd = tmp_path / 'crd.yaml'
    crd.write_text(yaml.safe_dump({**cfg, 'student': {'name': 'cifar_resnet8'}, 'losses': {'ce': 1.0, 'crd': 0.8},
                                   'trainer': {**cfg['trainer'], 'run_name': 'crd'}}))
    refused = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                              '--nproc_per_node=2', '-m', 'distill', 'train', str(crd)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "loss terms ['crd'] keep per-sample state" in refused.stderr


def test_streamed_image_folder_trains_with_imagenet_augmentation_and_a_seeded_order(tmp_path):
    from distill.data import build_data
    root = image_folder(tmp_path / 'folder')
    data_cfg = {'name': 'imagefolder', 'root': root, 'in_memory': False, 'workers': 2, 'image_size': 32,
                'augment': 'random_resized_crop', 'batch_size': 8}
    first, again = (build_data(from_dict({'data': data_cfg}).data, seed=3) for _ in range(2))
    batches = [next(iter(loader.train)) for loader in (first, again)]
    assert batches[0].images.shape == (8, 3, 32, 32) and torch.equal(batches[0].indices, batches[1].indices)
    assert torch.equal(batches[0].images, batches[1].images)  # worker augmentation seeded from the generator
    val = next(iter(first.val))
    assert val.images.shape[-1] == 32 and torch.equal(val.indices, torch.arange(len(val.indices)))
    cfg = digits_config(tmp_path, 'streamed', epochs=2, data=data_cfg, student={'name': 'cifar_resnet8'})
    cfg['data'] = data_cfg
    summary = Trainer(from_dict(cfg), quiet=True).fit()
    assert summary['epochs'] == 2 and len(metrics(tmp_path / 'streamed')) == 2
    # what streaming cannot do is refused with one line
    with pytest.raises(DistillError, match='needs the in-memory pipeline'):
        from_dict({'data': {**data_cfg, 'train_per_class': 5}})
    with pytest.raises(DistillError, match='random_resized_crop is for streamed data'):
        from_dict({'data': {**data_cfg, 'in_memory': True}})
    teacher = teacher_weights(tmp_path, num_classes=3)
    cached = kd_config(tmp_path, 'cached', teacher, teacher_cache={'enabled': True})
    cached['data'] = data_cfg
    with pytest.raises(DistillError, match='no finite set of views'):
        Trainer(from_dict(cached), quiet=True)


@pytest.mark.slow
def test_a_failing_compile_falls_back_to_eager_and_says_so(tmp_path, monkeypatch):
    def broken_backend(graph, example_inputs):  # what a compiler failure looks like
        raise RuntimeError('backend compiler failed')
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, mode: compile_module(self, backend=broken_backend))
    trainer = Trainer(from_dict(digits_config(tmp_path, 'fallback', epochs=1, trainer={'compile': True})),
                      quiet=True)
    summary = trainer.fit()
    assert summary['epochs'] == 1 and not trainer.forward.active and summary['last_top1'] > 20
    assert 'torch.compile failed (BackendCompilerFailed: RuntimeError: backend compiler failed); training eagerly' \
        in open(tmp_path / 'fallback' / 'log.txt').read()
