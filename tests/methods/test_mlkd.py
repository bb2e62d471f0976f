"""MLKD (Jin et al., CVPR 2023) against the official mdistiller/distillers/MLKD.py, and its strong view through
the trainer."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from safetensors.torch import save_file

from distill.config import from_dict
from distill.losses import mlkd_loss
from distill.training.trainer import Trainer
from helpers import assert_matches_reference, digits_config, random_logits, strip_times


def ref_mlkd(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong,
             temperature=4.0, logit_stand=False):
    """Official MLKD mdistiller/distillers/MLKD.py: forward_train's distillation terms (kd, cc and bc on the
    weak view, kd on the strong view), with its kd_loss/cc_loss/bc_loss and numpy percentile gates; with
    ``logit_stand`` as sunshangquan/logit-standardization-KD distillers/MLKD.py (z-scored kd_loss only)."""
    import numpy as np

    def normalize(logit):
        return (logit - logit.mean(dim=-1, keepdims=True)) / (1e-7 + logit.std(dim=-1, keepdims=True))

    def kd_loss(s, t, T):
        s, t = (normalize(s), normalize(t)) if logit_stand else (s, t)
        return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1).mean() * T ** 2

    def cc_loss(s, t, T):
        batch_size, class_num = t.shape
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        return ((torch.mm(pt.transpose(1, 0), pt) - torch.mm(ps.transpose(1, 0), ps)) ** 2).sum() / class_num

    def bc_loss(s, t, T):
        batch_size, class_num = t.shape
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        return ((torch.mm(pt, pt.transpose(1, 0)) - torch.mm(ps, ps.transpose(1, 0))) ** 2).sum() / batch_size

    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0)
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    sw, tw, ss, ts = logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong
    loss_kd_weak = sum((kd_loss(sw, tw, T) * mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    loss_kd_strong = (kd_loss(ss, ts, temperature) + kd_loss(ss, ts, 3.0) + kd_loss(ss, ts, 5.0)
                      + kd_loss(sw, tw, 2.0) + kd_loss(sw, tw, 6.0))
    loss_cc_weak = sum((cc_loss(sw, tw, T) * class_conf_mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    loss_bc_weak = sum((bc_loss(sw, tw, T) * mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    return loss_kd_weak + loss_kd_strong + loss_cc_weak + loss_bc_weak


def test_mlkd_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen), random_logits(gen)  # [weak, strong] views
    assert_matches_reference(lambda s, t: mlkd_loss(s[0], t[0], s[1], t[1]),
                             lambda s, t: ref_mlkd(s[0], t[0], s[1], t[1]), student, teacher)


def test_mlkd_with_logit_standardization_at_base_temperature_2_matches_the_reference():
    """The logit-standardization paper's MLKD runs: --logit-stand --base-temp 2 (temperatures 2, 3, 5, 2, 6)."""
    from distill.losses.base import StepOutputs
    from distill.losses.mlkd import MLKDLoss
    gen = torch.Generator().manual_seed(1)
    student, teacher = random_logits(gen), random_logits(gen)
    term = MLKDLoss(kd_weight=1.0, ce_weight=0.0, temperature=2.0, logit_standardization=True)
    ours = lambda s, t: term(StepOutputs(s[0], torch.zeros(len(s[0]), dtype=torch.long), t[0],  # noqa: E731
                                         student_logits_strong=s[1], teacher_logits_strong=t[1]))
    assert_matches_reference(ours, lambda s, t: ref_mlkd(s[0], t[0], s[1], t[1], 2.0, logit_stand=True),
                             student, teacher)
    assert term.temperatures == (2.0, 3.0, 5.0, 2.0, 6.0)


@pytest.mark.slow
def test_strong_view_batches_are_reproducible_and_mlkd_trains_and_resumes_exactly(tmp_path):
    """The loader adds a RandAugment view only when a term needs it; a 1-epoch MLKD run resumed to 2 epochs ends
    like a 2-epoch run (the strong views come from the checkpointed data generator)."""
    from distill.data import build_data
    cfg = from_dict(digits_config(tmp_path, epochs=1))
    assert next(iter(build_data(cfg.data, seed=3).train)).strong is None
    first, second = build_data(cfg.data, seed=3), build_data(cfg.data, seed=3)
    first.train.strong_view = second.train.strong_view = True
    batch, again = next(iter(first.train)), next(iter(second.train))
    weak, strong = batch.images, batch.strong
    assert torch.equal(strong, again.strong) and torch.equal(weak, again.images)
    assert strong.shape == weak.shape and not torch.equal(strong, weak)

    teacher_path = str(tmp_path / 'teacher.safetensors')
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), teacher_path)
    sections = dict(teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher_path}, scheduler={'name': 'constant'},
                    losses={'ce': 0.1, 'mlkd': 0.9})
    Trainer(from_dict(digits_config(tmp_path, 'full', epochs=2, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=1, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=2, **sections)), resume=True, quiet=True).fit()
    metrics = [[json.loads(line) for line in open(tmp_path / run / 'metrics.jsonl')] for run in ('full', 'part')]
    assert strip_times(metrics[0]) == strip_times(metrics[1]) and metrics[0][-1]['train_mlkd'] > 0
