"""SDD: Wei et al., "Scale Decoupled Distillation", CVPR 2024.

The final feature map of each model (the map that enters its global average pooling) is average-pooled on an
s x s grid for every scale s (default 1, 2, 4: 1 + 4 + 16 = 21 regions), and the model's own classifier turns
every region's vector into region logits, region 0 being the whole map. A logit loss (KD or DKD) is computed for
each region and sample, and weighted by whether the teacher's region prediction agrees with its global one:
consistent regions (the teacher right, or wrong, on both the region and the whole map; region 0 always) weigh 1,
complementary regions (right on one, wrong on the other) weigh ``complementary_weight`` (2). With N regions and
B samples, loss = sum_(region, sample) w * l(student region logits, teacher region logits) / (N * B), where l is
T^2 * KL at temperature T (SD-KD) or alpha * TCKD + beta * NCKD (SD-DKD, see ``dkd.py``), each per sample.

Follows the official code (shicaiwei123/SDD-CVPR2024): ``mdistiller/models/cifar/utils.py::SPP`` (the map pooled
to 4x4, the coarser grids pooled from that grid, regions ordered 1x1, 2x2, 4x4, each grid row-major),
``mdistiller/models/cifar/*.py`` (``patch_score``: the model's classifier on each region, after the last
conv/BN-ReLU), ``mdistiller/distillers/SDD_DKD.py::multi_dkd`` and ``KD.py::sdd_kd_loss`` (the consistent and
complementary masks from the teacher's region argmax, weights 1 and 2, the sum over N * B rows divided by N * B).
The student's classifier is the student's own (gradient flows into it); the teacher's is frozen; the term holds no
reference to either as a submodule. Region 0 is the mean of the finest grid, which equals the model's own pooled
features (so SDD at scales [1] is exactly its base loss) where the map's side is a multiple of the finest scale
(CIFAR maps: 8, 4, 2 px), as in the official code.

Defaults: SD-DKD, the best row of the paper's CIFAR-100 table and the README's example (``train_origin.py --cfg
configs/cifar100/sdd_dkd/res32x4_shuv1.yaml --M [1,2,4]``): scales [1, 2, 4] (the ``--M`` of every run of that
table's six pairs in ``teacher_resnet32x4.sh``, ``teacher_wrn.sh``, ``teacher_vgg.sh``, ``teacher_unpair.sh``;
[1, 2] for the same-family pairs resnet32x4 -> resnet8x4 and vgg13 -> vgg8), DKD alpha 1, beta 8, T 4
(``mdistiller/engine/cfg.py`` defaults, which those pairs' ``configs/cifar100/sdd_dkd/*.yaml`` keep; beta 2 for
resnet56/110 teachers, 6 for resnet32 -> mobilenetv2), warm-up 20 epochs (``train_origin.py --warmup``, scaling the
loss by min(epoch / 20, 1) with 1-based epochs), weight 1 with CE 1. Option ``base: kd`` gives SD-KD (T 4, no
warm-up: ``SDD_KD`` ignores it), whose recipes weigh CE 0.1 and the term 0.9 (``cfg.KD.LOSS``).
Differences: for scale lists without 4 the official SPP still pools through a 4x4 grid; here the coarser grids
are pooled from the finest requested one (the same numbers wherever the map's side is a multiple of 4). The
official NaN guards (NaN elements and a NaN/inf total set to 0) are left out. Needs CNN teacher and student whose
head is global average pooling + a classifier on the pooled vector (not ViTs: their heads pool tokens).
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import DistillError
from ..models.features import feature_info_list
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature

BASES = ('kd', 'dkd')


def pool_regions(feature_map: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """(B, C, N) region vectors: the map average-pooled on the finest s x s grid, each coarser grid pooled from
    that one, regions ordered by scale then row-major (region 0 is the 1 x 1 grid when scales start at 1)."""
    finest = F.adaptive_avg_pool2d(feature_map, max(scales))
    return torch.cat([F.adaptive_avg_pool2d(finest, scale).flatten(2) for scale in scales], dim=2)


def region_logits(feature_map: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor],
                  scales: Sequence[int]) -> torch.Tensor:
    """(B, K, N) logits of the classifier on every region of the map (``patch_score`` of the official models)."""
    regions = pool_regions(feature_map, scales)
    logits = classifier(rearrange(regions, 'b c n -> (n b) c'))
    return rearrange(logits, '(n b) k -> b k n', n=regions.shape[2])


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='none', log_target=True).sum(1) * temperature ** 2


def dkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD of each sample (``dkd.py`` without the batch mean)."""
    gt_mask = F.one_hot(targets, student_logits.shape[1]).to(student_logits.dtype)
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    b_student = torch.stack([(p_student * gt_mask).sum(1), (p_student * (1 - gt_mask)).sum(1)], dim=1)
    b_teacher = torch.stack([(p_teacher * gt_mask).sum(1), (p_teacher * (1 - gt_mask)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_student), b_teacher, reduction='none').sum(1)
    log_q_student = F.log_softmax(student_logits / temperature - 1000.0 * gt_mask, dim=1)
    q_teacher = F.softmax(teacher_logits / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_q_student, q_teacher, reduction='none').sum(1)
    return (alpha * tckd + beta * nckd) * temperature ** 2


def region_weights(teacher_rows: torch.Tensor, row_targets: torch.Tensor, batch: int,
                   complementary_weight: float) -> torch.Tensor:
    """1 where the teacher's prediction on a region is right exactly when its global one is (consistent),
    ``complementary_weight`` where one is right and the other wrong; rows ordered region-major, region 0 global."""
    correct = teacher_rows.argmax(dim=1) == row_targets
    global_correct = correct[:batch].repeat(len(row_targets) // batch)
    complementary = (correct != global_correct).to(teacher_rows.dtype)
    return 1 + (complementary_weight - 1) * complementary


@fp32_loss
def sdd_loss(student_regions: torch.Tensor, teacher_regions: torch.Tensor, targets: torch.Tensor,
             base: str = 'dkd', complementary_weight: float = 2.0, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0) -> torch.Tensor:
    """Region-weighted KD or DKD over (B, K, N) region logits (region 0: the whole map), summed over regions and
    samples and divided by N * B. No warm-up (``SDDLoss`` applies it)."""
    batch, classes, count = student_regions.shape
    student_rows, teacher_rows = (rearrange(regions, 'b k n -> (n b) k') for regions in (student_regions,
                                                                                        teacher_regions))
    row_targets = targets.repeat(count)
    if base == 'kd':
        per_row = kd_per_sample(student_rows, teacher_rows, temperature)
    elif base == 'dkd':
        per_row = dkd_per_sample(student_rows, teacher_rows, row_targets, alpha, beta, temperature)
    else:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    weights = region_weights(teacher_rows.detach(), row_targets, batch, complementary_weight)
    return (weights * per_row).sum() / (count * batch)


def head_input_tap(model: nn.Module, role: str) -> Union[int, str]:
    """The tap whose feature is the map that enters ``model``'s global pooling: stage -1 where the last stage
    feeds the head directly (ResNets, VGG), else the last module that outputs that map (e.g. a final conv or
    BN-ReLU: MobileNetV2's ``conv2``, the pre-activation WRN's ``relu``). Found by one dry run (eval mode, no
    grad), which also checks that the classifier on the map's spatial mean gives the model's logits."""
    pool, classifier = getattr(model, 'global_pool', None), model.get_classifier()
    name = type(model).__name__
    refuse = (f"loss 'sdd' needs CNNs whose head is global average pooling + a classifier on the pooled vector "
              f"(it applies the classifier to regions of the final feature map); the {role} {name} has ")
    if not isinstance(pool, nn.Module) or not isinstance(classifier, nn.Module):
        raise DistillError(refuse + "no such pooling module; use another method for this pair")
    parameter = next(model.parameters())
    input_size = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    images = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(parameter)
    seen, head_input = [], {}
    skip = (pool, classifier)
    handles = [pool.register_forward_pre_hook(lambda module, inputs: head_input.setdefault('map', inputs[0]))]
    for path, module in model.named_modules():
        if path and not any(module is other for other in skip):
            handles.append(module.register_forward_hook(
                lambda module, inputs, output, path=path: seen.append((path, output))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            last_stage = None
            if hasattr(model, 'forward_intermediates') and hasattr(model, 'forward_head'):
                final, intermediates = model.forward_intermediates(images, indices=[len(feature_info_list(model)) - 1])
                logits, last_stage = model.forward_head(final), intermediates[-1]
            else:
                logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    feature_map = head_input.get('map')
    if not isinstance(feature_map, torch.Tensor) or feature_map.ndim != 4:
        raise DistillError(refuse + "no NCHW feature map entering its pooling; use another method for this pair")
    with torch.no_grad():
        pooled_logits = classifier(feature_map.mean(dim=(2, 3)))
    if pooled_logits.shape != logits.shape or not torch.allclose(pooled_logits, logits, rtol=1e-3, atol=1e-4):
        raise DistillError(refuse + "a head that is not average pooling + classifier; use another method for "
                                    "this pair")
    if last_stage is feature_map:
        return -1
    producers = [path for path, output in seen if output is feature_map]
    if not producers:
        raise DistillError(refuse + "no module that outputs the map entering its pooling; use another method "
                                    "for this pair")
    return producers[-1]  # the outermost, last to finish (e.g. a Sequential around its in-place ReLU)


@register_loss('sdd')
class SDDLoss(LossTerm):
    paper = 'Wei et al., CVPR 2024'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES, Need.CLASS_LABELS})
    pairs = 'CNN teacher and student (global average pooling + classifier heads)'

    def __init__(self, base: str = 'dkd', scales: Sequence[int] = (1, 2, 4), complementary_weight: float = 2.0,
                 temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, warmup: Optional[int] = None):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
        scales = list(scales)
        if not scales or scales[0] != 1 or any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be increasing grid sizes starting at 1 (the whole map), e.g. [1, 2, 4]; "
                             f"got {scales}")
        check_temperature(temperature)
        if complementary_weight < 0:
            raise ValueError(f"complementary_weight must be >= 0, got {complementary_weight}")
        if warmup is not None and warmup < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
        self.base, self.scales, self.complementary_weight = base, scales, complementary_weight
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.warmup = (20 if base == 'dkd' else 0) if warmup is None else warmup

    def resolve_layers(self, student, teacher) -> None:
        if teacher is None:
            return
        self.student_layers = [head_input_tap(student, 'student')]
        self.teacher_layers = [head_input_tap(teacher, 'teacher')]

    def setup(self, context) -> None:
        # plain references (not submodules): the classifiers stay the models' own, registered and saved once;
        # read at each step, so a reset_classifier is followed
        object.__setattr__(self, '_classifiers', (context.student.get_classifier, context.teacher.get_classifier))

    def forward(self, step: StepOutputs) -> torch.Tensor:
        student_classifier, teacher_classifier = self._classifiers
        student_regions = region_logits(step.student_features[self.student_layers[0]], student_classifier(),
                                        self.scales)
        with torch.no_grad():
            teacher_regions = region_logits(step.teacher_features[self.teacher_layers[0]], teacher_classifier(),
                                            self.scales)
        ramp = min((step.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * sdd_loss(student_regions, teacher_regions, step.targets, self.base,
                               self.complementary_weight, self.temperature, self.alpha, self.beta)
