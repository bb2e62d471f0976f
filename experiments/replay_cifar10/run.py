"""A replayed teacher against a live one: students distilled from a recording (teacher_cache.mode replay) reach the
top-1 of students distilled from the running teacher, on streamed shared CIFAR-10 images with RandAugment.

    python experiments/replay_cifar10/run.py [--data ../shared/data/cifar10-jpeg] [--seeds 0 1 2] [--top-k 10 3]

1. A small ImageFolder tree of links: the first ``--per-class`` training and ``--test-per-class`` test images of
   each class (streaming reads whole trees).
2. The teacher, cifar_resnet20, trained in memory (crop + flip) on those training images.
3. Students, cifar_resnet8, streamed with RandomResizedCrop + flip + RandAugment (rand-m9-mstd0.5-inc1), CE 0.1 + KD
   0.9 at T 4, SGD + cosine: per seed with the live teacher (seed 0's run also records the teacher's top-k, for
   each ``--top-k``), then per seed and top-k replaying seed 0's recording (its stream; the seed sets the student's
   initialisation) without running the teacher.
Writes the runs to --output, results.json there, and the markdown table to stdout.
"""
import json
import os
import sys

import torch

from distill.config import from_dict
from distill.data.imagefolder import link_subset
from distill.sweeps.stages import ensure_trained
from distill.runs.directory import RunDir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/common.py
from common import experiment_parser, mean_std  # noqa: E402

TEACHER, STUDENT = 'cifar_resnet20', 'cifar_resnet8'


def config(args, run_name, seed, data, epochs, lr, **sections):
    return from_dict({'student': {'name': STUDENT}, 'losses': {'ce': 1.0}, 'data': data,
                      'optimizer': {'name': 'momentum', 'lr': lr, 'weight_decay': 5e-4},
                      'scheduler': {'name': 'cosine'},
                      'trainer': {'epochs': epochs, 'seed': seed, 'output_dir': args.output, 'run_name': run_name,
                                  'device': 'cpu', 'progress': False, 'eval_every': epochs}, **sections})


def top1(cfg) -> float:
    ensure_trained(cfg, cfg.trainer.run_name, quiet=True)
    return json.load(open(RunDir.of(cfg).summary))['last_top1']


def main():
    parser = experiment_parser(__doc__, 'runs/replay_cifar10')
    parser.add_argument('--top-k', type=int, nargs='+', default=[10, 3])
    parser.add_argument('--per-class', type=int, default=250)
    parser.add_argument('--test-per-class', type=int, default=100)
    parser.add_argument('--epochs', type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = link_subset(args.data, os.path.join(args.output, 'data'), {'train': args.per_class,
                                                                    'test': args.test_per_class})
    teacher_cfg = config(args, 'teacher', 0, {'name': 'imagefolder', 'root': root, 'image_size': 32}, 30, 0.1,
                         student={'name': TEACHER})
    teacher_top1 = top1(teacher_cfg)
    streamed = {'name': 'imagefolder', 'root': root, 'in_memory': False, 'workers': 2, 'image_size': 32,
                'augment': 'random_resized_crop', 'auto_augment': 'rand-m9-mstd0.5-inc1', 'batch_size': 64}
    teacher = {'name': TEACHER, 'checkpoint': RunDir.of(teacher_cfg).student_weights('best')}
    records = os.path.join(args.output, 'records')
    kd = dict(teacher=teacher, losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}})
    rows = {'live teacher': []}
    for seed in args.seeds:
        if seed == args.seeds[0]:  # the live run of the first seed records the teacher, once per top-k
            for k in args.top_k:
                cache = {'enabled': True, 'mode': 'record', 'top_k': k, 'dir': f'{records}-k{k}'}
                result = top1(config(args, f'live-seed{seed}-record-k{k}', seed, streamed, args.epochs, 0.05,
                                     teacher_cache=cache, **kd))
            rows['live teacher'].append(result)
        else:
            rows['live teacher'].append(top1(config(args, f'live-seed{seed}', seed, streamed, args.epochs, 0.05, **kd)))
    for k in args.top_k:
        rows[f'replay, top-{k}'] = [top1(config(args, f'replay-k{k}-seed{seed}', seed, streamed, args.epochs, 0.05,
                                                teacher_cache={'enabled': True, 'mode': 'replay', 'top_k': k,
                                                               'dir': f'{records}-k{k}'}, **kd))
                                    for seed in args.seeds]

    print(f"\nteacher {TEACHER}: top-1 {teacher_top1:.2f}\n\n| {STUDENT}, {args.epochs} epochs | seeds | top-1 per "
          f"seed | last top-1 |\n|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {len(values)} | {', '.join(f'{v:.2f}' for v in values)} | {mean_std(values)} |")
    json.dump({'teacher_top1': teacher_top1, **rows}, open(os.path.join(args.output, 'results.json'), 'w'), indent=2)


if __name__ == '__main__':
    main()
