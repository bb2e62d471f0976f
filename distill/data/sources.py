"""Where images come from: CIFAR-10/100 (torchvision), any ImageFolder tree (decoded once, cached as uint8 under
``~/.cache/distill`` or ``$DISTILL_CACHE``), a ``.npz`` file of uint8 arrays and scikit-learn's bundled digits, each
as an ``ImageSplit`` held in memory, optionally reduced to some classes or a number of images per class; and
``link_subset``: a smaller ImageFolder tree of links, for streamed runs on part of a tree."""
import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import DistillError, first_line
from ..files import atomic_save

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


NPZ_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')


def _load_npz(cfg: DataConfig, train: bool) -> ImageSplit:
    """``data.root`` a ``.npz`` file (``numpy.savez``) holding ``train_images``/``test_images`` (uint8, N x H x W x
    3 as image arrays usually are, or N x 3 x H x W), ``train_labels``/``test_labels`` (integers) and optionally
    ``classes`` (names); e.g. a subset of a dataset packed once to travel to a machine without it."""
    path = os.path.expanduser(cfg.root)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in NPZ_KEYS if key not in arrays.files]
            if missing:
                raise DistillError(f"{cfg.root} lacks the arrays {missing}; a data.name=npz file holds "
                                   f"{', '.join(NPZ_KEYS)} (and optionally classes)")
            prefix = 'train' if train else 'test'
            images, labels = arrays[f'{prefix}_images'], arrays[f'{prefix}_labels']
            count = max(int(arrays['train_labels'].max()), int(arrays['test_labels'].max())) + 1
            classes = [str(name) for name in arrays['classes']] if 'classes' in arrays.files else \
                [str(i) for i in range(count)]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DistillError(f"data.root={cfg.root} is not a readable .npz file ({first_line(exc)}); point it at a "
                           f"file written by numpy.savez") from None
    if images.dtype != np.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise DistillError(f"{cfg.root}: {prefix}_images is {images.dtype} {images.shape}; it must be uint8 images, "
                           f"N x H x W x 3 or N x 3 x H x W")
    tensor = torch.from_numpy(images)
    tensor = tensor.permute(0, 3, 1, 2).contiguous() if images.shape[3] == 3 else tensor
    return ImageSplit(tensor, torch.from_numpy(labels.astype(np.int64)), classes)


def find_split_dir(root: str, train: bool) -> str:
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
    split_dir = find_split_dir(root, train)
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
        if len(names) == 0 and not cfg.allow_empty_classes:
            raise DistillError(f"class folder {os.path.join(split_dir, name)} holds no images "
                               f"({', '.join(IMAGE_EXTENSIONS)}); remove it, or set data.allow_empty_classes=true "
                               f"to keep it as a class without images")
        names = names[_pick(np.arange(len(names)), per_class, cfg.subset_seed, label)].tolist()
        files += [os.path.join(split_dir, name, f) for f in names]
        labels += [label] * len(names)
    key = hashlib.sha1(repr((files, cfg.image_size) + (('skip_bad_images',) if cfg.skip_bad_images else ())
                            ).encode()).hexdigest()[:16]
    cache_file = os.path.join(cache_dir(), 'imagefolder', f'{key}.pt')
    if os.path.isfile(cache_file):
        try:
            cached = torch.load(cache_file, weights_only=True)
            return ImageSplit(cached['images'], cached['labels'], classes)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    size = cfg.image_size
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    readable = torch.ones(len(files), dtype=torch.bool)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert('RGB')
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                images[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for non-images and truncated files
            if not cfg.skip_bad_images:
                raise DistillError(f"{path} is not a readable image ({str(exc)[:100]}); remove it, or set "
                                   f"data.skip_bad_images=true to leave such files out") from None
            readable[i] = False
    if not readable.all():
        print(f"data: left out {int((~readable).sum())} unreadable image files of {split_dir} "
              f"(data.skip_bad_images)")
    split = ImageSplit(images[readable], torch.as_tensor(labels, dtype=torch.int64)[readable], classes)
    atomic_save({'images': split.images, 'labels': split.labels}, cache_file)
    return split


def load_split(cfg: DataConfig, train: bool) -> ImageSplit:
    per_class = cfg.train_per_class if train else cfg.val_per_class
    if cfg.name == 'imagefolder':
        return _load_imagefolder(cfg, train, per_class)
    loader = _load_cifar if cfg.name.startswith('cifar') else _load_npz if cfg.name == 'npz' else _load_digits
    split = loader(cfg, train)
    split = _select_classes(split, cfg.classes, cfg.name)
    keep = torch.from_numpy(_keep_per_class(split.labels.numpy(), per_class, cfg.subset_seed))
    images = split.images[keep]
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        images = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode='bilinear',
                               antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return ImageSplit(images, split.labels[keep], split.classes)


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    pixels = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1), pixels.std(1)


def link_subset(source: str, target: str, per_class: Dict[str, int]) -> str:
    """``target/<split>/<class>/`` holding links to the first ``per_class[split]`` images (sorted by name) of each
    class of the ImageFolder root ``source`` (a streamed run on part of a tree; links already there are kept)."""
    for split, count in per_class.items():
        if not os.path.isdir(os.path.join(source, split)):
            raise DistillError(f"image folder not found: {os.path.join(source, split)}; point it at an ImageFolder "
                               f"root holding {'/, '.join(per_class)}/")
        for name in sorted(os.listdir(os.path.join(source, split))):
            folder = os.path.join(target, split, name)
            os.makedirs(folder, exist_ok=True)
            for image in sorted(os.listdir(os.path.join(source, split, name)))[:count]:
                link = os.path.join(folder, image)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(source, split, name, image)), link)
    return target
