"""SP (Tung & Mori, ICCV 2019) against RepDistiller's distiller_zoo/SP.py."""
import torch
import torch.nn.functional as F

from distill.losses import sp_loss
from helpers import assert_matches_reference, random_maps


def ref_sp(f_s, f_t):
    """RepDistiller distiller_zoo/SP.py: Similarity.similarity_loss."""
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def test_sp_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_maps(gen, (6, 8, 4, 4), (6, 16, 2, 2))
    assert_matches_reference(sp_loss, ref_sp, student, teacher)
