"""RKD: Park et al., "Relational Knowledge Distillation", CVPR 2019.

Distance term: smooth-L1 between the batch's pairwise Euclidean distances, each normalised by its mean
non-zero distance. Angle term: smooth-L1 between the cosines of the angles formed by every triplet. Follows
RepDistiller ``distiller_zoo/RKD.py``: pooled pre-logits features (``feat[-1]``), distance weight 25, angle
weight 50, teacher relations without gradient. Default weight on CIFAR-100: 1 (with CE 1, KD 0).
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    squared = embedding.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.t()).clamp(min=eps).sqrt()
    return distances * (1 - torch.eye(len(embedding), device=embedding.device, dtype=embedding.dtype))


def normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(embedding)
    return distances / distances[distances > 0].mean()


def triplet_angles(embedding: torch.Tensor) -> torch.Tensor:
    directions = F.normalize(embedding[None, :] - embedding[:, None], p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


@fp32_loss
def rkd_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    student, teacher = student_embedding.flatten(1), teacher_embedding.flatten(1)
    with torch.no_grad():
        teacher_distances, teacher_angles = normalised_distances(teacher), triplet_angles(teacher)
    distance = F.smooth_l1_loss(normalised_distances(student), teacher_distances)
    angle = F.smooth_l1_loss(triplet_angles(student), teacher_angles)
    return distance_weight * distance + angle_weight * angle


@register_loss('rkd')
class RKDLoss(LossTerm):
    paper = 'Park et al., CVPR 2019'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES})
    student_layers = teacher_layers = ('pre_logits',)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return rkd_loss(step.student_features['pre_logits'], step.teacher_features['pre_logits'],
                        self.distance_weight, self.angle_weight)
