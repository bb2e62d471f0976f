"""CC (Peng et al., ICCV 2019) against RepDistiller's distiller_zoo/CC.py."""
import torch
import torch.nn.functional as F

from distill.losses import cc_loss
from helpers import assert_matches_reference, random_maps


def ref_cc(f_s, f_t):
    """RepDistiller distiller_zoo/CC.py: Correlation.forward (on the embedded features)."""
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def test_cc_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = [F.normalize(x) for x in random_maps(gen, (6, 16), (6, 16))]
    assert_matches_reference(cc_loss, ref_cc, student, teacher)
