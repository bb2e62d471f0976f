"""VID (Ahn et al., CVPR 2019) against RepDistiller's distiller_zoo/VID.py."""
import torch
import torch.nn.functional as F

import distill


def test_vid_matches_repdistiller_vidloss():
    """RepDistiller distiller_zoo/VID.py VIDLoss, transcribed, with our regressor's weights."""
    from distill.losses.vid import VIDLoss

    class RefVIDLoss(torch.nn.Module):
        def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
            super().__init__()

            def conv1x1(in_channels, out_channels, stride=1):
                return torch.nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False, stride=stride)
            self.regressor = torch.nn.Sequential(
                conv1x1(num_input_channels, num_mid_channel), torch.nn.ReLU(),
                conv1x1(num_mid_channel, num_mid_channel), torch.nn.ReLU(),
                conv1x1(num_mid_channel, num_target_channels))
            import numpy as np
            self.log_scale = torch.nn.Parameter(
                np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels))
            self.eps = eps

        def forward(self, input, target):
            s_H, t_H = input.shape[2], target.shape[2]
            if s_H > t_H:
                input = F.adaptive_avg_pool2d(input, (t_H, t_H))
            elif s_H < t_H:
                target = F.adaptive_avg_pool2d(target, (s_H, s_H))
            pred_mean = self.regressor(input)
            pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
            pred_var = pred_var.view(1, -1, 1, 1)
            neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
            return torch.mean(neg_log_prob)

    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 8, 8, 8, generator=gen), torch.randn(4, 16, 4, 4, generator=gen)]
    teacher = [torch.randn(4, 12, 4, 4, generator=gen), torch.randn(4, 24, 8, 8, generator=gen)]
    term = VIDLoss(student_layers=[1, 2], teacher_layers=[1, 2])
    term.setup(distill.SetupContext(student_shapes={1: student[0].shape, 2: student[1].shape},
                                    teacher_shapes={1: teacher[0].shape, 2: teacher[1].shape}))
    refs = [RefVIDLoss(s.shape[1], t.shape[1], t.shape[1]) for s, t in zip(student, teacher)]
    for ref, ours in zip(refs, term.regressors):
        for ref_conv, our_conv in zip(ref.regressor[::2], ours.mean[::2]):
            ref_conv.weight.data.copy_(our_conv.weight.data)
        torch.testing.assert_close(ref.log_scale.data, ours.log_scale.data)
    step = distill.StepOutputs(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long),
                               student_features={1: student[0], 2: student[1]},
                               teacher_features={1: teacher[0], 2: teacher[1]})
    ours = term(step)
    ref = sum(r(s, t) for r, s, t in zip(refs, student, teacher))
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(term.regressors[0].log_scale.grad, refs[0].log_scale.grad)
    torch.testing.assert_close(term.regressors[1].mean[0].weight.grad, refs[1].regressor[0].weight.grad)
