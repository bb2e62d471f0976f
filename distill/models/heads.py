"""What a student's forward returns, by head. A timm model returns its logits; a distilled DeiT
(``deit_*_distilled_*``: a class token and a distillation token, each with its own head) in distilled training
returns both heads' logits while training and their average in eval mode (timm's ``VisionTransformerDistilled``)."""
from typing import Dict, Tuple, Union

import torch
import torch.nn as nn

LOGITS = 'logits'  # the class head: what cross-entropy, KD and the training top-1 read
DISTILLATION = 'distillation'  # the distillation token's head (DeiT)


def student_heads(output: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """``{LOGITS: class head}``, plus ``DISTILLATION`` for a model that returned both heads."""
    if isinstance(output, (tuple, list)):
        class_logits, distillation_logits = output
        return {LOGITS: class_logits, DISTILLATION: distillation_logits}
    return {LOGITS: output}


def has_distillation_head(model: nn.Module) -> bool:
    """A model with a distillation token and head that can train them (timm's ``set_distilled_training``)."""
    return callable(getattr(model, 'set_distilled_training', None))
