"""Checks of config values that take more than a line of ``config``: timm's augmentation strings (timm drops what
it does not know), the streaming settings, the example a non-positive setting's message gives, and a teacher
without weights."""
import re
from typing import Optional, Set

from ..errors import DistillError, nearest

# The grammar of timm/data/auto_augment.py: a name, then '-'-separated sections <key><value>, the value starting at
# the first digit (RandAugment's t<set> aside). timm skips a section without a digit and, for t<set>, falls back to
# the default set on an unknown name, both silently: every section is checked here.
RAND = {'m': 'int', 'n': 'int', 'p': 'float', 'mstd': 'float', 'mmax': 'int', 'inc': '0|1', 't': 'weights|3aw|3a'}
AUGMIX = {'m': 'int', 'w': 'int', 'd': 'int', 'a': 'float', 'b': '0|1', 'mstd': 'float'}
AUTO = {'mstd': 'float'}
AUGMENTATIONS = {'rand': ('RandAugment', RAND, 'rand-m9-mstd0.5-inc1'),
                 'augmix': ('AugMix', AUGMIX, 'augmix-m5-w4-d2'),
                 **dict.fromkeys(('original', 'originalr', 'v0', 'v0r', '3a'),
                                 ('AutoAugment', AUTO, 'original-mstd0.5'))}
# a sensible value named where a setting must be > 0 (a key without one gets none)
POSITIVE_EXAMPLES = {
    'data.batch_size': '64', 'data.eval_batch_size': '256', 'data.image_size': '32', 'trainer.epochs': '240',
    'trainer.eval_every': '1', 'trainer.check_finite_every': '50, or null (1 on CPU, 50 on CUDA)',
    'trainer.accumulate_steps': '1 (no accumulation)', 'optimizer.lr': '0.05',
    'data.num_classes': "null (the data's count)", 'data.train_per_class': '500, or null for every image',
    'data.val_per_class': '100, or null for every image', 'transfer.head_hidden': '512, or null for a linear head',
    'transfer.backbone_lr_scale': '0.1', 'transfer.layer_decay': '0.75, or null for none', 'data.recount': '1',
    'trainer.grad_clip': '1.0, or null for none', 'wandb.init_timeout': '30',
    'teacher_cache.top_k': "10 (TinyViT's), or null for every class"}


def positive_example(key: str) -> str:
    """'; set e.g. KEY=VALUE' for a setting that must be > 0, or '' without a sensible example."""
    return f"; set e.g. {key}={POSITIVE_EXAMPLES[key]}" if key in POSITIVE_EXAMPLES else ''


def _fits(value: Optional[str], kind: str) -> bool:
    if value is None:
        return False
    if kind == 'int':
        return value.isdecimal()
    if kind == 'float':
        try:
            float(value)
        except ValueError:
            return False
        return True
    return value in kind.split('|')


def check_auto_augment(config: Optional[str]) -> None:
    """``data.auto_augment``: a timm AutoAugment / RandAugment / AugMix string, every section of it."""
    if not config:
        return
    name, *sections = config.split('-')
    if name not in AUGMENTATIONS:
        raise DistillError(f"data.auto_augment={config!r}: {name!r} is not a timm augmentation"
                           f"{nearest(name, AUGMENTATIONS)}; start it with one of {', '.join(AUGMENTATIONS)}, e.g. "
                           f"rand-m9-mstd0.5-inc1")
    what, keys, example = AUGMENTATIONS[name]
    valid = ', '.join(f"{key}<{kind}>" for key, kind in keys.items())
    for section in sections:
        match = re.fullmatch(r'(\D*)(\d.*)', section)
        key, value = ('t', section[1:]) if 't' in keys and section.startswith('t') else \
            match.groups() if match else (section, None)
        problem = f"is not an option of {what}{nearest(key, keys)}" if key not in keys else \
            None if _fits(value, keys[key]) else f"needs {key}<{keys[key]}>"
        if problem:
            raise DistillError(f"data.auto_augment={config!r}: section {section!r} {problem}; {what}'s sections "
                               f"are {valid} (e.g. {example})")


# the names of the registered data sources: data.register_source adds each (importing distill registers the
# built-in ones), so a recipe naming another is refused when it is parsed, before anything runs
DATA_SOURCES: Set[str] = set()


def check_data(data) -> None:
    """The ``DataConfig`` ``data``: its source, normalisation, augmentation and mixing ranges, streamed vs in-memory
    settings."""
    if data.name not in DATA_SOURCES:
        raise DistillError(f"data.name must be one of {sorted(DATA_SOURCES)}, got {data.name!r}"
                           f"{nearest(data.name, DATA_SOURCES)}")
    for key in ('mean', 'std'):
        values = getattr(data, key)
        if values is not None and len(values) not in (1, 3):
            raise DistillError(f"data.{key} needs one value per image channel (3 for RGB, 1 for grey), got {values}")
    if data.augment != 'none' and data.crop_padding < 0:
        raise DistillError(f"data.crop_padding must be >= 0, got {data.crop_padding}")
    for key in ('mix_prob', 'mix_switch_prob', 'reprob'):
        if not 0.0 <= getattr(data, key) <= 1.0:
            raise DistillError(f"data.{key} must be in [0, 1], got {getattr(data, key)}")
    if data.workers < 0:
        raise DistillError(f"data.workers must be >= 0, got {data.workers} (the decoding processes of streamed "
                           f"data; 0 decodes in the training process)")
    if not 0.0 < data.eval_crop_pct <= 1.0:
        raise DistillError(f"data.eval_crop_pct must be in (0, 1], got {data.eval_crop_pct} (the centre crop's "
                           f"share of the resized validation image; timm's default 0.875)")
    check_auto_augment(data.auto_augment)
    if not data.in_memory:
        if data.name != 'imagefolder':
            raise DistillError(f"data.in_memory=false streams ImageFolder trees; data.name is {data.name!r} "
                               f"(set data.name=imagefolder, or data.in_memory=true)")
        fixed = [key for key in ('train_per_class', 'val_per_class', 'classes', 'include_classes', 'exclude_classes')
                 if getattr(data, key) is not None]
        if fixed:
            raise DistillError(f"data.{fixed[0]} needs the in-memory pipeline; drop it or set data.in_memory=true")
    elif data.augment == 'random_resized_crop' or data.auto_augment:
        what = 'augment=random_resized_crop' if data.augment == 'random_resized_crop' else 'auto_augment'
        raise DistillError(f"data.{what} is for streamed data (data.in_memory=false); in memory use augment "
                           f"crop_flip, crop or none")


def check_teacher_weights(cfg, where: str = '') -> None:
    """A recipe's teacher has weights to distill from: ``teacher.checkpoint``, ``teacher.pretrained`` (the name's
    weights: a registry tag, ``hf-hub:``, ``local-dir:``) or ``teacher.recipe`` (trained first), or it is fine-tuned
    first (``teacher_finetune``). Else timm builds it randomly initialised, which a recipe never means (the Python
    API keeps building such teachers, e.g. for tests). ``where`` starts the message."""
    teacher = cfg.teacher
    if teacher is None or teacher.checkpoint or teacher.pretrained or teacher.recipe or cfg.teacher_finetune:
        return
    raise DistillError(f"{where}teacher {teacher.name} has no weights (no teacher.checkpoint, "
                       f"teacher.pretrained=false, no teacher.recipe): it would be a random teacher; set "
                       f"teacher.checkpoint=<weights file>, teacher.pretrained=true (the name's own weights) or "
                       f"teacher.recipe=<recipe that trains it>")
