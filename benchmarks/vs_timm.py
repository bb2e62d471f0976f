"""KD side by side with timm's own training script: ``train.py --kd-model-name`` vs ``distill train``.

    python benchmarks/vs_timm.py --timm-train PATH/TO/timm/train.py [--data ../shared/data/cifar10-jpeg]
        [--per-class 500 --val-per-class 100 --epochs 3 --seeds 0 1 2 --image-size 32] [--distill-type token]
        [--tools timm streamed memory warm] [--device cuda --workers 8]

timm's train.py is not in the timm wheel: pass the file of the timm release you compare with (the repository's
``train.py`` at its tag), and say which in the results. Steps, all on the same ImageFolder subset of the shared
CIFAR-10 JPEGs (the first ``--per-class`` training and ``--val-per-class`` test images of each class, linked into
``--output``):

1. ``distill train`` trains the teacher (``--teacher``) for ``--teacher-epochs``; its exported folder is the teacher
   of every run below, loaded by both tools as ``local-dir:<run>/student`` (timm's ``create_model`` format).
2. Per seed, interleaved in one loop so the machine's load hits every tool alike (their order rotated seed by
   seed), the student (``--student``, from scratch) for ``--epochs`` with CE 0.1 + KD 0.9 at T 4, SGD (lr 0.05,
   momentum 0.9, no Nesterov, weight decay 5e-4 off biases and norms), cosine per epoch to 0, no warm-up, no label
   smoothing, batch 64, ImageNet mean/std (the teacher's too, so neither re-normalises), every epoch evaluated and
   checkpointed:
   - ``timm``: train.py --kd-model-name ... --kd-distill-type logit, RandomResizedCrop + flip (bilinear, no colour
     jitter), ``--workers`` loader processes, validation resized by 1/0.875 and centre-cropped;
   - ``distill streamed``: ``data.in_memory: false``, the same augmentation (``random_resized_crop``), workers and
     validation;
   - ``distill in memory, filling the teacher cache``: the images resident, crop (pad 4) + flip batched on the device
     (timm's train.py has no pad-crop; this is distill's CIFAR path), validation on the 32 px images as they are;
     the teacher's logits of every view it draws go to a teacher cache (``<output>/cache``);
   - ``distill in memory, warm teacher cache``: the same run again, as the next method or student of a grid on the
     same seed runs: every view it draws is in the cache, so no teacher forward pass runs.
   With ``--distill-type token`` the student is a small distilled DeiT (``deit_tiny_distilled_patch16_224`` with
   ``TOKEN_STUDENT`` 's arguments: 4-px patches, 4 blocks of width 96) and the loss DeiT's hard distillation, the
   official weights: timm ``--kd-distill-type token --kd-token-distill-type hard``, task and distillation weights
   0.5; distill ``losses={ce: 0.5, deit: {weight: 0.5, mode: hard}}``. Both evaluate the average of the two heads.
Each run is timed from outside, so no tool's timer is trusted: its whole process from start to exit (imports, reading
the data, training, evaluation, checkpoints), and its steady epoch, the mean interval between the epoch lines it
writes after each evaluation (timm's summary.csv, distill's metrics.jsonl: training, evaluation and checkpoint of
every epoch after the first). Peak memory is the training process's maximum resident set (without loader workers).
Prints a table of both times per run, each as a ratio to timm's in the same seed, peak memory and top-1.
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
TOOLS = {'timm': 'timm', 'streamed': 'distill streamed', 'memory': 'distill in memory, filling the teacher cache',
         'warm': 'distill in memory, warm teacher cache'}
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
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='cuda: both in bf16 autocast with channels_last, timm with its prefetcher (its fast path)')
    parser.add_argument('--distill-type', choices=('logit', 'token'), default='logit',
                        help="timm's --kd-distill-type: logit (KD) or token (DeiT's hard distillation, a DeiT student)")
    parser.add_argument('--tools', nargs='+', choices=TOOLS, default=list(TOOLS),
                        help='which runs, in this order within each seed (warm reads the cache that memory fills)')
    parser.add_argument('--output', default='runs/vs_timm')
    args = parser.parse_args()
    if 'timm' not in args.tools:
        parser.error('--tools needs timm: every ratio is to its run of the same seed')
    args.student_kwargs = {}
    if args.distill_type == 'token':
        args.student, args.student_kwargs = TOKEN_STUDENT[0], {'img_size': args.image_size, **TOKEN_STUDENT[1]}
    return args


def run(command: list, log: str, epochs_file: str) -> dict:
    """Run ``command`` (a script or module run by PEAK) to its end: wall seconds, peak RSS (MiB), and the steady
    epoch time: the mean interval between the appearances of successive epoch lines in ``epochs_file`` (timm's
    summary.csv, distill's metrics.jsonl, each written once per epoch after its evaluation), watched every 20 ms from
    outside, so it spans each epoch's training, evaluation and checkpoint and no tool's own timer is trusted."""
    started = time.perf_counter()
    seen, epoch_ends = 0, []
    with open(log, 'w') as out:
        process = subprocess.Popen([sys.executable, '-c', PEAK, *command], stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(0.02)
            lines = epoch_lines(epochs_file)
            if lines > seen:
                seen, epoch_ends = lines, epoch_ends + [time.perf_counter()] * (lines - seen)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}; see {log}")
    peak = [line for line in open(log) if line.startswith('PEAK_RSS_KB')]
    intervals = [end - start for start, end in zip(epoch_ends, epoch_ends[1:])]
    return {'seconds': seconds, 'epoch_seconds': statistics.mean(intervals) if intervals else None,
            'peak_mib': int(peak[-1].split()[1]) / 1024 if peak else None}


def epoch_lines(path: str) -> int:
    """Epochs on record in ``path`` so far: its complete lines, less summary.csv's header."""
    try:
        with open(path) as lines:
            complete = sum(1 for line in lines if line.endswith('\n'))
    except FileNotFoundError:
        return 0
    return max(0, complete - 1) if path.endswith('.csv') else complete


def distill_command(args, data_root: str, run_name: str, *overrides: str) -> list:
    return ['distill', 'train', os.path.join(HERE, 'vs_timm.yaml'), f'data.root={data_root}',
            f'data.image_size={args.image_size}', f'student.name={args.student}', f'trainer.epochs={args.epochs}',
            f'trainer.output_dir={args.output}', f'trainer.run_name={run_name}', f'data.workers={args.workers}',
            f'data.mean={list(IMAGENET_MEAN)}', f'data.std={list(IMAGENET_STD)}', f'trainer.device={args.device}',
            f"trainer.precision={'fp32' if args.device == 'cpu' else 'bf16'}", *overrides]


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
            *device_flags(args), '--seed', str(seed), '--log-interval', '1000',
            '--checkpoint-hist', '1', '--output', args.output, '--experiment', name]


def device_flags(args) -> list:
    """timm's settings for the device: on CPU fp32 and its plain loader; on CUDA bf16 autocast, channels_last and
    the prefetcher, as distill's defaults there (``trainer.channels_last`` auto, the side-stream prefetch)."""
    if args.device == 'cpu':
        return ['--no-prefetcher', '--device', 'cpu']
    return ['--device', 'cuda', '--amp', '--amp-dtype', 'bfloat16', '--channels-last']


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
        print('teacher:', run(command, os.path.join(args.output, f'{teacher_run}.log'),
                              os.path.join(args.output, teacher_run, 'metrics.jsonl')))
    kd = [f'teacher.name=local-dir:{teacher}', 'teacher.pretrained=true', *kd_terms(args)[1]]
    # The cache holds the teacher's logits per (image, crop, flip): a run fills it with the views its seed draws
    # and a later run of the same seed (another method of a grid, another student) reads every one of them.
    cache = ['teacher_cache.enabled=true', f"teacher_cache.dir={os.path.join(os.path.abspath(args.output), 'cache')}"]
    commands = {
        'timm': lambda seed, name: timm_command(args, data_root, teacher, seed, name, classes),
        'streamed': lambda seed, name: distill_command(
            args, data_root, name, f'trainer.seed={seed}', *kd, 'data.in_memory=false',
            'data.augment=random_resized_crop', 'data.eval_crop_pct=0.875'),
        'memory': lambda seed, name: distill_command(args, data_root, name, f'trainer.seed={seed}', *kd, *cache),
    }
    commands['warm'] = commands['memory']  # the same run, after the cache holds its views
    results = []
    for turn, seed in enumerate(args.seeds):
        for key in rotated(args.tools, turn):
            tool, command = TOOLS[key], commands[key]
            name = f"{tool.split(',')[0].replace(' ', '-')}-{args.distill_type}-{args.image_size}px-seed{seed}-" \
                   f"{int(time.time())}"
            epochs_file = os.path.join(args.output, name, 'summary.csv' if tool == 'timm' else 'metrics.jsonl')
            measured = run(command(seed, name), os.path.join(args.output, f'{name}.log'), epochs_file)
            top1 = timm_top1(args, name) if tool == 'timm' else distill_top1(args, name)
            images = args.per_class * classes * args.epochs
            results.append(dict(tool=tool, seed=seed, top1=top1, img_per_s=images / measured['seconds'], **measured))
            print(json.dumps(results[-1]), flush=True)
    report(results)
    with open(os.path.join(args.output, 'results.json'), 'w') as out:
        json.dump({'args': vars(args), 'runs': results}, out, indent=1)


def rotated(tools: list, turn: int) -> list:
    """``tools`` in the order of seed number ``turn``: rotated by one run each seed (warm stays right after memory,
    whose cache it reads), so no tool always runs after the same other one (a run that follows timm's measured 3-10%
    slower than one that precedes it)."""
    paired = 'memory' in tools and 'warm' in tools
    units = [[key, 'warm'] if key == 'memory' and paired else [key] for key in tools if not (key == 'warm' and paired)]
    shift = turn % len(units)
    return [key for unit in units[shift:] + units[:shift] for key in unit]


def report(results: list) -> None:
    print('\n| tool | s per epoch | / timm (same seed) | s per run | / timm (same seed) | peak RSS MiB | top-1 |')
    print('|---|---|---|---|---|---|---|')
    timm = {r['seed']: r for r in results if r['tool'] == 'timm'}
    for tool in dict.fromkeys(r['tool'] for r in results):
        rows = [r for r in results if r['tool'] == tool]
        top1 = [r['top1'] for r in rows]
        spread = f" ± {statistics.stdev(top1):.1f}" if len(top1) > 1 else ''
        columns = [f"{statistics.mean(r[key] for r in rows):.1f} | {speedup(rows, timm, key)}"
                   if all(r[key] for r in rows) else '- | -' for key in ('epoch_seconds', 'seconds')]
        print(f"| {tool} | {' | '.join(columns)} | {max(r['peak_mib'] or 0 for r in rows):.0f} | "
              f"{statistics.mean(top1):.1f}{spread} |")


def speedup(rows: list, timm: dict, key: str) -> str:
    """The mean of timm's time over each row's, seed by seed, and the seeds' ratios."""
    ratios = [timm[r['seed']][key] / r[key] for r in rows]
    return f"{statistics.mean(ratios):.2f}x ({', '.join(f'{ratio:.2f}' for ratio in ratios)})"


if __name__ == '__main__':
    main()
