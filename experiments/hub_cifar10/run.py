"""A pretrained timm teacher from a folder (``local-dir:``), distilled into a timm student of another family with
another normalisation and input size, on the shared CIFAR-10 images.

    python experiments/hub_cifar10/run.py [--data ../shared/data/cifar10-jpeg] [--seeds 0 1 2]

1. Pretrain the teacher, timm ``resnet10t`` at 64 px with its own normalisation (mean = std = 0.5, as many
   timm/Hub weights), on 500 training images per class; its run exports ``student/`` with timm's ``save_for_hf``
   (``config.json``: mean/std 0.5, input size 64) - the shape of any timm model folder or Hub repo.
2. Per seed, the student, timm ``test_efficientnet`` (an EfficientNet of 0.1 M parameters) at 32 px on the first
   250 training images per class, normalised with those images' statistics: trained alone, and distilled (CE 0.1 +
   KD 0.9, T 4) from ``local-dir:<teacher run>/student`` with ``pretrained: true``, which sees the same batches
   re-normalised with its own statistics and resized to 64 px. Both evaluated on the 10,000 test images.
3. The distilled student's exported folder is loaded in a fresh process by timm alone (no ``import distill``) and
   must give the logits of the run's best weights.
Writes the runs to --output, results.json there, and the markdown table to stdout.
"""
import json
import os
import subprocess
import sys

import torch

from distill.config import from_dict
from distill.sweeps.stages import ensure_trained
from distill.runs.directory import RunDir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/common.py
from common import experiment_parser, mean_std  # noqa: E402

TEACHER, STUDENT = 'resnet10t', 'test_efficientnet'
RELOAD = """
import json, sys, timm, torch
model = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    print(json.dumps(model(torch.rand(4, 3, 32, 32)).tolist()))
"""


def recipe(args, run_name, seed, student, data, epochs, lr, **sections):
    """A run on the ImageFolder tree at ``args.data``: SGD + cosine, evaluated after the last epoch."""
    return from_dict({'student': student, 'losses': {'ce': 1.0},
                      'data': {'name': 'imagefolder', 'root': args.data, 'augment': 'crop_flip', 'batch_size': 64,
                               **data},
                      'optimizer': {'name': 'momentum', 'lr': lr, 'weight_decay': 5e-4}, 'scheduler': {'name': 'cosine'},
                      'trainer': {'epochs': epochs, 'seed': seed, 'output_dir': args.output, 'run_name': run_name,
                                  'device': 'cpu', 'progress': False, 'eval_every': epochs}, **sections})


def train(cfg):
    """Train ``cfg``, or reuse its finished run (same config), or resume it; returns its summary."""
    ensure_trained(cfg, cfg.trainer.run_name, quiet=True)
    return json.load(open(RunDir.of(cfg).summary))


def reloads_with_timm_alone(folder: str) -> bool:
    """A fresh process without distill loads the folder; its logits equal the best weights' in this process."""
    import timm
    from safetensors.torch import load_file
    out = subprocess.run([sys.executable, '-c', RELOAD, folder], capture_output=True, text=True, check=True)
    model = timm.create_model(STUDENT, num_classes=10).eval()
    model.load_state_dict(load_file(os.path.join(os.path.dirname(folder), 'student_best.safetensors')))
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.rand(4, 3, 32, 32))
    return torch.equal(torch.tensor(json.loads(out.stdout)), expected)


def main():
    parser = experiment_parser(__doc__, 'runs/hub_cifar10')
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    teacher = train(recipe(args, 'teacher', 0, {'name': TEACHER}, dict(
        image_size=64, crop_padding=8, train_per_class=500, mean=[0.5] * 3, std=[0.5] * 3), epochs=20, lr=0.1))
    folder = os.path.join(args.output, 'teacher', 'student')
    print(f"teacher {TEACHER} (64 px, mean/std 0.5): top-1 {teacher['best_top1']:.2f}; exported to {folder}")
    student_data = dict(image_size=32, crop_padding=4, train_per_class=250)
    rows = {'student alone': [], f'KD from local-dir:{TEACHER}': []}
    for seed in args.seeds:
        rows['student alone'].append(train(recipe(args, f'alone-seed{seed}', seed, {'name': STUDENT}, student_data,
                                                  epochs=15, lr=0.05)))
        kd = recipe(args, f'kd-seed{seed}', seed, {'name': STUDENT}, student_data, epochs=15, lr=0.05,
                    teacher={'name': f'local-dir:{folder}', 'pretrained': True}, losses={'ce': 0.1, 'kd': 0.9})
        rows[f'KD from local-dir:{TEACHER}'].append(train(kd))
    reloads = reloads_with_timm_alone(os.path.join(args.output, f'kd-seed{args.seeds[0]}', 'student'))

    print(f"\n| {STUDENT} (32 px) | seeds | best top-1 | last top-1 |\n|---|---|---|---|")
    for name, summaries in rows.items():
        print(f"| {name} | {len(summaries)} | {mean_std([s['best_top1'] for s in summaries])} | "
              f"{mean_std([s['last_top1'] for s in summaries])} |")
    print(f"\nexported KD student reloads with timm alone, same logits: {reloads}")
    json.dump({'teacher_top1': teacher['best_top1'], 'reloads_with_timm_alone': reloads,
               **{name: [{k: s[k] for k in ('seed', 'best_top1', 'last_top1')} for s in summaries]
                  for name, summaries in rows.items()}},
              open(os.path.join(args.output, 'results.json'), 'w'), indent=2)


if __name__ == '__main__':
    main()
