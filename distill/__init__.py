"""distill: knowledge distillation on timm models."""
from . import models  # noqa: F401  (registers the cifar_* models in timm)
