"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Student and teacher pooled features are embedded (linear + l2 norm, 128-d, both trained with the student). Each
model keeps a memory bank of one embedding per training sample. For a sample, its teacher-memory entry is the
positive and K entries of samples of *other* classes are negatives (RepDistiller's ``--mode exact``, drawn with
replacement); scores exp(<memory, e> / T) / Z, with Z fixed from the first batch (mean score * N). NCE loss
with noise probability 1/N for each side: -[log h(pos) + sum log(1 - h(neg))] / batch, h(x) = x / (x + K/N).
After the step each bank entry of the batch becomes normalise(m * old + (1 - m) * new).

Follows RepDistiller ``crd/criterion.py`` and ``crd/memory.py``: feature dim 128, K = 16384 negatives,
T = 0.07, momentum 0.5, eps 1e-7, memories initialised uniform in +-1/sqrt(dim/3). Default weight on CIFAR-100:
0.8 (with CE 1, KD 0; ``crd+kd`` adds KD 1). Needs the batch's dataset indices and the training labels; the
engine provides both. The memory banks are buffers, saved in checkpoints, so a resumed run continues exactly.
"""
import math

import torch
import torch.nn as nn

from ..errors import DistillError
from ..models.features import PRE_LOGITS
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .cc import Embed

EPS = 1e-7


@fp32_loss
def contrast_scores(embedding: torch.Tensor, memory: torch.Tensor, sample_indices: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """exp(<memory[j], embedding_i> / T) for the (B, K + 1) memory rows j = sample_indices[i] (memory detached)."""
    memory = memory.detach()
    if 4 * sample_indices.shape[1] >= memory.shape[0]:
        # K + 1 rows per sample cover much of the bank (CIFAR: 16385 of 50000): one GEMM against the whole bank
        # and a gather of the scores is several times faster than gathering B x (K + 1) x D memory rows.
        # (the bank is updated in place after the forward pass; the GEMM keeps its own copy for the backward)
        dots = torch.gather(embedding @ memory.clone().t(), 1, sample_indices)
    else:
        dots = torch.bmm(memory[sample_indices], embedding.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / temperature)


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """NCE with uniform noise 1/num_data: column 0 holds the positives, the other K columns negatives."""
    negatives = scores.shape[1] - 1
    noise = negatives / num_data
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_negative = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


@fp32_loss
def crd_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, student_memory: torch.Tensor,
             teacher_memory: torch.Tensor, sample_indices: torch.Tensor, student_normalizer: torch.Tensor,
             teacher_normalizer: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Both NCE terms: the student embedding against the teacher's memory and vice versa."""
    num_data = student_memory.shape[0]
    student_scores = contrast_scores(student_embedding, teacher_memory, sample_indices, temperature)
    teacher_scores = contrast_scores(teacher_embedding, student_memory, sample_indices, temperature)
    return (nce_loss(student_scores / student_normalizer, num_data)
            + nce_loss(teacher_scores / teacher_normalizer, num_data))


def update_memory(memory: torch.Tensor, embedding: torch.Tensor, indices: torch.Tensor, momentum: float) -> None:
    with torch.no_grad():
        mixed = memory[indices] * momentum + embedding.detach().float() * (1 - momentum)
        memory.index_copy_(0, indices, mixed / mixed.norm(dim=1, keepdim=True))


class NegativeSampler(nn.Module):
    """Draws, for each sample, K dataset indices of samples of other classes: without replacement when the other
    classes hold at least K samples, else with replacement (RepDistiller ``CIFAR100InstanceSample``:
    ``np.random.choice(cls_negative[target], K, replace=K > len(cls_negative[target]))``)."""

    def __init__(self, train_targets: torch.Tensor):
        super().__init__()
        targets = train_targets.long().cpu()
        counts = torch.bincount(targets)
        self.register_buffer('targets', targets, persistent=False)
        self.register_buffer('order', torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer('class_start', torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer('class_count', counts, persistent=False)

    def forward(self, targets: torch.Tensor, k: int) -> torch.Tensor:
        others = len(self.order) - self.class_count[targets]
        if bool((others >= k).all()):  # K distinct samples: the K smallest of uniform scores, own class excluded
            scores = torch.rand(len(targets), len(self.order), device=targets.device)
            scores.masked_fill_(self.targets[None, :] == targets[:, None], 2.0)
            return scores.topk(k, dim=1, largest=False).indices
        start, count = self.class_start[targets, None], self.class_count[targets, None]
        # a uniform position among the N - n_c samples of other classes, then skip the class's own block
        position = (torch.rand(len(targets), k, device=targets.device) * (len(self.order) - count)).long()
        position = position + (position >= start) * count
        return self.order[position]


@register_loss('crd')
class CRDLoss(LossTerm):
    paper = 'Tian et al., ICLR 2020'
    default_weight = 0.8
    needs = frozenset({Need.TEACHER_FEATURES, Need.SAMPLE_INDICES, Need.PER_SAMPLE_STATE, Need.CLASS_LABELS})
    student_layers = teacher_layers = (PRE_LOGITS,)

    def __init__(self, embed_dim: int = 128, negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5):
        super().__init__()
        self.embed_dim, self.negatives, self.temperature, self.momentum = embed_dim, negatives, temperature, momentum

    def setup(self, context) -> None:
        if context.train_targets is None:
            raise DistillError("loss 'crd' needs the training labels for its memory bank; train through "
                               "distill.Trainer or pass train_targets= to Distiller")
        num_data = len(context.train_targets)
        self.embed_student = Embed(context.student_shapes[PRE_LOGITS][1], self.embed_dim)
        self.embed_teacher = Embed(context.teacher_shapes[PRE_LOGITS][1], self.embed_dim)
        self.sampler = NegativeSampler(context.train_targets)
        bound = 1.0 / math.sqrt(self.embed_dim / 3)
        self.register_buffer('student_memory', (torch.rand(num_data, self.embed_dim) * 2 - 1) * bound)
        self.register_buffer('teacher_memory', (torch.rand(num_data, self.embed_dim) * 2 - 1) * bound)
        self.register_buffer('normalizers', torch.full((2,), -1.0))  # Z of each side, fixed at the first batch
        self._normalizers_set = False  # host-side copy of "normalizers >= 0", to avoid a sync every step

    def forward(self, step: StepOutputs) -> torch.Tensor:
        if step.indices is None:
            raise DistillError("loss 'crd' needs the dataset indices of each batch (StepOutputs.indices)")
        student = self.embed_student(step.student_features[PRE_LOGITS]).float()
        teacher = self.embed_teacher(step.teacher_features[PRE_LOGITS]).float()
        sample_indices = torch.cat([step.indices[:, None], self.sampler(step.targets, self.negatives)], dim=1)
        if not self._normalizers_set and bool(self.normalizers[0] < 0):
            with torch.no_grad():
                num_data = len(self.student_memory)
                self.normalizers[0] = contrast_scores(student, self.teacher_memory, sample_indices,
                                                      self.temperature).mean() * num_data
                self.normalizers[1] = contrast_scores(teacher, self.student_memory, sample_indices,
                                                      self.temperature).mean() * num_data
        self._normalizers_set = True
        loss = crd_loss(student, teacher, self.student_memory, self.teacher_memory, sample_indices,
                        self.normalizers[0], self.normalizers[1], self.temperature)
        if self.training:
            update_memory(self.student_memory, student, step.indices, self.momentum)
            update_memory(self.teacher_memory, teacher, step.indices, self.momentum)
        return loss
