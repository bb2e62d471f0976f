"""Gradient accumulation and the student's EMA (distill/training/stepping.py) through the real trainer on digits."""
import json

import pytest
import torch
from safetensors.torch import load_file

from distill.config import from_dict
from distill.errors import DistillError
from distill.training.trainer import Trainer
from helpers import digits_config

# A LayerNorm student: per-sample arithmetic, so two half batches give the gradient of their union (BatchNorm's
# batch statistics would not).
VIT = {'name': 'vit_tiny_patch16_224', 'kwargs': {'img_size': 8, 'patch_size': 4, 'depth': 1, 'embed_dim': 64,
                                                  'num_heads': 2}}


def vit_run(tmp_path, name, batch_size, accumulate_steps, epochs=1, **sections):
    return from_dict(digits_config(tmp_path, name, epochs=epochs, student=VIT,
                                   data={'augment': 'none', 'batch_size': batch_size},
                                   trainer={'accumulate_steps': accumulate_steps}, **sections))


def test_accumulating_two_half_batches_is_one_step_of_the_whole_batch(tmp_path):
    """Batch 16 x 2 accumulation steps trains what batch 32 trains: the same number of optimizer updates and the
    same weights up to summation order, the epoch's last group (16 + 14 images) weighted by its 30 samples exactly
    as batch 32's last batch of 30."""
    whole = Trainer(vit_run(tmp_path, 'whole', 32, 1), quiet=True)
    halves = Trainer(vit_run(tmp_path, 'halves', 16, 2), quiet=True)
    assert len(whole.data.train.split) % 32 == 30
    whole.fit(), halves.fit()
    assert halves.state.num_updates == whole.state.num_updates == 45
    for (name, a), b in zip(whole.distiller.student.state_dict().items(),
                            halves.distiller.student.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6, msg=name)
    assert halves.state.history[0]['train_loss'] == pytest.approx(whole.state.history[0]['train_loss'], rel=1e-5)
    # not a test that cannot fail: one update per half batch (no accumulation) trains other weights
    single = Trainer(vit_run(tmp_path, 'single', 16, 1), quiet=True)
    single.fit()
    head = 'head.weight'
    assert not torch.allclose(single.distiller.student.state_dict()[head], whole.distiller.student.state_dict()[head],
                              atol=1e-3)


def test_the_ema_is_evaluated_checkpointed_exported_and_resumes_exactly(tmp_path):
    """ema.enabled: the averaged student (timm ModelEmaV3) is what the run evaluates (val_top1; the raw student's
    as val_top1_raw), keeps as best and exports; stopped after epoch 1 and resumed, it ends bit-equal to an
    uninterrupted run; decay 0 makes it the trained weights themselves."""
    ema, constant = {'enabled': True, 'decay': 0.9}, {'name': 'none'}  # a constant lr: epochs=1 then 2 is a resume
    straight = Trainer(from_dict(digits_config(tmp_path, 'straight', epochs=2, ema=ema, scheduler=constant)),
                       quiet=True)
    summary = straight.fit()
    checkpoint = torch.load(tmp_path / 'straight' / 'checkpoints' / 'last.pt', weights_only=True)
    raw, averaged = checkpoint['model'], checkpoint['model_ema']
    assert not torch.equal(raw['fc.weight'], averaged['fc.weight'])
    exported = load_file(tmp_path / 'straight' / 'student_last.safetensors')
    assert all(torch.equal(exported[k], averaged[k]) for k in averaged)
    evaluated = straight._evaluate(straight.ema.module)['top1']
    assert evaluated == summary['last_top1'] == straight.state.history[-1]['val_top1']
    assert 'val_top1_raw' in straight.state.history[-1]

    Trainer(from_dict(digits_config(tmp_path, 'resumed', epochs=1, ema=ema, scheduler=constant)), quiet=True).fit()
    resumed = Trainer(from_dict(digits_config(tmp_path, 'resumed', epochs=2, ema=ema, scheduler=constant)),
                      resume=True, quiet=True)
    resumed.fit()
    final = torch.load(tmp_path / 'resumed' / 'checkpoints' / 'last.pt', weights_only=True)['model_ema']
    assert all(torch.equal(final[k], averaged[k]) for k in averaged)

    zero = Trainer(from_dict(digits_config(tmp_path, 'zero', epochs=1, ema={'enabled': True, 'decay': 0.0})),
                   quiet=True)
    zero.fit()
    assert all(torch.equal(v, zero.distiller.student.state_dict()[k]) for k, v in zero.ema.module.state_dict().items())
    record = json.loads(open(tmp_path / 'zero' / 'metrics.jsonl').readlines()[-1])
    assert record['val_top1'] == record['val_top1_raw']


@pytest.mark.parametrize('override, message', [
    ({'ema': {'decay': 1.0}}, r'ema.decay must be in \[0, 1\), got 1.0'),
    ({'trainer': {'accumulate_steps': 0}}, 'trainer.accumulate_steps must be > 0, got 0'),
    ({'teacher_cache': {'mode': 'replay'}}, 'teacher_cache.mode=replay needs teacher_cache.enabled=true'),
    ({'data': {'mix_prob': 1.5}}, r'data.mix_prob must be in \[0, 1\], got 1.5'),
])
def test_bad_settings_are_one_line(tmp_path, override, message):
    with pytest.raises(DistillError, match=message):
        from_dict(digits_config(tmp_path, **override))
