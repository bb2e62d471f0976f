"""The ``distill`` command: train, grid, table, eval, push, extract, probe, demo, models, methods. User mistakes print
one line and exit with code 2."""
import argparse
import os
import sys
from typing import List, Optional

from .errors import exit_code


def _train(args: argparse.Namespace) -> None:
    from .sweeps.stages import train
    train(args.recipe, args.overrides, args.pair, args.method, resume=args.resume, quiet=args.quiet)


def _eval(args: argparse.Namespace) -> None:
    from .tools.evaluate import evaluate_command
    evaluate_command(args)


def _push(args: argparse.Namespace) -> None:
    from .runs.export import push
    files = push(args.run, args.repo_id, args.private, args.dry_run)
    verb = 'would upload' if args.dry_run else 'uploaded'
    print(f"{verb} {os.path.join(args.run, 'student')} ({', '.join(files)}) to https://huggingface.co/{args.repo_id}")


def _extract(args: argparse.Namespace) -> None:
    import time
    from .config import ModelConfig, TransferConfig
    from .models.factory import create_model
    from .models.pretrained import pretrained_input, pretrained_stats
    from .tools.evaluate import data_config
    from .tools.probe import extract_features, feature_loaders, save_features
    from .training.runtime import resolve_device
    data_cfg = data_config(args.data, args.root)
    data_cfg.image_size, data_cfg.augment = args.image_size, 'none'
    data_cfg.train_per_class, data_cfg.val_per_class = args.train_per_class, args.val_per_class
    # a pretrained backbone sees the normalisation its weights expect
    train_loader, val_loader = feature_loaders(data_cfg, pretrained_stats(pretrained_input(args.model,
                                                                                           args.pretrained)))
    notes = []
    model = create_model(ModelConfig(name=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained),
                         len(train_loader.split.classes), 'model', TransferConfig(new_head=True), notes)
    device = resolve_device(args.device)
    layer = int(args.layer) if args.layer is not None and args.layer.lstrip('-').isdigit() else args.layer
    started = time.perf_counter()
    tensors = {}
    for split, loader in (('train', train_loader), ('val', val_loader)):
        for key, value in extract_features(model, loader, device, layer).items():
            tensors[f'{split}_{key}'] = value
    save_features(args.out, tensors, {'model': args.model, 'checkpoint': str(args.checkpoint),
                                      'layer': str(args.layer), 'classes': ','.join(train_loader.split.classes)})
    for note in notes:
        print(note)
    print(f"{args.model}: {len(train_loader.split)} train / {len(val_loader.split)} val features of size "
          f"{tensors['train_features'].shape[1]}{' and layer ' + str(args.layer) if args.layer else ''} in "
          f"{time.perf_counter() - started:.1f}s -> {args.out}")


def _probe(args: argparse.Namespace) -> None:
    from .tools.probe import probe_file
    result = probe_file(args.features, args.layer, args.weight_decay, args.max_iter)
    print(f"linear probe on {'layer' if args.layer else 'pooled'} features of {args.features}: val top-1 "
          f"{result['val_top1']:.2f} (train {result['train_top1']:.2f}) in {result['seconds']:.1f}s")


def _grid(args: argparse.Namespace) -> None:
    from .sweeps.grid import run_grid
    run_grid(args.grid, parallel=args.parallel, dry_run=args.dry_run, executor=args.executor, status=args.status)


def _table(args: argparse.Namespace) -> None:
    from .files import atomic_write_text
    from .sweeps.table import table
    fmt = args.format or {'.csv': 'csv', '.json': 'json'}.get(os.path.splitext(args.output or '')[1], 'markdown')
    text = table(args.runs, args.paper, args.plot, fmt)
    if args.output:
        atomic_write_text(args.output, text.rstrip('\n') + '\n')
        print(f"{fmt} table of {args.runs} -> {args.output}")
    else:
        print(text.rstrip('\n'))


def _demo(args: argparse.Namespace) -> None:
    from .tools.demo import run_demo
    run_demo(data_dir=args.data, output_dir=args.output, epochs=args.epochs, seed=args.seed,
             train_per_class=args.train_per_class)


def _models(args: argparse.Namespace) -> None:
    import timm
    print('\n'.join(timm.list_models(args.pattern)))


def method_table() -> str:
    """A markdown table of the registered loss terms: paper, default weight and options, what each needs."""
    import inspect
    from .losses import list_losses
    rows = ['| method | paper | weight | options (defaults) | needs | pairs |', '|---|---|---|---|---|---|']
    for name, cls in sorted(list_losses().items()):
        options = ', '.join(f'{p.name}={p.default!r}' for p in inspect.signature(cls.__init__).parameters.values()
                            if p.name != 'self' and p.default is not inspect.Parameter.empty)
        needs = sorted(need.value for need in cls.needs)
        rows.append(f"| {name} | {cls.paper} | {cls.default_weight:g} | {options} | {', '.join(needs) or '-'} | "
                    f"{cls.pairs} |")
    return '\n'.join(rows)


def _methods(args: argparse.Namespace) -> None:
    print(method_table())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='distill', description='Knowledge distillation on timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    train = sub.add_parser('train', help='train from a YAML recipe')
    train.add_argument('recipe', help='YAML recipe, or a pair table with --pair and --method, e.g. '
                                      'experiments/cifar100/pairs.yaml --pair resnet32x4-resnet8x4 --method kd')
    train.add_argument('--pair', help='a pair of the pair table, e.g. resnet32x4-resnet8x4')
    train.add_argument('--method', help='a method of the pair table (its methods/<method>.yaml), e.g. dkd')
    train.add_argument('overrides', nargs='*', help='dotted overrides, e.g. trainer.epochs=2 optimizer.lr=0.1')
    train.add_argument('--resume', action='store_true', help="continue the run from its checkpoints/last.pt")
    train.add_argument('--quiet', action='store_true', help='no per-epoch lines on stdout')
    train.set_defaults(func=_train)
    ev = sub.add_parser('eval', help='top-1/top-5 of a checkpoint on a validation split')
    ev.add_argument('checkpoint', help='a run directory (its last student), distill checkpoint (.pt), .safetensors, '
                                       'RepDistiller ckpt_epoch_240.pth, or a timm model folder (a run\'s student/)')
    ev.add_argument('--data', help='cifar10 | cifar100 | mnist | digits | an ImageFolder directory')
    ev.add_argument('--root', help='dataset folder for cifar10/cifar100')
    ev.add_argument('--model', help='timm model name (needed when the file holds no distill config)')
    ev.add_argument('--device', default='auto')
    bias = ev.add_mutually_exclusive_group()
    bias.add_argument('--logit-bias', metavar='CLASSES=DELTA', help='add DELTA to these classes\' logits, e.g. 3=+3.5 '
                                                                    'or 7,8=-7.6, and report errors per class')
    bias.add_argument('--fit-bias', metavar='CLASSES', help='the one DELTA for these classes (e.g. 3 or 7,8) with the '
                                                            'fewest errors on --fit-on, and the report with it')
    ev.add_argument('--fit-on', default='test', help='test (the evaluated split, as Hinton et al. 2015) or train:N '
                                                     '(the last N training images)')
    ev.add_argument('--json', help='also write the report (errors, per class, DELTA) to this file')
    ev.set_defaults(func=_eval)
    demo = sub.add_parser('demo', help='teacher, baseline student and KD student on data that needs no download')
    demo.add_argument('--data', help='ImageFolder directory (default: scikit-learn digits)')
    demo.add_argument('--output', default='runs/demo', help='where runs, table and plot go')
    demo.add_argument('--epochs', type=int, default=None, help='epochs per run')
    demo.add_argument('--seed', type=int, default=0)
    demo.add_argument('--train-per-class', type=int, default=None, help='training images per class (ImageFolder)')
    demo.set_defaults(func=_demo)
    models = sub.add_parser('models', help='list timm model names (e.g. "cifar_*")')
    models.add_argument('pattern', nargs='?', default='cifar_*')
    models.set_defaults(func=_models)
    extract = sub.add_parser('extract', help='store a frozen backbone\'s features of a dataset (for distill probe)')
    extract.add_argument('--model', required=True, help='timm model name')
    extract.add_argument('--checkpoint', help='local weights (its classifier is not needed)')
    extract.add_argument('--pretrained', action='store_true', help='timm hub weights (needs internet)')
    extract.add_argument('--data', required=True, help='cifar10 | cifar100 | digits | an ImageFolder directory')
    extract.add_argument('--root', help='dataset folder for cifar10/cifar100')
    extract.add_argument('--image-size', type=int, default=32)
    extract.add_argument('--train-per-class', type=int, default=None)
    extract.add_argument('--val-per-class', type=int, default=None)
    extract.add_argument('--layer', help='also store this tap pooled (stage index, module path, preact:N)')
    extract.add_argument('--out', required=True, help='.safetensors or .npz file')
    extract.add_argument('--device', default='auto')
    extract.set_defaults(func=_extract)
    probe = sub.add_parser('probe', help='fit a linear classifier on features stored by distill extract')
    probe.add_argument('features', help='file written by distill extract')
    probe.add_argument('--layer', action='store_true', help='probe the stored --layer features, not the pooled ones')
    probe.add_argument('--weight-decay', type=float, default=1e-4)
    probe.add_argument('--max-iter', type=int, default=200)
    probe.set_defaults(func=_probe)
    grid = sub.add_parser('grid', help='run recipes (or pairs x methods) x seeds here or on SLURM; skips finished '
                                       'and running runs, resumes interrupted ones')
    grid.add_argument('grid', help='grid YAML: recipes or table/pairs/methods, seeds, output_dir, overrides, slurm')
    grid.add_argument('--executor', help="local (submitit jobs on this machine, waited for; the default unless the "
                                         "grid sets executor:) or slurm (sbatch job arrays from the grid's slurm: "
                                         "section, not waited for)")
    grid.add_argument('--parallel', type=int, default=1, help='local: runs at once')
    grid.add_argument('--dry-run', action='store_true', help='only list each run and its state')
    grid.add_argument('--status', action='store_true', help='table of the runs: state, epochs, job id, and the last '
                                                            'log line of each failure')
    grid.set_defaults(func=_grid)
    tab = sub.add_parser('table', help='table of runs (mean +- std over finished seeds; unfinished runs listed) vs the '
                                       'paper')
    tab.add_argument('runs', help='directory holding run directories (searched recursively)')
    tab.add_argument('--paper', help='published numbers, e.g. experiments/cifar100/paper.yaml')
    tab.add_argument('--plot', help='also draw accuracy per method as a PNG at this path')
    tab.add_argument('--format', help='markdown (default), csv or json (default with --output: from its extension)')
    tab.add_argument('--output', help='write the table to this file (atomically) instead of printing it')
    tab.set_defaults(func=_table)
    push = sub.add_parser('push', help="upload a finished run's student (its timm model folder) to the Hugging Face "
                                       "Hub")
    push.add_argument('run', help='run directory (holding student/)')
    push.add_argument('--repo-id', required=True, help='ORG/NAME on the Hub (created if missing)')
    push.add_argument('--private', action='store_true')
    push.add_argument('--dry-run', action='store_true', help='only list what would be uploaded')
    push.set_defaults(func=_push)
    methods = sub.add_parser('methods', help='list distillation methods: paper, defaults, needs, supported pairs')
    methods.set_defaults(func=_methods)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == 'train':  # overrides may also follow --resume / --quiet
        args.overrides += [item for item in extra if '=' in item and not item.startswith('-')]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return exit_code(lambda: args.func(args))


if __name__ == '__main__':
    sys.exit(main())
