"""FT (factor transfer): Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018.

A paraphraser (conv autoencoder on the teacher's last feature map, factor rate k = 0.5, LeakyReLU 0.1, no BN) is
first trained to reconstruct that map (MSE) and then fixed; in the main training a translator (3 conv + BN +
LeakyReLU on the student's last map) is trained with the student so that the l2-normalised, channel-mean-of-
squares factors match: loss = mean |factor(translator(s)) - factor(paraphraser.encode(t))| (p1 = 2, p2 = 1).
Follows RepDistiller ``distiller_zoo/FT.py``, ``models/util.py`` (Paraphraser, Translator) and
``helper/pretrain.py``: 30 pre-stage epochs at lr 0.01 (the rate RepDistiller uses for ResNet/WRN students; it
uses the recipe's rate for VGG/MobileNet/ShuffleNet ones: set ``pre_stage_lr: null``). Default weight on
CIFAR-100: 200 (with CE 1, KD 0). Difference: RepDistiller leaves the fixed paraphraser in train mode; it has no
BN, so this changes nothing.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from typing import Optional

from .base import LossTerm, Need, StepOutputs, fp32_loss, pool_to_smaller, register_loss


def _conv_stack(channels, transpose: bool = False, batch_norm: bool = False) -> nn.Sequential:
    layers = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append((nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 3, 1, 1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    def __init__(self, channels: int, factor_rate: float = 0.5):
        super().__init__()
        factor_channels = int(channels * factor_rate)
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], transpose=True)


def factor(feature: torch.Tensor, p1: float = 2.0) -> torch.Tensor:
    return F.normalize(feature.pow(p1).mean(1).flatten(1))


@fp32_loss
def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p1: float = 2.0, p2: float = 1.0):
    student_factor, teacher_factor = pool_to_smaller(student_factor, teacher_factor)
    difference = factor(student_factor, p1) - factor(teacher_factor, p1)
    return difference.abs().mean() if p2 == 1 else difference.pow(p2).mean()


@register_loss('ft')
class FTLoss(LossTerm):
    paper = 'Kim et al., NeurIPS 2018'
    default_weight = 200.0
    needs = frozenset({Need.TEACHER_FEATURES, Need.PRE_STAGE})
    student_layers = teacher_layers = (-1,)

    def __init__(self, factor_rate: float = 0.5, p1: float = 2.0, p2: float = 1.0, pre_stage_epochs: int = 30,
                 pre_stage_lr: Optional[float] = 0.01):
        super().__init__()
        self.factor_rate, self.p1, self.p2 = factor_rate, p1, p2
        self.pre_stage_epochs, self.pre_stage_lr = pre_stage_epochs, pre_stage_lr

    def setup(self, context) -> None:
        student_channels, teacher_channels = context.student_shapes[-1][1], context.teacher_shapes[-1][1]
        self.paraphraser = Paraphraser(teacher_channels, self.factor_rate).requires_grad_(False)
        factor_channels = int(teacher_channels * self.factor_rate)
        self.translator = _conv_stack([student_channels, student_channels, factor_channels, factor_channels],
                                      batch_norm=True)

    def pre_stage_modules(self, student):
        return [self.paraphraser]

    def pre_stage_loss(self, step: StepOutputs) -> torch.Tensor:
        teacher = step.teacher_features[-1]
        return F.mse_loss(self.paraphraser.decoder(self.paraphraser.encoder(teacher)).float(), teacher.float())

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return ft_loss(self.translator(step.student_features[-1]), self.paraphraser.encoder(step.teacher_features[-1]),
                       self.p1, self.p2)
