"""KDSVD: Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018.
Official code: sseung0703/SSKD_SVD (``nets/Distillation.py``, the paper's VGG runs) and the authors' later, cleaner
version sseung0703/KD_methods_with_TF (``nets/Shared.py::KD_SVD`` with ``nets/SVP.py::SVD, Align_rsv``), which
mdistiller (``mdistiller/distillers/KDSVD.py``) transcribes to PyTorch.

Each sample's feature map at a stage is a matrix X with H*W rows (positions) and C columns (channels); its thin SVD
X = U S V^T gives right singular vectors over channels. The teacher keeps its first K (V_t, each l2-normalised, and
sigma_t, its first K singular values l2-normalised); the student keeps its first K + 3 and, for each teacher vector,
takes the one of largest |cosine| with it, flipped to a positive cosine (``Align_rsv``: sign and order alignment).
Both are scaled by sigma_t. Consecutive stages l - 1, l are related by a Gaussian RBF,
G[c, c', k] = exp(-(v_l[c, k] - v_(l-1)[c', k])^2 / 8), and
loss = sum over consecutive stage pairs of sum_(c, c', k) (G_s - G_t)^2, divided by the batch size
(G_t detached; non-finite entries count 0, as in the reference).

Flattening: the authors' TensorFlow code reshapes NHWC maps to (B, H*W, C) (``SVP.SVD``: ``[sz[0], sz[1]*sz[2],
sz[3]]``), so V lies in channel space and the spatial layout does not matter. mdistiller reshapes NCHW maps to
(B, C*H, W), so its V has W entries (the map's width): another quantity, not invariant to the spatial layout. We
follow the authors: NCHW maps become (B, H*W, C), (B, N, D) token maps are used as they are and (B, D) vectors are one
row (as ``SVP.SVD`` does for 3-D and 2-D inputs). Hence student and teacher must have equal channels per stage (the
authors' pairs do: VGG, ResNet32 -> ResNet8 of one width); where they differ a bias-free linear map over channels
(a 1x1 convolution, trained with the student) takes the student's map to the teacher's width. That is beyond the
paper (the authors' own code bridges widths with a learned linear map for FitNet, ``nets/Multiple.py``);
``match_channels=False`` refuses such pairs instead.

Defaults, from the CIFAR-100 settings: K = 1 (KD_methods_with_TF ``K = 1`` in ``KD_SVD``; SSKD_SVD ``num_DFV = 1``;
mdistiller ``CFG.KDSVD.K = 1``), K + 3 student vectors (KD_methods_with_TF, mdistiller); every stage but the stem
of each model, paired in order (mdistiller ``feats[1:]``, the authors' residual-group outputs); weight 1 with CE 1
(mdistiller ``CFG.KDSVD.LOSS.FEAT_WEIGHT = CE_WEIGHT = 1.0``, ``configs/cifar100/kdsvd.yaml``, resnet32x4 -> resnet8x4).
The batch mean is mdistiller's: the TensorFlow loss is a batch sum whose gradient the authors' optimizer clips, per
parameter, to the norm of the cross-entropy gradient times sigmoid(epoch) (KD_methods_with_TF
``op_util.py::Optimizer_w_Distillation``), which a loss term cannot do. Where the two author codes differ, we follow
KD_methods_with_TF (its CIFAR-100 ResNet table and mdistiller's recipe); the ECCV paper's own SSKD_SVD code halves the
sum (``tf.nn.l2_loss``) times sqrt(K), keeps K + 1 vectors of each model, flips the teacher's sign instead of the
student's and masks samples with non-finite vectors. The teacher's vectors keep the SVD's own sign convention (as in
the reference), and the RBF between stages depends on it: the loss is invariant to the student's signs only.

Numerical safety, as in the reference: singular values and vectors that are not finite become 0, vectors and
sigma_t are l2-normalised, squared differences that are not finite count 0, and the SVD has its own backward (the
authors replace TensorFlow's, ``SVP.py::gradient_svd``): PyTorch's SVD gradient is NaN (0/0) as soon as two singular
values are equal, e.g. several zero singular values of a rank-deficient map (dead ReLU channels, small late maps),
even when the loss reads only the leading vectors. Our backward is the standard one (Townsend 2016) with the
reference's guards made a tolerance: a factor 1/(s_j^2 - s_i^2) of two singular values within the SVD's precision
(max(m, n) * eps * s_max^2) is 0 (the reference zeroes the infinite ones), and singular values below
max(m, n) * eps * s_max count as zero in S^-1 (the reference adds 1e-8). KD_methods_with_TF's ``right_grad`` is
twice the true gradient (``msym`` is X + X^T, then times 2); we use the true one.
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DistillError
from .base import Need, PairedStagesLoss, StepOutputs, fp32_loss, register_loss

EXTRA_STUDENT_VECTORS = 3  # the student keeps K + 3 vectors to align with the teacher's K (both reference codes)
RBF_SCALE = 8.0  # exp(-d^2 / 8) in both reference codes


def feature_matrix(feature: torch.Tensor) -> torch.Tensor:
    """(B, rows, channels): NCHW maps as (B, H*W, C), token maps (B, N, D) as they are, vectors (B, D) as one row."""
    if feature.dim() == 4:
        return feature.flatten(2).transpose(1, 2)
    if feature.dim() == 3:
        return feature
    if feature.dim() == 2:
        return feature[:, None, :]
    raise ValueError(f'KDSVD takes (B, C, H, W), (B, N, D) or (B, D) features, got shape {tuple(feature.shape)}')


def feature_channels(shape: Sequence[int]) -> int:
    """The channel count of a feature of this shape, as ``feature_matrix`` lays it out."""
    return shape[1] if len(shape) in (2, 4) else shape[-1]


def _precision(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Per matrix, the size below which a singular value (or difference) is round-off: max(m, n) * eps * s_max."""
    return s.amax(dim=-1, keepdim=True) * (max(m, n) * torch.finfo(s.dtype).eps)


class _SafeSVD(torch.autograd.Function):
    """Thin SVD of a batch of matrices, returning (S, V), with a backward that stays finite for repeated or zero
    singular values (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor, grad_v: torch.Tensor):
        u, s, v = ctx.saved_tensors
        m, n = u.shape[-2], v.shape[-2]
        tiny = _precision(s, m, n)  # (B, 1)
        vt_grad = v.transpose(-2, -1) @ grad_v  # (B, k, k)
        skew = vt_grad - vt_grad.transpose(-2, -1)
        s2 = s * s
        gap = s2[..., None, :] - s2[..., :, None]  # gap[i, j] = s_j^2 - s_i^2
        degenerate = gap.abs() <= (tiny * s.amax(dim=-1, keepdim=True))[..., None]  # the diagonal included
        safe_gap = torch.where(degenerate, torch.ones_like(gap), gap)
        inverse_gap = torch.where(degenerate, torch.zeros_like(gap), 1.0 / safe_gap)
        inner = s[..., :, None] * (inverse_gap * skew) + torch.diag_embed(grad_s)
        grad_x = u @ inner @ v.transpose(-2, -1)
        if m < n:  # V spans only part of the row space of X^T: the component of grad_v outside it
            nonzero = s > tiny
            s_inverse = torch.where(nonzero, 1.0 / torch.where(nonzero, s, torch.ones_like(s)), torch.zeros_like(s))
            outside = grad_v - v @ vt_grad  # (I - V V^T) grad_v
            grad_x = grad_x + (u * s_inverse[..., None, :]) @ outside.transpose(-2, -1)
        return grad_x


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular_vectors(matrices: torch.Tensor, count: int):
    """(sigma, V): the first ``count`` singular values, l2-normalised over the ``count`` (B, count), and right singular
    vectors, each l2-normalised (B, channels, count); non-finite entries 0."""
    s, v = _SafeSVD.apply(_finite(matrices))
    s, v = _finite(s[:, :count]), _finite(v[:, :, :count])
    return F.normalize(s, dim=1), F.normalize(v, dim=1)


def align_to_teacher(student_v: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine| with it, signed to a positive cosine."""
    cosine = student_v.transpose(1, 2) @ teacher_v  # (B, K + 3, K)
    best = cosine.abs().argmax(dim=1, keepdim=True)  # (B, 1, K)
    sign = torch.sign(cosine.gather(1, best))
    return student_v.gather(2, best.expand(-1, student_v.shape[1], -1)) * sign


def rbf(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """exp(-(upper[c] - lower[c'])^2 / 8) for every channel pair and vector: (B, C_upper, C_lower, K)."""
    return torch.exp(-(upper[:, :, None, :] - lower[:, None, :, :]).pow(2) / RBF_SCALE)


@fp32_loss
def kdsvd_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor], k: int = 1) -> torch.Tensor:
    """KDSVD over paired stages (at least two); features as ``feature_matrix`` takes them, equal channel counts per
    stage. Batch mean of the summed squared RBF differences between consecutive stages."""
    if len(student_features) != len(teacher_features) or len(student_features) < 2:
        raise ValueError(f'KDSVD relates consecutive stages: give two or more stage pairs, got '
                         f'{len(student_features)} student and {len(teacher_features)} teacher features')
    students = [feature_matrix(f) for f in student_features]
    teachers = [feature_matrix(f).detach() for f in teacher_features]
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        if student.shape[2] != teacher.shape[2]:
            raise ValueError(f'KDSVD compares singular vectors over channels: stage pair {index} has '
                             f'{student.shape[2]} student and {teacher.shape[2]} teacher channels')
    k = min([k] + [min(t.shape[1], t.shape[2]) for t in teachers])  # as many vectors as every teacher map has
    total, previous = student_features[0].new_zeros(()), None
    for student, teacher in zip(students, teachers):
        with torch.no_grad():
            teacher_sigma, teacher_v = leading_singular_vectors(teacher, k)
        _, student_v = leading_singular_vectors(student, k + EXTRA_STUDENT_VECTORS)
        student_v = align_to_teacher(student_v, teacher_v)
        weight = teacher_sigma[:, None, :]
        student_v, teacher_v = student_v * weight, teacher_v * weight
        if previous is not None:
            squared = (rbf(student_v, previous[0]) - rbf(teacher_v, previous[1])).pow(2)
            total = total + _finite(squared).sum()
        previous = (student_v, teacher_v)
    return total / students[0].shape[0]


@register_loss('kdsvd')
class KDSVDLoss(PairedStagesLoss):
    paper = 'Lee, Kim & Song, ECCV 2018'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES})
    pairs = 'any'

    def __init__(self, k: int = 1, match_channels: bool = True,
                 student_layers: Optional[Sequence[Union[int, str]]] = None,
                 teacher_layers: Optional[Sequence[Union[int, str]]] = None):
        super().__init__(student_layers, teacher_layers)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f'k (singular vectors per stage) must be an integer >= 1, got {k!r}')
        self.k, self.match_channels = k, match_channels
        self.adapters: Optional[nn.ModuleList] = None

    def setup(self, context) -> None:
        if len(self.student_layers) < 2:
            raise DistillError(f"loss 'kdsvd' relates consecutive stages and needs two or more stage pairs, got "
                               f"student layers {list(self.student_layers)} and teacher layers "
                               f"{list(self.teacher_layers)}")
        student_channels = [feature_channels(context.student_shapes[layer]) for layer in self.student_layers]
        teacher_channels = [feature_channels(context.teacher_shapes[layer]) for layer in self.teacher_layers]
        if student_channels != teacher_channels and not self.match_channels:
            raise DistillError(f"loss 'kdsvd' with match_channels: false needs equal channels at every stage, but "
                               f"the student has {student_channels} and the teacher {teacher_channels}")
        self.adapters = nn.ModuleList(nn.Identity() if s == t else nn.Linear(s, t, bias=False)
                                      for s, t in zip(student_channels, teacher_channels))

    def forward(self, step: StepOutputs) -> torch.Tensor:
        students, teachers = self.feature_pairs(step)
        if self.adapters is not None:
            students = [adapter(feature_matrix(f)) for adapter, f in zip(self.adapters, students)]
        return kdsvd_loss(students, teachers, self.k)
