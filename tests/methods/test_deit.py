"""DeiT token distillation (Touvron et al., ICML 2021) against the official formula (facebookresearch/deit
losses.py) and, through the Distiller, against timm's own TokenDistillationTask on the same distilled DeiT, teacher
and batch: both modes, timm's three weightings, float64, the loss and every student gradient."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import TokenDistillationTask

from distill import Batch, DistillError, Distiller
from distill.losses.deit import deit_loss
from helpers import TARGETS, assert_matches_reference, random_logits


def reference_deit(distillation_logits, teacher_logits, mode, tau=1.0):
    """facebookresearch/deit losses.py DistillationLoss, its distillation term; soft with timm's batch mean
    (the official code's sum / (batch x classes) is this / num_classes)."""
    if mode == 'hard':
        return F.cross_entropy(distillation_logits, teacher_logits.argmax(dim=1))
    return F.kl_div(F.log_softmax(distillation_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction='sum', log_target=True) * (tau * tau) / distillation_logits.shape[0]


@pytest.mark.parametrize('mode, tau', [('hard', 1.0), ('soft', 1.0), ('soft', 3.0)])
def test_deit_loss_matches_the_official_formula_value_and_gradient(mode, tau):
    student, teacher = random_logits(torch.Generator().manual_seed(0))
    assert_matches_reference(lambda s, t: deit_loss(s, t, mode, tau), lambda s, t: reference_deit(s, t, mode, tau),
                             student, teacher)


def tiny_distilled_deit(num_classes=5):
    return timm.create_model('deit_tiny_distilled_patch16_224', img_size=16, patch_size=8, embed_dim=16, depth=1,
                             num_heads=2, num_classes=num_classes)


@pytest.mark.parametrize('mode', ['hard', 'soft'])
@pytest.mark.parametrize('weights, ours', [({'distill_loss_weight': 0.3}, (1.0, 0.3)),  # independent
                                           ({'task_loss_weight': 0.7}, (0.7, 0.3)),  # complementary
                                           ({}, (1.0, 1.0))])  # equal
def test_the_distiller_equals_timms_token_distillation_task(mode, weights, ours):
    torch.manual_seed(0)
    student, teacher = tiny_distilled_deit().double(), timm.create_model('resnet10t', num_classes=5).double()
    images, labels = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    theirs_student = copy.deepcopy(student)
    task = TokenDistillationTask(theirs_student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type=mode,
                                 temperature=2.0, dtype=torch.float64, verbose=False, **weights).train()
    expected = task(images, labels)['loss']
    expected.backward()
    distiller = Distiller(teacher, student, {'ce': ours[0], 'deit': {'weight': ours[1], 'mode': mode,
                                                                     'temperature': 2.0}}).train()
    out = distiller(Batch(images, labels))
    out.loss.backward()
    assert out.loss.dtype == torch.float64 and out.loss.item() > 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    for (name, ours_param), theirs_param in zip(student.named_parameters(), theirs_student.parameters()):
        assert ours_param.grad is not None and theirs_param.grad is not None, name
        torch.testing.assert_close(ours_param.grad, theirs_param.grad, rtol=1e-6, atol=1e-12, msg=name)
    # the training top-1 reads the class head; both heads learn, the distillation head from the teacher alone
    class_logits, distillation_logits = student.train()(images)
    torch.testing.assert_close(out.logits, class_logits)
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0


def test_evaluation_averages_the_two_heads_as_timms_inference():
    torch.manual_seed(0)
    student = tiny_distilled_deit()
    Distiller(timm.create_model('resnet10t', num_classes=5), student, {'ce': 0.5, 'deit': 0.5})
    images = torch.randn(3, 3, 16, 16)
    class_logits, distillation_logits = student.train()(images)
    torch.testing.assert_close(student.eval()(images), (class_logits + distillation_logits) / 2)


def test_a_student_without_a_distillation_head_is_refused_in_one_line():
    teacher, student = timm.create_model('resnet10t', num_classes=5), timm.create_model('resnet10t', num_classes=5)
    with pytest.raises(DistillError, match=r"has none: use a distilled DeiT \(timm's deit_\*_distilled_\*"):
        Distiller(teacher, student, {'ce': 0.5, 'deit': 0.5})


def test_a_distillation_head_no_term_reads_is_noted():
    teacher = timm.create_model('resnet10t', num_classes=5)
    assert 'no loss term reads it' in Distiller(teacher, tiny_distilled_deit(), {'ce': 0.1, 'kd': 0.9}).notes[0]
    assert Distiller(teacher, tiny_distilled_deit(), {'ce': 0.5, 'deit': 0.5}).notes == []


def test_hard_distillation_vanishes_when_the_head_agrees_with_the_teacher():
    teacher = torch.eye(10)[TARGETS[:8]] * 50
    assert deit_loss(teacher, teacher, 'hard').item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_a_distilled_deit_trains_through_the_trainer_with_the_teacher_cache_as_with_the_live_teacher(tmp_path):
    from distill.config import from_dict
    from distill.training.trainer import Trainer
    from test_speed import kd_config, metrics, teacher_weights
    teacher_path = teacher_weights(tmp_path)
    student = {'name': 'deit_tiny_distilled_patch16_224',
               'kwargs': {'img_size': 8, 'patch_size': 4, 'embed_dim': 16, 'depth': 1, 'num_heads': 2}}
    sections = dict(student=student, losses={'ce': 0.5, 'deit': {'weight': 0.5, 'mode': 'soft', 'temperature': 2.0}})
    live = Trainer(from_dict(kd_config(tmp_path, 'live', teacher_path, **sections)), quiet=True)
    assert live.model_notes == [] and live.fit()['epochs'] == 1
    cache = {'enabled': True, 'dir': str(tmp_path / 'cache'), 'dtype': 'float32'}
    Trainer(from_dict(kd_config(tmp_path, 'cached', teacher_path, teacher_cache=cache, **sections)), quiet=True).fit()
    live_record, cached_record = metrics(tmp_path / 'live')[0], metrics(tmp_path / 'cached')[0]
    assert live_record['train_deit'] > 0 and 0 < cached_record['teacher_cache_filled'] < 1
    for key in ('train_loss', 'train_ce', 'train_deit'):
        assert cached_record[key] == pytest.approx(live_record[key], rel=1e-3), key
