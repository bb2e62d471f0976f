"""Building a Distiller for one method on a model pair, shared by the engine tests and the method tests that run a
method through the engine."""
import timm
import torch

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Distiller
from distill.losses import list_losses

# every method on CNN and CNN <-> ViT pairs; deit needs a distilled DeiT student (tests/methods/test_deit.py runs it
# through the engine)
METHODS = {name: {'weight': 1.0} for name, term in list_losses().items()
           if name not in ('ce', 'kd') and not name.startswith('test_') and term.student_head == 'logits'}
METHODS['crd'] = {'weight': 1.0, 'negatives': 64}
TRAIN_TARGETS = torch.arange(40) % 10  # the engine's tests index a 40-sample "training set"


def _pair(teacher_name, student_name, num_classes=10, **kwargs):
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, num_classes=num_classes, **kwargs.get('teacher', {}))
    student = timm.create_model(student_name, num_classes=num_classes, **kwargs.get('student', {}))
    return teacher, student


def _build(method, teacher, student, image_size):
    return Distiller(teacher, student, {'ce': 1.0, method: METHODS[method]}, input_size=(3, image_size, image_size),
                     train_targets=TRAIN_TARGETS)
