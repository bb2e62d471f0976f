"""Top-1 / top-5 accuracy and cross-entropy of a model over a loader; its logits over a loader (``predict``)."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..data import Loader
from .distributed import DistributedContext
from .runtime import in_memory_format


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             context: DistributedContext = DistributedContext(),
             memory_format: Optional[torch.memory_format] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (under torch.distributed:
    each rank's part of the split, summed over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, loss sum, count
    for batch in loader:
        images = in_memory_format(batch.images.to(device, non_blocking=True), memory_format)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               nn.functional.cross_entropy(logits, labels, reduction='sum'),
                               torch.tensor(len(labels), device=device)]).double()
    model.train(was_training)
    correct1, correct5, loss_sum, count = context.all_sum(totals).tolist()
    return {'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count, 'loss': loss_sum / count}


@torch.no_grad()
def predict(model: nn.Module, loader: Loader, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) of every image of ``loader``, on the CPU."""
    was_training = model.training
    model.eval()
    outputs = [(model(batch.images.to(device)).float().cpu(), batch.labels.cpu()) for batch in loader]
    model.train(was_training)
    return torch.cat([logits for logits, _ in outputs]), torch.cat([labels for _, labels in outputs])
