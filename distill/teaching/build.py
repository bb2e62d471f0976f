"""The run's teacher: live, its logits cached per (image, view), or recorded and replayed, whichever the recipe's
``teacher_cache`` asks for and is exact for its loss terms; with the input adapter its pretrained weights need."""
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..data import cache_dir
from ..errors import DistillError
from ..files import check_folder_writable
from .cache import open_teacher_cache
from .inputs import teacher_input
from .recorded import recorded_teacher
from .teachers import CachedTeacher, LiveTeacher


def cache_root(cfg, default: str, writes: bool = True) -> str:
    """``teacher_cache.dir``, or ``default`` under distill's cache folder; where the run ``writes`` there, refused
    in one line when it cannot, before the run writes anything (a recording is written at the first epoch's end)."""
    root = os.path.expanduser(cfg.teacher_cache.dir or os.path.join(cache_dir(), default))
    if writes:
        check_folder_writable(root, 'teacher cache folder', "set teacher_cache.dir to a writable folder")
    return root


def cache_blocker(losses: Dict[str, Any], num_views: Optional[int], augment: str) -> Optional[str]:
    """Why teacher logits looked up by (image, view) would not give the configured loss terms what a live
    teacher gives (checked from the terms' declarations, before any table is created), or None when exact.
    ``num_views`` None: a recording (``record``), which does not enumerate views."""
    from ..losses import Need, list_losses
    registered = list_losses()
    terms = {name: registered[name] for name in losses if name in registered}
    if not any(term.requires_teacher for term in terms.values()):
        return "no loss term uses the teacher"
    feature_terms = [name for name, term in terms.items() if Need.TEACHER_FEATURES in term.needs]
    if feature_terms:
        return f"loss terms {feature_terms} read teacher features, and the cache holds logits only"
    if any(Need.STRONG_VIEW in term.needs for term in terms.values()):
        return "a RandAugment view (MLKD) has no finite set of views to cache"
    if num_views == 0:
        return f"data.augment={augment} on streamed images has no finite set of views (teacher_cache.mode record " \
               f"and replay serve streamed data)"
    return None


def build_teacher(model: nn.Module, cfg, loader, num_classes: int, device: torch.device, channels_last: bool,
                  notes: List[str]) -> LiveTeacher:
    """The run's teacher (``cfg``: the run's ``Config``): live, or its logits table when ``teacher_cache.enabled``
    (refused where not exact); with the input adapter its pretrained weights need (said in ``notes``)."""
    adapter = teacher_input(model, cfg.teacher.pretrained, loader.mean, loader.std, cfg.data.image_size,
                            cfg.data.mean is not None)
    if adapter is not None:
        seen = adapter.describe()
        normalised = f"mean {seen['mean']} std {seen['std']}" if seen['mean'] else "the student's normalisation"
        resized = f", resized to {seen['size']} px ({seen['interpolation']})" if seen['size'] else ''
        notes.append(f"teacher input: {normalised}{resized} (its pretrained_cfg)")
    if not cfg.teacher_cache.enabled:
        return LiveTeacher(model, adapter)
    recorded = cfg.teacher_cache.mode != 'views'
    blocker = cache_blocker(cfg.losses, None if recorded else loader.num_views, cfg.data.augment)
    if not recorded and (cfg.data.mixup or cfg.data.cutmix or cfg.data.reprob):
        blocker = "erased or mixed images are not among the crop-and-flip views (record and replay serve them)"
    if recorded and loader.num_views:
        blocker = "record and replay follow a streamed run; the in-memory pipeline's views table is exact (mode views)"
    if blocker:
        raise DistillError(f"teacher_cache (mode {cfg.teacher_cache.mode}) cannot be exact here: {blocker}; set "
                           f"teacher_cache.enabled=false")
    if recorded:
        root = cache_root(cfg, 'teacher_records', writes=cfg.teacher_cache.mode == 'record')
        return recorded_teacher(model, adapter, cfg, loader, num_classes, cfg.trainer.precision, root)
    settings = {'teacher': cfg.teacher.name, 'augment': cfg.data.augment, 'precision': cfg.trainer.precision,
                'channels_last': channels_last}
    if adapter is not None:  # only then: the tables of teachers that see the student's input keep their key
        settings['teacher_input'] = adapter.describe()
    cache = open_teacher_cache(model if adapter is None else nn.Sequential(adapter, model), loader, num_classes,
                               settings, {'data': cfg.data.name, 'root': cfg.data.root,
                                          'teacher_checkpoint': cfg.teacher.checkpoint},
                               cache_root(cfg, 'teacher_logits'), cfg.teacher_cache.dtype, device)
    notes.append(f"teacher cache {cache.folder}: {len(loader.split)} images x {loader.num_views} views, "
                 f"{100 * cache.fill_ratio:.1f}% filled")
    return CachedTeacher(model, cache, adapter)
