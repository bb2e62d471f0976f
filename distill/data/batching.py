"""Batches and the loaders that yield them: the ``Batch`` every training step receives, the ``Loader`` protocol
the in-memory and streamed loaders implement, the in-memory ``BatchLoader``, and how a global batch is split
over torch.distributed ranks."""
import contextlib
from dataclasses import dataclass
from typing import (Any, ContextManager, Iterator, List, NamedTuple, Optional, Protocol, Tuple,
                    runtime_checkable)

import torch

from .randaugment import rand_augment
from .sources import ImageSplit
from .views import apply_views, draw_views, normalize, view_count


class Batch(NamedTuple):
    """One training (or evaluation) step's inputs: everything a ``Distiller`` step and its loss terms may read."""
    images: torch.Tensor  # normalised float images on the loader's device
    labels: torch.Tensor
    indices: Optional[torch.Tensor] = None  # positions in the split (CRD's memory bank, the teacher cache)
    views: Optional[torch.Tensor] = None  # each image's augmentation view id (see views.draw_views); 0 without
    strong: Optional[torch.Tensor] = None  # a strongly augmented view, for terms that need one (MLKD)
    loss_scale: float = 1.0  # world * local / global batch size: makes DDP's gradient mean the global batch mean
    soft_targets: Optional[torch.Tensor] = None  # (N, C) label distributions of a mixed batch (data.mixing)


@dataclass(frozen=True)
class Placement:
    """Where a run's batches go: the training device, and this process's rank of ``world_size`` under
    torch.distributed (each rank keeps its own part of every global batch)."""
    device: torch.device = torch.device('cpu')
    rank: int = 0
    world_size: int = 1


class Loader(Protocol):
    """What the trainer needs of a loader (the in-memory ``BatchLoader`` and the streamed ``StreamingLoader``):
    batches of one epoch in an order drawn from ``generator`` (its state at the epoch's start is checkpointed, so a
    resume continues the same stream, also from inside an epoch), their count, the split's labels and classes, and
    how many distinct views an image has (0: not a finite set)."""
    split: ImageSplit  # for streamed data only ``labels``, ``classes`` and ``len`` are available
    generator: torch.Generator
    num_views: int
    mean: torch.Tensor
    std: torch.Tensor

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch the next ``__iter__`` serves (a replayed stream follows its recording's epochs), from its batch
        ``start`` (a resume inside the epoch: the generator then holds its state at the epoch's start)."""

    def host_work(self) -> ContextManager:
        """The context of the training process's own batch-wide work outside the step (erasing, mixing): one torch
        thread where DataLoader workers hold the CPU's cores, else nothing."""


@runtime_checkable
class RecordableLoader(Loader, Protocol):
    """A loader whose epochs a teacher recording follows (the streamed ``StreamingLoader``): its ImageFolder
    (``folder.root``, ``folder.samples``: what the recording's key hashes), the order and augmentation seed of the
    epoch it serves (``epoch_order``, ``epoch_seed``: what a recording stores), and ``replay``: a recording whose
    epochs' orders and seeds it follows instead of drawing its own (None: it draws them)."""
    folder: Any
    epoch_order: torch.Tensor
    epoch_seed: int
    replay: Optional[Any]


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


class BatchLoader:
    """Yields ``Batch`` es from an in-memory split held as uint8 on ``device`` (the training device, so crops,
    flips and normalisation run batched there, with no DataLoader workers; see ``Placement``).

    Training loaders shuffle and augment with ``generator`` (a CPU generator: one permutation per epoch, then the
    augmentation draws of each batch in order), so a run's data equal on every device and after a resume;
    evaluation loaders keep the order and do not augment. With ``strong_view`` a training batch also carries a
    RandAugment view of the same images (for terms that need one, such as MLKD). Under ``torch.distributed``
    every rank draws the global batch and keeps its own contiguous part of it, so
    the global batch, its augmentation and its order equal those of a single process.
    """

    def __init__(self, split: ImageSplit, batch_size: int, mean: torch.Tensor, std: torch.Tensor,
                 train: bool, augment: str = 'none', padding: int = 0,
                 generator: Optional[torch.Generator] = None, strong_view: bool = False,
                 placement: Placement = Placement()):
        device = torch.device(placement.device)
        self.split = ImageSplit(split.images.to(device), split.labels.to(device), split.classes)
        self.batch_size, self.train, self.strong_view = batch_size, train, strong_view and train
        self.mean, self.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
        self.augment, self.padding, self.flip = augment, padding, augment == 'crop_flip'
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.world_size = placement.rank, placement.world_size
        self.num_views = view_count(augment, padding) if train else 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """In memory, epochs follow the generator alone; the batches before ``start`` are drawn, not made."""
        self.start = start

    def host_work(self) -> ContextManager:
        return contextlib.nullcontext()  # no workers compete for the cores

    def __len__(self) -> int:
        return len(plan_batches(torch.arange(len(self.split)), self.batch_size, self.train, self.rank,
                                self.world_size))

    def __iter__(self) -> Iterator[Batch]:
        n, device = len(self.split), self.split.images.device
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        augmenting, start, self.start = self.train and self.augment != 'none', self.start, 0
        for position, (indices, local, loss_scale) in enumerate(plan_batches(order, self.batch_size, self.train,
                                                                             self.rank, self.world_size)):
            views = draw_views(len(indices), self.padding, self.flip, self.generator) \
                if augmenting else torch.zeros(len(indices), dtype=torch.int64)
            strong = None
            if self.strong_view:  # drawn for the global batch so every rank's draws stay aligned
                raw = self.split.images[indices.to(device)].cpu()
                weak = apply_views(raw, draw_views(len(raw), self.padding, self.flip, self.generator),
                                   self.padding, self.flip) if augmenting else raw
                strong = rand_augment(weak, self.generator)
            if position < start:  # a resumed epoch: drawn above as before, so later batches draw the same
                continue
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
