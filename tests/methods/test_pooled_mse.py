"""Pooled-feature MSE against timm's own FeatureDistillationTask on the same student, teacher, projection and batch:
timm's three weightings, widths equal (no projection) and different, float64, the loss and every gradient."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import FeatureDistillationTask

import distill  # noqa: F401
from distill import Batch, Distiller
from distill.losses.pooled_mse import pooled_mse_loss
from helpers import assert_matches_reference, random_logits


def test_pooled_mse_is_the_mean_squared_error_value_and_gradient():
    student, teacher = random_logits(torch.Generator().manual_seed(0))  # any (batch, width) pair
    assert_matches_reference(pooled_mse_loss, lambda s, t: ((s - t) ** 2).mean(), student, teacher)


@pytest.mark.parametrize('student_name', ['resnet10t', 'cifar_resnet8'])  # width 512 as the teacher's, and 64
@pytest.mark.parametrize('weights, ours', [({'distill_loss_weight': 5.0}, (1.0, 5.0)),  # independent
                                           ({'task_loss_weight': 0.7}, (0.7, 0.3)),  # complementary
                                           ({}, (1.0, 1.0))])  # equal
def test_the_distiller_equals_timms_feature_distillation_task(student_name, weights, ours):
    torch.manual_seed(0)
    teacher = timm.create_model('resnet10t', num_classes=5).double()
    # timm's task re-normalises the teacher's input from the student's pretrained_cfg statistics: give both the same
    same_input = dict(mean=teacher.pretrained_cfg['mean'], std=teacher.pretrained_cfg['std'])
    student = timm.create_model(student_name, num_classes=5, pretrained_cfg_overlay=same_input).double()
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    distiller = Distiller(teacher, student, {'ce': ours[0], 'pooled_mse': ours[1]}, input_size=(3, 32, 32)).double()
    theirs_student = copy.deepcopy(student)
    task = FeatureDistillationTask(theirs_student, teacher, criterion=torch.nn.CrossEntropyLoss(),
                                   dtype=torch.float64, verbose=False, **weights).train()
    projection, theirs_projection = distiller.loss_terms['pooled_mse'].projection, task.trainable_module.projection
    assert (theirs_projection is None) == isinstance(projection, torch.nn.Identity)
    if theirs_projection is not None:
        theirs_projection.load_state_dict(projection.state_dict())
    expected = task(images, labels)['loss']
    expected.backward()
    out = distiller.train()(Batch(images, labels))
    out.loss.backward()
    assert out.loss.dtype == torch.float64 and out.terms['pooled_mse'].item() > 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    pairs = list(zip(student.named_parameters(), theirs_student.parameters()))
    if theirs_projection is not None:
        pairs += list(zip(projection.named_parameters(), theirs_projection.parameters()))
    for (name, ours_param), theirs_param in pairs:
        torch.testing.assert_close(ours_param.grad, theirs_param.grad, rtol=1e-6, atol=1e-12, msg=name)


def test_the_term_reads_what_timms_forward_head_calls_pre_logits():
    torch.manual_seed(0)
    teacher, student = timm.create_model('resnet10t', num_classes=5), timm.create_model('cifar_resnet8', num_classes=5)
    distiller = Distiller(teacher, student, {'ce': 1.0, 'pooled_mse': 1.0}, input_size=(3, 32, 32)).train()
    images = torch.randn(2, 3, 32, 32)
    step = distiller.step_outputs(Batch(images, torch.tensor([0, 1])), 0, True)
    torch.testing.assert_close(step.student_features['pre_logits'],
                               student.forward_head(student.forward_features(images), pre_logits=True))
    with torch.no_grad():
        expected = teacher.eval().forward_head(teacher.forward_features(images), pre_logits=True)
    torch.testing.assert_close(step.teacher_features['pre_logits'], expected)
    assert F.mse_loss(distiller.loss_terms['pooled_mse'].projection(step.student_features['pre_logits']),
                      expected).item() > 0
