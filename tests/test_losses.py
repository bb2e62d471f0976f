"""Cross-entropy and Hinton KD against their formulas, and the engine's treatment of the teacher."""
import pytest
import timm
import torch
import torch.nn.functional as F

import distill  # noqa: F401
from distill import DistillError, Distiller, create_loss, cross_entropy_loss, kd_loss


def reference_kd(student_logits, teacher_logits, temperature):
    """Hinton et al. 2015 as written: T^2 * mean_i sum_c p_t log(p_t / p_s), softmaxes at temperature T."""
    p_teacher = torch.softmax(teacher_logits.double() / temperature, dim=1)
    p_student = torch.softmax(student_logits.double() / temperature, dim=1)
    return temperature ** 2 * (p_teacher * (p_teacher.log() - p_student.log())).sum(1).mean()


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


def test_kd_loss_zero_when_equal_and_fp32_under_bf16_autocast():
    logits = torch.randn(4, 7)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(4, 7).bfloat16(), torch.randn(4, 7).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = kd_loss(student, teacher, 4.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference_kd(student.float(), teacher.float(), 4.0).item(), rel=1e-5)


def test_cross_entropy_with_label_smoothing_matches_formula():
    logits, targets, eps = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), 0.1
    smooth = torch.full((5, 4), eps / 4).scatter_add_(1, targets[:, None], torch.full((5, 1), 1 - eps))
    expected = -(smooth * torch.log_softmax(logits, 1)).sum(1).mean()
    assert cross_entropy_loss(logits, targets, eps).item() == pytest.approx(expected.item(), rel=1e-6)


def test_create_loss_rejects_unknown_names_and_options():
    assert create_loss('kd', temperature=2.0).temperature == 2.0
    with pytest.raises(DistillError, match="unknown loss 'kdd'.*did you mean 'kd'"):
        create_loss('kdd')
    with pytest.raises(DistillError, match="unknown option losses.kd.temperatur.*did you mean 'temperature'"):
        create_loss('kd', temperatur=4)
    with pytest.raises(DistillError, match='temperature must be > 0'):
        create_loss('kd', temperature=0)


def _pair():
    torch.manual_seed(0)
    return timm.create_model('cifar_resnet8x4', num_classes=10), timm.create_model('cifar_resnet8', num_classes=10)


def test_teacher_is_frozen_in_eval_and_its_bn_statistics_never_change():
    teacher, student = _pair()
    teacher.train()  # even a teacher handed over in train mode is put in eval
    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}})
    distiller.train()
    assert not teacher.training and student.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_modules().parameters(), lr=0.1)
    for _ in range(3):
        out = distiller(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f'teacher {key} changed'
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not any(p is q for p in distiller.trainable_modules().parameters() for q in teacher.parameters())
    assert set(out['terms']) == {'ce', 'kd'}
    assert out['loss'].item() == pytest.approx(sum(v.item() for v in out['terms'].values()), rel=1e-6)


def test_loss_is_weighted_sum_of_formulas():
    teacher, student = _pair()
    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}).train()
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = distiller(images, targets)
    with torch.no_grad():
        teacher_logits = teacher(images)
    expected = 0.1 * F.cross_entropy(out['logits'], targets) + 0.9 * reference_kd(out['logits'], teacher_logits, 4.0)
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_student_alone_and_teacher_requirement():
    _, student = _pair()
    out = Distiller(None, student, {'ce': 1.0})(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert set(out['terms']) == {'ce'}
    with pytest.raises(DistillError, match=r"\['kd'\] need a teacher"):
        Distiller(None, student, {'ce': 0.1, 'kd': 0.9})
    with pytest.raises(DistillError, match='weight must be a number'):
        Distiller(None, student, {'ce': 'heavy'})
