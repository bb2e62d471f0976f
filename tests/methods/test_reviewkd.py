"""ReviewKD (Chen et al., CVPR 2021) against mdistiller's distillers/ReviewKD.py: the HCL loss and the review
path through the ABF fusion modules."""
import torch
import torch.nn.functional as F

import distill
from distill.losses import hcl_loss
from helpers import assert_matches_reference, random_maps


def ref_hcl(fstudent, fteacher):
    """mdistiller distillers/ReviewKD.py: hcl_loss."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def test_reviewkd_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = (random_maps(gen, (4, 8, 8, 8), (4, 16, 1, 1)),
                        random_maps(gen, (4, 8, 8, 8), (4, 16, 1, 1)))
    assert_matches_reference(hcl_loss, ref_hcl, student, teacher)


def test_reviewkd_review_path_matches_mdistiller_abf():
    """mdistiller ReviewKD.forward_train and ABF.forward, transcribed, with our fusion modules' weights."""
    from distill.losses.reviewkd import ReviewKDLoss

    class ABF(torch.nn.Module):
        def __init__(self, in_channel, mid_channel, out_channel, fuse):
            super().__init__()
            self.conv1 = torch.nn.Sequential(torch.nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                             torch.nn.BatchNorm2d(mid_channel))
            self.conv2 = torch.nn.Sequential(
                torch.nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                torch.nn.BatchNorm2d(out_channel))
            self.att_conv = torch.nn.Sequential(torch.nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                                                torch.nn.Sigmoid()) if fuse else None

        def forward(self, x, y=None, shape=None, out_shape=None):
            n, _, h, w = x.shape
            x = self.conv1(x)
            if self.att_conv is not None:
                y = F.interpolate(y, (shape, shape), mode="nearest")
                z = torch.cat([x, y], dim=1)
                z = self.att_conv(z)
                x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
            if x.shape[-1] != out_shape:
                x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
            y = self.conv2(x)
            return y, x

    gen = torch.Generator().manual_seed(0)
    # student resnet8-like stages 1..3 + pooled; teacher resnet8x4-like preact stages 1..3 + pooled
    student = [torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 32, 4, 4, generator=gen),
               torch.randn(2, 64, 2, 2, generator=gen), torch.randn(2, 64, generator=gen)]
    teacher = [torch.randn(2, 64, 8, 8, generator=gen), torch.randn(2, 128, 4, 4, generator=gen),
               torch.randn(2, 256, 2, 2, generator=gen), torch.randn(2, 256, generator=gen)]
    term = ReviewKDLoss(warmup=20)
    term.student_layers, term.teacher_layers = [1, 2, 3, 'pre_logits'], ['preact:1', 'preact:2', 'preact:3',
                                                                         'pre_logits']
    term.setup(distill.SetupContext(student_shapes=dict(zip(term.student_layers, (f.shape for f in student))),
                                    teacher_shapes=dict(zip(term.teacher_layers, (f.shape for f in teacher)))))
    in_channels, out_channels = [16, 32, 64, 64], [64, 128, 256, 256]
    shapes = out_shapes = [1, 2, 4, 8]  # mdistiller's cfg lists them deepest first
    abfs = torch.nn.ModuleList(ABF(c, min(512, in_channels[-1]), out_channels[i], i < len(in_channels) - 1)
                               for i, c in enumerate(in_channels))[::-1]
    for ref, ours in zip(abfs, term.fusions):
        renamed = {k.replace('reduce', 'conv1').replace('project', 'conv2').replace('attention', 'att_conv.0'): v
                   for k, v in ours.state_dict().items()}
        ref.load_state_dict(renamed)
    term.train(), abfs.train()
    for epoch in (4, 30):
        x = [f.clone().requires_grad_() for f in student]
        step = distill.StepOutputs(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), epoch=epoch - 1,
                                   student_features=dict(zip(term.student_layers, x)),
                                   teacher_features=dict(zip(term.teacher_layers, teacher)))
        ours = term(step)
        features = [f.clone().requires_grad_() for f in student]
        x_ref = (features[:3] + [features[3].unsqueeze(-1).unsqueeze(-1)])[::-1]
        results = []
        out_features, res_features = abfs[0](x_ref[0], out_shape=out_shapes[0])
        results.append(out_features)
        for feat, abf, shape, out_shape in zip(x_ref[1:], abfs[1:], shapes[1:], out_shapes[1:]):
            out_features, res_features = abf(feat, res_features, shape, out_shape)
            results.insert(0, out_features)
        teacher_maps = teacher[:3] + [teacher[3].unsqueeze(-1).unsqueeze(-1)]
        ref = min(epoch / 20, 1.0) * ref_hcl(results, teacher_maps)
        torch.testing.assert_close(ours, ref)
        for ours_grad, ref_grad in zip(torch.autograd.grad(ours, x), torch.autograd.grad(ref, features)):
            torch.testing.assert_close(ours_grad, ref_grad)
