"""Where images come from: CIFAR-10/100 (torchvision), MNIST (its four IDX files, md5-checked), any ImageFolder
tree (decoded once, cached as uint8 under ``~/.cache/distill`` or ``$DISTILL_CACHE``), a ``.npz`` file of uint8
arrays and scikit-learn's bundled digits, each as an ``ImageSplit`` held in memory, optionally reduced to some
classes or a number of images per class, the training split to a transfer set of classes; and ``link_subset``: a
smaller ImageFolder tree of links, for streamed runs on part of a tree."""
import gzip
import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

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


# md5 of the uncompressed IDX files (the originals of LeCun et al.; torchvision lists the md5s of the .gz files)
MNIST_FILES = {
    'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',
    'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
    't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
    't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637',
}


def _mnist_bytes(root: str, stem: str) -> bytes:
    """The uncompressed IDX file ``stem`` under ``root`` (gzipped or not, or under torchvision's ``MNIST/raw/``),
    checked against the original's md5."""
    candidates = [os.path.join(root, *sub, stem + ext) for sub in ((), ('MNIST', 'raw')) for ext in ('', '.gz')]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise DistillError(f"MNIST file {stem}(.gz) not found under {root}; set data.root=<folder holding the four "
                           f"IDX files>, or data.download=true where there is internet")
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # a truncated or damaged gzip stream
        raise DistillError(f"{path} does not decompress ({first_line(exc)}); fetch the MNIST files again") from None
    digest = hashlib.md5(data).hexdigest()
    if digest != MNIST_FILES[stem]:
        raise DistillError(f"{path} is not the original MNIST {stem} (md5 {digest} of its {len(data):,} bytes, "
                           f"expected {MNIST_FILES[stem]}): truncated, damaged or another dataset; fetch it again")
    return data


def _load_mnist(cfg: DataConfig, train: bool) -> ImageSplit:
    """MNIST as 1-channel 28x28 uint8 images, classes '0'..'9' (the IDX header: a 4-byte magic, a 4-byte count per
    dimension, then the bytes)."""
    root = os.path.expanduser(cfg.root)
    prefix = 'train' if train else 't10k'
    if cfg.download and not os.path.isfile(os.path.join(root, 'MNIST', 'raw', f'{prefix}-labels-idx1-ubyte')):
        from torchvision import datasets
        try:
            datasets.MNIST(root, train=train, download=True)
        except (RuntimeError, OSError) as exc:
            raise DistillError(f"MNIST download into {root} failed ({first_line(exc)}); without internet put the "
                               f"four IDX files under data.root and set data.download=false") from None
    images = _mnist_bytes(root, f'{prefix}-images-idx3-ubyte')
    labels = _mnist_bytes(root, f'{prefix}-labels-idx1-ubyte')
    count = len(labels) - 8
    pixels = torch.frombuffer(bytearray(images[16:]), dtype=torch.uint8).view(count, 1, 28, 28)
    return ImageSplit(pixels.clone(), torch.frombuffer(bytearray(labels[8:]), dtype=torch.uint8).long(),
                      [str(digit) for digit in range(10)])


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


SOURCES = {'cifar10': _load_cifar, 'cifar100': _load_cifar, 'mnist': _load_mnist, 'npz': _load_npz,
           'digits': _load_digits}


def load_split(cfg: DataConfig, train: bool) -> ImageSplit:
    """The training (``train``) or test split of ``cfg``: its classes, images per class and size; the training
    split reduced to the transfer set (``include_classes`` / ``exclude_classes``)."""
    split = _load_resized(cfg, train, cfg.train_per_class if train else cfg.val_per_class)
    return _transfer_set(split, cfg.include_classes, cfg.exclude_classes, cfg.name) if train else split


def _load_resized(cfg: DataConfig, train: bool, per_class: Optional[int]) -> ImageSplit:
    if cfg.name == 'imagefolder':
        return _load_imagefolder(cfg, train, per_class)
    split = _select_classes(SOURCES[cfg.name](cfg, train), cfg.classes, cfg.name)
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
