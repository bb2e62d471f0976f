"""Training views of uint8 image batches: the CRD augmentation (random crop with zero padding, horizontal flip)
drawn per sample as a view id, applied batched on the images' device, and the normalisation to model inputs.

A view id names one of an image's (2p+1)^2 * 2 crop-and-flip variants, so the teacher cache can store the
teacher's answer per (image, view)."""
import torch
import torch.nn.functional as F


def view_count(augment: str, padding: int) -> int:
    """How many distinct training views an image has: (2p+1)^2 crop offsets, times 2 with flipping."""
    if augment == 'none':
        return 1
    return (2 * padding + 1) ** 2 * (2 if augment == 'crop_flip' else 1)


def draw_views(n: int, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each sample's view id ``(top * (2p+1) + left) * 2 + flipped`` (without flipping: ``top * (2p+1) + left``),
    drawn as torchvision's RandomCrop(padding=p)
    and RandomHorizontalFlip would: top and left offsets uniform in [0, 2p], a flip with probability 1/2."""
    top = left = torch.zeros(n, dtype=torch.int64)
    if padding > 0:
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flipped = (torch.rand(n, generator=generator) < 0.5).long() if flip else torch.zeros(n, dtype=torch.int64)
    return (top * (2 * padding + 1) + left) * (2 if flip else 1) + flipped


def apply_views(images: torch.Tensor, views: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Crop (zero padding ``padding``) and flip each image of a batch as its view id says, on the images' device."""
    n, channels, h, w = images.shape
    views = views.to(images.device)
    flipped, offset = (views % 2, views // 2) if flip else (torch.zeros_like(views), views)
    if padding > 0:
        top, left = offset // (2 * padding + 1), offset % (2 * padding + 1)
        padded = F.pad(images, (padding, padding, padding, padding))
        arange = lambda k: torch.arange(k, device=images.device)  # noqa: E731
        rows = (top[:, None] + arange(h))[:, None, :, None]  # (n, 1, h, 1)
        cols = (left[:, None] + arange(w))[:, None, None, :]  # (n, 1, 1, w)
        images = padded[arange(n)[:, None, None, None], arange(channels)[None, :, None, None], rows, cols]
    return torch.where(flipped.bool()[:, None, None, None], images.flip(-1), images)


def augment_batch(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding, as torchvision's RandomCrop(padding=p)) and horizontal flip."""
    return apply_views(images, draw_views(len(images), padding, flip, generator), padding, flip)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's input: scaled to [0, 1], then standardised per channel (in place on a float
    copy: the same numbers as out of place, in a tenth of the time on a CPU)."""
    return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)
