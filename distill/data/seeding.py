"""Seeds of every random draw the data makes (an image's augmentation, a batch's mixing and erasing): pure functions
of (the epoch's seed, a position), so an epoch regenerates image by image and batch by batch, whatever worker or
process makes it; a resumed, replayed or recorded run draws the same."""
import contextlib
import random
from typing import Optional

import numpy as np
import torch


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: a pure function of both (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None, restore: bool = True):
    """Every global RNG an augmentation may draw from (torch, numpy, Python; and ``device``'s CUDA generator) seeded
    with ``seed``; with ``restore`` the caller's states are put back afterwards (a loader without workers decodes in
    the training process). A DataLoader worker passes ``restore=False``: each of its items seeds every generator
    again and nothing else there draws, so the copies (NumPy's state alone costs about half a millisecond per
    image) would buy nothing. Seeds torch's generators themselves: ``torch.manual_seed`` also queues the seeding of
    every lazily started accelerator, which costs a quarter of a millisecond per image."""
    cuda = [device] if device is not None and device.type == 'cuda' else []
    if not restore:
        _seed_all(seed, cuda)
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda, device_type='cuda'):
        _seed_all(seed, cuda)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _seed_all(seed: int, cuda: list) -> None:
    torch.default_generator.manual_seed(seed)
    for device in cuda:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
