"""A teacher recorded once on a streamed run and replayed by later runs without a teacher (``teacher_cache.mode``).

TinyViT's fast distillation (Wu et al., ECCV 2022, microsoft/Cream ``TinyViT/save_logits.py``) and FKD (Shen & Xing,
ECCV 2022) store, per (epoch, image), the augmentation and the teacher's top-k answer, so that many students
train from one teacher pass. Here the augmentation needs no parameters of its own: the streamed loader seeds every
draw of an image's augmentation from (the epoch's seed, the image's index) (``data.streaming``), so a recording
keeps, per epoch, the epoch's seed and image order (int32), and per image the top-k classes (int16/int32), their
values v and the log-sum-exp L of all the values (float32). In float32 v are the teacher's logits z. In float16 they
are z - max(z) (``record_values``): float16 keeps 11 significant bits, so a logit of 50 only to 0.02 (1e-2 off in
the probabilities), but a difference from the top logit is 0 (exact) for the top class and kept to 11 bits of itself
for the others, which puts the soft labels' error below that of TinyViT's float16 probabilities. A replay run takes
the epoch's order and seed from the recording (its own seed then only sets the student's initialisation), so its
loader regenerates the recorded pixels, and its logit terms read

    logits_c = v_c for the k recorded classes,  log((1 - sum_k exp(v_k - L)) / (C - k)) + L otherwise,

whose softmax at T = 1 is TinyViT's soft label: the top-k probabilities, the remaining mass spread evenly over the
other classes (logit terms are softmaxes, blind to the float16 shift by max(z)). With ``top_k`` null (every class)
in float32 the logits are the teacher's own, bit for bit, and a replayed run computes what the recording run
computed.

Files: ``<dir>/<key hash>/meta.json`` (what the logits depend on: teacher weights, training files, augmentation,
normalisation, teacher input, top_k and dtype; the recording run's seed and precision, which a recording run into
the folder must share; and per recorded epoch its shard's size and sha256) and ``epoch_NNNN.safetensors``, each
written atomically after its epoch. A replay checks the size and checksum of every shard it will read before the
run starts (``Recording.verify``), and each shard's checksum again when it loads it.
"""
import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.batching import RecordableLoader
from ..errors import DistillError
from ..files import atomic_write, atomic_write_json
from .cache import digest_tensors

VERSION = 3  # in the key: another version's recording holds other images or values, and is refused
STORAGE = ('top_k', 'dtype')  # the key's fields that say how a recording stores the same logits


def record_key(teacher: torch.nn.Module, loader: RecordableLoader,
               settings: Dict[str, Any]) -> Dict[str, Any]:
    """What a recording's logits and images depend on: the teacher's weights (hash), the training files and
    labels (hash), the augmentation, teacher-input and storage (top_k, dtype) ``settings`` and the normalisation.
    Not the run seed: runs of any seed replay one recording (the recording run's seed is in its meta.json)."""
    weights = hashlib.sha1()
    digest_tensors(weights, teacher.state_dict())
    files = hashlib.sha1(json.dumps([(os.path.relpath(path, loader.folder.root), label)
                                     for path, label in loader.folder.samples]).encode())
    return {**settings, 'teacher_weights': weights.hexdigest()[:20], 'train_files': files.hexdigest()[:20],
            'num_images': len(loader.split), 'mean': loader.mean.flatten().tolist(),
            'std': loader.std.flatten().tolist(), 'version': VERSION}


def key_folder(root: str, key: Dict[str, Any]) -> str:
    return os.path.join(root, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20])


def record_values(logits: torch.Tensor, top_k: int,
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a recording keeps of a batch's logits: the top-k values (in ``dtype``), their classes and the
    log-sum-exp of all the values (float32); float16 values are relative to the top logit (module docstring)."""
    scores = logits.float()
    top = scores.topk(top_k, dim=1)
    if dtype == torch.float32:  # the teacher's own logits: an every-class replay is exact
        return top.values, top.indices, scores.logsumexp(1)
    peak = top.values[:, :1]
    return (top.values - peak).to(dtype), top.indices, (scores - peak).logsumexp(1)


def dense_logits(values: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits from a recorded top-k (see the module docstring); exact when k is every class."""
    values = values.float()
    if values.shape[1] == num_classes:
        return torch.empty_like(values).scatter_(1, classes.long(), values)
    rest = (1 - torch.exp(values - lse[:, None]).sum(1)).clamp_min(1e-12) / (num_classes - values.shape[1])
    logits = (rest.log() + lse).unsqueeze(1).expand(-1, num_classes).contiguous()
    return logits.scatter_(1, classes.long(), values)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):  # 4 MiB reads: hashing streams without holding the shard
            digest.update(chunk)
    return digest.hexdigest()


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

    def _corrupt(self, epoch: int, why: str) -> DistillError:
        return DistillError(f"recording shard {self.shard(epoch)} is corrupt or truncated ({why}); delete "
                            f"{self.folder} and record it again (teacher_cache.mode=record)")

    def verify(self, epochs: Sequence[int]) -> None:
        """Every shard of ``epochs`` present, of its recorded size and sha256, before a run writes anything:
        the sizes first (a truncated shard fails at once), then the checksums in threads (hashlib releases the
        GIL while it hashes; about 70 ms per ImageNet-size shard of 61 MB on one core)."""
        for epoch in epochs:
            try:
                size = os.path.getsize(self.shard(epoch))
            except OSError as exc:
                raise DistillError(f"recording shard {self.shard(epoch)} cannot be read ({exc.strerror}); delete "
                                   f"{self.folder} and record it again (teacher_cache.mode=record)") from None
            if size != self.meta['epochs'][str(epoch)]['bytes']:
                raise self._corrupt(epoch, f"{size} bytes, meta.json says {self.meta['epochs'][str(epoch)]['bytes']}")
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            for epoch, digest in zip(epochs, pool.map(file_sha256, [self.shard(e) for e in epochs])):
                if digest != self.meta['epochs'][str(epoch)]['sha256']:
                    raise self._corrupt(epoch, "its sha256 differs from meta.json's")
        except OSError as exc:
            raise DistillError(f"a shard of recording {self.folder} cannot be read ({exc.strerror}); delete it and "
                               f"record it again (teacher_cache.mode=record)") from None
        finally:
            pool.shutdown(cancel_futures=True)  # a corrupt shard need not wait for the later ones

    def epoch(self, epoch: int) -> Dict[str, torch.Tensor]:
        """Epoch ``epoch``'s tensors (order, seed, values, classes, lse; on the CPU), checksum verified."""
        if self._loaded is not None and self._loaded[0] == epoch:
            return self._loaded[1]
        from safetensors.torch import load
        entry = self.meta['epochs'].get(str(epoch))
        if entry is None:
            raise DistillError(f"recording {self.folder} holds {describe(self.epochs)}, not epoch "
                               f"{epoch + 1}; record more epochs first (teacher_cache.mode=record with this "
                               f"trainer.epochs, --resume)")
        try:
            with open(self.shard(epoch), 'rb') as f:
                payload = f.read()
        except OSError as exc:
            raise DistillError(f"recording shard {self.shard(epoch)} cannot be read ({exc.strerror}); record "
                               f"it again (teacher_cache.mode=record)") from None
        if hashlib.sha256(payload).hexdigest() != entry['sha256']:
            raise self._corrupt(epoch, "its sha256 differs from meta.json's")
        tensors = load(payload)
        self._loaded = (epoch, tensors)
        return tensors


def describe(epochs: List[int]) -> str:
    """'epoch 1', 'epochs 1-3', 'epochs 2, 5' or 'no epochs' (epochs counted from 0)."""
    if len(epochs) == 1:
        return f"epoch {epochs[0] + 1}"
    if epochs and epochs == list(range(len(epochs))):
        return f"epochs 1-{len(epochs)}"
    return f"epochs {', '.join(str(e + 1) for e in epochs)}" if epochs else 'no epochs'


def differences(key: Dict[str, Any], other: Dict[str, Any]) -> List[str]:
    """The fields in which recording key ``other`` differs from ``key``; of another version's key, those both
    have (a field one version added or dropped says nothing more than the version)."""
    both = other.get('version') == key.get('version')
    return [name for name in sorted(set(key) | set(other))
            if key.get(name) != other.get(name) and (both or (name in key and name in other))]


def open_replay(root: str, key: Dict[str, Any], epochs: int) -> Recording:
    """The recording of ``key`` under ``root`` holding the run's ``epochs``, its shards verified, or a one-line
    error naming what the nearest recording differs in."""
    folder = key_folder(root, key)
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        others = []
        for path in glob.glob(os.path.join(root, '*', 'meta.json')):
            with open(path) as f:
                other = json.load(f)['key']
            others.append((differences(key, other), other))
        nearest, other = min(others, key=lambda pair: len(pair[0]), default=(None, None))
        if nearest == ['version']:
            hint = " (the nearest one was made by another distill version, whose images or files differ)"
        elif nearest and set(nearest) <= set(STORAGE):
            hint = f" (one holds top_k={other['top_k']} in {other['dtype']}: set teacher_cache.top_k and " \
                   f"teacher_cache.dtype to replay it)"
        else:
            hint = f" (the nearest one differs in {', '.join(nearest)})" if nearest else ''
        raise DistillError(f"no recording of this teacher, data and augmentation under {root}{hint}; record one "
                           f"with teacher_cache.mode=record, or point teacher_cache.dir at it")
    recording = Recording(folder, key)
    missing = [e for e in range(epochs) if str(e) not in recording.meta['epochs']]
    if missing:
        raise DistillError(f"recording {folder} holds {describe(recording.epochs)} but the run asks for "
                           f"{epochs}; record more first (teacher_cache.mode=record, trainer.epochs={epochs}, "
                           f"--resume), or lower trainer.epochs")
    recording.verify(range(epochs))
    return recording
