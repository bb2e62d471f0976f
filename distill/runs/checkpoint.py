"""Checkpoint files and the random-number state that makes a resumed run equal an uninterrupted one."""
import os
import pickle
import random
import warnings
from typing import Any, Dict

import numpy as np
import torch

from ..errors import DistillError, first_line


class NotACheckpoint(DistillError):
    """A readable file that is not a distill checkpoint (plain weights, say)."""


def torch_load(path: str, what: str) -> Any:
    """``torch.load(weights_only=True)``: a damaged file, or one that holds pickled code, is a one-line error."""
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol warning would precede the one-line error
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a pickled object: never suggest loading it anyway
        raise DistillError(f"{what} {path} was refused: it is not a plain weights file (it holds pickled Python "
                           f"objects, which loading would run); re-save its tensors (a state_dict) or use a "
                           f".safetensors file") from None
    except Exception as exc:  # any other decoding failure: damaged or not a torch file
        reason = first_line(exc, 200)
        raise DistillError(f"{what} {path} is corrupt or truncated ({reason}); use another copy (a run's "
                           f"best.pt / last.pt, a fresh download) or start the run again") from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a distill checkpoint; a missing, damaged or foreign file is a user error."""
    if not os.path.isfile(path):
        raise DistillError(f"checkpoint not found: {path} (check the path or the run directory)")
    checkpoint = torch_load(path, 'checkpoint')
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise NotACheckpoint(f"{path} is not a distill checkpoint (no 'model' entry)")
    return checkpoint


def rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': random.getstate(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32), numpy_state['pos'],
                         numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deployed_weights(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The student a checkpoint deploys: its EMA where the run kept one (the model it evaluated), else its weights."""
    return checkpoint.get('model_ema') or checkpoint['model']
