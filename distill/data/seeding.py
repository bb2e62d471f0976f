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
def seeded(seed: int, device: Optional[torch.device] = None):
    """Every global RNG an augmentation may draw from (torch, numpy, Python; and ``device``'s CUDA generator) seeded
    with ``seed``; the caller's states restored afterwards (a loader without workers decodes in the training
    process). Seeds torch's generators themselves: ``torch.manual_seed`` also queues the seeding of every lazily
    started accelerator, which costs a quarter of a millisecond per image."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device] if device is not None and device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda, device_type='cuda'):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
