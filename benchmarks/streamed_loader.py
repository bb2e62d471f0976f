"""Streamed training-data throughput with ImageNet's full augmentation: distill's streamed loader against timm's
``create_loader`` and a plain torchvision DataLoader, on the same images with the same transforms, side by side.

    python benchmarks/streamed_loader.py [--data ../shared/data/cifar10-jpeg --per-class 100 --image-size 224
                                          --batch 32 --workers 2 --rounds 4 --threads 1]

The images are the first ``--per-class`` training JPEGs of each class (a tree of links in a temporary folder),
RandomResizedCrop to ``--image-size`` (224 emulates ImageNet's per-image cost on CIFAR-10's 32x32 files) + flip +
RandAugment rand-m9-mstd0.5-inc1 + random erasing (probability 0.25, per-pixel noise), each loader with ``--workers``
decoding processes:

- distill: ``data.in_memory: false`` (``build_streaming_data``): workers decode to uint8 with every draw seeded
  from (epoch seed, image index); normalisation and erasing (``create_batch_augment``, as the trainer applies it)
  run on the batch in the training process.
- timm: ``ImageDataset`` + ``create_loader(is_training=True, use_prefetcher=True, device=cpu)``: workers make
  uint8, its ``PrefetchLoader`` normalises and erases the batch (timm's train.py path).
- torchvision: ``ImageFolder`` + ``DataLoader`` with ``timm.data.create_transform``'s training transform, so every
  step, normalisation and erasing included, runs per image in the workers.

Both baselines run distill's RandAugment object (``use_distills_rand_augment``): the same operations, which under
Pillow >= 11 they would otherwise not survive.

Every loader first runs one untimed epoch (worker start-up); then ``--rounds`` rounds time one whole epoch of each
loader in turn (whole epochs, so no worker is still prefetching for one loader while another is timed), each round
starting with the next loader. Prints images/s over the timed epochs and the ratios as a markdown table.
"""
import argparse
import itertools
import os
import tempfile
import time

import torch

from common import SHARED_CIFAR10
from distill.data.imagefolder import link_subset

AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
ERASE_PROBABILITY, ERASE_MODE = 0.25, 'pixel'


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=SHARED_CIFAR10, help='ImageFolder root with train/ and test/')
    parser.add_argument('--per-class', type=int, default=100)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--threads', type=int, default=1,
                        help="torch threads of this process, which normalises and erases distill's and timm's batches "
                             "(1: the workers keep the cores, as on a GPU machine where that runs on the device)")
    return parser.parse_args()


def distill_epochs(root: str, args):
    """Epochs of distill's streamed loader with the trainer's batch erasing; each call serves the next epoch."""
    from distill.config import DataConfig
    from distill.data import build_data
    from distill.data.mixing import batch_seed, create_batch_augment
    cfg = DataConfig(name='imagefolder', root=root, in_memory=False, workers=args.workers, batch_size=args.batch,
                     image_size=args.image_size, augment='random_resized_crop', auto_augment=AUTO_AUGMENT,
                     reprob=ERASE_PROBABILITY, remode=ERASE_MODE)
    data = build_data(cfg, seed=0)
    erase = create_batch_augment(cfg, False, data.num_classes, torch.device('cpu'))
    loader, epochs = data.train, itertools.count()

    def epoch():
        number = next(epochs)
        loader.set_epoch(number)
        for step, batch in enumerate(loader):
            yield erase(batch, batch_seed(loader, 0, number, step)).images
    return epoch


def use_distills_rand_augment(transform, image_size: int) -> None:
    """Replace timm's RandAugment in ``transform`` (a Compose) with the one distill's loader builds from the same
    string: Posterize at 0 bits gives a black image (rand-m9-mstd0.5-inc1 reaches 0 bits, which Pillow >= 11
    refuses: timm 1.0.31's own loader stops with a ValueError), and each geometric op resamples bilinear or bicubic
    at random, as timm's train.py (--train-interpolation random) has it, where ``create_transform``'s default is
    bilinear."""
    from timm.data import IMAGENET_DEFAULT_MEAN
    from timm.data.auto_augment import RandAugment
    from distill.data.image_transforms import auto_augment_transform
    transform.transforms = [auto_augment_transform(AUTO_AUGMENT, image_size, IMAGENET_DEFAULT_MEAN)
                            if isinstance(step, RandAugment) else step for step in transform.transforms]


def timm_epochs(split_dir: str, args):
    from timm.data import ImageDataset, create_loader
    loader = create_loader(ImageDataset(split_dir), args.image_size, args.batch, is_training=True,
                           auto_augment=AUTO_AUGMENT, re_prob=ERASE_PROBABILITY, re_mode=ERASE_MODE,
                           num_workers=args.workers, device=torch.device('cpu'), use_prefetcher=True)
    use_distills_rand_augment(loader.dataset.transform, args.image_size)
    return lambda: (images for images, _ in loader)


def torchvision_epochs(split_dir: str, args):
    from timm.data import create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    transform = create_transform(args.image_size, is_training=True, auto_augment=AUTO_AUGMENT,
                                 re_prob=ERASE_PROBABILITY, re_mode=ERASE_MODE)
    use_distills_rand_augment(transform, args.image_size)
    loader = DataLoader(ImageFolder(split_dir, transform=transform), batch_size=args.batch, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0, drop_last=True)
    return lambda: (images for images, _ in loader)


def timed_epoch(epoch) -> tuple:
    """(images, seconds) of one whole epoch."""
    started, count = time.perf_counter(), 0
    for images in epoch():
        count += len(images)
    return count, time.perf_counter() - started


def measure(root: str, args) -> dict:
    """Images/s of each loader over ``args.rounds`` whole epochs, the loaders in turn, after one untimed epoch."""
    split_dir = os.path.join(root, 'train')
    loaders = {'distill streamed': distill_epochs(root, args), 'timm create_loader': timm_epochs(split_dir, args),
               'torchvision DataLoader': torchvision_epochs(split_dir, args)}
    for epoch in loaders.values():
        timed_epoch(epoch)  # worker start-up
    totals = {name: [0, 0.0] for name in loaders}
    names = list(loaders)
    for round_ in range(args.rounds):
        shift = round_ % len(names)  # each round starts with the next loader: none always follows the same one
        for name in names[shift:] + names[:shift]:
            count, seconds = timed_epoch(loaders[name])
            totals[name][0] += count
            totals[name][1] += seconds
    return {name: count / seconds for name, (count, seconds) in totals.items()}


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix='streamed_loader-') as root:
        link_subset(args.data, root, {'train': args.per_class, 'test': 1})
        images = sum(len(files) for _, _, files in os.walk(os.path.join(root, 'train')))
        rates = measure(root, args)
    print(f"{images} images ({os.path.normpath(args.data)}), {args.image_size} px, batch {args.batch}, {args.workers} "
          f"workers, {args.threads} main thread(s), {args.rounds} timed epochs each; RandomResizedCrop + flip + "
          f"RandAugment {AUTO_AUGMENT} + erasing p {ERASE_PROBABILITY} ({ERASE_MODE}); {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}\n")
    print("| loader | img/s | / timm | / torchvision |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['timm create_loader']:.2f}x | "
              f"{rate / rates['torchvision DataLoader']:.2f}x |")


if __name__ == '__main__':
    main()
