"""The teacher side of a distillation step: a frozen model run on every batch (``LiveTeacher``), its logits read
from a table filled once per (training image, augmentation view) (``CachedTeacher``), or, on streamed data, its
top-k logits recorded per (epoch, image) (``RecordingTeacher``) and replayed without running it (``ReplayTeacher``).

Either way the teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
``torch.no_grad()``, so its BatchNorm statistics never change. The ``Distiller`` tells it once which feature taps
its loss terms read (``watch``); each step it returns ``(logits, {tap: feature})`` for a ``Batch``. A teacher that
expects another normalisation or input size than the student (its pretrained weights') sees the batch through its
``adapter`` (``inputs.TeacherInput``).
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import Batch, cache_dir, plan_batches
from .errors import DistillError
from .features import FeatureExtractor, TapLayer
from .files import check_folder_writable
from .inputs import TeacherInput, teacher_input
from .teacher_cache import TeacherCache, open_teacher_cache
from .teacher_record import VERSION, Recording, dense_logits, key_folder, open_replay, record_key, record_values

TeacherOutputs = Tuple[torch.Tensor, Dict[TapLayer, torch.Tensor]]


class LiveTeacher(nn.Module):
    """A frozen model run on every batch, recording the taps the loss terms read in the same forward pass."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput] = None):
        super().__init__()
        self.model, self.adapter = model, adapter
        model.requires_grad_(False)
        model.eval()
        self.extractor = FeatureExtractor(model, [])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The student's input as this teacher expects it."""
        return self.adapter(images) if self.adapter is not None else images

    def classifier(self) -> nn.Module:
        """The teacher as a model of the student's input (for evaluation)."""
        return nn.Sequential(self.adapter, self.model) if self.adapter is not None else self.model

    def input_size(self, student_size: Sequence[int]) -> Tuple[int, ...]:
        size = self.adapter.size if self.adapter is not None else None
        return tuple(student_size) if size is None else (student_size[0], size, size)

    def watch(self, layers: Sequence[TapLayer]) -> None:
        """Record ``layers`` (feature taps) in every forward from now on."""
        self.extractor = FeatureExtractor(self.model, layers)

    def train(self, mode: bool = True) -> 'LiveTeacher':
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def forward(self, batch: Batch) -> TeacherOutputs:
        with torch.no_grad():
            logits, features = self.extractor(self.prepare(batch.images))
        return logits, dict(zip(self.extractor.keys, features))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of other images than the batch's (e.g. a strongly augmented view)."""
        with torch.no_grad():
            return self.model(self.prepare(images))

    def end_epoch(self) -> Dict[str, Any]:
        """Epoch-end work and what to log of it."""
        return {}

    def epoch_state(self) -> Dict[str, torch.Tensor]:
        """What a checkpoint inside an epoch keeps of the epoch's work so far (``load_epoch_state`` restores it)."""
        return {}

    def load_epoch_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Continue an epoch from a checkpoint inside it (``epoch_state``)."""


class LogitsOnlyTeacher(LiveTeacher):
    """A teacher whose stored answers are logits (the cache's table, a recording): terms reading its features are
    refused."""

    def watch(self, layers: Sequence[TapLayer]) -> None:
        if layers:
            raise DistillError(f"a teacher cache holds logits only, but loss terms read teacher features "
                               f"{list(layers)}; set teacher_cache.enabled=false")


class CachedTeacher(LogitsOnlyTeacher):
    """The teacher's logits looked up by each sample's (index, view) in ``cache``; views not yet in the table are
    computed by the model (those samples only) and stored. Exact for logit terms on a finite set of views."""

    def __init__(self, model: nn.Module, cache: TeacherCache, adapter: Optional[TeacherInput] = None):
        super().__init__(model, adapter)
        self.cache = cache

    def forward(self, batch: Batch) -> TeacherOutputs:
        if batch.indices is None or batch.views is None:
            raise DistillError("a teacher cache looks logits up by sample index and view: give the Batch indices "
                               "and views (distill's loaders do)")
        with torch.no_grad():
            return self.cache.lookup(batch.indices, batch.views, batch.images, self.classifier()), {}

    def end_epoch(self) -> Dict[str, Any]:
        self.cache.flush()
        return {'teacher_cache_filled': self.cache.fill_ratio}

    def epoch_state(self) -> Dict[str, torch.Tensor]:
        self.cache.flush()  # the checkpoint never names a table entry the disk does not hold
        return {}


class RecordingTeacher(LogitsOnlyTeacher):
    """A live teacher whose top-k logits per image (``teacher_record.record_values``) are written, with the epoch's
    order and seed, to ``recording`` at every epoch end. Under torchrun each rank records the images of its
    part of every batch; the ranks' buffers are summed (each row is non-zero on one rank) and rank 0 writes."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput], recording: Recording, loader,
                 top_k: int, dtype: str, info: Dict[str, Any]):
        super().__init__(model, adapter)
        self.recording, self.loader, self.top_k, self.info = recording, loader, top_k, info
        self.dtype = {'float16': torch.float16, 'float32': torch.float32}[dtype]
        self.buffers: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, batch: Batch) -> TeacherOutputs:
        logits, features = super().forward(batch)
        values, classes, lse = record_values(logits, self.top_k, self.dtype)
        if self.buffers is None:
            count, device = len(self.loader.split), logits.device
            index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
            self.buffers = {'values': torch.zeros(count, self.top_k, dtype=self.dtype, device=device),
                            'classes': torch.zeros(count, self.top_k, dtype=index_dtype, device=device),
                            'lse': torch.zeros(count, device=device), 'seen': torch.zeros(count, dtype=torch.bool,
                                                                                           device=device)}
        rows = batch.indices.to(logits.device)
        self.buffers['values'][rows] = values
        self.buffers['classes'][rows] = classes.to(self.buffers['classes'].dtype)
        self.buffers['lse'][rows] = lse
        self.buffers['seen'][rows] = True
        return logits, features

    def _gathered(self) -> Dict[str, torch.Tensor]:
        """The epoch's buffers so far, of every rank."""
        if self.loader.world_size == 1 or self.buffers is None:
            return dict(self.buffers or {})
        gathered = {}
        for name, tensor in self.buffers.items():  # NCCL sums neither int16 nor bool
            summed = tensor.to(torch.int32) if name in ('classes', 'seen') else tensor.clone()
            torch.distributed.all_reduce(summed)
            gathered[name] = summed.to(tensor.dtype)
        return gathered

    def end_epoch(self) -> Dict[str, Any]:
        buffers, self.buffers = self._gathered(), None
        seen = int(buffers.pop('seen').sum()) if buffers else 0
        if seen != len(self.loader.split):
            raise DistillError(f"recorded epoch {self.loader.epoch + 1} saw {seen} of {len(self.loader.split)} "
                               f"training images; record the whole epoch (teacher_cache.mode=record from its start)")
        if self.loader.rank == 0:
            order = self.loader.epoch_order.to(torch.int32 if len(self.loader.split) < 2 ** 31 else torch.int64)
            self.recording.write_epoch(self.loader.epoch, {**buffers, 'order': order,
                                                          'seed': torch.tensor([self.loader.epoch_seed])}, self.info)
        return {}

    def epoch_state(self) -> Dict[str, torch.Tensor]:
        """The epoch's top-k buffers so far (every rank's; rank 0 writes the checkpoint): a run resumed inside a
        recorded epoch still records all of it."""
        state = {name: tensor.cpu() for name, tensor in self._gathered().items()}
        return {**state, 'version': torch.tensor([VERSION])} if state else state

    def load_epoch_state(self, state: Dict[str, torch.Tensor]) -> None:
        state = dict(state)
        version = state.pop('version', torch.tensor([0]))
        if state and int(version) != VERSION:  # its buffers store values as another distill version did
            raise DistillError("this run's checkpoint inside an epoch holds a recording by another distill version; "
                               "finish the run with that version, or record again under another trainer.run_name")
        if self.loader.rank == 0:  # the other ranks add only what they record from here on
            self.buffers = {name: tensor.to(self.loader.device) for name, tensor in state.items()} or None


class ReplayTeacher(LogitsOnlyTeacher):
    """The recorded teacher's logits of each batch's images (``teacher_record.dense_logits``); the model itself is
    kept for evaluation only and never runs in training. The loader follows the recording's order and seeds."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput], recording: Recording, loader,
                 num_classes: int):
        super().__init__(model, adapter)
        self.recording, self.loader, self.num_classes = recording, loader, num_classes
        self.current: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None
        loader.replay = recording

    def forward(self, batch: Batch) -> TeacherOutputs:
        if self.current is None or self.current[0] != self.loader.epoch:
            tensors = self.recording.epoch(self.loader.epoch)
            self.current = (self.loader.epoch, {name: tensors[name].to(batch.images.device)
                                                for name in ('values', 'classes', 'lse')})
        table, rows = self.current[1], batch.indices.to(batch.images.device)
        return dense_logits(table['values'][rows], table['classes'][rows], table['lse'][rows], self.num_classes), {}


def recorded_teacher(model: nn.Module, adapter: Optional[TeacherInput], cfg, loader, num_classes: int,
                     precision: str) -> LiveTeacher:
    """``teacher_cache.mode`` record or replay on a streamed loader (``teacher_record``)."""
    top_k = min(cfg.teacher_cache.top_k or num_classes, num_classes)
    settings = {'teacher': cfg.teacher.name, 'augment': cfg.data.augment, 'auto_augment': cfg.data.auto_augment,
                'image_size': cfg.data.image_size, 'crop_padding': cfg.data.crop_padding,
                'teacher_input': adapter.describe() if adapter is not None else None, 'batch_size': cfg.data.batch_size,
                'mixing': [cfg.data.mixup, cfg.data.cutmix, cfg.data.mix_prob, cfg.data.mix_switch_prob],
                'erasing': [cfg.data.reprob, cfg.data.remode, cfg.data.recount],
                'top_k': top_k, 'dtype': cfg.teacher_cache.dtype}
    key = record_key(model, loader, settings)
    root = cache_root(cfg, 'teacher_records', writes=cfg.teacher_cache.mode == 'record')
    if cfg.teacher_cache.mode == 'replay':
        return ReplayTeacher(model, adapter, open_replay(root, key, cfg.trainer.epochs), loader, num_classes)
    count = len(loader.split)
    dropped = count - sum(len(batch) for batch, _, _ in plan_batches(torch.arange(count), cfg.data.batch_size, True,
                                                                      loader.rank, loader.world_size))
    if dropped:
        raise DistillError(f"under torchrun the last batch of {dropped} images is dropped ({loader.world_size} "
                           f"processes), but a recording holds every image; pick a data.batch_size that leaves at "
                           f"least {loader.world_size}, or record in one process")
    recording = Recording(key_folder(root, key), key)
    seed = recording.meta.get('seed', cfg.trainer.seed)
    if seed != cfg.trainer.seed:
        raise DistillError(f"recording {recording.folder} was drawn with trainer.seed={seed}; record with that "
                           f"seed (its stream), or into another teacher_cache.dir")
    recorded = recording.meta.get('teacher_precision', precision)
    if recorded != precision:  # its epochs so far hold that precision's logits: meta.json describes every shard
        raise DistillError(f"recording {recording.folder} was recorded with trainer.precision={recorded}; record "
                           f"with that precision, or into another teacher_cache.dir")
    return RecordingTeacher(model, adapter, recording, loader, top_k, cfg.teacher_cache.dtype,
                            {'seed': seed, 'top_k': top_k, 'dtype': cfg.teacher_cache.dtype,
                             'num_classes': num_classes, 'teacher_precision': precision})


def cache_root(cfg, default: str, writes: bool = True) -> str:
    """``teacher_cache.dir``, or ``default`` under distill's cache folder; where the run ``writes`` there, refused
    in one line when it cannot, before the run writes anything (a recording is written at the first epoch's end)."""
    root = os.path.expanduser(cfg.teacher_cache.dir or os.path.join(cache_dir(), default))
    if writes:
        check_folder_writable(root, 'teacher cache folder', "set teacher_cache.dir to a writable folder")
    return root


def as_teacher(teacher: Optional[nn.Module]) -> Optional[LiveTeacher]:
    """A plain model becomes a ``LiveTeacher``; teachers and None pass through."""
    return teacher if teacher is None or isinstance(teacher, LiveTeacher) else LiveTeacher(teacher)


def cache_blocker(losses: Dict[str, Any], num_views: Optional[int], augment: str) -> Optional[str]:
    """Why teacher logits looked up by (image, view) would not give the configured loss terms what a live
    teacher gives (checked from the terms' declarations, before any table is created), or None when exact.
    ``num_views`` None: a recording (``teacher_record``), which does not enumerate views."""
    from .losses import Need, list_losses
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
        return recorded_teacher(model, adapter, cfg, loader, num_classes, cfg.trainer.precision)
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
