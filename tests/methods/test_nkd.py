"""NKD (Yang et al., ICCV 2023) against the official NKDLoss (yzd-v/cls_KD), its target and normalised non-target
terms against the paper's formula, and the non-target mask that must drop the target class."""
import pytest
import torch
import torch.nn.functional as F

from distill import DistillError
from distill.losses import create_loss
from distill.losses.nkd import NKDLoss, nkd_loss
from helpers import TARGETS, assert_matches_reference, random_logits


def ref_nkd(logit_s, logit_t, gt_label, temp=1.0, gamma=1.5):
    """yzd-v/cls_KD (branch 1.0, after commit 9466b3f) mmcls/models/dis_losses/nkd.py: NKDLoss.forward
    (``self.log_softmax`` is ``nn.LogSoftmax(dim=1)``)."""
    if len(gt_label.size()) > 1:
        label = torch.max(gt_label, dim=1, keepdim=True)[1]
    else:
        label = gt_label.view(len(gt_label), 1)

    # N*class
    N, c = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    # N*1
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()

    loss_t = - (t_t * s_t).mean()

    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(N, -1)
    logit_t = logit_t[mask].reshape(N, -1)

    # N*class
    S_i = F.log_softmax(logit_s / temp, dim=1)
    T_i = F.softmax(logit_t / temp, dim=1)

    loss_non = (T_i * S_i).sum(dim=1).mean()
    loss_non = - gamma * (temp ** 2) * loss_non

    return loss_t + loss_non


def ref_nkd_whole_softmax(logit_s, logit_t, gt_label, temp=3.0, gamma=3.5):
    """The copies with the July 2023 mask bug (e.g. shicaiwei123/SDD-CVPR2024): ``scatter_(1, label, 1)`` keeps every
    class, so the 'non-target' term is plain KD's soft cross-entropy. Not what we follow."""
    label = gt_label.view(-1, 1)
    loss_t = -(F.softmax(logit_t, 1).gather(1, label) * F.log_softmax(logit_s, 1).gather(1, label)).mean()
    loss_non = (F.softmax(logit_t / temp, 1) * F.log_softmax(logit_s / temp, 1)).sum(1).mean()
    return loss_t - gamma * temp ** 2 * loss_non


def test_nkd_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    term = NKDLoss()
    assert (term.temperature, term.gamma, NKDLoss.default_weight) == (3.0, 3.5, 1.0)  # the official CIFAR-100 config
    assert_matches_reference(nkd_loss, ref_nkd, student, teacher, TARGETS, term.temperature, term.gamma)
    assert_matches_reference(nkd_loss, ref_nkd, student, teacher, TARGETS, 1.0, 1.5)  # the ImageNet setting
    one_hot = F.one_hot(TARGETS, 10).float()  # soft targets: the argmax class, as the official code
    assert_matches_reference(nkd_loss, ref_nkd, student, teacher, 0.9 * one_hot + 0.01, 3.0, 3.5)


def test_target_and_non_target_terms_follow_the_paper_formula():
    # L = -T_t log S_t - gamma * tau^2 * sum_{j != t} T^_j log S^_j, with T^_j = T_j^tau / (1 - T_t^tau) the teacher's
    # non-target probabilities renormalised (likewise S^ for the student) -- written here by that division.
    gen = torch.Generator().manual_seed(1)
    student, teacher = random_logits(gen)
    tau, gamma = 3.0, 3.5
    target = F.one_hot(TARGETS, 10).bool()
    p_s, p_t = F.softmax(student, 1), F.softmax(teacher, 1)
    target_term = -(p_t[target] * p_s[target].log()).mean()
    q_s, q_t = F.softmax(student / tau, 1), F.softmax(teacher / tau, 1)
    renorm_s = q_s / (1 - q_s[target])[:, None]
    renorm_t = q_t / (1 - q_t[target])[:, None]
    non_target_term = -(renorm_t * renorm_s.log()).masked_fill(target, 0).sum(1).mean()
    torch.testing.assert_close(nkd_loss(student, teacher, TARGETS, tau, 0.0), target_term)
    torch.testing.assert_close((nkd_loss(student, teacher, TARGETS, tau, gamma) - target_term) / (gamma * tau ** 2),
                               non_target_term, rtol=1e-5, atol=1e-6)


def test_non_target_term_drops_the_target_class():
    # The student's own target logit enters only the target term: raising it leaves the non-target term unchanged.
    # With the whole softmax (the buggy copies) it does not.
    gen = torch.Generator().manual_seed(2)
    student, teacher = random_logits(gen)
    raised = student + 4.0 * F.one_hot(TARGETS, 10)
    for fn in (nkd_loss, ref_nkd_whole_softmax):
        change = (fn(raised, teacher, TARGETS, 3.0, 3.5) - fn(raised, teacher, TARGETS, 3.0, 0.0)) \
            - (fn(student, teacher, TARGETS, 3.0, 3.5) - fn(student, teacher, TARGETS, 3.0, 0.0))
        if fn is nkd_loss:
            assert abs(change.item()) < 1e-5
        else:
            assert abs(change.item()) > 1e-2
    assert not torch.allclose(nkd_loss(student, teacher, TARGETS), ref_nkd_whole_softmax(student, teacher, TARGETS))


def test_non_target_gradient_vanishes_when_the_normalised_distributions_match():
    # Normalisation: non-target logits equal to the teacher's up to a per-sample shift (so the two non-target sums
    # differ) give equal renormalised distributions, the minimum of the non-target cross-entropy.
    gen = torch.Generator().manual_seed(3)
    _, teacher = random_logits(gen)
    student = (teacher + 5 * torch.randn(8, 1, generator=gen) + 3 * F.one_hot(TARGETS, 10)).requires_grad_()
    non_target = nkd_loss(student, teacher, TARGETS, 3.0, 3.5) - nkd_loss(student, teacher, TARGETS, 3.0, 0.0)
    grad = torch.autograd.grad(non_target, student)[0]
    assert grad.abs().max() < 1e-6


def test_options_are_checked():
    with pytest.raises(DistillError, match='temperature must be > 0'):
        create_loss('nkd', temperature=0.0)
    with pytest.raises(DistillError, match='gamma must be >= 0'):
        create_loss('nkd', gamma=-1.0)
