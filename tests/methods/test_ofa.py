"""OFA (Hao et al., NeurIPS 2023) against Hao840/OFAKD's distillers/ofa.py."""
import torch
import torch.nn.functional as F

from distill.losses import ofa_loss
from helpers import TARGETS, assert_matches_reference, random_logits


def ref_ofa(logits_student, logits_teacher, eps=1.5, temperature=2.0):
    """Hao840/OFAKD distillers/ofa.py: ofa_loss (labels as in OFA.forward: one-hot of the integer targets)."""
    target_mask = F.one_hot(TARGETS, logits_student.size(-1))
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    loss = torch.sum(- (prod - target_mask) * torch.log(pred_student), dim=-1)
    return loss.mean()


def test_ofa_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    assert_matches_reference(lambda s, t: ofa_loss(s, t, TARGETS, 1.5, 2.0), ref_ofa, student, teacher)
