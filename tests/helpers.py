"""Shared by the tests: small real-data configs (scikit-learn digits, 8x8, no download) and the inputs and check of
the loss reference tests."""
import copy
import os
from typing import Any, Callable, Dict, Sequence

import pytest
import torch

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-jpeg')


def quick_sample(cases: Sequence[tuple], *keys: Callable[[tuple], Any]) -> list:
    """The cases of an exhaustive test matrix with only a sample in the quick loop (``pytest -m 'not slow'``): a case
    stays quick where it is the first with some value of one of ``keys`` (e.g. the first pair of each method and the
    first method of each pair); the others are marked slow, and CI runs them all."""
    seen, params = set(), []
    for case in cases:
        values = {(index, key(case)) for index, key in enumerate(keys)}
        params.append(pytest.param(*case, marks=() if values - seen else pytest.mark.slow))
        seen |= values
    return params


def digits_config(output_dir, run_name='run', epochs=3, **sections: Dict[str, Any]) -> Dict[str, Any]:
    """A fast digits run: cifar_resnet8 on 8x8 digits, SGD + cosine, a few epochs."""
    cfg = {
        'student': {'name': 'cifar_resnet8'},
        'data': {'name': 'digits', 'image_size': 8, 'augment': 'crop', 'crop_padding': 1, 'batch_size': 64},
        'losses': {'ce': 1.0},
        'optimizer': {'name': 'momentum', 'lr': 0.05, 'weight_decay': 5e-4},
        'scheduler': {'name': 'cosine'},
        'trainer': {'epochs': epochs, 'seed': 0, 'output_dir': str(output_dir), 'run_name': run_name,
                    'device': 'cpu', 'progress': False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict) and section != 'losses':
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = copy.deepcopy(values)
    return cfg


def strip_times(records):
    return [{k: v for k, v in r.items() if k != 'epoch_time'} for r in records]


def assert_matches_reference(ours, reference, student_inputs, teacher_inputs, *extra, rtol=1e-5, grad_rtol=1e-4):
    """``ours`` equals ``reference`` (a transcription of the official code) in value and in the gradient with
    respect to every student input: float32 scalars, positive, with non-zero reference gradients.

    ``student_inputs`` is a tensor or a list of tensors (each gets ``requires_grad``); ``teacher_inputs`` and
    ``extra`` are passed as they are: ``fn(student, teacher, *extra)``."""
    import torch
    listed = isinstance(student_inputs, (list, tuple))
    values, grads = [], []
    for fn in (ours, reference):
        inputs = [x.clone().requires_grad_() for x in (student_inputs if listed else [student_inputs])]
        value = fn(inputs if listed else inputs[0], teacher_inputs, *extra)
        values.append(value)
        grads.append(torch.autograd.grad(value, inputs))
    assert values[0].ndim == 0 and values[0].dtype == torch.float32
    assert values[0].item() > 0
    torch.testing.assert_close(values[0], values[1].reshape(()), rtol=rtol, atol=1e-7)
    for ours_grad, reference_grad in zip(*grads):
        assert reference_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, reference_grad, rtol=grad_rtol, atol=1e-8)
    return values[0]


def random_maps(gen, *shapes):
    """One standard-normal tensor per shape, drawn in order from ``gen`` (inputs of the loss reference tests)."""
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def random_logits(gen):
    """A (student, teacher) pair of 8 x 10 logits with std 3, drawn in order from ``gen``; ``TARGETS`` are their
    labels."""
    return [3 * torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)]


TARGETS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])  # the labels of random_logits' 8 rows


def image_folder(root, per_class=12, size=40):
    """A small ImageFolder tree (train/ and val/, 3 classes) of real digits images, upscaled to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    for split, offset in (('train', 0), ('val', 100)):
        for label in range(3):
            os.makedirs(root / split / str(label), exist_ok=True)
            members = [i for i, t in enumerate(digits.target) if t == label][offset:offset + per_class]
            for i in members:
                gray = (digits.images[i] * 255 / 16).astype('uint8')
                Image.fromarray(gray).convert('RGB').resize((size, size)).save(root / split / str(label) / f'{i}.png')
    return str(root)
