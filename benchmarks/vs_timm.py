"""KD side by side with timm's own training script: ``train.py --kd-model-name`` vs ``distill train``.

    python benchmarks/vs_timm.py --timm-train PATH/TO/timm/train.py [--data ../shared/data/cifar10-jpeg]
        [--per-class 500 --val-per-class 100 --epochs 3 --seeds 0 1 2 --image-size 32] [--distill-type token]

timm's train.py is not in the timm wheel: pass the file of the timm release you compare with (the repository's
``train.py`` at its tag), and say which in the results. Steps, all on the same ImageFolder subset of the shared
CIFAR-10 JPEGs (the first ``--per-class`` training and ``--val-per-class`` test images of each class, linked into
``--output``):

1. ``distill train`` trains the teacher (``--teacher``) for ``--teacher-epochs``; its exported folder is the teacher
   of every run below, loaded by both tools as ``local-dir:<run>/student`` (timm's ``create_model`` format).
2. Per seed, interleaved in one loop so the machine's load hits every tool alike, the student (``--student``, from
   scratch) for ``--epochs`` with CE 0.1 + KD 0.9 at T 4, SGD (lr 0.05, momentum 0.9, no Nesterov, weight decay 5e-4
   off biases and norms), cosine per epoch to 0, no warm-up, no label smoothing, batch 64, ImageNet mean/std (the
   teacher's too, so neither re-normalises), every epoch evaluated and checkpointed:
   - ``timm``: train.py --kd-model-name ... --kd-distill-type logit, RandomResizedCrop + flip (bilinear, no colour
     jitter), ``--workers`` loader processes, validation resized by 1/0.875 and centre-cropped;
   - ``distill streamed``: ``data.in_memory: false``, the same augmentation (``random_resized_crop``), workers and
     validation;
   - ``distill in memory``: the images resident, crop (pad 4) + flip batched on the device (timm's train.py has no
     pad-crop; this is distill's CIFAR path), validation on the 32 px images as they are.
   With ``--distill-type token`` the student is a small distilled DeiT (``deit_tiny_distilled_patch16_224`` with
   ``TOKEN_STUDENT`` 's arguments: 4-px patches, 4 blocks of width 96) and the loss DeiT's hard distillation, the
   official weights: timm ``--kd-distill-type token --kd-token-distill-type hard``, task and distillation weights
   0.5; distill ``losses={ce: 0.5, deit: {weight: 0.5, mode: hard}}``. Both evaluate the average of the two heads.
Each run's wall time is its whole process, from start to exit (imports, reading the data, training, evaluation,
checkpoints), so no tool's timer is trusted; peak memory is the training process's maximum resident set (without
loader workers). Prints a table of seconds, img/s and top-1 per run, and each tool's time as a ratio to timm's in
the same seed.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import SHARED_CIFAR10  # noqa: E402
from distill.data.imagefolder import link_subset  # noqa: E402

TOKEN_STUDENT = ('deit_tiny_distilled_patch16_224', {'patch_size': 4, 'depth': 4, 'embed_dim': 96, 'num_heads': 3})
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Runs a script or module in this interpreter and reports its peak resident memory on exit (SystemExit included).
PEAK = ("import atexit, resource, runpy, sys\n"
        "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "file=sys.stderr))\n"
        "target, sys.argv = sys.argv[1], sys.argv[1:]\n"
        "runpy.run_path(target, run_name='__main__') if target.endswith('.py') else "
        "runpy.run_module(target, run_name='__main__', alter_sys=True)\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--timm-train', required=True, help="timm's train.py (from the release's repository tag)")
    parser.add_argument('--data', default=SHARED_CIFAR10, help='ImageFolder root with train/ and test/')
    parser.add_argument('--per-class', type=int, default=500)
    parser.add_argument('--val-per-class', type=int, default=100)
    parser.add_argument('--teacher', default='resnet10t')
    parser.add_argument('--teacher-epochs', type=int, default=5)
    parser.add_argument('--student', default='resnet10t')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--image-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--distill-type', choices=('logit', 'token'), default='logit',
                        help="timm's --kd-distill-type: logit (KD) or token (DeiT's hard distillation, a DeiT student)")
    parser.add_argument('--output', default='runs/vs_timm')
    args = parser.parse_args()
    args.student_kwargs = {}
    if args.distill_type == 'token':
        args.student, args.student_kwargs = TOKEN_STUDENT[0], {'img_size': args.image_size, **TOKEN_STUDENT[1]}
    return args


def run(command: list, log: str) -> dict:
    """Run ``command`` (a script or module run by PEAK) to its end: wall seconds and peak RSS (MiB)."""
    started = time.perf_counter()
    with open(log, 'w') as out:
        result = subprocess.run([sys.executable, '-c', PEAK, *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")
    peak = [line for line in open(log) if line.startswith('PEAK_RSS_KB')]
    return {'seconds': seconds, 'peak_mib': int(peak[-1].split()[1]) / 1024 if peak else None}


def distill_command(args, data_root: str, run_name: str, *overrides: str) -> list:
    return ['distill', 'train', os.path.join(HERE, 'vs_timm.yaml'), f'data.root={data_root}',
            f'data.image_size={args.image_size}', f'student.name={args.student}', f'trainer.epochs={args.epochs}',
            f'trainer.output_dir={args.output}', f'trainer.run_name={run_name}', f'data.workers={args.workers}',
            f'data.mean={list(IMAGENET_MEAN)}', f'data.std={list(IMAGENET_STD)}', *overrides]


def kd_terms(args) -> tuple:
    """(timm train.py arguments, distill overrides) for the same distillation loss."""
    if args.distill_type == 'token':
        model_kwargs = [f'{key}={value}' for key, value in args.student_kwargs.items()]
        timm = ['--kd-distill-type', 'token', '--kd-token-distill-type', 'hard', '--distill-loss-weight', '0.5',
                '--task-loss-weight', '0.5', '--model-kwargs', *model_kwargs]
        return timm, ['losses={ce: 0.5, deit: {weight: 0.5, mode: hard}}',
                      f'student.kwargs={json.dumps(args.student_kwargs)}']
    return (['--kd-distill-type', 'logit', '--kd-temperature', '4', '--distill-loss-weight', '0.9',
             '--task-loss-weight', '0.1'], ['losses={ce: 0.1, kd: {weight: 0.9, temperature: 4.0}}'])


def timm_command(args, data_root: str, teacher: str, seed: int, name: str, classes: int) -> list:
    return [os.path.abspath(args.timm_train), '--data-dir', data_root, '--train-split', 'train', '--val-split',
            'test', '--model', args.student, '--num-classes', str(classes), '--input-size', '3', str(args.image_size),
            str(args.image_size), '--crop-pct', '0.875', '--mean', *map(str, IMAGENET_MEAN), '--std',
            *map(str, IMAGENET_STD), '--kd-model-name', f'local-dir:{teacher}', *kd_terms(args)[0], '--smoothing', '0',
            '--opt', 'momentum', '--lr', '0.05', '--momentum', '0.9', '--weight-decay', '5e-4', '--sched', 'cosine',
            '--epochs', str(args.epochs), '--warmup-epochs', '0', '--cooldown-epochs', '0', '--min-lr', '0',
            '--scale', '0.08', '1.0', '--hflip', '0.5', '--color-jitter', '0', '--train-interpolation', 'bilinear',
            '--interpolation', 'bilinear',
            '--batch-size', '64', '--validation-batch-size', '256', '--workers', str(args.workers),
            '--no-prefetcher', '--device', 'cpu', '--seed', str(seed), '--log-interval', '1000',
            '--checkpoint-hist', '1', '--output', args.output, '--experiment', name]


def timm_top1(args, name: str) -> float:
    with open(os.path.join(args.output, name, 'summary.csv')) as rows:
        return float(list(csv.DictReader(rows))[-1]['eval_top1'])


def distill_top1(args, name: str) -> float:
    with open(os.path.join(args.output, name, 'metrics.jsonl')) as lines:
        return [json.loads(line) for line in lines][-1]['val_top1']


def main() -> None:
    args = parse_args()
    os.makedirs(args.output, exist_ok=True)
    data_root = link_subset(args.data, os.path.join(os.path.abspath(args.output), 'data'),
                            {'train': args.per_class, 'test': args.val_per_class})
    classes = len(os.listdir(os.path.join(data_root, 'train')))
    teacher_run = f'teacher-{args.teacher}-{args.image_size}px'
    teacher = os.path.join(os.path.abspath(args.output), teacher_run, 'student')
    if not os.path.isfile(os.path.join(teacher, 'model.safetensors')):
        command = distill_command(args, data_root, teacher_run, f'student.name={args.teacher}',
                                  f'trainer.epochs={args.teacher_epochs}')
        print('teacher:', run(command, os.path.join(args.output, f'{teacher_run}.log')))
    kd = [f'teacher.name=local-dir:{teacher}', 'teacher.pretrained=true', *kd_terms(args)[1]]
    tools = {
        'timm': lambda seed, name: timm_command(args, data_root, teacher, seed, name, classes),
        'distill streamed': lambda seed, name: distill_command(
            args, data_root, name, f'trainer.seed={seed}', *kd, 'data.in_memory=false',
            'data.augment=random_resized_crop', 'data.eval_crop_pct=0.875'),
        'distill in memory': lambda seed, name: distill_command(
            args, data_root, name, f'trainer.seed={seed}', *kd),
    }
    results = []
    for seed in args.seeds:
        for tool, command in tools.items():
            name = f"{tool.replace(' ', '-')}-{args.distill_type}-{args.image_size}px-seed{seed}-{int(time.time())}"
            measured = run(command(seed, name), os.path.join(args.output, f'{name}.log'))
            top1 = timm_top1(args, name) if tool == 'timm' else distill_top1(args, name)
            images = args.per_class * classes * args.epochs
            results.append(dict(tool=tool, seed=seed, top1=top1, img_per_s=images / measured['seconds'], **measured))
            print(json.dumps(results[-1]), flush=True)
    report(results)
    with open(os.path.join(args.output, 'results.json'), 'w') as out:
        json.dump({'args': vars(args), 'runs': results}, out, indent=1)


def report(results: list) -> None:
    print('\n| tool | s per run | img/s (end to end) | / timm (same seed) | peak RSS MiB | top-1 |')
    print('|---|---|---|---|---|---|')
    timm_seconds = {r['seed']: r['seconds'] for r in results if r['tool'] == 'timm'}
    for tool in dict.fromkeys(r['tool'] for r in results):
        rows = [r for r in results if r['tool'] == tool]
        speedups = [timm_seconds[r['seed']] / r['seconds'] for r in rows]
        top1 = [r['top1'] for r in rows]
        spread = f" ± {statistics.stdev(top1):.1f}" if len(top1) > 1 else ''
        print(f"| {tool} | {statistics.mean(r['seconds'] for r in rows):.1f} | "
              f"{statistics.mean(r['img_per_s'] for r in rows):.0f} | "
              f"{statistics.mean(speedups):.2f}x ({', '.join(f'{s:.2f}' for s in speedups)}) | "
              f"{max(r['peak_mib'] or 0 for r in rows):.0f} | {statistics.mean(top1):.1f}{spread} |")


if __name__ == '__main__':
    main()
