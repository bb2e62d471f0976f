"""Cross-entropy with the ground-truth labels, optionally label-smoothed (Szegedy et al., "Rethinking the
Inception Architecture", CVPR 2016), or with a mixed batch's label distributions (mixup/cutmix: smoothing then
applies to them, as timm's ``mixup_target`` does). Default weight in the CRD benchmark's KD recipe: 0.1 (1.0
alone)."""
import torch
import torch.nn.functional as F

from .base import LossTerm, StepOutputs, fp32_loss, register_loss


@fp32_loss
def cross_entropy_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean cross-entropy, in float32; ``targets`` class indices or (N, C) probabilities."""
    return F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)


@register_loss('ce')
class CrossEntropyLoss(LossTerm):
    paper = 'Szegedy et al., CVPR 2016 (label smoothing)'
    default_weight = 1.0

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        self.label_smoothing = label_smoothing

    def forward(self, step: StepOutputs) -> torch.Tensor:
        targets = step.soft_targets if step.soft_targets is not None else step.targets
        return cross_entropy_loss(step.student_logits, targets, self.label_smoothing)
