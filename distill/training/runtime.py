"""Where and how training steps run: the device (a rank's own GPU under torchrun), autocast precision,
channels_last, DDP around the trainable parts, and ``torch.compile`` with an eager fallback."""
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..config import TrainerConfig
from ..data import Batch
from ..errors import DistillError
from .distributed import DistributedContext, init_distributed


def resolve_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """The training device; under torchrun (``local_rank`` given) a CUDA run uses the rank's own GPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistillError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DistillError(f"trainer.device={name} but no CUDA GPU is visible; use trainer.device=cpu")
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)  # mps, xpu, ...
    if device.type not in ('cuda', 'cpu') and not (hasattr(backend, 'is_available') and backend.is_available()):
        raise DistillError(f"trainer.device={name} is not available on this machine; use trainer.device=auto or cpu")
    if device.type == 'cuda' and local_rank is not None:
        device = torch.device('cuda', local_rank)
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == 'fp16' and device.type != 'cuda':
        raise DistillError("trainer.precision=fp16 needs a CUDA device (CPU has no fast fp16 path); use "
                           "trainer.precision=bf16 or fp32 on CPU")
    return {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]


def in_memory_format(images: Optional[torch.Tensor], memory_format: Optional[torch.memory_format]):
    """``images`` laid out as the models are (channels_last on CUDA), or as they are."""
    if images is None or memory_format is None:
        return images
    return images.contiguous(memory_format=memory_format)


class Runtime:
    """The device, precision and process layout of a run, from ``trainer`` settings."""

    def __init__(self, cfg: TrainerConfig):
        self.dist: DistributedContext = init_distributed(resolve_device(cfg.device).type)
        self.device = resolve_device(cfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == 'cuda'
        self.memory_format = torch.channels_last if channels_last else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def place(self, module: nn.Module) -> nn.Module:
        module.to(self.device)
        return module.to(memory_format=self.memory_format) if self.memory_format is not None else module

    def batch(self, batch: Batch) -> Batch:
        """``batch`` with its images in the models' memory format."""
        if self.memory_format is None:
            return batch
        return batch._replace(images=in_memory_format(batch.images, self.memory_format),
                              strong=in_memory_format(batch.strong, self.memory_format))

    def wrap(self, distiller: nn.Module, trainable: nn.Module, single_process_only: list) -> nn.Module:
        """What a training step calls: ``distiller``, or under torch.distributed DDP around ``trainable`` (the
        student and the loss terms' modules; never the frozen teacher)."""
        if not self.dist.enabled:
            return distiller
        if single_process_only:
            raise DistillError(f"loss terms {single_process_only} keep per-sample state that torch.distributed "
                               f"ranks would not share; train them in one process (without torchrun)")
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(trainable, device_ids=[self.device.index] if self.device.type == 'cuda'
                                       else None)


class CompiledForward:
    """Calls ``module`` (``__call__``) or any function of the compiled models (``run``: evaluation) with ``models``
    compiled in place (``nn.Module.compile``: state_dict keys unchanged). A call that fails compiled and succeeds
    under ``torch.compiler.set_stance('force_eager')`` was the compiler's failure (at the first step or at a later
    recompilation): it is logged and the process goes on eagerly, so a run is never lost to the compiler; an error
    that eager execution repeats is raised. (Compiling the whole step instead lost the graph's gradient in a
    student-only step on torch 2.14, so the models are compiled, as before.) In a ``mode`` with CUDA graphs each call
    starts a new graph step, so a step never reads outputs that the previous one's graph replay overwrote."""

    def __init__(self, module: nn.Module, models: Sequence[nn.Module], enabled: bool, log: Callable[[str], None],
                 mode: str = 'default'):
        self.module, self.log, self.active = module, log, enabled
        self.cuda_graphs = enabled and mode in ('reduce-overhead', 'max-autotune')
        if enabled:
            for model in models:
                if model is not None:
                    model.compile(mode=mode)

    def __call__(self, *args: Any) -> Any:
        return self.run(self.module, *args)

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        if not self.active:
            with torch.compiler.set_stance('force_eager'):  # a no-op when nothing was compiled
                return function(*args)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return function(*args)
        except DistillError:
            raise
        except Exception as exc:  # noqa: BLE001 (retried eagerly below; raised again unless it was the compiler)
            with torch.compiler.set_stance('force_eager'):
                out = function(*args)
            self.active = False
            cause = getattr(exc, 'inner_exception', None)  # BackendCompilerFailed wraps the backend's error
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            self.log(f"torch.compile failed ({type(exc).__name__}: {reason.splitlines()[0][:160]}); training eagerly")
            return out
