"""Teachers on streamed data: the live teacher's top-k logits recorded per (epoch, image) at every epoch end
(``RecordingTeacher``, ``teacher_cache.mode: record``) and replayed without running it (``ReplayTeacher``,
``mode: replay``); the storage (key, shards, checks) is ``record``'s."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..data import Batch, plan_batches
from ..data.batching import RecordableLoader
from ..errors import DistillError
from .inputs import TeacherInput
from .record import VERSION, Recording, dense_logits, key_folder, open_replay, record_key, record_values
from .teachers import LiveTeacher, LogitsOnlyTeacher, TeacherOutputs


class RecordingTeacher(LogitsOnlyTeacher):
    """A live teacher whose top-k logits per image (``record.record_values``) are written, with the epoch's
    order and seed, to ``recording`` at every epoch end. Under torchrun each rank records the images of its
    part of every batch; the ranks' buffers are summed (each row is non-zero on one rank) and rank 0 writes."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput], recording: Recording,
                 loader: RecordableLoader, top_k: int, dtype: str, info: Dict[str, Any]):
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
    """The recorded teacher's logits of each batch's images (``record.dense_logits``); the model itself is
    kept for evaluation only and never runs in training. The loader follows the recording's order and seeds."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput], recording: Recording,
                 loader: RecordableLoader, num_classes: int):
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
                     precision: str, root: str) -> LiveTeacher:
    """``teacher_cache.mode`` record or replay on a streamed loader, the recordings under ``root``."""
    if not isinstance(loader, RecordableLoader):
        raise DistillError(f"teacher_cache.mode={cfg.teacher_cache.mode} follows a loader's recorded epochs, and "
                           f"{type(loader).__name__} records none; stream the data (data.in_memory=false)")
    top_k = min(cfg.teacher_cache.top_k or num_classes, num_classes)
    settings = {'teacher': cfg.teacher.name, 'augment': cfg.data.augment, 'auto_augment': cfg.data.auto_augment,
                'image_size': cfg.data.image_size, 'crop_padding': cfg.data.crop_padding,
                'teacher_input': adapter.describe() if adapter is not None else None, 'batch_size': cfg.data.batch_size,
                'mixing': [cfg.data.mixup, cfg.data.cutmix, cfg.data.mix_prob, cfg.data.mix_switch_prob],
                'erasing': [cfg.data.reprob, cfg.data.remode, cfg.data.recount],
                'top_k': top_k, 'dtype': cfg.teacher_cache.dtype}
    key = record_key(model, loader, settings)
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
