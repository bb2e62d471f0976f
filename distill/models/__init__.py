"""CIFAR architectures of the KD literature and the MLPs of Hinton et al. (2015), registered in timm's model
registry under ``cifar_*`` and ``mnist_mlp*``.

Importing :mod:`distill` registers them, after which ``timm.create_model("cifar_resnet8x4", num_classes=100)``
works like any timm model.
"""
from . import (cifar_mobilenetv2, cifar_resnet, cifar_resnet50, cifar_shufflenet, cifar_vgg,  # noqa: F401
               cifar_wrn, mnist_mlp)  # (registration side effect)
from .weights import load_backbone_weights, load_state_dict_file, load_weights

__all__ = ['load_backbone_weights', 'load_state_dict_file', 'load_weights']
