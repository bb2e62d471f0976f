"""ImageFolder trees too large to hold in memory (ImageNet), streamed from disk through DataLoader workers.

``data.in_memory: false`` selects this path. Training images get timm/torchvision's ImageNet augmentation
(``random_resized_crop``: RandomResizedCrop to ``image_size`` + horizontal flip) or the CIFAR crop and flip;
validation images are resized to ``image_size / eval_crop_pct`` and centre-cropped. Workers decode to uint8;
normalisation runs on the training device. The epoch's order comes from the trainer's seeded generator (so a
resumed run continues the same order) and each epoch's worker seed is drawn from it too; under torch.distributed
every rank takes its own part of each global batch, as with the in-memory loader.
"""
import os
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DistillError
from .batching import Batch, Placement, plan_batches
from .sources import find_split_dir
from .views import normalize


class LabelSplit:
    """What the trainer reads of a split it does not hold: the labels (CRD's class lists) and the classes."""

    def __init__(self, labels: torch.Tensor, classes: List[str]):
        self.labels, self.classes = labels, classes

    def __len__(self) -> int:
        return len(self.labels)


class _Indexed(Dataset):
    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        return image, label, index


def image_transform(train: bool, augment: str, image_size: int, padding: int, crop_pct: float):
    from torchvision.transforms import v2 as T
    if not train:
        resize = int(round(image_size / crop_pct))
        steps = [T.Resize(resize, antialias=True), T.CenterCrop(image_size)]
    elif augment == 'random_resized_crop':
        steps = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
        if augment in ('crop', 'crop_flip'):
            steps.append(T.RandomCrop(image_size, padding=padding))
        if augment == 'crop_flip':
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([T.ToImage()] + steps + [T.ToDtype(torch.uint8)])


class StreamingLoader:
    """Yields ``Batch`` es of an ImageFolder split decoded by ``workers`` processes (a ``batching.Loader``)."""
    num_views = 0  # no finite set of views: the teacher cache refuses this loader

    def __init__(self, split_dir: str, batch_size: int, mean: torch.Tensor, std: torch.Tensor, train: bool,
                 augment: str, image_size: int, padding: int, workers: int, crop_pct: float,
                 generator: Optional[torch.Generator] = None, placement: Placement = Placement()):
        from torchvision.datasets import ImageFolder
        self.folder = ImageFolder(split_dir, transform=image_transform(train, augment, image_size, padding,
                                                                        crop_pct))
        self.split = LabelSplit(torch.as_tensor(self.folder.targets, dtype=torch.int64), self.folder.classes)
        self.batch_size, self.train, self.augment, self.padding, self.workers = \
            batch_size, train, augment, padding, workers
        self.device, self.rank, self.world_size = torch.device(placement.device), placement.rank, placement.world_size
        self.mean, self.std = mean.view(1, -1, 1, 1).to(self.device), std.view(1, -1, 1, 1).to(self.device)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def _plan(self, order: torch.Tensor):
        return plan_batches(order, self.batch_size, self.train, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self._plan(torch.arange(len(self.split))))

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        batches = self._plan(torch.randperm(n, generator=self.generator) if self.train else torch.arange(n))
        worker_seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator)) if self.train else 0
        parts = [batch[local].tolist() for batch, local, _ in batches]  # this rank's samples of each batch
        loader = DataLoader(_Indexed(self.folder), batch_sampler=parts,
                            num_workers=self.workers, pin_memory=self.device.type == 'cuda',
                            generator=torch.Generator().manual_seed(worker_seed))
        for (images, labels, indices), (*_, loss_scale) in zip(loader, batches):
            images = images.to(self.device, non_blocking=True)
            labels, indices = labels.to(self.device, non_blocking=True), indices.to(self.device)
            yield Batch(normalize(images, self.mean, self.std), labels, indices, torch.zeros_like(indices), None,
                        loss_scale)


def streaming_split_dir(root: str, train: bool) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DistillError(f"data directory not found: {root} (set data.root=<ImageFolder root>)")
    return find_split_dir(root, train)
