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


def _distiller(ofd_options, teacher=None):
    import timm
    import distill  # noqa: F401
    from distill import Distiller
    teacher = teacher or timm.create_model('cifar_resnet14', num_classes=10)
    student = timm.create_model('cifar_resnet8', num_classes=10)
    return Distiller(teacher, student, {'ce': 1.0, 'ofd': {'weight': 0.001, **ofd_options}}, input_size=(3, 16, 16),
                     train_targets=torch.arange(40) % 10)


def test_ofd_teacher_batch_statistics_reproduces_the_reference_train_mode_teacher():
    """mdistiller OFD.train() leaves the teacher in train mode: its BN normalises with the batch's statistics (and
    updates its running statistics); the option reproduces that, the default keeps the frozen eval-mode teacher."""
    from distill import Batch
    gen = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 3, 16, 16, generator=gen), torch.arange(8) % 10)
    modes = []
    for options in ({}, {'teacher_batch_statistics': True}):
        distiller = _distiller(options)
        teacher = distiller.teacher.model
        teacher.register_forward_hook(lambda module, args, out: modes.append(module.training))
        before = teacher.bn1.running_mean.clone()
        distiller.train()
        distiller(batch, epoch=0).loss.backward()
        changed = not torch.equal(teacher.bn1.running_mean, before)
        assert changed == bool(options) and all(p.grad is None for p in teacher.parameters())
        distiller.eval()
        assert not teacher.training
    assert modes == [False, True]

