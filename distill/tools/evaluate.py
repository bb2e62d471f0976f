"""``distill eval``: top-1/top-5 of a run's student, a checkpoint or weights file, or a timm model folder, on the
data its recipe names (or ``--data``); with ``--logit-bias`` / ``--fit-bias`` the output-bias report (``bias``)."""
import argparse
import os
from typing import Optional

from ..config import DataConfig
from ..data import SOURCES
from ..errors import DistillError


def evaluate_command(args: argparse.Namespace) -> None:
    """``distill eval CHECKPOINT``: a run directory, a checkpoint or weights file, or a timm model folder."""
    from ..config import ModelConfig, from_dict
    from ..data import build_eval_loader
    from ..models.factory import create_model
    from ..runs.checkpoint import NotACheckpoint, load_checkpoint
    run_last = os.path.join(args.checkpoint, 'checkpoints', 'last.pt')
    if os.path.isfile(run_last):  # a run directory: its final student (best.pt was picked on the same split)
        args.checkpoint = run_last
    if os.path.isdir(args.checkpoint):
        return _eval_folder(args)
    if not os.path.isfile(args.checkpoint):
        raise DistillError(f"checkpoint not found: {args.checkpoint} (check the path)")
    checkpoint = None
    if not args.checkpoint.endswith('.safetensors'):
        try:
            checkpoint = load_checkpoint(args.checkpoint)
        except NotACheckpoint:  # plain weights: load_weights below reads them
            pass
    # a run's checkpoint carries its recipe (unchecked: rules added since must not lock an old run out of eval)
    cfg = from_dict(checkpoint['config'], validate=False) if checkpoint and 'config' in checkpoint else None
    data_cfg = data_config(args.data, args.root, cfg.data if cfg else None)
    model_name = args.model or (cfg.student.name if cfg else None)
    if model_name is None:
        raise DistillError("--model NAME is required for weights without a distill config, e.g. "
                           "--model cifar_resnet8x4")
    stats = checkpoint.get('normalization') if checkpoint and args.data is None else None
    loader = build_eval_loader(data_cfg, *(stats['mean'], stats['std']) if stats else ())
    kwargs = cfg.student.kwargs if cfg and model_name == cfg.student.name else {}  # e.g. a ViT's img_size
    model = create_model(ModelConfig(name=model_name, checkpoint=args.checkpoint, kwargs=kwargs),
                         len(loader.split.classes), 'model')
    _report(args, model_name, model, loader, data_cfg)


def _eval_folder(args: argparse.Namespace) -> None:
    """``distill eval FOLDER --data ...``: a timm model folder (a run's ``student/``, timm's ``save_for_hf``) at
    the mean/std and input size of its ``pretrained_cfg``."""
    from ..config import ModelConfig
    from ..data import build_eval_loader
    from ..models.factory import create_model
    from ..models.pretrained import pretrained_input, pretrained_stats
    if not os.path.isfile(os.path.join(args.checkpoint, 'config.json')):
        raise DistillError(f"{args.checkpoint} holds no config.json: give a checkpoint file or a timm model folder")
    name = f'local-dir:{args.checkpoint}'
    pretrained_cfg = pretrained_input(name, pretrained=True) or {}
    if args.data is None:
        raise DistillError("--data is required with a model folder (a dataset name or an ImageFolder directory)")
    data_cfg = data_config(args.data, args.root)
    data_cfg.image_size = pretrained_cfg.get('input_size', (3, data_cfg.image_size))[-1]
    loader = build_eval_loader(data_cfg, *(pretrained_stats(pretrained_cfg) or ()))
    model = create_model(ModelConfig(name=name, pretrained=True), len(loader.split.classes), 'model')
    if model.pretrained_cfg.get('num_classes') != len(loader.split.classes):
        raise DistillError(f"{args.checkpoint} classifies {model.pretrained_cfg.get('num_classes')} classes but "
                           f"{data_cfg.name} has {len(loader.split.classes)}; evaluate it on its own data")
    _report(args, name, model, loader, data_cfg)


def _report(args: argparse.Namespace, name: str, model, loader, data_cfg) -> None:
    from ..training.evaluation import evaluate, predict
    from ..training.runtime import resolve_device
    device = resolve_device(args.device)
    model = model.to(device)
    if args.logit_bias or args.fit_bias or args.json:
        from .bias import bias_eval
        fit_data = predict(model, _fit_loader(args.fit_on, data_cfg, loader), device) \
            if args.fit_bias and args.fit_on != 'test' else None
        bias_eval(f"{name} on {data_cfg.name}", *predict(model, loader, device), args.logit_bias, args.fit_bias,
                  args.fit_on, fit_data, args.json)
        return
    metrics = evaluate(model, loader, device)
    print(f"{name} on {data_cfg.name} ({len(loader.split)} images): top-1 {metrics['top1']:.2f}  "
          f"top-5 {metrics['top5']:.2f}")


def _fit_loader(fit_on: str, data_cfg, test_loader):
    """``--fit-on train:N``: the last N images of the training split (whole: every class, the transfer set's
    exclusions aside), normalised as the test images."""
    import dataclasses
    from ..data import BatchLoader, ImageSplit, load_split
    count = fit_on.partition(':')[2]
    if not fit_on.startswith('train:') or not count.isdigit() or int(count) == 0:
        raise DistillError(f"--fit-on {fit_on!r}: say test, or train:N (the last N training images), e.g. train:5000")
    split = load_split(dataclasses.replace(data_cfg, include_classes=None, exclude_classes=None), train=True)
    tail = slice(max(0, len(split) - int(count)), None)
    return BatchLoader(ImageSplit(split.images[tail], split.labels[tail], split.classes), data_cfg.eval_batch_size,
                       test_loader.mean, test_loader.std, False)


def data_config(data: Optional[str], root: Optional[str], base: Optional[DataConfig] = None) -> DataConfig:
    """The data section from ``--data`` (a dataset name or an ImageFolder directory) and ``--root``."""
    data_cfg = base or DataConfig()
    if data is None and base is None:
        raise DistillError("--data is required for weights without a distill config (a dataset name: cifar10, "
                           "cifar100, digits; or an ImageFolder directory)")
    if data is not None:
        if os.path.isdir(data):
            data_cfg.name, data_cfg.root = 'imagefolder', data
        elif data in SOURCES and SOURCES[data].by_name:
            data_cfg.name = data
        else:
            named = ', '.join(name for name, source in sorted(SOURCES.items()) if source.by_name)
            raise DistillError(f"--data {data}: not a directory nor one of {named}")
    if root:
        data_cfg.root = root
    return data_cfg
