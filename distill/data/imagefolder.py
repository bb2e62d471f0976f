"""ImageFolder trees (``root/train/<class>/*.jpg`` and ``root/val/`` or ``test/``): decoded once at the run's size,
cached as uint8 under ``~/.cache/distill`` or ``$DISTILL_CACHE``, only the chosen classes and images per class; and
``link_subset``: a smaller tree of links (or copies), for streamed runs on part of a tree."""
import hashlib
import os
import shutil
from typing import Dict, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DistillError
from ..files import atomic_save, atomic_write
from .sources import DataSource, ImageSplit, cache_dir, pick, register_source

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


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
        names = names[pick(np.arange(len(names)), per_class, cfg.subset_seed, label)].tolist()
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


def link_subset(source: str, target: str, per_class: Dict[str, int], copy: bool = False) -> str:
    """``target/<split>/<class>/`` holding links to the first ``per_class[split]`` images (sorted by name) of each
    class of the ImageFolder root ``source`` (a streamed run on part of a tree; links already there are kept), or
    with ``copy`` copies of them (a tree that travels without its source)."""
    for split, count in per_class.items():
        if not os.path.isdir(os.path.join(source, split)):
            raise DistillError(f"image folder not found: {os.path.join(source, split)}; point it at an ImageFolder "
                               f"root holding {'/, '.join(per_class)}/")
        for name in sorted(os.listdir(os.path.join(source, split))):
            folder = os.path.join(target, split, name)
            os.makedirs(folder, exist_ok=True)
            for image in sorted(os.listdir(os.path.join(source, split, name)))[:count]:
                link, original = os.path.join(folder, image), os.path.abspath(os.path.join(source, split, name, image))
                if not os.path.lexists(link):
                    if copy:  # whole or not at all: a copy cut short is never taken for an image
                        with open(original, 'rb') as image_file:
                            atomic_write(link, lambda out: shutil.copyfileobj(image_file, out))
                    else:
                        os.symlink(original, link)
    return target


register_source('imagefolder', DataSource(_load_imagefolder, by_name=False, selects=True))
