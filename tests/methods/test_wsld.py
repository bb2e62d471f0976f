"""WSLD (Zhou et al., ICLR 2021) against the official code, and the properties of its per-sample weight."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses import create_loss
from distill.losses.wsld import WSLDLoss, wsld_loss, wsld_weights
from helpers import assert_matches_reference


def ref_wsld(fc_s, fc_t, label, T=4.0, num_classes=10):
    """bellymonster/Weighted-Soft-Label-Distillation knowledge_distiller.py: WSLDistiller.forward, the soft part
    (``soft_loss``; the hard loss is our 'ce' term and alpha the term's weight). ``nn.LogSoftmax()`` without dim
    takes dim 1 on 2-D input; ``.cuda()`` dropped; the one-hot width is a parameter (1000 in the original)."""
    softmax, logsoftmax = torch.nn.Softmax(dim=1), torch.nn.LogSoftmax(dim=1)
    s_input_for_softmax = fc_s / T
    t_input_for_softmax = fc_t / T
    t_soft_label = softmax(t_input_for_softmax)
    softmax_loss = - torch.sum(t_soft_label * logsoftmax(s_input_for_softmax), 1, keepdim=True)
    fc_s_auto = fc_s.detach()
    fc_t_auto = fc_t.detach()
    log_softmax_s = logsoftmax(fc_s_auto)
    log_softmax_t = logsoftmax(fc_t_auto)
    one_hot_label = F.one_hot(label, num_classes=num_classes).float()
    softmax_loss_s = - torch.sum(one_hot_label * log_softmax_s, 1, keepdim=True)
    softmax_loss_t = - torch.sum(one_hot_label * log_softmax_t, 1, keepdim=True)
    focal_weight = softmax_loss_s / (softmax_loss_t + 1e-7)
    ratio_lower = torch.zeros(1)
    focal_weight = torch.max(focal_weight, ratio_lower)
    focal_weight = 1 - torch.exp(- focal_weight)
    softmax_loss = focal_weight * softmax_loss
    soft_loss = (T ** 2) * torch.mean(softmax_loss)
    return soft_loss


def _logits(seed=0, batch=8, classes=10):
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, classes, generator=gen)
    teacher = 3 * torch.randn(batch, classes, generator=gen)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    return student, teacher, targets


def test_wsld_matches_the_official_code_in_value_and_gradient():
    student, teacher, targets = _logits()
    term = WSLDLoss()
    assert term.temperature == 4.0 and WSLDLoss.default_weight == 2.25  # the paper's CIFAR-100 setting
    assert_matches_reference(wsld_loss, ref_wsld, student, teacher, targets, term.temperature)
    assert_matches_reference(wsld_loss, ref_wsld, student, teacher, targets, 2.0)  # the ImageNet T


def test_weight_is_detached_and_equals_one_minus_exp_of_the_ce_ratio():
    student, teacher, targets = _logits(1)
    ce_s = -F.log_softmax(student, 1).gather(1, targets[:, None]).squeeze(1)
    ce_t = -F.log_softmax(teacher, 1).gather(1, targets[:, None]).squeeze(1)
    expected = 1 - torch.exp(-ce_s / ce_t)
    torch.testing.assert_close(wsld_weights(student, teacher, targets), expected, rtol=1e-5, atol=1e-6)
    # the gradient is that of T^2 * mean(w * soft CE) with w a constant: no gradient through the weight
    x = student.clone().requires_grad_()
    grad = torch.autograd.grad(wsld_loss(x, teacher, targets, 4.0), x)[0]
    y = student.clone().requires_grad_()
    soft_ce = -(F.softmax(teacher / 4, 1) * F.log_softmax(y / 4, 1)).sum(1)
    grad_constant_weight = torch.autograd.grad(16 * (expected * soft_ce).mean(), y)[0]
    torch.testing.assert_close(grad, grad_constant_weight, rtol=1e-5, atol=1e-7)


def test_soft_term_is_a_cross_entropy_not_a_kl():
    # CE(p_t, p_s) = KL(p_t || p_s) + H(p_t): a KL would miss the teacher-entropy part of the value
    student, teacher, targets = _logits(2)
    w, T = wsld_weights(student, teacher, targets), 4.0
    p_t = F.softmax(teacher / T, 1)
    kl = (p_t * (F.log_softmax(teacher / T, 1) - F.log_softmax(student / T, 1))).sum(1)
    entropy = -(p_t * F.log_softmax(teacher / T, 1)).sum(1)
    torch.testing.assert_close(wsld_loss(student, teacher, targets, T), T ** 2 * (w * (kl + entropy)).mean())
    assert (T ** 2 * (w * entropy).mean()) > 0.1


def test_a_teacher_worse_than_the_student_gets_a_smaller_weight():
    targets = torch.tensor([0, 0])
    student = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    teacher = torch.tensor([[6.0, 0.0, 0.0],    # sure of the label: the student lags, a large weight
                            [0.0, 3.0, 0.0]])   # wrong where the student is right: a small weight
    w = wsld_weights(student, teacher, targets)
    assert w[1] < 1 - math.exp(-1) < w[0]  # ce_s / ce_t < 1 exactly where the teacher is worse
    assert w[1] < 0.2 and w[0] > 0.99


def test_temperature_must_be_positive():
    with pytest.raises(DistillError, match='temperature must be > 0'):
        create_loss('wsld', temperature=0.0)
