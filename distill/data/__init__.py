"""Data for training and evaluation: ``build_data`` gives the training and validation loaders of a ``DataConfig``.

In memory (``sources`` + ``batching``): datasets held as uint8 tensors on the training device, augmented batched
there (``views``), in an order and with augmentation drawn from one checkpointed ``torch.Generator``, so a
resumed run equals an uninterrupted one. Streamed (``streaming``, ``data.in_memory: false``): ImageFolder trees
too large for memory, decoded by DataLoader workers. Both loaders implement ``batching.Loader``.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..config import DataConfig
from ..errors import DistillError
from . import datasets, imagefolder  # noqa: F401  (register the built-in data sources)
from .batching import Batch, BatchLoader, Loader, Placement, plan_batches
from .sources import SOURCES, DataSource, ImageSplit, cache_dir, channel_stats, get_source, load_split, register_source
from .views import apply_views, augment_batch, draw_views, normalize, view_count

__all__ = ['Batch', 'BatchLoader', 'DataBundle', 'DataSource', 'ImageSplit', 'Loader', 'SOURCES', 'apply_views',
           'augment_batch', 'build_data', 'build_eval_loader', 'cache_dir', 'channel_stats', 'draw_views',
           'get_source', 'load_split', 'normalization', 'normalize', 'plan_batches', 'Placement', 'register_source',
           'view_count']


Stats = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    num_classes: int
    classes: List[str]

    @property
    def channels(self) -> int:
        return self.train.mean.numel()


def _check_classes(cfg: DataConfig, num_classes: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DistillError(f"data.num_classes={cfg.num_classes} but {cfg.name} at {cfg.root} has "
                           f"{num_classes} classes; set data.num_classes={num_classes} or fix the data")


def normalization(cfg: DataConfig, train: Optional[ImageSplit],
                  model_stats: Optional[Stats] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The configured mean/std; else those the student's pretrained weights expect (``model_stats``); else CRD's
    CIFAR statistics for CIFAR, MNIST's for MNIST (the source's fixed ``stats``), else the training images' own."""
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("set both data.mean and data.std, or neither (then the training images' statistics "
                           "are used)")
    if cfg.mean is not None:
        return torch.tensor(cfg.mean), torch.tensor(cfg.std)
    if model_stats is not None:
        return model_stats
    fixed = get_source(cfg.name).stats  # so a transfer set without some classes is normalised as the teacher was
    if fixed is not None:
        return tuple(torch.tensor(values) for values in fixed)
    if train is None:
        train = load_split(cfg, train=True)
    return channel_stats(train.images)


def _check_channels(mean: torch.Tensor, split: ImageSplit) -> None:
    if mean.numel() != split.images.shape[1]:
        raise DistillError(f"data.mean/std have {mean.numel()} values but the images have {split.images.shape[1]} "
                           f"channels; give one value per channel")


def _check_same_classes(train_classes: List[str], val_classes: List[str]) -> None:
    if train_classes != val_classes:
        raise DistillError(f"train and validation splits have different classes ({len(train_classes)} vs "
                           f"{len(val_classes)}); make both hold the same class folders")


def build_streaming_data(cfg: DataConfig, seed: int, placement: Placement = Placement(),
                         strong_view: bool = False, model_stats: Optional[Stats] = None) -> DataBundle:
    """Loaders that decode an ImageFolder tree from disk each epoch (``data.in_memory=false``), normalised with
    the configured statistics, the student's pretrained ones, or ImageNet's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from .streaming import StreamingLoader, streaming_split_dir
    if strong_view:
        raise DistillError("a loss term needs a RandAugment view of each batch (MLKD), which only the in-memory "
                           "pipeline makes; set data.in_memory=true or drop the term")
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("set both data.mean and data.std, or neither (then ImageNet's statistics are used)")
    mean, std = (torch.tensor(cfg.mean), torch.tensor(cfg.std)) if cfg.mean is not None else model_stats or \
        (torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD))
    train, val = (StreamingLoader(streaming_split_dir(cfg.root, train), cfg.batch_size if train else
                                  cfg.eval_batch_size, mean, std, train, cfg.augment, cfg.image_size,
                                  cfg.crop_padding, cfg.workers, cfg.eval_crop_pct,
                                  torch.Generator().manual_seed(seed) if train else None, placement,
                                  cfg.auto_augment)
                  for train in (True, False))
    _check_same_classes(train.split.classes, val.split.classes)
    _check_classes(cfg, len(train.split.classes))
    return DataBundle(train=train, val=val, num_classes=len(train.split.classes), classes=train.split.classes)


def build_data(cfg: DataConfig, seed: int, placement: Placement = Placement(), strong_view: bool = False,
               model_stats: Optional[Stats] = None) -> DataBundle:
    """Training and validation loaders of ``cfg`` (``strong_view``: training batches also carry a RandAugment
    view, for loss terms that need one; ``model_stats``: the mean/std the student's pretrained weights expect)."""
    if not cfg.in_memory:
        return build_streaming_data(cfg, seed, placement, strong_view, model_stats)
    train, val = load_split(cfg, train=True), load_split(cfg, train=False)
    _check_same_classes(train.classes, val.classes)
    _check_classes(cfg, len(train.classes))
    mean, std = normalization(cfg, train, model_stats)
    _check_channels(mean, train)
    generator = torch.Generator().manual_seed(seed)
    return DataBundle(
        train=BatchLoader(train, cfg.batch_size, mean, std, True, cfg.augment, cfg.crop_padding, generator,
                          strong_view, placement),
        val=BatchLoader(val, cfg.eval_batch_size, mean, std, False, placement=placement),
        num_classes=len(train.classes), classes=train.classes)


def build_eval_loader(cfg: DataConfig, mean: Optional[torch.Tensor] = None,
                      std: Optional[torch.Tensor] = None) -> BatchLoader:
    """The validation split alone, normalised with the statistics the model was trained with (when known)."""
    val = load_split(cfg, train=False)
    _check_classes(cfg, len(val.classes))
    if mean is None or std is None:
        mean, std = normalization(cfg, None)
    return BatchLoader(val, cfg.eval_batch_size, mean, std, False)
