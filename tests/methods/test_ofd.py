"""OFD (Heo et al., ICCV 2019) against mdistiller's distillers/OFD.py: the loss and the BN margins."""
import torch
import torch.nn.functional as F

from distill.losses import ofd_loss
from helpers import assert_matches_reference, random_maps


def ref_ofd(feature_student, feature_teacher, margins):
    """mdistiller distillers/OFD.py: feat_loss and OFD.ofd_loss (after the connectors)."""
    def feat_loss(source, target, margin):
        margin = margin.to(source)
        loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
                + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
                + (source - target) ** 2 * (target > 0).float())
        return torch.abs(loss).mean(dim=0).sum()

    loss_distill = 0
    feat_num = len(feature_student)
    for i in range(feat_num):
        loss_distill = loss_distill + feat_loss(
            feature_student[i], F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            margins[i].unsqueeze(1).unsqueeze(2).unsqueeze(0)) / 2 ** (feat_num - i - 1)
    return loss_distill


MARGINS = [-torch.rand(8, generator=torch.Generator().manual_seed(5)), -torch.rand(16)]


def test_ofd_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 4, 4), (4, 16, 2, 2)),
                        random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4)))
    assert_matches_reference(lambda s, t: ofd_loss(s, t, MARGINS), lambda s, t: ref_ofd(s, t, MARGINS),
                             student, teacher)


def test_ofd_margins_match_the_reference_formula():
    """mdistiller OFD.init_ofd_modules: margin per channel of the teacher BN before the ReLU."""
    from scipy.stats import norm
    import math
    from distill.losses.ofd import bn_margin
    bn = torch.nn.BatchNorm2d(6)
    bn.weight.data = torch.tensor([1.0, 0.5, -2.0, 0.1, 1.0, 0.3])
    bn.bias.data = torch.tensor([0.0, 1.0, -1.0, 0.5, 4.0, -0.2])  # channel 4: P(x < 0) < 0.001 -> -3 s
    expected = []
    for s, m in zip(bn.weight.data, bn.bias.data):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            expected.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            expected.append(-3 * s)
    torch.testing.assert_close(bn_margin(bn), torch.tensor(expected, dtype=torch.float32))
