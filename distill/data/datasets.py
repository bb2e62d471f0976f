"""The built-in data sources held in memory: CIFAR-10/100 (torchvision's files), MNIST (its four IDX files,
md5-checked), scikit-learn's bundled digits and a ``.npz`` file of uint8 arrays."""
import gzip
import hashlib
import os
import zipfile
from typing import Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DistillError, first_line
from ..models._base import CIFAR100_MEAN, CIFAR100_STD
from ..models.mnist_mlp import MNIST_MEAN, MNIST_STD
from .sources import DataSource, ImageSplit, register_source


def _load_cifar(cfg: DataConfig, train: bool, per_class: Optional[int] = None) -> ImageSplit:
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


def _load_digits(cfg: DataConfig, train: bool, per_class: Optional[int] = None) -> ImageSplit:
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


def _load_mnist(cfg: DataConfig, train: bool, per_class: Optional[int] = None) -> ImageSplit:
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


NPZ_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')


def _load_npz(cfg: DataConfig, train: bool, per_class: Optional[int] = None) -> ImageSplit:
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


CIFAR_STATS = (CIFAR100_MEAN, CIFAR100_STD)  # CRD's, for both CIFARs (RepDistiller normalises CIFAR-10 alike)
register_source('cifar10', DataSource(_load_cifar, CIFAR_STATS))
register_source('cifar100', DataSource(_load_cifar, CIFAR_STATS))
register_source('mnist', DataSource(_load_mnist, (MNIST_MEAN, MNIST_STD)))
register_source('digits', DataSource(_load_digits))
register_source('npz', DataSource(_load_npz, by_name=False))
