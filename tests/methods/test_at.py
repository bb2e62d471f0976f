"""AT (Zagoruyko & Komodakis, ICLR 2017) against RepDistiller's distiller_zoo/AT.py."""
import torch
import torch.nn.functional as F

from distill.losses import at_loss
from helpers import assert_matches_reference, random_maps


def ref_at(f_s_list, f_t_list, p=2):
    """RepDistiller distiller_zoo/AT.py: Attention.forward / at_loss / at."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    losses = []
    for f_s, f_t in zip(f_s_list, f_t_list):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        losses.append((at(f_s) - at(f_t)).pow(2).mean())
    return sum(losses)


def test_at_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4)),
                        random_maps(gen, (4, 32, 4, 4), (4, 8, 8, 8)))
    assert_matches_reference(at_loss, ref_at, student, teacher)
