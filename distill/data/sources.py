"""Data sources by name: each registered ``DataSource`` loads a split as an ``ImageSplit`` held in memory (uint8
images, labels, class names) and may fix the normalisation; ``load_split`` picks the source of ``data.name`` and
reduces the split to some classes, a number of images per class and the image size, the training split to a
transfer set of classes. The sources themselves: ``datasets`` (CIFAR-10/100, MNIST, scikit-learn's digits, ``.npz``
files) and ``imagefolder`` (any ImageFolder tree); a new one is one ``register_source`` call."""
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..config.checks import DATA_SOURCES
from ..errors import DistillError, nearest


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    classes: List[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSource:
    """``load(cfg, train, per_class)``: the training or test split. ``stats``: the fixed normalisation (mean, std)
    of the source (else the training images' own are used), so a transfer set without some classes is normalised
    as the full set was. ``by_name``: ``distill eval --data NAME`` takes it (else ``data.root`` names its file or
    tree). ``selects``: ``load`` itself keeps ``data.classes``, ``per_class`` images and ``data.image_size`` (it
    decodes only those); else ``load_split`` does, after loading the whole split."""
    load: Callable[[DataConfig, bool, Optional[int]], ImageSplit]
    stats: Optional[Tuple[Sequence[float], Sequence[float]]] = None
    by_name: bool = True
    selects: bool = False


SOURCES: Dict[str, DataSource] = {}


def register_source(name: str, source: DataSource) -> None:
    SOURCES[name] = source
    DATA_SOURCES.add(name)  # what recipes may name


def get_source(name: str) -> DataSource:
    if name not in SOURCES:
        raise DistillError(f"data.name must be one of {sorted(SOURCES)}, got {name!r}{nearest(name, SOURCES)}")
    return SOURCES[name]


def cache_dir() -> str:
    return os.environ.get('DISTILL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill'))


def pick(members: np.ndarray, per_class: Optional[int], seed: Optional[int], label: int) -> np.ndarray:
    """The first ``per_class`` of ``members`` (all when None), or a random subset when ``seed`` is set."""
    if per_class is None:
        return members
    if seed is not None:
        members = np.random.RandomState([seed, label]).permutation(members)
    return np.sort(members[:per_class])


def _keep_per_class(labels: np.ndarray, per_class: Optional[int], seed: Optional[int] = None) -> np.ndarray:
    """Indices of ``per_class`` samples of each class (all when None), in dataset order."""
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([pick(np.flatnonzero(labels == c), per_class, seed, int(c))
                                   for c in np.unique(labels)]))


def _select_classes(split: 'ImageSplit', names: Optional[List[str]], where: str) -> 'ImageSplit':
    """Only the classes ``names`` (relabelled 0..k-1 in that order)."""
    if names is None:
        return split
    unknown = [n for n in names if n not in split.classes]
    if unknown:
        raise DistillError(f"data.classes {unknown} not in {where}; its classes are {split.classes}")
    old_labels = torch.tensor([split.classes.index(n) for n in names])
    mapping = torch.full((len(split.classes),), -1, dtype=torch.int64)
    mapping[old_labels] = torch.arange(len(names))
    new_labels = mapping[split.labels]
    keep = new_labels >= 0
    return ImageSplit(split.images[keep], new_labels[keep], list(names))


def _transfer_set(split: ImageSplit, include: Optional[List[Any]], exclude: Optional[List[Any]],
                  where: str) -> ImageSplit:
    """The training images of the classes ``include`` (all when None) but not ``exclude`` (names, or the integers
    that name MNIST's digits); labels and class list stay whole, so the model still has every output."""
    if include is None and exclude is None:
        return split
    chosen = {}
    for key, names in (('include_classes', include), ('exclude_classes', exclude)):
        unknown = [n for n in names or () if str(n) not in split.classes]
        if unknown:
            raise DistillError(f"data.{key} {unknown} not in {where}; its classes are {split.classes}")
        chosen[key] = [split.classes.index(str(n)) for n in names or ()]
    keep_classes = set(chosen['include_classes'] or range(len(split.classes))) - set(chosen['exclude_classes'])
    if not keep_classes:
        raise DistillError(f"data.include_classes / exclude_classes leave no training class of {where}; keep one")
    keep = torch.isin(split.labels, torch.tensor(sorted(keep_classes)))
    return ImageSplit(split.images[keep], split.labels[keep], split.classes)


def load_split(cfg: DataConfig, train: bool) -> ImageSplit:
    """The training (``train``) or test split of ``cfg``: its classes, images per class and size; the training
    split reduced to the transfer set (``include_classes`` / ``exclude_classes``)."""
    split = _load_resized(cfg, train, cfg.train_per_class if train else cfg.val_per_class)
    return _transfer_set(split, cfg.include_classes, cfg.exclude_classes, cfg.name) if train else split


def _load_resized(cfg: DataConfig, train: bool, per_class: Optional[int]) -> ImageSplit:
    source = get_source(cfg.name)
    if source.selects:
        return source.load(cfg, train, per_class)
    split = _select_classes(source.load(cfg, train, per_class), cfg.classes, cfg.name)
    keep = torch.from_numpy(_keep_per_class(split.labels.numpy(), per_class, cfg.subset_seed))
    images = split.images[keep]
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        images = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode='bilinear',
                               antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return ImageSplit(images, split.labels[keep], split.classes)


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    pixels = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1), pixels.std(1)
