"""Datasets held in memory as uint8 tensors, with batched augmentation and a seeded, checkpointable order.

CIFAR-10/100 come from torchvision (``download=True`` where there is internet), any ImageFolder tree is decoded
once and cached under ``~/.cache/distill`` (``$DISTILL_CACHE``), and scikit-learn's bundled digits serve tiny
offline runs. Training batches get the CRD augmentation (random crop with zero padding, horizontal flip) applied
per sample on the whole batch, drawn from one ``torch.Generator`` whose state is saved in checkpoints, so the
data order and augmentation of a resumed run equal those of an uninterrupted one.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .errors import DistillError
from .randaugment import rand_augment

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    classes: List[str]

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> str:
    return os.environ.get('DISTILL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill'))


def _pick(members: np.ndarray, per_class: Optional[int], seed: Optional[int], label: int) -> np.ndarray:
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
    return np.sort(np.concatenate([_pick(np.flatnonzero(labels == c), per_class, seed, int(c))
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


def _load_cifar(cfg: DataConfig, train: bool) -> ImageSplit:
    from torchvision import datasets
    cls = datasets.CIFAR10 if cfg.name == 'cifar10' else datasets.CIFAR100
    try:
        dataset = cls(os.path.expanduser(cfg.root), train=train, download=cfg.download)
    except (RuntimeError, OSError) as exc:  # missing files, or a download without internet (URLError)
        reason = 'download failed, no internet?' if cfg.download else 'not downloaded'
        raise DistillError(f"{cfg.name} not found under {cfg.root} ({reason}: {str(exc).splitlines()[0][:100]}); "
                           f"set data.root=<folder holding the dataset>, or data.download=true where there is "
                           f"internet") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.as_tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def _load_digits(cfg: DataConfig, train: bool) -> ImageSplit:
    from sklearn.datasets import load_digits
    digits = load_digits()
    # A fixed stratified 80/20 split: every class contributes its first 80% of samples to training.
    labels = digits.target.astype(np.int64)
    is_train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        is_train[members[:int(round(0.8 * len(members)))]] = True
    select = np.flatnonzero(is_train == train)
    gray = torch.from_numpy(digits.images[select] * (255.0 / 16.0)).round().to(torch.uint8)
    images = gray[:, None].expand(-1, 3, -1, -1).contiguous()  # 3 channels, like every image model's stem
    return ImageSplit(images, torch.from_numpy(labels[select]), [str(i) for i in range(10)])


def _find_split_dir(root: str, train: bool) -> str:
    names = ('train',) if train else ('val', 'test')
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise DistillError(f"ImageFolder root {root} has no {' or '.join(names)}/ folder; point data.root at a "
                       f"folder holding train/<class>/*.jpg and val/ (or test/)")


def _load_imagefolder(cfg: DataConfig, train: bool, per_class: Optional[int]) -> ImageSplit:
    from PIL import Image
    root = os.path.abspath(os.path.expanduser(cfg.root))
    if not os.path.isdir(root):
        raise DistillError(f"data directory not found: {cfg.root} (set data.root=<ImageFolder root>)")
    split_dir = _find_split_dir(root, train)
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise DistillError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    if cfg.classes is not None:  # decode only the chosen classes
        unknown = [n for n in cfg.classes if n not in classes]
        if unknown:
            raise DistillError(f"data.classes {unknown} not in {split_dir}; its classes are {classes}")
        classes = list(cfg.classes)
    files, labels = [], []
    for label, name in enumerate(classes):
        names = np.array(sorted(f for f in os.listdir(os.path.join(split_dir, name))
                                if f.lower().endswith(IMAGE_EXTENSIONS)))
        names = names[_pick(np.arange(len(names)), per_class, cfg.subset_seed, label)].tolist()
        files += [os.path.join(split_dir, name, f) for f in names]
        labels += [label] * len(names)
    key = hashlib.sha1(repr((files, cfg.image_size)).encode()).hexdigest()[:16]
    cache_file = os.path.join(cache_dir(), 'imagefolder', f'{key}.pt')
    if os.path.isfile(cache_file):
        try:
            cached = torch.load(cache_file, weights_only=True)
            return ImageSplit(cached['images'], cached['labels'], classes)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    size = cfg.image_size
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            img = img.convert('RGB')
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            images[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    split = ImageSplit(images, torch.as_tensor(labels, dtype=torch.int64), classes)
    from .checkpoint import atomic_save
    atomic_save({'images': split.images, 'labels': split.labels}, cache_file)
    return split


def load_split(cfg: DataConfig, train: bool) -> ImageSplit:
    per_class = cfg.train_per_class if train else cfg.val_per_class
    if cfg.name == 'imagefolder':
        return _load_imagefolder(cfg, train, per_class)
    split = _load_cifar(cfg, train) if cfg.name.startswith('cifar') else _load_digits(cfg, train)
    split = _select_classes(split, cfg.classes, cfg.name)
    keep = torch.from_numpy(_keep_per_class(split.labels.numpy(), per_class, cfg.subset_seed))
    images = split.images[keep]
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        images = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode='bilinear',
                               antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return ImageSplit(images, split.labels[keep], split.classes)


def view_count(augment: str, padding: int) -> int:
    """How many distinct training views an image has: (2p+1)^2 crop offsets, times 2 with flipping."""
    if augment == 'none':
        return 1
    return (2 * padding + 1) ** 2 * (2 if augment == 'crop_flip' else 1)


def draw_views(n: int, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each sample's view id ``(top * (2p+1) + left) * 2 + flipped`` (without flipping: ``top * (2p+1) + left``),
    drawn as torchvision's RandomCrop(padding=p)
    and RandomHorizontalFlip would: top and left offsets uniform in [0, 2p], a flip with probability 1/2."""
    top = left = torch.zeros(n, dtype=torch.int64)
    if padding > 0:
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flipped = (torch.rand(n, generator=generator) < 0.5).long() if flip else torch.zeros(n, dtype=torch.int64)
    return (top * (2 * padding + 1) + left) * (2 if flip else 1) + flipped


def apply_views(images: torch.Tensor, views: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Crop (zero padding ``padding``) and flip each image of a batch as its view id says, on the images' device."""
    n, channels, h, w = images.shape
    views = views.to(images.device)
    flipped, offset = (views % 2, views // 2) if flip else (torch.zeros_like(views), views)
    if padding > 0:
        top, left = offset // (2 * padding + 1), offset % (2 * padding + 1)
        padded = F.pad(images, (padding, padding, padding, padding))
        arange = lambda k: torch.arange(k, device=images.device)  # noqa: E731
        rows = (top[:, None] + arange(h))[:, None, :, None]  # (n, 1, h, 1)
        cols = (left[:, None] + arange(w))[:, None, None, :]  # (n, 1, 1, w)
        images = padded[arange(n)[:, None, None, None], arange(channels)[None, :, None, None], rows, cols]
    return torch.where(flipped.bool()[:, None, None, None], images.flip(-1), images)


def augment_batch(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding, as torchvision's RandomCrop(padding=p)) and horizontal flip."""
    return apply_views(images, draw_views(len(images), padding, flip, generator), padding, flip)


class Batch(NamedTuple):
    images: torch.Tensor  # normalised float images on the loader's device
    labels: torch.Tensor
    indices: torch.Tensor  # positions in the split (CRD's memory bank, the teacher cache)
    views: torch.Tensor  # each image's augmentation view id (see draw_views); 0 without augmentation
    strong: Optional[torch.Tensor] = None  # a strongly augmented view (methods such as MLKD)
    loss_scale: float = 1.0  # world * local / global batch size: makes DDP's gradient mean the global batch mean


def plan_batches(order: torch.Tensor, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """Each batch of an epoch as ``(global batch indices, positions of this rank's part in it, loss scale)``.

    Training: every rank sees the same global batches of ``order`` and keeps a contiguous part of each (the loss
    scale ``world * local / global`` makes DDP's mean of rank means the global batch mean); a last batch smaller
    than the world is dropped, since a rank would have no sample. Evaluation under torch.distributed: each rank
    takes a contiguous part of the split, batched on its own."""
    if not train and world_size > 1:
        order = torch.tensor_split(order, world_size)[rank]
        world_size = 1
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if train and batches and len(batches[-1]) < world_size:
        batches.pop()
    if world_size == 1:
        return [(batch, torch.arange(len(batch)), 1.0) for batch in batches]
    parts = [torch.tensor_split(torch.arange(len(batch)), world_size)[rank] for batch in batches]
    return [(batch, part, world_size * len(part) / len(batch)) for batch, part in zip(batches, parts)]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's input: scaled to [0, 1], then standardised per channel."""
    return (images.float() / 255.0 - mean) / std


class BatchLoader:
    """Yields ``Batch`` es from an in-memory split held as uint8 on one device (``to(device)``: the training
    device, so crops, flips and normalisation run batched there, with no DataLoader workers).

    Training loaders shuffle and augment with ``generator`` (a CPU generator: one permutation per epoch, then the
    augmentation draws of each batch in order), so a run's data equal on every device and after a resume;
    evaluation loaders keep the order and do not augment. With ``strong_view`` set (by the trainer, for methods
    such as MLKD) a training batch also carries a RandAugment view of the same images. Under ``torch.distributed``
    (``shard(rank, world)``) every rank draws the global batch and keeps its own contiguous part of it, so the
    global batch, its augmentation and its order equal those of a single process.
    """
    strong_view: bool = False

    def __init__(self, split: ImageSplit, batch_size: int, mean: torch.Tensor, std: torch.Tensor,
                 train: bool, augment: str = 'none', padding: int = 0,
                 generator: Optional[torch.Generator] = None):
        self.split, self.batch_size, self.train = split, batch_size, train
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.augment, self.padding, self.flip = augment, padding, augment == 'crop_flip'
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.world_size = 0, 1
        self.num_views = view_count(augment, padding) if train else 1

    def to(self, device: torch.device) -> 'BatchLoader':
        split = self.split
        self.split = ImageSplit(split.images.to(device), split.labels.to(device), split.classes)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def shard(self, rank: int, world_size: int) -> 'BatchLoader':
        self.rank, self.world_size = rank, world_size
        return self

    def __len__(self) -> int:
        return len(plan_batches(torch.arange(len(self.split)), self.batch_size, self.train, self.rank,
                                self.world_size))

    def __iter__(self) -> Iterator[Batch]:
        n, device = len(self.split), self.split.images.device
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        augmenting = self.train and self.augment != 'none'
        for indices, local, loss_scale in plan_batches(order, self.batch_size, self.train, self.rank,
                                                       self.world_size):
            views = draw_views(len(indices), self.padding, self.flip, self.generator) \
                if augmenting else torch.zeros(len(indices), dtype=torch.int64)
            strong = None
            if self.train and self.strong_view:  # drawn for the global batch so every rank's draws stay aligned
                raw = self.split.images[indices.to(device)].cpu()
                weak = apply_views(raw, draw_views(len(raw), self.padding, self.flip, self.generator),
                                   self.padding, self.flip) if augmenting else raw
                strong = rand_augment(weak, self.generator)
            if len(local) < len(indices):  # this rank's part of the global batch
                indices, views = indices[local], views[local]
                strong = strong[local] if strong is not None else None
            indices = indices.to(device)
            images = self.split.images[indices]
            if augmenting:
                images = apply_views(images, views, self.padding, self.flip)
            yield Batch(self._normalize(images), self.split.labels[indices], indices, views.to(device),
                        self._normalize(strong.to(device)) if strong is not None else None, loss_scale)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


@dataclass
class DataBundle:
    train: BatchLoader
    val: BatchLoader
    num_classes: int
    classes: List[str]


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    pixels = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1), pixels.std(1)


def _check_classes(cfg: DataConfig, num_classes: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DistillError(f"data.num_classes={cfg.num_classes} but {cfg.name} at {cfg.root} has "
                           f"{num_classes} classes; set data.num_classes={num_classes} or fix the data")


def normalization(cfg: DataConfig, train: Optional[ImageSplit]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The configured mean/std; else CRD's CIFAR statistics for CIFAR, else the training images' own."""
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("set both data.mean and data.std, or neither (then the training images' statistics "
                           "are used)")
    if cfg.mean is not None:
        return torch.tensor(cfg.mean), torch.tensor(cfg.std)
    if cfg.name.startswith('cifar'):
        from .models._base import CIFAR100_MEAN, CIFAR100_STD
        return torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)
    if train is None:
        train = load_split(cfg, train=True)
    return channel_stats(train.images)


def build_streaming_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Loaders that decode an ImageFolder tree from disk each epoch (``data.in_memory=false``), normalised with
    the configured statistics or ImageNet's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from .streaming import StreamingLoader, streaming_split_dir
    if (cfg.mean is None) != (cfg.std is None):
        raise DistillError("set both data.mean and data.std, or neither (then ImageNet's statistics are used)")
    mean = torch.tensor(cfg.mean if cfg.mean is not None else IMAGENET_DEFAULT_MEAN)
    std = torch.tensor(cfg.std if cfg.std is not None else IMAGENET_DEFAULT_STD)
    loaders = [StreamingLoader(streaming_split_dir(cfg.root, train), cfg.batch_size if train else cfg.eval_batch_size,
                               mean, std, train, cfg.augment, cfg.image_size, cfg.crop_padding, cfg.workers,
                               cfg.eval_crop_pct, torch.Generator().manual_seed(seed) if train else None)
               for train in (True, False)]
    train, val = loaders
    if train.split.classes != val.split.classes:
        raise DistillError(f"train and validation splits have different classes ({len(train.split.classes)} vs "
                           f"{len(val.split.classes)}); make both hold the same class folders")
    _check_classes(cfg, len(train.split.classes))
    return DataBundle(train=train, val=val, num_classes=len(train.split.classes), classes=train.split.classes)


def build_data(cfg: DataConfig, seed: int) -> DataBundle:
    if not cfg.in_memory:
        return build_streaming_data(cfg, seed)
    train, val = load_split(cfg, train=True), load_split(cfg, train=False)
    if train.classes != val.classes:
        raise DistillError(f"train and validation splits have different classes ({len(train.classes)} vs "
                           f"{len(val.classes)}); make both hold the same class folders")
    _check_classes(cfg, len(train.classes))
    mean, std = normalization(cfg, train)
    generator = torch.Generator().manual_seed(seed)
    return DataBundle(
        train=BatchLoader(train, cfg.batch_size, mean, std, True, cfg.augment, cfg.crop_padding, generator),
        val=BatchLoader(val, cfg.eval_batch_size, mean, std, False),
        num_classes=len(train.classes), classes=train.classes)


def build_eval_loader(cfg: DataConfig, mean: Optional[torch.Tensor] = None,
                      std: Optional[torch.Tensor] = None) -> BatchLoader:
    """The validation split alone, normalised with the statistics the model was trained with (when known)."""
    val = load_split(cfg, train=False)
    _check_classes(cfg, len(val.classes))
    if mean is None or std is None:
        mean, std = normalization(cfg, None)
    return BatchLoader(val, cfg.eval_batch_size, mean, std, False)
