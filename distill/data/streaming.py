"""ImageFolder trees too large to hold in memory (ImageNet), streamed from disk through DataLoader workers.

``data.in_memory: false`` selects this path. Training images get timm/torchvision's ImageNet augmentation
(``random_resized_crop``: RandomResizedCrop to ``image_size`` + horizontal flip) or the CIFAR crop and flip, then
timm's AutoAugment / RandAugment / AugMix where ``data.auto_augment`` names one (timm's strings, e.g.
``rand-m9-mstd0.5-inc1``, with timm's parameters for them); validation images are resized to
``image_size / eval_crop_pct`` and centre-cropped. Persistent workers decode to uint8 into pinned memory;
normalisation runs on the training device. On the CPU it, and the trainer's erasing and mixing, run on one thread
while workers run (``host_work``): a batch-wide op on two threads waits for its second thread to get a core that a
worker holds (normalising a 64 x 32 x 32 batch took 6.6 ms instead of 0.07 ms beside two busy workers; erasing and
mixing it 12.5 ms on average instead of 2.1).

Every random draw of a training image's augmentation (torch, numpy and Python ``random``, which timm's operations
use) is seeded from (the epoch's seed, the image's index) alone, so an image's augmented pixels do not depend on
the worker that made them, the number of workers, or what was decoded before: an epoch can be regenerated image by
image. The epoch's order and seed come from the trainer's seeded generator (checkpointed: a resumed run continues
the same stream); under torch.distributed every rank takes its own part of each global batch, as with the
in-memory loader. Batches reach the device one step ahead (on CUDA on a side stream, overlapping the step).
"""
import contextlib
import os
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import DistillError
from .batching import Batch, Placement, plan_batches
from .imagefolder import find_split_dir
from .image_transforms import image_transform
from .seeding import sample_seed, seeded
from .views import normalize


class LabelSplit:
    """What the trainer reads of a split it does not hold: the labels (CRD's class lists) and the classes."""

    def __init__(self, labels: torch.Tensor, classes: List[str]):
        self.labels, self.classes = labels, classes

    def __len__(self) -> int:
        return len(self.labels)


class _Indexed(Dataset):
    """Items are ``(index, epoch seed)``: the image's augmentation is seeded from both (``sample_seed``)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch_seed = key
        with seeded(sample_seed(epoch_seed, index), restore=get_worker_info() is None):
            image, label = self.folder[index]
        return image, label, index


class _EpochBatches:
    """The DataLoader's batch sampler: the current epoch's batches of ``(index, epoch seed)``, set per epoch so the
    persistent workers serve every epoch."""

    def __init__(self):
        self.batches: List[List[Tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamingLoader:
    """Yields ``Batch`` es of an ImageFolder split decoded by ``workers`` processes (a ``batching.Loader``)."""
    num_views = 0  # no finite set of views: the teacher cache refuses this loader

    def __init__(self, split_dir: str, batch_size: int, mean: torch.Tensor, std: torch.Tensor, train: bool,
                 augment: str, image_size: int, padding: int, workers: int, crop_pct: float,
                 generator: Optional[torch.Generator] = None, placement: Placement = Placement(),
                 auto_augment: Optional[str] = None):
        from torchvision.datasets import ImageFolder
        self.folder = ImageFolder(split_dir, transform=image_transform(train, augment, image_size, padding,
                                                                        crop_pct, auto_augment, mean.tolist()))
        self.split = LabelSplit(torch.as_tensor(self.folder.targets, dtype=torch.int64), self.folder.classes)
        self.batch_size, self.train, self.augment, self.padding, self.workers = \
            batch_size, train, augment, padding, workers
        self.device, self.rank, self.world_size = torch.device(placement.device), placement.rank, placement.world_size
        self.mean, self.std = mean.view(1, -1, 1, 1).to(self.device), std.view(1, -1, 1, 1).to(self.device)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._batches, self._loader, self._stream = _EpochBatches(), None, None
        self.epoch_seed = 0  # the current epoch's: with an index, it regenerates an image (``augmented``)
        self.epoch, self.start, self.epoch_order = 0, 0, torch.arange(0)
        self.replay = None  # a teaching.record.Recording whose epochs' orders and seeds this loader follows

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def host_work(self):
        """One torch thread on the CPU while workers run (see the module's docstring)."""
        return one_thread() if self.device.type == 'cpu' and self.workers else contextlib.nullcontext()

    def augmented(self, index: int, epoch_seed: int) -> torch.Tensor:
        """Image ``index`` as the epoch of ``epoch_seed`` augmented it (uint8, before normalisation)."""
        return _Indexed(self.folder)[(index, epoch_seed)][0]

    def _plan(self, order: torch.Tensor):
        return plan_batches(order, self.batch_size, self.train, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self._plan(torch.arange(len(self.split))))

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        if self.train and self.replay is not None:
            recorded = self.replay.epoch(self.epoch)
            order, self.epoch_seed = recorded['order'].long(), int(recorded['seed'])
        else:
            order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
            self.epoch_seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator)) if self.train else 0
        self.epoch_order = order
        batches, self.start = self._plan(order)[self.start:], 0  # a resumed epoch decodes from its next batch
        # this rank's samples of each batch
        self._batches.batches = [[(i, self.epoch_seed) for i in batch[local].tolist()] for batch, local, _ in batches]
        if self._loader is None:  # its own generator: creating an epoch's iterator leaves torch's global RNG alone
            self._loader = DataLoader(_Indexed(self.folder), batch_sampler=self._batches,
                                      num_workers=self.workers, persistent_workers=self.workers > 0,
                                      pin_memory=self.device.type == 'cuda', generator=torch.Generator())
        # one batch ahead: on CUDA the next batch's copy and normalisation run on a side stream while the step runs
        # (as timm's PrefetchLoader: each stream waits for the other before it touches the next batch's memory)
        cuda = self.device.type == 'cuda'
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        ahead: Optional[Batch] = None
        for (images, labels, indices), (*_, loss_scale) in zip(self._loader, batches):
            if cuda:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
                images = images.to(self.device, non_blocking=True)
                labels, indices = labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True)
                with self.host_work():
                    images = normalize(images, self.mean, self.std)
                batch = Batch(images, labels, indices, torch.zeros_like(indices), None, loss_scale)
            if ahead is not None:
                yield ahead
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            ahead = batch
        if ahead is not None:
            yield ahead


@contextlib.contextmanager
def one_thread():
    """torch's CPU ops on the calling thread alone (setting the thread count costs under a microsecond)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def streaming_split_dir(root: str, train: bool) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DistillError(f"data directory not found: {root} (set data.root=<ImageFolder root>)")
    return find_split_dir(root, train)
