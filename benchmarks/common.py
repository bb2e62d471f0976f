"""Shared pieces of the benchmark scripts: the teacher/student pair arguments, the step timer and where the shared
CIFAR-10 images are."""
import argparse
import os
import time

import torch

SHARED_CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                              'cifar10-jpeg')


def time_steps(step, steps: int, warmup: int = 3) -> float:
    """Mean seconds per call of ``step`` after ``warmup`` untimed calls (CUDA synchronised)."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def pair_parser(description: str, steps: int, teacher: str = 'cifar_resnet32x4', student: str = 'cifar_resnet8x4',
                batch: int = 64, image_size: int = 32) -> argparse.ArgumentParser:
    """The pair, batch, image size, timed steps and device shared by every step benchmark (defaults given)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher', default=teacher)
    parser.add_argument('--student', default=student)
    parser.add_argument('--batch', type=int, default=batch)
    parser.add_argument('--image-size', type=int, default=image_size)
    parser.add_argument('--steps', type=int, default=steps)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser


def pair_arguments(description: str, steps: int) -> argparse.Namespace:
    """Parse ``pair_parser``'s arguments at their CIFAR defaults."""
    return pair_parser(description, steps).parse_args()


class PILImages(torch.utils.data.Dataset):
    """The baseline pipeline: what torchvision's CIFAR datasets do, a PIL image per item, then ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]
