"""The typed configuration of a recipe: one dataclass per section, each field's default and meaning.

``parsing`` checks a recipe's mapping against these dataclasses; ``resolved.yaml`` in a run directory holds the full
resolved config.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ModelConfig:
    name: str = 'cifar_resnet8x4'
    checkpoint: Optional[str] = None  # local weights: .safetensors, state_dict, distill or RepDistiller checkpoint
    pretrained: bool = False  # timm hub weights (needs internet)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # teacher only: the recipe that trains this model when no checkpoint (and no hub weights) is given; run first,
    # or reused when finished (a path relative to the recipe file that names it)
    recipe: Optional[str] = None


@dataclass
class DataConfig:
    name: str = 'cifar100'  # cifar10 | cifar100 | mnist | imagefolder | npz | digits
    root: str = 'data'  # dataset folder (imagefolder: holds train/ and val/ or test/; npz: the .npz file)
    download: bool = False  # torchvision download for CIFAR (needs internet)
    # None (a recipe with a pretrained student that leaves it unset): the size the student's weights expect,
    # resolved where the student is built (models.pretrained.resolve_image_size)
    image_size: Optional[int] = 32
    num_classes: Optional[int] = None  # if set, must equal the data's class count
    batch_size: int = 64
    eval_batch_size: int = 256
    augment: str = 'crop_flip'  # crop_flip | crop | none | random_resized_crop (ImageNet; in_memory: false only)
    crop_padding: int = 4
    mean: Optional[List[float]] = None  # None: statistics of the training images
    std: Optional[List[float]] = None
    train_per_class: Optional[int] = None  # keep only the first N training images of each class
    val_per_class: Optional[int] = None
    subset_seed: Optional[int] = None  # set: *_per_class picks a random subset (this seed) instead of the first N
    classes: Optional[List[str]] = None  # keep only these classes (labels follow this order)
    include_classes: Optional[List[Any]] = None  # training split only (a transfer set): only these classes' images
    exclude_classes: Optional[List[Any]] = None  # training split only: none of these classes' images (Hinton's 3s)
    in_memory: bool = True  # false: stream an ImageFolder tree from disk through DataLoader workers (ImageNet)
    workers: int = 8  # streaming only: decoding processes
    reprob: float = 0.0  # > 0: timm RandomErasing of each training image with this probability (DeiT: 0.25)
    remode: str = 'pixel'  # erased pixels: pixel (normal noise per pixel) | rand (one colour) | const (zeros)
    recount: int = 1  # at most this many erased boxes per image
    mixup: float = 0.0  # > 0: mixup with lambda ~ Beta(mixup, mixup) (timm's mixup_alpha; 0.8 in DeiT recipes)
    cutmix: float = 0.0  # > 0: CutMix with lambda ~ Beta(cutmix, cutmix) (timm's cutmix_alpha; DeiT: 1.0)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both set: probability of CutMix instead of mixup
    auto_augment: Optional[str] = None  # streaming only: timm AutoAugment/RandAugment/AugMix, e.g. rand-m9-mstd0.5-inc1
    eval_crop_pct: float = 0.875  # streaming only: validation resize to image_size / eval_crop_pct, centre crop
    allow_empty_classes: bool = False  # imagefolder: keep class folders without images (a class nothing trains)
    skip_bad_images: bool = False  # imagefolder: leave out (and count) files that do not decode, instead of stopping


@dataclass
class OptimizerConfig:
    name: str = 'momentum'  # any timm optimizer; 'momentum' is SGD without Nesterov (CRD), 'sgd' is Nesterov
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    filter_bias_and_bn: bool = False  # CRD decays every parameter
    fused: Optional[bool] = None  # fused optimizer kernels; None: on CUDA for sgd/momentum/adam/adamw
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    name: str = 'multistep'  # any timm scheduler (multistep, step, cosine, ...) or none
    milestones: List[int] = field(default_factory=lambda: [150, 180, 210])  # lr *= decay_rate after these epochs
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    step_on_epochs: bool = True  # False: update the lr every iteration


@dataclass
class TrainerConfig:
    epochs: int = 240
    precision: str = 'fp32'  # fp32 | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    seed: int = 0
    grad_clip: Optional[float] = None
    max_norm: Optional[float] = None  # after every step: each hidden unit's incoming weights to L2 norm <= this
    output_dir: str = 'runs'
    run_name: Optional[str] = None  # default: the recipe's file name
    progress: bool = True  # tqdm bars (shown only on a terminal)
    eval_every: int = 1  # validate every N epochs (and after the last one)
    channels_last: Optional[bool] = None  # NHWC models and inputs; None: on CUDA (faster convolutions), not on CPU
    compile: bool = False  # torch.compile student and teacher (falls back to eager, logged, if it fails)
    compile_mode: str = 'default'  # torch.compile mode; reduce-overhead: CUDA graphs, max-autotune: searches kernels
    accumulate_steps: int = 1  # batches per optimizer step (gradient accumulation): global batch data.batch_size x this
    check_finite_every: Optional[int] = None  # steps between host checks for a non-finite loss; None: 1 on CPU,
    # 50 on CUDA (the check is on the device every step; the host looks only this often, so steps never sync)
    checkpoint_every: int = 0  # also write last.pt every N optimizer updates inside an epoch (0: at epoch ends only)


@dataclass
class TransferConfig:
    """How a pretrained student is fine-tuned (see distill/models/transfer.py)."""
    new_head: bool = False  # a fresh classifier for the data's classes (the weights' old one is skipped, reported)
    head_hidden: Optional[int] = None  # new head with one hidden layer of this width (ReLU)
    head_dropout: float = 0.0  # dropout before the new head's linear layer(s)
    freeze: str = 'full'  # full (train everything) | partial (freeze stem + first frozen_stages) | linear_probe
    frozen_stages: int = 0  # partial: how many stages after the stem are frozen
    unfreeze_every: int = 0  # > 0: unfreeze one more stage (deepest first) every this many epochs
    backbone_lr_scale: float = 1.0  # lr multiplier of everything but the head (e.g. 0.1)
    layer_decay: Optional[float] = None  # timm layer-wise lr decay: lr * decay^(layers above), e.g. 0.75
    init_from: Optional[str] = None  # weights (e.g. the teacher's) copied into the student wherever they fit
    # init_from prefix -> student prefix, e.g. layer3.4. -> layer3.0.
    init_map: Dict[str, str] = field(default_factory=dict)


@dataclass
class TeacherFinetuneConfig:
    """Stage 1 of a two-stage recipe: fine-tune ``teacher`` on this recipe's data, then distill from it."""
    epochs: int = 10
    lr: Optional[float] = None  # None: optimizer.lr
    transfer: TransferConfig = field(default_factory=lambda: TransferConfig(new_head=True))


@dataclass
class TeacherCacheConfig:
    """Teacher logits stored per (training image, augmentation view), reused by later runs and seeds."""
    enabled: bool = False
    dir: Optional[str] = None  # default: $DISTILL_CACHE/teacher_logits (~/.cache/distill/teacher_logits)
    dtype: str = 'float16'  # float16 (half the memory) | float32 (equal to the live teacher's fp32 logits)
    mode: str = 'views'  # views: the table above (in-memory data) | record | replay: a streamed run's teacher top-k
    # logits per (epoch, image), recorded once and replayed by later runs without a teacher (distill/teaching/record.py)
    top_k: Optional[int] = 10  # record: logits kept per image (TinyViT's k); null: every class (with float32: exact)


@dataclass
class EmaConfig:
    """An exponential moving average of the student (timm ``ModelEmaV3``), updated after every optimizer step; when
    enabled it is what is evaluated, checkpointed as best and exported (as timm's train.py validates its EMA)."""
    enabled: bool = False
    decay: float = 0.9998  # timm train.py's --model-ema-decay
    warmup: bool = False  # timm's decay warm-up: min(decay, 1 - (1 + step)^-0.67)


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write every logged scalar as TensorBoard events in <run>/tensorboard


@dataclass
class WandbConfig:
    mode: str = 'disabled'  # online | offline | disabled
    project: str = 'distill'
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    init_timeout: float = 30.0  # online: seconds to wait for the W&B server before logging offline instead
    strict: bool = False  # online: exit 2 before the run writes anything when W&B cannot be reached (no offline)


@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None  # None: the student trains alone (baseline)
    data: DataConfig = field(default_factory=DataConfig)
    losses: Dict[str, Any] = field(default_factory=lambda: {'ce': 1.0})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    teacher_finetune: Optional[TeacherFinetuneConfig] = None  # set: fine-tune the teacher first (two stages)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
