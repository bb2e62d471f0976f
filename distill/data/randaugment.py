"""The strong view of multi-view methods (MLKD): FixMatch's RandAugment(2, 10) + Cutout, on uint8 batches.

Per sample: two of 14 operations drawn with replacement, each with a magnitude uniform in its range
(AutoContrast, Brightness/Color/Contrast/Sharpness in [0.05, 0.95], Equalize, Identity, Posterize in [4, 8] bits,
Rotate in [-30, 30] degrees, ShearX/Y in [-0.3, 0.3], Solarize in [0, 256], TranslateX/Y in [-0.3, 0.3] of the
size), then Cutout of a square of side U(0, 0.5) x size filled with (125, 123, 114). As in the MLKD/mdistiller
``RandAugment`` (after FixMatch), but on tensors with torchvision's functional ops, so shears turn about the image
centre rather than its corner. Randomness comes from the loader's generator, so the views are reproducible and
resume exactly.
"""
import math

import torch
import torchvision.transforms.v2.functional as TF

CUTOUT_FILL = torch.tensor([125, 123, 114], dtype=torch.uint8)


def _affine(image, translate=(0.0, 0.0), shear=(0.0, 0.0)):
    return TF.affine(image, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear))


OPERATIONS = [  # (name, operation(image, value), low, high)
    ('autocontrast', lambda img, v: TF.autocontrast(img), 0, 1),
    ('brightness', lambda img, v: TF.adjust_brightness(img, v), 0.05, 0.95),
    ('color', lambda img, v: TF.adjust_saturation(img, v), 0.05, 0.95),
    ('contrast', lambda img, v: TF.adjust_contrast(img, v), 0.05, 0.95),
    ('equalize', lambda img, v: TF.equalize(img), 0, 1),
    ('identity', lambda img, v: img, 0, 1),
    ('posterize', lambda img, v: TF.posterize(img, max(1, int(v))), 4, 8),
    ('rotate', lambda img, v: TF.rotate(img, v), -30, 30),
    ('sharpness', lambda img, v: TF.adjust_sharpness(img, v), 0.05, 0.95),
    ('shear_x', lambda img, v: _affine(img, shear=(math.degrees(math.atan(v)), 0.0)), -0.3, 0.3),
    ('shear_y', lambda img, v: _affine(img, shear=(0.0, math.degrees(math.atan(v)))), -0.3, 0.3),
    # PIL semantics: pixels >= threshold invert, so a threshold above 255 (the range reaches 256) inverts none
    ('solarize', lambda img, v: TF.solarize(img, v) if v <= 255 else img, 0, 256),
    ('translate_x', lambda img, v: _affine(img, translate=(-v * img.shape[-1], 0.0)), -0.3, 0.3),
    ('translate_y', lambda img, v: _affine(img, translate=(0.0, -v * img.shape[-2])), -0.3, 0.3),
]


def rand_augment(images: torch.Tensor, generator: torch.Generator, num_ops: int = 2) -> torch.Tensor:
    """RandAugment + Cutout of each uint8 image of a (N, C, H, W) batch."""
    out = images.clone()
    n, channels, h, w = images.shape
    choices = torch.randint(0, len(OPERATIONS), (n, num_ops), generator=generator)
    levels = torch.rand(n, num_ops, generator=generator)
    cutout = torch.rand(n, 3, generator=generator)  # size fraction, centre x, centre y
    fill = CUTOUT_FILL[:channels].view(-1, 1, 1) if channels == 3 else torch.tensor(124, dtype=torch.uint8)
    for i in range(n):
        image = out[i]
        for op_index, level in zip(choices[i].tolist(), levels[i].tolist()):
            _, operation, low, high = OPERATIONS[op_index]
            image = operation(image, low + (high - low) * level)
        side = cutout[i, 0].item() * 0.5 * w
        x0, y0 = int(max(0.0, cutout[i, 1].item() * w - side / 2)), int(max(0.0, cutout[i, 2].item() * h - side / 2))
        x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
        image = image.clone()
        image[:, y0:y1, x0:x1] = fill
        out[i] = image
    return out
