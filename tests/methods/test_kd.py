"""Hinton KD (Hinton et al., 2015) against its formula, also through the Distiller, and with logit standardization
(Sun et al., CVPR 2024) against sunshangquan/logit-standardization-KD."""
import pytest
import torch
import torch.nn.functional as F

from distill import Batch, Distiller, kd_loss
from engine_helpers import _pair
from helpers import assert_matches_reference, random_logits


def reference_kd(student_logits, teacher_logits, temperature):
    """Hinton et al. 2015 as written: T^2 * mean_i sum_c p_t log(p_t / p_s), softmaxes at temperature T."""
    p_teacher = torch.softmax(teacher_logits.double() / temperature, dim=1)
    p_student = torch.softmax(student_logits.double() / temperature, dim=1)
    return temperature ** 2 * (p_teacher * (p_teacher.log() - p_student.log())).sum(1).mean()


def ref_kd_logit_standardized(logits_student_in, logits_teacher_in, temperature=2.0):
    """sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py: kd_loss with logit_stand=True."""
    def normalize(logit):
        mean = logit.mean(dim=-1, keepdims=True)
        stdv = logit.std(dim=-1, keepdims=True)
        return (logit - mean) / (1e-7 + stdv)

    logits_student = normalize(logits_student_in)
    logits_teacher = normalize(logits_teacher_in)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


@pytest.mark.parametrize('temperature', [1.0, 4.0, 8.0])
def test_kd_loss_matches_formula_and_gradient(temperature):
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(6, 10, generator=gen)).requires_grad_()
    teacher = 3 * torch.randn(6, 10, generator=gen)
    ours = kd_loss(student, teacher, temperature)
    ref = reference_kd(student, teacher, temperature)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    # d/ds of T^2 KL = T * (p_s - p_t) / batch: the T^2 factor leaves a gradient linear in T (Hinton et al.)
    ours.backward()
    expected = temperature * (torch.softmax(student.detach() / temperature, 1) -
                              torch.softmax(teacher / temperature, 1)) / student.shape[0]
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_with_logit_standardization_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    assert_matches_reference(lambda s, t: kd_loss(s, t, 2.0, True), ref_kd_logit_standardized, student, teacher)


def test_kd_loss_zero_when_equal_and_fp32_under_bf16_autocast():
    logits = torch.randn(4, 7)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(4, 7).bfloat16(), torch.randn(4, 7).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = kd_loss(student, teacher, 4.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference_kd(student.float(), teacher.float(), 4.0).item(), rel=1e-5)


def test_loss_is_weighted_sum_of_formulas():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}).train()
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = distiller(Batch(images, targets))
    with torch.no_grad():
        teacher_logits = teacher(images)
    expected = 0.1 * F.cross_entropy(out.logits, targets) + 0.9 * reference_kd(out.logits, teacher_logits, 4.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
