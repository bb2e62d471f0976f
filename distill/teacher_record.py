"""A teacher recorded once on a streamed run and replayed by later runs without a teacher (``teacher_cache.mode``).

TinyViT's fast distillation (Wu et al., ECCV 2022, microsoft/Cream ``TinyViT/save_logits.py``) and FKD (Shen & Xing,
ECCV 2022) store, per (epoch, image), the augmentation and the teacher's top-k answer, so that many students
train from one teacher pass. Here the augmentation needs no parameters of its own: the streamed loader seeds every
draw of an image's augmentation from (the epoch's seed, the image's index) (``data.streaming``), so a recording
keeps, per epoch, the epoch's seed and image order (int32), and per image the teacher's top-k logits (values in
``dtype``, class indices int16/int32) and the log-sum-exp of all its logits. A replay run takes the epoch's order
and seed from the recording (its own seed then only sets the student's initialisation), so its loader regenerates
the recorded pixels, and its logit terms read

    logits_c = z_c for the k recorded classes,  log((1 - sum_k softmax(z)_k) / (C - k)) + logsumexp(z) otherwise,

whose softmax at T = 1 is TinyViT's soft label: the top-k probabilities exactly, the remaining mass spread evenly
over the other classes. With ``top_k`` null (every class) the logits are the teacher's own and a replayed run
computes what the recording run computed.

Files: ``<dir>/<key hash>/meta.json`` (what the logits depend on: teacher weights, training files, augmentation,
normalisation and teacher input; and per recorded epoch its shard's sha256) and ``epoch_NNNN.safetensors``, each
written atomically after its epoch. A replay checks every shard's checksum before using it.
"""
import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import DistillError
from .files import atomic_write, atomic_write_json
from .teacher_cache import digest_tensors


def record_key(teacher: torch.nn.Module, loader, settings: Dict[str, Any]) -> Dict[str, Any]:
    """What a recording's logits and images depend on: the teacher's weights (hash), the training files and
    labels (hash), the augmentation and teacher-input ``settings`` and the normalisation. Not the run seed: runs of
    any seed replay one recording (the recording run's seed is in its meta.json)."""
    weights = hashlib.sha1()
    digest_tensors(weights, teacher.state_dict())
    files = hashlib.sha1(json.dumps([(os.path.relpath(path, loader.folder.root), label)
                                     for path, label in loader.folder.samples]).encode())
    return {**settings, 'teacher_weights': weights.hexdigest()[:20], 'train_files': files.hexdigest()[:20],
            'num_images': len(loader.split), 'mean': loader.mean.flatten().tolist(),
            'std': loader.std.flatten().tolist(), 'version': 2}  # 2: int32 orders; RandAugment runs crop on PIL


def key_folder(root: str, key: Dict[str, Any]) -> str:
    return os.path.join(root, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20])


def dense_logits(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits from a recorded top-k (see the module docstring); exact when k is every class."""
    values = values.float()
    if values.shape[1] == num_classes:
        return torch.empty_like(values).scatter_(1, classes.long(), values)
    rest = (1 - torch.exp(values - lse[:, None]).sum(1)).clamp_min(1e-12) / (num_classes - values.shape[1])
    logits = (rest.log() + lse).unsqueeze(1).expand(-1, num_classes).contiguous()
    return logits.scatter_(1, classes.long(), values)


class Recording:
    """One teacher's recording on one training stream, under ``folder``: ``record`` epochs or ``epoch`` them."""

    def __init__(self, folder: str, key: Dict[str, Any]):
        self.folder, self.key = folder, key
        self.meta_path = os.path.join(folder, 'meta.json')
        self.meta: Dict[str, Any] = {'key': key, 'epochs': {}}
        if os.path.isfile(self.meta_path):
            with open(self.meta_path) as f:
                self.meta = json.load(f)
        self._loaded: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None

    @property
    def epochs(self) -> List[int]:
        return sorted(int(e) for e in self.meta['epochs'])

    def shard(self, epoch: int) -> str:
        return os.path.join(self.folder, f'epoch_{epoch:04d}.safetensors')

    def write_epoch(self, epoch: int, tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> None:
        from safetensors.torch import save
        payload = save({name: tensor.cpu().contiguous() for name, tensor in tensors.items()})
        atomic_write(self.shard(epoch), lambda f: f.write(payload))
        self.meta.update(info)
        self.meta['epochs'][str(epoch)] = {'sha256': hashlib.sha256(payload).hexdigest(), 'bytes': len(payload)}
        atomic_write_json(self.meta_path, self.meta)

    def epoch(self, epoch: int) -> Dict[str, torch.Tensor]:
        """Epoch ``epoch``'s tensors (order, seed, values, classes, lse; on the CPU), checksum verified."""
        if self._loaded is not None and self._loaded[0] == epoch:
            return self._loaded[1]
        from safetensors.torch import load
        entry = self.meta['epochs'].get(str(epoch))
        if entry is None:
            raise DistillError(f"recording {self.folder} holds epochs {describe(self.epochs)}, not epoch "
                               f"{epoch + 1}; record more epochs first (teacher_cache.mode=record with this "
                               f"trainer.epochs, --resume)")
        try:
            with open(self.shard(epoch), 'rb') as f:
                payload = f.read()
        except OSError as exc:
            raise DistillError(f"recording shard {self.shard(epoch)} cannot be read ({exc.strerror}); record "
                               f"it again (teacher_cache.mode=record)") from None
        if hashlib.sha256(payload).hexdigest() != entry['sha256']:
            raise DistillError(f"recording shard {self.shard(epoch)} is corrupt or truncated (its sha256 differs "
                               f"from meta.json's); delete {self.folder} and record it again")
        tensors = load(payload)
        self._loaded = (epoch, tensors)
        return tensors


def describe(epochs: List[int]) -> str:
    return f"1-{epochs[-1] + 1}" if epochs and epochs == list(range(len(epochs))) else \
        (', '.join(str(e + 1) for e in epochs) or 'none')


def open_replay(root: str, key: Dict[str, Any], epochs: int) -> Recording:
    """The recording of ``key`` under ``root`` holding the run's ``epochs``, or a one-line error naming what the
    nearest recording differs in."""
    folder = key_folder(root, key)
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        others = []
        for path in glob.glob(os.path.join(root, '*', 'meta.json')):
            with open(path) as f:
                other = json.load(f)['key']
            others.append([name for name in sorted(set(key) | set(other)) if key.get(name) != other.get(name)])
        nearest = min(others, key=len, default=None)
        hint = " (the nearest one was made by another distill version, whose images or files differ)" \
            if nearest == ['version'] else f" (the nearest one differs in {', '.join(nearest)})" if nearest else ''
        raise DistillError(f"no recording of this teacher, data and augmentation under {root}{hint}; record one "
                           f"with teacher_cache.mode=record, or point teacher_cache.dir at it")
    recording = Recording(folder, key)
    missing = [e for e in range(epochs) if str(e) not in recording.meta['epochs']]
    if missing:
        raise DistillError(f"recording {folder} holds epochs {describe(recording.epochs)} but the run asks for "
                           f"{epochs}; record more first (teacher_cache.mode=record, trainer.epochs={epochs}, "
                           f"--resume), or lower trainer.epochs")
    return recording
