"""FitNet (Romero et al., ICLR 2015) against RepDistiller's distiller_zoo/FitNet.py."""
import torch

from distill.losses import fitnet_loss
from helpers import assert_matches_reference, random_maps


def ref_fitnet(f_s, f_t):
    """RepDistiller distiller_zoo/FitNet.py: HintLoss = nn.MSELoss()."""
    return torch.nn.MSELoss()(f_s, f_t)


def test_fitnet_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_maps(gen, (4, 8, 4, 4), (4, 8, 4, 4))
    assert_matches_reference(fitnet_loss, ref_fitnet, student, teacher)
