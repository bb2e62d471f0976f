"""The step contract: a term reads only what it declared (the fields of needs it did not declare, and feature taps it
did not name, refuse to be used with one line naming the term and the missing declaration), ``requires_teacher``
follows from the needs, and a step returns a ``StepResult``."""
import pytest
import timm
import torch
import torch.nn.functional as F

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Batch, Distiller, DistillError
from distill.losses import LossTerm, Need, StepOutputs, list_losses, register_loss
from distill.losses.step import TEACHER_NEEDS, term_view
from distill.training.distiller import StepResult


def _models():
    torch.manual_seed(0)
    return timm.create_model('cifar_resnet14', num_classes=4), timm.create_model('cifar_resnet8', num_classes=4)


def _batch():
    return Batch(torch.randn(2, 3, 16, 16), torch.tensor([0, 3]), torch.tensor([5, 7]))


@pytest.mark.parametrize('field, need', [('teacher_logits', 'TEACHER_LOGITS'), ('indices', 'SAMPLE_INDICES'),
                                         ('teacher_features', 'TEACHER_FEATURES')])
def test_a_term_reading_an_undeclared_field_stops_naming_itself_and_the_need(field, need):
    @register_loss(f'test_reads_{field}')
    class ReadsUndeclared(LossTerm):
        needs = frozenset({Need.TEACHER_LOGITS}) if field != 'teacher_logits' else frozenset()

        def forward(self, step):
            value = getattr(step, field)
            return step.student_logits.sum() * 0 + (value[0] if field == 'teacher_features' else value).float().sum()

    teacher, student = _models()
    distiller = Distiller(teacher, student, {'ce': 1.0, f'test_reads_{field}': 1.0}, input_size=(3, 16, 16))
    with pytest.raises(DistillError, match=rf"loss term 'test_reads_{field}' reads step.{field} but does not "
                                           rf"declare Need.{need} in its needs"):
        distiller(_batch())


def test_a_term_reading_a_tap_it_did_not_name_stops():
    """Taps are per term: another term's tap is in the step, but not in this term's view."""
    @register_loss('test_reads_other_tap')
    class ReadsOtherTap(LossTerm):
        student_layers = (1,)

        def forward(self, step):
            return step.student_features[2].mean() + step.student_features[1].mean()

    teacher, student = _models()
    distiller = Distiller(teacher, student, {'ce': 1.0, 'fitnet': 1.0, 'test_reads_other_tap': 1.0},
                          input_size=(3, 16, 16))
    assert 2 in distiller.student_extractor.keys  # fitnet's hint tap: computed, but not declared by the term
    with pytest.raises(DistillError, match=r"loss term 'test_reads_other_tap' reads student feature tap 2 but does "
                                           r"not declare it in its student_layers \[1\]"):
        distiller(_batch())


def test_refused_fields_refuse_every_use():
    step = term_view(StepOutputs(torch.zeros(2, 4), torch.tensor([0, 1]), teacher_logits=torch.ones(2, 4)), 'x',
                     frozenset(), (), ())
    for use in (lambda t: t + 1, lambda t: F.softmax(t, 1), lambda t: t.shape, lambda t: t[0], bool, len,
                lambda t: torch.stack([t, t])):
        with pytest.raises(DistillError, match="loss term 'x' reads step.teacher_logits"):
            use(step.teacher_logits)
    declared = term_view(step, 'y', frozenset({Need.TEACHER_LOGITS}), (), ())
    assert declared.teacher_logits is not None
    torch.testing.assert_close(term_view(StepOutputs(torch.zeros(2, 4), torch.tensor([0, 1]),
                                                     teacher_logits=torch.ones(2, 4)), 'y',
                                         frozenset({Need.TEACHER_LOGITS}), (), ()).teacher_logits, torch.ones(2, 4))


def test_requires_teacher_follows_from_the_needs_and_cannot_be_declared_twice():
    for name, cls in list_losses().items():
        assert cls.requires_teacher == bool(cls.needs & TEACHER_NEEDS), name
    assert list_losses()['kd'].requires_teacher and list_losses()['fitnet'].requires_teacher
    assert not list_losses()['ce'].requires_teacher and not list_losses()['ce']().requires_teacher
    with pytest.raises(TypeError, match='declare Need.TEACHER_LOGITS or Need.TEACHER_FEATURES in needs instead'):
        class Twice(LossTerm):  # noqa: F841
            requires_teacher = True


def test_a_step_returns_a_step_result_whose_loss_is_the_weighted_sum():
    teacher, student = _models()
    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': 0.9}, input_size=(3, 16, 16))
    result = distiller(_batch())
    assert isinstance(result, StepResult) and set(result.terms) == {'ce', 'kd'}
    torch.testing.assert_close(result.loss, 0.1 * F.cross_entropy(result.logits, _batch().labels) + result.terms['kd'])
    assert not any(term.requires_grad for term in result.terms.values()) and result.loss.requires_grad
