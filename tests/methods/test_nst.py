"""NST (Huang & Wang, 2017) against RepDistiller's distiller_zoo/NST.py."""
import torch
import torch.nn.functional as F

from distill.losses import nst_loss
from helpers import assert_matches_reference, random_maps


def ref_nst(g_s, g_t):
    """RepDistiller distiller_zoo/NST.py: NSTLoss.nst_loss (full_loss) and poly_kernel, summed over pairs."""
    def poly_kernel(a, b):
        a = a.unsqueeze(1)
        b = b.unsqueeze(2)
        return (a * b).sum(-1).pow(2)

    losses = []
    for f_s, f_t in zip(g_s, g_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        losses.append(poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
                      - 2 * poly_kernel(f_s, f_t).mean())
    return sum(losses)


def test_nst_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4)),
                        random_maps(gen, (4, 32, 4, 4), (4, 8, 8, 8)))
    assert_matches_reference(nst_loss, ref_nst, student, teacher)
