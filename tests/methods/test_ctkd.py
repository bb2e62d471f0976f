"""CTKD (Li et al., AAAI 2023) against zhengli97/CTKD: KD at a learned temperature with a reversed gradient."""
import torch
import torch.nn.functional as F

import distill
from helpers import TARGETS, random_logits


def test_ctkd_is_kd_at_the_learned_temperature_with_a_reversed_curriculum_gradient():
    """zhengli97/CTKD: T = 1 + 20 sigmoid(theta), theta = 1 at start; CosineDecay(0, -1, 10) at 1-based epochs
    gives the gradient-reversal factor; DistillKL = batchmean KL * T^2."""
    import math
    from distill.losses.ctkd import CTKDLoss
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    term = CTKDLoss()
    for epoch in (0, 4, 20):
        term.zero_grad()
        decay_value = (math.cos(min(epoch + 1, 10) * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
        theta = torch.ones(1, requires_grad=True)
        T = 1 + 20 * torch.sigmoid(theta)
        ref = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction='batchmean') * T * T
        ref_grad, = torch.autograd.grad(ref.sum(), theta)
        ours = term(distill.StepOutputs(student, TARGETS, teacher_logits=teacher, epoch=epoch))
        ours.backward()
        torch.testing.assert_close(ours, ref.reshape(()))
        torch.testing.assert_close(term.theta.grad, decay_value * ref_grad)  # reversed and scaled
        assert (epoch == 20) == math.isclose(decay_value, -1.0)
