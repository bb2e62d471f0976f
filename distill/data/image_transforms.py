"""Per-image transforms of the streamed path (``data.in_memory: false``), run in the DataLoader workers: the decoded
PIL image to a (3, size, size) uint8 tensor. ImageNet's RandomResizedCrop + flip and the evaluation resize + centre
crop run torchvision v2's kernels on the image as a tensor; with timm's AutoAugment / RandAugment / AugMix the crop
and flip run on the PIL image, as timm's operations do. Each makes the draws and pixels of the torchvision v2
``Compose`` it stands for (tests compare them bit for bit) without v2's per-call dispatch, which costs more than
cropping a 32-px image: 0.47 instead of 0.87 ms per image for the crop and flip to 32 px."""
import math
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision import transforms as V1
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from ..errors import DistillError


def image_transform(train: bool, augment: str, image_size: int, padding: int, crop_pct: float,
                    auto_augment: Optional[str] = None, mean: Sequence[float] = (0.5, 0.5, 0.5)):
    """The transform of a streamed split's images (``augment``: random_resized_crop | crop | crop_flip | none)."""
    if not train:
        return ResizeCenterCrop(int(round(image_size / crop_pct)), image_size)
    if augment == 'random_resized_crop' and not auto_augment:
        return ResizedCropFlip(image_size)
    if augment == 'random_resized_crop':  # timm's operations work on PIL images: the crop and flip too, as in timm
        steps = [RandomResizedCrop(image_size), V1.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
        if augment in ('crop', 'crop_flip'):
            steps.append(T.RandomCrop(image_size, padding=padding))
        if augment == 'crop_flip':
            steps.append(T.RandomHorizontalFlip())
    if auto_augment:
        return T.Compose(steps + [auto_augment_transform(auto_augment, image_size, mean), pil_to_uint8])
    return T.Compose([T.ToImage()] + steps + [T.ToDtype(torch.uint8)])


def auto_augment_transform(config: str, image_size: int, mean: Sequence[float]):
    """timm's AutoAugment / RandAugment / AugMix for a timm config string, with the parameters timm's
    ``transforms_imagenet_train`` gives them (translation 45% of the size, the fill colour the mean)."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform as auto, \
        rand_augment_transform
    params = {'translate_const': int(image_size * 0.45), 'img_mean': tuple(min(255, round(255 * x)) for x in mean)}
    try:
        if config.startswith('rand'):
            transform = rand_augment_transform(config, params)
        elif config.startswith('augmix'):
            transform = augment_and_mix_transform(config, {**params, 'translate_pct': 0.3})
        else:
            transform = auto(config, params)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise DistillError(f"data.auto_augment={config!r} is not a timm augmentation string ({type(exc).__name__}: "
                           f"{exc}); use e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original") from None
    for op in getattr(transform, 'ops', None) or [op for ops in transform.policy for op in ops]:
        if op.name.startswith('Posterize'):
            op.aug_fn = posterize
    return transform


def posterize(image, bits: int, **_):
    """timm's posterize, where 0 bits (Posterize at the highest magnitudes, e.g. rand-m9-mstd0.5-inc1's noisy
    magnitude reaching 10) gives the black image it gave before Pillow 11 refused 0 bits."""
    from PIL import Image, ImageOps
    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits >= 1 else Image.new(image.mode, image.size)


class RandomResizedCrop(V1.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` (v1, on PIL images) drawing the same crops from the same generator states
    with a third of its Python overhead (the log ratios computed once, not per image): 80 us less per image."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        super().__init__(size, scale, ratio)
        # torchvision draws between the float32 logs of the ratios
        self.log_ratio = [float(x) for x in torch.log(torch.tensor(self.ratio))]

    def get_params(self, image, scale, ratio):
        """(top, left, height, width) of the crop of a PIL ``image``, drawn as torchvision draws it."""
        width, height = image.size
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect_ratio = torch.empty(1).uniform_(*self.log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        # no draw fitted: torchvision's fallback, the central crop clamped to the ratio range
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


class ResizedCropFlip:
    """v2's ``RandomResizedCrop(size, antialias=True)`` + ``RandomHorizontalFlip()`` on the image as a uint8 tensor:
    the same draws in the same order and the same kernels."""

    def __init__(self, size: int):
        self.crop, self.size = RandomResizedCrop(size), [size, size]

    def __call__(self, image) -> torch.Tensor:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        pixels = F.resized_crop(F.pil_to_tensor(image), top, left, height, width, self.size, antialias=True)
        return F.horizontal_flip(pixels) if torch.rand(1) < 0.5 else pixels


class ResizeCenterCrop:
    """v2's ``Resize(resize, antialias=True)`` (the shorter side) + ``CenterCrop(size)`` on the image as a uint8
    tensor: evaluation's transform."""

    def __init__(self, resize: int, size: int):
        self.resize, self.size = [resize], [size]

    def __call__(self, image) -> torch.Tensor:
        return F.center_crop(F.resize(F.pil_to_tensor(image), self.resize, antialias=True), self.size)


def pil_to_uint8(image) -> torch.Tensor:
    """A PIL RGB image as a contiguous (3, H, W) uint8 tensor: a plain tensor, which the DataLoader collates several
    times faster than torchvision's ``Image`` views; NumPy's transposing copy takes half the time of torch's."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))
