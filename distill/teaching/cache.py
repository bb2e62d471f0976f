"""Teacher logits computed once per (training image, augmentation view) and reused by every run and seed.

A frozen teacher's logits depend only on its weights and the exact input. With CIFAR's crop-and-flip
augmentation an image has (2p+1)^2 * 2 = 162 possible views (p = 4), so a table of logits indexed by image and
view id is exact: a run whose teacher, data, normalisation, augmentation and precision match reads the teacher's
answer instead of running it (about 1.6 GB in fp16 for CIFAR-100). The table fills lazily: a view seen for the
first time is computed by the teacher (only those samples of the batch) and stored, so the first run costs what a
live teacher costs and every later run or seed is teacher-free where its views are filled.

The table lives in two ``.npy`` files mapped into memory (``logits.npy``, ``filled.npy``) under a folder named by
a hash of everything the logits depend on; new entries are written in place (logits before their ``filled``
flag, so a killed run never leaves a flag without its logits) and flushed at every epoch end. Runs may fill one
table at once (seeds of one teacher): the teacher computes missing views in chunks of exactly ``TEACHER_ROWS``
images, so an entry's bits do not depend on which run computed it or with which other images (CPU kernels sum in
another order for a batch of a few rows, and a table filled partly a few views at a time moved a KD run's final
errors by one). Augmentations without a finite view set (RandAugment, mixup) and teacher features cannot be
cached: the trainer refuses them.
"""
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

NUMPY_DTYPES = {'float16': np.float16, 'float32': np.float32}
TEACHER_ROWS = 64  # the teacher's batch when it fills the table


def teacher_in_chunks(teacher: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                      rows: int = TEACHER_ROWS) -> torch.Tensor:
    """``teacher(images)`` computed in batches of exactly ``rows`` images (the last padded with copies of the first
    image): each image's logits are then a function of that image alone."""
    count = len(images)
    padding = -count % rows
    if padding:
        images = torch.cat([images, images[:1].expand(padding, *images.shape[1:])])
    return torch.cat([teacher(chunk) for chunk in images.split(rows)])[:count]


def digest_tensors(digest: 'hashlib._Hash', tensors: Dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def cache_key(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              settings: Dict[str, Any]) -> str:
    """A hash of the teacher's weights, the training images (uint8, before augmentation) and ``settings``
    (augmentation, normalisation, precision, storage dtype): equal keys give equal logits."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    digest_tensors(digest, teacher.state_dict())
    digest_tensors(digest, {'images': images, 'labels': labels})
    return digest.hexdigest()[:20]


class TeacherCache:
    """The logits table of one teacher on one training split: ``(num_images, num_views, num_classes)``."""

    def __init__(self, folder: str, num_images: int, num_views: int, num_classes: int, dtype: str,
                 device: torch.device, meta: Dict[str, Any]):
        self.folder, self.device = folder, device
        shape = (num_images, num_views, num_classes)
        if not self._open(shape, dtype):
            self._create(shape, dtype, meta)
            if not self._open(shape, dtype):
                raise RuntimeError(f"teacher cache {folder} could not be opened after creating it")
        # On the CPU the tables are the mapped files themselves; on a GPU they are copies written through.
        self.logits = torch.from_numpy(self._logits_file) if device.type == 'cpu' else \
            torch.from_numpy(np.asarray(self._logits_file)).to(device)
        self.filled = torch.from_numpy(self._filled_file).view(torch.bool) if device.type == 'cpu' else \
            torch.from_numpy(np.asarray(self._filled_file)).view(torch.bool).to(device)
        self.capacity = num_images * num_views
        self.filled_count = int(self.filled.sum())
        self.computed = 0  # views the teacher had to compute in this process

    def _paths(self, folder: Optional[str] = None):
        folder = folder or self.folder
        return os.path.join(folder, 'logits.npy'), os.path.join(folder, 'filled.npy')

    def _open(self, shape, dtype: str) -> bool:
        """Map an existing table; a damaged or mismatched one is removed (it is a cache, never trusted)."""
        logits_path, filled_path = self._paths()
        if not os.path.isdir(self.folder):
            return False
        try:
            self._logits_file = np.lib.format.open_memmap(logits_path, mode='r+')
            self._filled_file = np.lib.format.open_memmap(filled_path, mode='r+')
            if self._logits_file.shape != shape or self._logits_file.dtype != NUMPY_DTYPES[dtype] \
                    or self._filled_file.shape != shape[:2]:
                raise ValueError('shape or dtype differs')
            return True
        except (OSError, ValueError):
            shutil.rmtree(self.folder, ignore_errors=True)
            return False

    def _create(self, shape, dtype: str, meta: Dict[str, Any]) -> None:
        """Build the files in a temporary folder and rename it into place (a concurrent run may win the race)."""
        parent = os.path.dirname(self.folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix='.building-', dir=parent)
        logits_path, filled_path = self._paths(tmp)
        np.lib.format.open_memmap(logits_path, mode='w+', dtype=NUMPY_DTYPES[dtype], shape=shape).flush()
        np.lib.format.open_memmap(filled_path, mode='w+', dtype=np.uint8, shape=shape[:2]).flush()
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        try:
            os.rename(tmp, self.folder)
        except OSError:  # another process created it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)

    def lookup(self, indices: torch.Tensor, views: torch.Tensor, images: torch.Tensor,
               teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The teacher's fp32 logits for ``images`` (sample ``indices`` seen in ``views``); views not yet in the
        table are computed by ``teacher`` on those samples only and stored."""
        indices, views = indices.to(self.device), views.to(self.device)
        if self.filled_count < self.capacity:  # a full table needs no check (and no host sync)
            missing = torch.nonzero(~self.filled[indices, views]).squeeze(1)
            if len(missing):
                self._store(indices[missing], views[missing], teacher_in_chunks(teacher, images[missing]))
        return self.logits[indices, views].float()

    def _store(self, indices: torch.Tensor, views: torch.Tensor, logits: torch.Tensor) -> None:
        values = logits.detach().to(self.logits.dtype)
        self.logits[indices, views] = values.to(self.logits.device)
        self.filled[indices, views] = True
        if self.device.type != 'cpu':  # write through to the mapped files, logits first
            rows, cols = indices.cpu().numpy(), views.cpu().numpy()
            self._logits_file[rows, cols] = values.cpu().numpy()
            self._filled_file[rows, cols] = 1
        self.filled_count += len(indices)
        self.computed += len(indices)

    def flush(self) -> None:
        self._logits_file.flush()
        self._filled_file.flush()
        self.filled_count = int(self._filled_file.sum())  # counts entries other processes filled, too

    @property
    def fill_ratio(self) -> float:
        return self.filled_count / self.capacity


def open_teacher_cache(teacher: torch.nn.Module, loader, num_classes: int, settings: Dict[str, Any],
                       meta: Dict[str, Any], root: Optional[str], dtype: str,
                       device: torch.device) -> TeacherCache:
    """The table of ``teacher`` on ``loader``'s training split (an in-memory loader with a finite view set),
    under ``root`` (default ``$DISTILL_CACHE/teacher_logits``) in a folder named by the hash of everything the
    logits depend on: weights, images, labels, augmentation, normalisation and ``settings`` (precision, ...)."""
    from ..data import cache_dir
    settings = {**settings, 'padding': loader.padding, 'mean': loader.mean.flatten().tolist(),
                'std': loader.std.flatten().tolist(), 'dtype': dtype, 'version': 2}
    key = cache_key(teacher, loader.split.images, loader.split.labels, settings)
    root = os.path.expanduser(root or os.path.join(cache_dir(), 'teacher_logits'))
    return TeacherCache(os.path.join(root, key), len(loader.split), loader.num_views, num_classes, dtype, device,
                        meta={**settings, **meta})
