"""FSP (Yim et al., CVPR 2017) against RepDistiller's distiller_zoo/FSP.py, and its refusal of unequal widths."""
import pytest
import torch
import torch.nn.functional as F

import distill
from distill.losses import fsp_loss
from engine_helpers import _build, _pair
from helpers import assert_matches_reference, random_maps


def ref_fsp(g_s, g_t):
    """RepDistiller distiller_zoo/FSP.py: FSP.forward / compute_fsp / compute_loss, summed as in pretrain.py."""
    def compute_fsp(g):
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            fsp_list.append((bot * top).mean(-1))
        return fsp_list

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


def test_fsp_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 8, 8), (4, 8, 8, 8), (4, 16, 4, 4)),
                        random_maps(gen, (4, 8, 8, 8), (4, 8, 8, 8), (4, 16, 4, 4)))
    assert_matches_reference(fsp_loss, ref_fsp, student, teacher)


def test_fsp_refuses_a_pair_of_different_widths_in_one_line():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    with pytest.raises(distill.DistillError, match=r"loss 'fsp' needs equal channels at every stage, but the "
                                                   r"student has \[16, 16, 32, 64\] and the teacher \[32, 64"):
        _build('fsp', teacher, student, 16)
