"""Animals -> vehicles transfer on real CIFAR-10 images, then distillation of the fine-tuned teacher.

    python experiments/transfer_cifar10/run.py [--data ../shared/data/cifar10-jpeg] [--seeds 0 1 2]

1. Pretrain a teacher (cifar_resnet20) on the 6 animal classes (1,000 training images each, 15 epochs).
2. Transfer to the 4 vehicle classes with 100 labelled images per class (a different random 100 per seed) and
   evaluate on the full vehicle test set (4,000 images): from scratch; linear probe; partial fine-tune (stem and
   the first 2 of 3 stages frozen); full fine-tune with backbone lr x0.1; a logistic-regression probe on stored
   features; and a small student (cifar_resnet8) alone vs distilled (CE 0.1 + KD 0.9, T 4) from the fine-tuned
   teacher of the same seed.
Writes runs to --output, results.json and the markdown table (mean +- std over seeds, last-epoch top-1) to stdout.
"""
import json
import os
import statistics
import sys
import time

import distill  # noqa: F401
from distill.config import from_dict
from distill.tools.probe import extract_features, feature_loaders, train_probe
from distill.models.factory import create_model
from distill.training.runtime import resolve_device
from distill.training.trainer import Trainer
from distill.config import ModelConfig, TransferConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/common.py
from common import experiment_parser, mean_std  # noqa: E402

ANIMALS = ['bird', 'cat', 'deer', 'dog', 'frog', 'horse']
VEHICLES = ['airplane', 'automobile', 'ship', 'truck']
TEACHER, STUDENT = 'cifar_resnet20', 'cifar_resnet8'
EPOCHS = 40


def recipe(args, run_name, data, student, seed, epochs, eval_every, **sections):
    cfg = dict(
        student=student, data=dict(name='imagefolder', root=args.data, image_size=32, augment='crop_flip',
                                   crop_padding=4, batch_size=64, **data),
        losses={'ce': 1.0}, optimizer=dict(name='momentum', lr=0.05, weight_decay=5e-4),
        scheduler=dict(name='cosine'),
        trainer=dict(epochs=epochs, seed=seed, output_dir=args.output, run_name=run_name, device='cpu',
                     progress=False, eval_every=eval_every))
    cfg.update(sections)
    return from_dict(cfg)


def train(cfg):
    """Run (or reuse a finished) training run; returns its summary and wall time."""
    summary_path = os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name, 'summary.json')
    if os.path.isfile(summary_path):
        summary = json.load(open(summary_path))
        return summary, summary.get('train_time_s', float('nan'))
    started = time.perf_counter()
    summary = Trainer(cfg, quiet=True).fit()
    return summary, time.perf_counter() - started


def main():
    parser = experiment_parser(__doc__, 'runs/transfer_cifar10')
    args = parser.parse_args()
    args.data = os.path.abspath(args.data)
    started_all = time.perf_counter()

    pretrain = recipe(args, 'pretrain-animals', dict(classes=ANIMALS, train_per_class=1000, val_per_class=200),
                      {'name': TEACHER}, seed=0, epochs=15, eval_every=5)
    pretrain_summary, pretrain_time = train(pretrain)
    weights = os.path.join(args.output, 'pretrain-animals', 'student_best.safetensors')
    print(f"pretrained {TEACHER} on {len(ANIMALS)} animal classes: top-1 {pretrain_summary['best_top1']:.2f} "
          f"({pretrain_time:.0f}s)")

    results = {}
    for seed in args.seeds:
        vehicles = dict(classes=VEHICLES, train_per_class=100, subset_seed=seed)

        def run(name, student, **sections):
            cfg = recipe(args, f'{name}-seed{seed}', vehicles, student, seed, EPOCHS, 10, **sections)
            summary, seconds = train(cfg)
            results.setdefault(name, []).append({'top1': summary['last_top1'], 'best': summary['best_top1'],
                                                 'seconds': seconds})
            print(f"seed {seed} {name}: top-1 {summary['last_top1']:.2f} ({seconds:.0f}s)")

        pretrained = {'name': TEACHER, 'checkpoint': weights}
        run('from scratch', {'name': TEACHER})
        run('linear probe', pretrained, transfer={'new_head': True, 'freeze': 'linear_probe'})
        run('partial fine-tune', pretrained, transfer={'new_head': True, 'freeze': 'partial', 'frozen_stages': 2})
        run('full fine-tune, backbone lr x0.1', pretrained, transfer={'new_head': True, 'backbone_lr_scale': 0.1})

        started = time.perf_counter()  # stored-feature probe: one frozen pass, then L-BFGS
        data_cfg = recipe(args, 'probe', vehicles, pretrained, seed, 1, 1).data
        data_cfg.augment = 'none'
        train_loader, val_loader = feature_loaders(data_cfg)
        model = create_model(ModelConfig(**pretrained), len(VEHICLES), 'model', TransferConfig(new_head=True))
        device = resolve_device('cpu')
        train_f, val_f = extract_features(model, train_loader, device), extract_features(model, val_loader, device)
        probe = train_probe(train_f['features'], train_f['labels'], val_f['features'], val_f['labels'])
        results.setdefault('stored-feature probe', []).append(
            {'top1': probe['val_top1'], 'best': probe['val_top1'], 'seconds': time.perf_counter() - started})
        print(f"seed {seed} stored-feature probe: top-1 {probe['val_top1']:.2f}")

        teacher_weights = os.path.join(args.output, f'full fine-tune, backbone lr x0.1-seed{seed}',
                                       'student_best.safetensors')
        run(f'student {STUDENT} alone', {'name': STUDENT})
        run(f'student {STUDENT} + KD from the fine-tuned teacher', {'name': STUDENT},
            teacher={'name': TEACHER, 'checkpoint': teacher_weights},
            losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}})

    total = time.perf_counter() - started_all
    json.dump({'pretrain': pretrain_summary, 'results': results, 'total_seconds': total},
              open(os.path.join(args.output, 'results.json'), 'w'), indent=1)
    print(f"\n| method (vehicles, 100 images/class, {len(args.seeds)} seeds) | top-1 (mean +- std) | seconds/run |")
    print('|---|---|---|')
    for name, rows in results.items():
        print(f"| {name} | {mean_std([r['top1'] for r in rows])} | {statistics.mean(r['seconds'] for r in rows):.1f} |")
    print(f"\ntotal wall time {total / 60:.1f} min (pretraining {pretrain_time:.0f}s)")


if __name__ == '__main__':
    main()
