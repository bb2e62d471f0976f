"""Augmentation of whole training batches on the device, in timm's order (its loader erases, its train loop mixes):
random erasing (Zhong et al., AAAI 2020; timm's ``RandomErasing``, ``data.reprob``/``remode``/``recount``, on the
normalised images), then mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) as timm's ``Mixup`` in
its ``batch`` mode: one lambda per batch from Beta(alpha, alpha), each image mixed with the batch reversed (its
partner), CutMix's box from timm's ``cutmix_bbox_and_lam`` with lambda corrected to the box's area, and the label
distributions from timm's ``mixup_target``. With both alphas set, ``mix_switch_prob`` picks CutMix; ``mix_prob``
mixes a batch at all. The mixed batch goes to teacher and student alike (consistent teaching, Beyer et al., CVPR
2022). Unlike timm's class, a batch of odd size mixes too (the middle image with itself), and every draw is seeded
from (the epoch's seed, the batch's position), so a resumed or replayed run mixes the same way.
"""
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DistillError
from .batching import Batch
from .seeding import sample_seed, seeded


BATCHES = 2 ** 63  # batch seeds are drawn above every image index (SeedSequence takes any non-negative integer)


class BatchMixer:
    def __init__(self, cfg: DataConfig, num_classes: int):
        self.mixup, self.cutmix, self.num_classes = cfg.mixup, cfg.cutmix, num_classes
        self.prob, self.switch_prob = cfg.mix_prob, cfg.mix_switch_prob

    def _draw(self, image_shape) -> Dict[str, Any]:
        """The batch's lambda and CutMix box (timm's ``Mixup._params_per_batch`` and ``_mix_batch``)."""
        from timm.data.mixup import cutmix_bbox_and_lam
        if np.random.rand() >= self.prob:
            return {'lam': 1.0, 'box': None}
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or np.random.rand() < self.switch_prob)
        lam = float(np.random.beta(self.cutmix, self.cutmix) if use_cutmix else np.random.beta(self.mixup, self.mixup))
        if not use_cutmix:
            return {'lam': lam, 'box': None}
        box, lam = cutmix_bbox_and_lam(image_shape, lam, correct_lam=True)
        return {'lam': float(lam), 'box': box}

    def __call__(self, batch: Batch, seed: int) -> Batch:
        from timm.data.mixup import mixup_target
        with seeded(seed):
            draw = self._draw(batch.images.shape)
        images, lam = batch.images, draw['lam']
        if draw['box'] is not None:
            top, bottom, left, right = draw['box']
            images = images.clone()
            images[:, :, top:bottom, left:right] = batch.images.flip(0)[:, :, top:bottom, left:right]
        elif lam != 1.0:
            images = images * lam + images.flip(0) * (1.0 - lam)
        targets = mixup_target(batch.labels, self.num_classes, lam, smoothing=0.0)
        return batch._replace(images=images, soft_targets=targets)


class BatchEraser:
    """timm's ``RandomErasing`` of each image of a batch (its draws from Python's ``random`` and, in pixel mode, the
    device's generator, both seeded), in place as in timm: the loaders make a batch's images afresh."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        from timm.data.random_erasing import RandomErasing
        self.erase = RandomErasing(probability=cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=device)

    def __call__(self, batch: Batch, seed: int) -> Batch:
        with seeded(seed, batch.images.device):
            self.erase(batch.images)
        return batch


class BatchAugment:
    """Erasing, then mixing, each seeded from the batch's seed (``batch_seed``)."""

    def __init__(self, eraser: Optional[BatchEraser], mixer: Optional[BatchMixer]):
        self.eraser, self.mixer = eraser, mixer

    def __call__(self, batch: Batch, seed: int) -> Batch:
        if self.eraser is not None:
            batch = self.eraser(batch, sample_seed(seed, 0))
        if self.mixer is not None:
            batch = self.mixer(batch, sample_seed(seed, 1))
        return batch


def batch_seed(loader, run_seed: int, epoch: int, step: int) -> int:
    """The mixing seed of batch ``step``: from the streamed loader's epoch seed (recorded, so a replay mixes as its
    recording did), else from the run seed and the epoch."""
    epoch_seed = getattr(loader, 'epoch_seed', None)
    return sample_seed(epoch_seed if epoch_seed is not None else sample_seed(run_seed, epoch), BATCHES + step)


def create_batch_augment(cfg: DataConfig, reads_class_labels: bool, num_classes: int,
                         device: torch.device) -> Optional[BatchAugment]:
    """The run's ``BatchAugment``, or None without erasing and mixing. Mixing is refused for terms that read one
    class per sample (``Need.CLASS_LABELS``), which a mixed image does not have."""
    mixes = bool(cfg.mixup or cfg.cutmix)
    if mixes and reads_class_labels:
        raise DistillError("data.mixup/cutmix give each image two classes, but a loss term reads one class per "
                           "sample (see `distill methods`); set data.mixup=0 data.cutmix=0, or use ce/kd-style terms")
    if not (mixes or cfg.reprob):
        return None
    return BatchAugment(BatchEraser(cfg, device) if cfg.reprob else None,
                        BatchMixer(cfg, num_classes) if mixes else None)
