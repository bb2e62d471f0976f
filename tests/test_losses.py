"""The loss machinery: the registry's checks of names and options, and the engine's treatment of the teacher. Each
method's own tests (CE and KD included) are in tests/methods/test_<method>.py."""
import pytest
import torch

import distill  # noqa: F401
from distill import Batch, DistillError, Distiller, create_loss
from engine_helpers import _pair


def test_create_loss_rejects_unknown_names_and_options():
    assert create_loss('kd', temperature=2.0).temperature == 2.0
    with pytest.raises(DistillError, match="unknown loss 'kdd'.*did you mean 'kd'"):
        create_loss('kdd')
    with pytest.raises(DistillError, match="unknown option losses.kd.temperatur.*did you mean 'temperature'"):
        create_loss('kd', temperatur=4)
    with pytest.raises(DistillError, match='temperature must be > 0'):
        create_loss('kd', temperature=0)


def test_teacher_is_frozen_in_eval_and_its_bn_statistics_never_change():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    teacher.train()  # even a teacher handed over in train mode is put in eval
    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}})
    distiller.train()
    assert not teacher.training and student.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_modules().parameters(), lr=0.1)
    for _ in range(3):
        out = distiller(Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f'teacher {key} changed'
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not any(p is q for p in distiller.trainable_modules().parameters() for q in teacher.parameters())
    assert set(out.terms) == {'ce', 'kd'}
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)


def test_student_alone_and_teacher_requirement():
    _, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    out = Distiller(None, student, {'ce': 1.0})(Batch(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])))
    assert set(out.terms) == {'ce'}
    with pytest.raises(DistillError, match=r"\['kd'\] need a teacher"):
        Distiller(None, student, {'ce': 0.1, 'kd': 0.9})
    with pytest.raises(DistillError, match='weight must be a number'):
        Distiller(None, student, {'ce': 'heavy'})
