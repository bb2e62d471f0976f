"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

loss = MSE(regressor(student hint feature), teacher hint feature), mean over all elements. As in RepDistiller
(``distiller_zoo/FitNet.py``, ``models/util.py::ConvReg``, trained jointly with CE, no separate hint stage) and
mdistiller: the hint is stage 2 of both models (``--hint_layer 2``) and the regressor is conv + BN + ReLU, a 3x3
stride-2 conv when the student map is twice the teacher's, a 4x4 stride-2 transposed conv when half, else a
(1 + dH) x (1 + dW) conv. Default weight on CIFAR-100: 100 (with CE 1, KD 0).
"""
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss


class ConvRegressor(nn.Module):
    """Maps a student feature map (N, Cs, Hs, Ws) onto the teacher's (N, Ct, Ht, Wt)."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, use_relu: bool = True):
        super().__init__()
        (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = student_shape, teacher_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:  # beyond RepDistiller (e.g. CNN -> ViT pairs): 1x1 conv, then resize to the teacher's map
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.output_size = (t_h, t_w)
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[-2:] != self.output_size:
            x = F.interpolate(x, size=self.output_size, mode='bilinear', align_corners=False)
        x = self.bn(x)
        return F.relu(x) if self.use_relu else x


@fp32_loss
def fitnet_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the (regressed) student hint and the teacher hint."""
    return F.mse_loss(student_hint, teacher_hint)


@register_loss('fitnet')
class FitNetLoss(LossTerm):
    paper = 'Romero et al., ICLR 2015'
    default_weight = 100.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def __init__(self, student_layer: Union[int, str] = 2, teacher_layer: Union[int, str] = 2):
        super().__init__()
        self.student_layers, self.teacher_layers = [student_layer], [teacher_layer]

    def setup(self, context) -> None:
        self.regressor = ConvRegressor(context.student_shapes[self.student_layers[0]],
                                       context.teacher_shapes[self.teacher_layers[0]])

    def forward(self, step: StepOutputs) -> torch.Tensor:
        student_hint = self.regressor(step.student_features[self.student_layers[0]])
        return fitnet_loss(student_hint, step.teacher_features[self.teacher_layers[0]])
