"""DKD (Zhao et al., CVPR 2022) against mdistiller's DKD.py, also with logit standardization (Sun et al.,
CVPR 2024), and its decomposition of KD."""
import torch
import torch.nn.functional as F

from distill.losses import dkd_loss, kd_loss
from helpers import TARGETS, assert_matches_reference, random_logits


def ref_dkd(logits_student, logits_teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller mdistiller/distillers/DKD.py: dkd_loss, _get_gt_mask, _get_other_mask, cat_mask."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction='sum') * temperature ** 2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction='sum') * temperature ** 2 \
        / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def _zscore(logits):
    """The paper's Z-score (Sun et al. 2024, Algorithm 1), with the official code's unbiased std and eps."""
    return (logits - logits.mean(-1, keepdim=True)) / (1e-7 + logits.std(-1, keepdim=True))


def test_dkd_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    assert_matches_reference(dkd_loss, ref_dkd, student, teacher, TARGETS, 1.0, 8.0, 4.0)


def test_dkd_with_logit_standardization_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    assert_matches_reference(lambda s, t: dkd_loss(s, t, TARGETS, 1.0, 8.0, 2.0, True),
                             lambda s, t: ref_dkd(_zscore(s), _zscore(t), TARGETS, 1.0, 8.0, 2.0), student, teacher)


def test_dkd_equals_kd_decomposition_at_alpha_beta_one_weighted_by_target_probability():
    # DKD paper, eq. 4: KD = TCKD + (1 - p_t^T) * NCKD; with alpha = 1, beta = 1 DKD drops the (1 - p_t) factor,
    # so DKD >= KD whenever NCKD >= 0, with equality when the teacher puts all mass on the target.
    gen = torch.Generator().manual_seed(1)
    student, teacher = random_logits(gen)
    assert dkd_loss(student, teacher, TARGETS, 1.0, 1.0, 4.0) >= kd_loss(student, teacher, 4.0) - 1e-6
