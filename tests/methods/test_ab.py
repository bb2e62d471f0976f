"""AB (Heo et al., AAAI 2019) against RepDistiller's distiller_zoo/AB.py."""
import torch

from distill.losses import ab_loss
from helpers import assert_matches_reference, random_maps


def ref_ab(g_s, g_t, margin=1.0):
    """RepDistiller distiller_zoo/AB.py: ABLoss.forward / criterion_alternative_l2, summed as in pretrain.py."""
    feat_num = len(g_s)
    w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
    bsz = g_s[0].shape[0]

    def criterion_alternative_l2(source, target):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float() +
                (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        return torch.abs(loss).sum()

    losses = [criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
    losses = [w * l for w, l in zip(w, losses)]
    losses = [l / bsz for l in losses]
    losses = [l / 1000 * 3 for l in losses]
    return sum(losses)


def test_ab_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4)),
                        random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4)))
    assert_matches_reference(ab_loss, ref_ab, student, teacher)
