"""Loss terms: each a plain function plus a thin registered module (``create_loss(name, **options)``).

Every module of this package but ``base`` (the term class and registry) and ``step`` (what a term sees) is one
method and is imported here, which registers it: adding a method is adding its file. Each module's loss functions
(``*_loss``) and term classes (``*Loss``) are importable from here.
"""
import importlib
import pkgutil

from .base import LossTerm, create_loss, declared_needs, list_losses, register_loss
from .step import Need, SetupContext, StepOutputs

__all__ = ['LossTerm', 'Need', 'SetupContext', 'StepOutputs', 'create_loss', 'declared_needs', 'list_losses',
           'register_loss']

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ('base', 'step'):
        _module = importlib.import_module(f'{__name__}.{_info.name}')
        for _name, _value in vars(_module).items():
            if (_name.endswith('_loss') or _name.endswith('Loss')) and not _name.startswith('_') \
                    and getattr(_value, '__module__', None) == _module.__name__:
                globals()[_name] = _value
                __all__.append(_name)
