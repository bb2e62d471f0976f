"""Training-data throughput: distill's in-memory uint8 pipeline (batched crop + flip + normalise on the training
device, no workers) vs a torchvision DataLoader (PIL image per sample, RandomCrop(pad 4) + flip + ToTensor +
Normalize in worker processes), on the same images, measured side by side.

    python benchmarks/data_pipeline.py [--data ../shared/data/cifar10-jpeg --per-class 1000 --workers 2]

Without the shared CIFAR-10 images it uses 10,000 random 32x32 images. Prints images/s of each and the ratio.
"""
import argparse
import os
import time

import torch
from torch.utils.data import DataLoader

from common import PILImages
from distill.config import DataConfig
from distill.data import BatchLoader, ImageSplit, Placement, channel_stats, load_split

HERE = os.path.dirname(os.path.abspath(__file__))


def images_per_second(batches, device: torch.device, epochs: int) -> float:
    count, started = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up (worker start, first allocation)
        if epoch == 1:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            started = time.perf_counter()
        for images, *_ in batches():
            images = images.to(device, non_blocking=True)
            count += len(images) if epoch > 0 else 0
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'cifar10-jpeg'))
    parser.add_argument('--per-class', type=int, default=1000)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    device = torch.device(args.device)
    if os.path.isdir(args.data):
        split = load_split(DataConfig(name='imagefolder', root=args.data, train_per_class=args.per_class), True)
        source = f"{args.data} ({len(split)} images)"
    else:
        generator = torch.Generator().manual_seed(0)
        split = ImageSplit(torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8, generator=generator),
                           torch.randint(0, 10, (10000,), generator=generator), [str(i) for i in range(10)])
        source = "10,000 random 32x32 images (shared data not found)"
    mean, std = channel_stats(split.images)

    from torchvision import transforms
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())])
    torchvision_loader = DataLoader(PILImages(split.images, split.labels, transform), batch_size=args.batch,
                                    shuffle=True, num_workers=args.workers, pin_memory=device.type == 'cuda',
                                    persistent_workers=args.workers > 0)
    ours = BatchLoader(split, args.batch, mean, std, True, 'crop_flip', 4, placement=Placement(device))
    rates = {
        'torchvision DataLoader': images_per_second(lambda: torchvision_loader, device, args.epochs),
        'distill in-memory': images_per_second(lambda: ours, device, args.epochs),
    }
    print(f"{source}, batch {args.batch}, crop (pad 4) + flip + normalise, device {device}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; torchvision with {args.workers} workers")
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:10.0f} img/s")
    print(f"  distill / torchvision: {rates['distill in-memory'] / rates['torchvision DataLoader']:.1f}x")


if __name__ == '__main__':
    main()
