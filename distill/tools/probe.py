"""Feature extraction and linear probing on stored features (``distill extract`` / ``distill probe``).

``extract_features`` runs a frozen backbone once over the (unaugmented) training and validation images and keeps
the pooled pre-logits features, and optionally one intermediate tap pooled over space (or tokens). ``train_probe``
fits a multinomial logistic regression (L2-regularised, full-batch L-BFGS on standardised features) on them in
seconds: a linear probe without re-running the backbone every epoch.
"""
import os
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DataConfig
from ..data import BatchLoader, load_split, normalization
from ..errors import DistillError
from ..files import atomic_write
from ..models.features import PRE_LOGITS, FeatureExtractor


def _pool(feature: torch.Tensor) -> torch.Tensor:
    if feature.dim() == 4:  # NCHW map
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:  # tokens
        return feature.mean(dim=1)
    return feature.flatten(1)


def feature_loaders(cfg: DataConfig, model_stats=None) -> Tuple[BatchLoader, BatchLoader]:
    """Training and validation splits in order, without augmentation, normalised as for training (``model_stats``:
    the mean/std a pretrained model expects)."""
    train, val = load_split(cfg, train=True), load_split(cfg, train=False)
    mean, std = normalization(cfg, train, model_stats)
    return (BatchLoader(train, cfg.eval_batch_size, mean, std, False),
            BatchLoader(val, cfg.eval_batch_size, mean, std, False))


@torch.no_grad()
def extract_features(model: nn.Module, loader: BatchLoader, device: torch.device,
                     layer=None) -> Dict[str, torch.Tensor]:
    """``{'features', 'labels'[, 'layer']}`` of every image of ``loader``, with ``model`` frozen in eval mode."""
    model.eval().to(device)
    extractor = FeatureExtractor(model, [PRE_LOGITS] + ([layer] if layer is not None else []))
    pooled, tapped, labels = [], [], []
    for batch in loader:
        targets = batch.labels
        _, features = extractor(batch.images.to(device))
        pooled.append(features[0].float().flatten(1).cpu())
        if layer is not None:
            tapped.append(_pool(features[1]).float().cpu())
        labels.append(targets)
    out = {'features': torch.cat(pooled), 'labels': torch.cat(labels)}
    if layer is not None:
        out['layer'] = torch.cat(tapped)
    return out


def save_features(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Atomically write ``tensors`` to ``.safetensors`` (with string metadata) or ``.npz``."""
    if path.endswith('.npz'):
        import numpy as np
        arrays = {**{k: v.numpy() for k, v in tensors.items()}, **{f'meta_{k}': v for k, v in metadata.items()}}
        write = lambda f: np.savez(f, **arrays)  # noqa: E731
    elif path.endswith('.safetensors'):
        from safetensors.torch import save
        payload = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        write = lambda f: f.write(payload)  # noqa: E731
    else:
        raise DistillError(f"--out {path}: use a .safetensors or .npz file name")
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise DistillError(f"cannot write {path} ({exc.strerror}); choose another --out") from None


def load_features(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise DistillError(f"features file not found: {path}; write one with `distill extract ... --out {path}`")
    try:
        if path.endswith('.npz'):
            import numpy as np
            with np.load(path) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files if not k.startswith('meta_')}
        from safetensors.torch import load_file
        return load_file(path)
    except Exception as exc:
        raise DistillError(f"cannot read features file {path} ({str(exc)[:120]}); extract it again") from None


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                weight_decay: float = 1e-4, max_iter: int = 200) -> Dict[str, float]:
    """Multinomial logistic regression on standardised features; returns train/val top-1 (%) and seconds."""
    started = time.perf_counter()
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    generator = torch.Generator().manual_seed(0)
    classifier = nn.Linear(train_x.shape[1], num_classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=generator)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_y) + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_top1 = (classifier(train_x).argmax(1) == train_y).float().mean().item() * 100
        val_top1 = (classifier(val_x).argmax(1) == val_y).float().mean().item() * 100
    return {'train_top1': train_top1, 'val_top1': val_top1, 'seconds': time.perf_counter() - started}


def probe_file(path: str, use_layer: bool = False, weight_decay: float = 1e-4,
               max_iter: int = 200) -> Dict[str, float]:
    tensors = load_features(path)
    key = 'layer' if use_layer else 'features'
    needed = [f'train_{key}', 'train_labels', f'val_{key}', 'val_labels']
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise DistillError(f"{path} lacks {missing}; extract with `distill extract`"
                           f"{' --layer N' if use_layer else ''}")
    return train_probe(tensors[f'train_{key}'], tensors['train_labels'].long(), tensors[f'val_{key}'],
                       tensors['val_labels'].long(), weight_decay, max_iter)
