"""DeiT's distillation token on a CPU: a small distilled DeiT trained from a CNN teacher with no token distillation,
soft distillation and hard distillation (Touvron et al., ICML 2021, Table 3: hard beats soft with a convnet
teacher), on the shared CIFAR-10 images.

    python experiments/deit_cifar10/run.py [--data ../shared/data/cifar10-jpeg] [--seeds 0 1 2] [--jobs 2]

1. A small ImageFolder tree of links: the first ``--per-class`` training and ``--test-per-class`` test images of
   each class.
2. The teacher, cifar_resnet20, trained in memory (crop + flip) on those training images (as
   experiments/replay_cifar10).
3. Students: ``deit_tiny_distilled_patch16_224`` at 32 px with 4-px patches (64 patches + class and distillation
   tokens), ``--depth`` blocks of width ``--width`` (3 heads), from scratch, AdamW + cosine with warm-up, crop +
   flip, per seed:
   - ``none``: CE alone (the distillation head trains as timm's forward gives it, averaged with the class head);
   - ``soft``: CE 0.9 on the class token + 0.1 T^2 KL(teacher || distillation token) at T 3 (the paper's soft
     setting, lambda 0.1 and tau 3: ``losses.deit.mode: soft``);
   - ``hard``: CE 0.5 on the class token + 0.5 CE between the distillation token and the teacher's argmax (the
     paper's DeiT⚗, ``mode: hard``).
   Each run is a ``distill train`` process (``--jobs`` at a time), reused when finished.
4. Top-1 of the averaged heads (what timm's inference returns) on the test images, and how often the distillation
   head's argmax agrees with the teacher's, for a freshly initialised student and after training.
Writes results.json to --output and the markdown table to stdout.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import timm
import torch
import yaml

from distill.config import from_dict
from distill.data import build_eval_loader
from distill.data.imagefolder import link_subset
from distill.runs.directory import RunDir
from distill.training.evaluation import evaluate as top1_of

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/common.py
from common import experiment_parser, mean_std  # noqa: E402

TEACHER, STUDENT = 'cifar_resnet20', 'deit_tiny_distilled_patch16_224'
MODES = {'none': {'ce': 1.0},
         'soft': {'ce': 0.9, 'deit': {'weight': 0.1, 'mode': 'soft', 'temperature': 3.0}},
         'hard': {'ce': 0.5, 'deit': {'weight': 0.5, 'mode': 'hard'}}}


def recipe(args, root: str, run_name: str, seed: int, **sections) -> dict:
    student = {'name': STUDENT, 'kwargs': {'img_size': 32, 'patch_size': 4, 'depth': args.depth,
                                           'embed_dim': args.width, 'num_heads': 3}}
    return {'student': student, 'losses': {'ce': 1.0},
            'data': {'name': 'imagefolder', 'root': root, 'image_size': 32, 'batch_size': 64},
            'optimizer': {'name': 'adamw', 'lr': args.lr, 'weight_decay': 0.05, 'filter_bias_and_bn': True},
            'scheduler': {'name': 'cosine', 'warmup_epochs': 2, 'warmup_lr': 1e-6, 'min_lr': 1e-5},
            'trainer': {'epochs': args.epochs, 'seed': seed, 'output_dir': args.output, 'run_name': run_name,
                        'device': 'cpu', 'progress': False, 'eval_every': args.epochs}, **sections}


def train(args, cfg: dict) -> str:
    """``distill train`` of ``cfg`` unless its run finished; the run directory."""
    run = RunDir.of(from_dict(cfg))
    if not os.path.isfile(run.summary):
        path = os.path.join(args.output, f"{cfg['trainer']['run_name']}.yaml")
        with open(path, 'w') as out:
            yaml.safe_dump(cfg, out)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
        resume = ['--resume'] if os.path.isfile(run.last) else []
        with open(os.path.join(args.output, f"{cfg['trainer']['run_name']}.log"), 'a') as log:
            subprocess.run([sys.executable, '-m', 'distill', 'train', path, *resume], env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=True)
    return run.path


@torch.no_grad()
def evaluate(student, teacher, loader) -> dict:
    """Top-1 of the averaged heads, and the share of test images whose distillation-head argmax is the teacher's."""
    student.eval(), teacher.eval()
    right = agree = count = 0
    for batch in loader:
        tokens = student.forward_features(batch.images)
        class_logits, distillation_logits = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
        right += ((class_logits + distillation_logits) / 2).argmax(1).eq(batch.labels).sum().item()
        agree += distillation_logits.argmax(1).eq(teacher(batch.images).argmax(1)).sum().item()
        count += len(batch.labels)
    return {'top1': 100.0 * right / count, 'teacher_agreement': 100.0 * agree / count}


def main():
    parser = experiment_parser(__doc__, 'runs/deit_cifar10')
    parser.add_argument('--per-class', type=int, default=250)
    parser.add_argument('--test-per-class', type=int, default=100)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--teacher-epochs', type=int, default=30)
    parser.add_argument('--depth', type=int, default=4)
    parser.add_argument('--width', type=int, default=96, help='embedding width (DeiT-Ti: 192), 3 heads')
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--jobs', type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    root = link_subset(args.data, os.path.abspath(os.path.join(args.output, 'data')),
                       {'train': args.per_class, 'test': args.test_per_class})
    teacher_recipe = recipe(args, root, 'teacher', 0, student={'name': TEACHER},
                            optimizer={'name': 'momentum', 'lr': 0.1, 'weight_decay': 5e-4},
                            scheduler={'name': 'cosine'})
    teacher_recipe['trainer']['epochs'] = teacher_recipe['trainer']['eval_every'] = args.teacher_epochs
    teacher_run = train(args, teacher_recipe)
    teacher_weights = os.path.join(teacher_run, 'student_best.safetensors')
    runs = {(mode, seed): recipe(args, root, f'{mode}-seed{seed}', seed, losses=losses,
                                 teacher={'name': TEACHER, 'checkpoint': teacher_weights})
            for seed in args.seeds for mode, losses in MODES.items()}
    for cfg in runs.values():
        if cfg['losses'] == MODES['none']:
            cfg.pop('teacher')
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = dict(zip(runs, pool.map(lambda cfg: train(args, cfg), runs.values())))

    teacher = exported(teacher_run)
    mean, std = (torch.tensor(teacher.pretrained_cfg[key]) for key in ('mean', 'std'))  # every run's: same images
    loader = build_eval_loader(from_dict(teacher_recipe).data, mean, std)
    results = {'teacher_top1': top1_of(teacher, loader, torch.device('cpu'))['top1'], 'runs': {}}
    for (mode, seed), folder in folders.items():
        torch.manual_seed(seed)
        fresh = timm.create_model(STUDENT, num_classes=10, **runs[mode, seed]['student']['kwargs'])
        results['runs'][f'{mode}-seed{seed}'] = {'mode': mode, 'seed': seed, 'init': evaluate(fresh, teacher, loader),
                                                 'trained': evaluate(exported(folder), teacher, loader)}
    with open(os.path.join(args.output, 'results.json'), 'w') as out:
        json.dump(results, out, indent=1)
    print(f"\nteacher {TEACHER}: top-1 {results['teacher_top1']:.2f}\n")
    print(f"| {STUDENT} (32 px, patch 4, depth {args.depth}, width {args.width}), {args.epochs} epochs | top-1 | "
          f"distillation head = teacher, init -> trained |\n|---|---|---|")
    for mode in MODES:
        rows = [run for run in results['runs'].values() if run['mode'] == mode]
        print(f"| {mode} | {mean_std([r['trained']['top1'] for r in rows])} | "
              f"{mean_std([r['init']['teacher_agreement'] for r in rows])} -> "
              f"{mean_std([r['trained']['teacher_agreement'] for r in rows])} |")


def exported(run_folder: str):
    """The run's best weights as its exported timm folder loads them (``local-dir:``)."""
    return timm.create_model(f'local-dir:{os.path.join(run_folder, "student")}', pretrained=True).eval()


if __name__ == '__main__':
    main()
