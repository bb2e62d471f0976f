"""``distill demo``: train a teacher, a baseline student and a KD student on data that needs no download,
print a table of their top-1 and save a PNG of the accuracy curves.

Default data: scikit-learn's bundled 8x8 digits (3 channels, 1,437 train / 360 test images). ``--data DIR``
uses any ImageFolder tree instead (e.g. ../shared/data/cifar10-jpeg at 32x32, a subset per class).
"""
import json
import os
from typing import Any, Dict, List, Optional

import yaml

from ..config import from_dict, to_dict
from ..errors import DistillError
from ..runs.directory import FINISHED, INTERRUPTED, RunDir, with_defaults
from ..training.trainer import Trainer

TEACHER, STUDENT = 'cifar_resnet8x4', 'cifar_resnet8'
IMAGEFOLDER_TEACHER = 'cifar_resnet20'  # at 32x32 on CPU, resnet8x4 is 4x slower for a similar accuracy here
STUDENT_FRACTION = 0.2


def demo_configs(data_dir: Optional[str], output_dir: str, epochs: Optional[int], seed: int,
                 train_per_class: Optional[int]) -> Dict[str, Dict[str, Any]]:
    if data_dir is None:
        data = dict(name='digits', image_size=8, augment='crop', crop_padding=1, batch_size=64)
        epochs = epochs or 30
    else:
        data = dict(name='imagefolder', root=data_dir, image_size=32, augment='crop_flip', crop_padding=4,
                    batch_size=64, train_per_class=train_per_class or 500, val_per_class=200)
        epochs = epochs or 20
    common = dict(
        data=data,
        optimizer=dict(name='momentum', lr=0.05, weight_decay=5e-4),
        scheduler=dict(name='cosine', warmup_epochs=0, min_lr=0.0),
        trainer=dict(epochs=epochs, seed=seed, output_dir=output_dir, device='cpu'),
    )
    teacher_weights = RunDir(output_dir, 'teacher').student_weights('best')
    # Both students see the same STUDENT_FRACTION of the teacher's training images: the setting of Hinton et
    # al. (2015, section 5), where soft targets let a model generalise from a small part of the training set.
    student_data = dict(data, train_per_class=max(1, int(STUDENT_FRACTION * data.get('train_per_class', 144))))
    teacher_name = TEACHER if data_dir is None else IMAGEFOLDER_TEACHER
    student = dict(common, data=student_data, student=dict(name=STUDENT))
    return {
        'teacher': dict(common, student=dict(name=teacher_name), losses={'ce': 1.0}),
        'student': dict(student, losses={'ce': 1.0}),
        'student+KD': dict(student, teacher=dict(name=teacher_name, checkpoint=teacher_weights),
                           losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}),
    }


def plot_curves(histories: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        evaluated = [r for r in history if 'val_top1' in r]
        ax.plot([r['epoch'] for r in evaluated], [r['val_top1'] for r in evaluated], label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title('distill demo: teacher, student alone, student + KD')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(data_dir: Optional[str] = None, output_dir: str = 'runs/demo', epochs: Optional[int] = None,
             seed: int = 0, train_per_class: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    configs = demo_configs(data_dir, output_dir, epochs, seed, train_per_class)
    summaries, histories = {}, {}
    for label, raw in configs.items():
        cfg = from_dict(raw)
        cfg.trainer.run_name = label.replace('+', '_')
        run_dir = RunDir.of(cfg)
        state = run_dir.state(cfg.trainer.epochs)
        if state == FINISHED:  # a finished stage is reused, so the demo can be re-run cheaply
            with open(run_dir.resolved) as f:
                if with_defaults(yaml.safe_load(f)) != to_dict(cfg):
                    raise DistillError(f"{run_dir.path} holds a demo run with other settings; pass --output <new dir>")
            print(f"[{label}] reusing finished run {run_dir.path}")
            with open(run_dir.summary) as f:
                trainer_summary = json.load(f)
        else:
            teacher = f" with teacher {cfg.teacher.name}" if cfg.teacher else ''
            print(f"[{label}] training {cfg.student.name}{teacher}")
            trainer_summary = Trainer(cfg, resume=state == INTERRUPTED, quiet=True).fit()
        summaries[label] = trainer_summary
        with open(run_dir.metrics) as f:
            histories[label] = [json.loads(line) for line in f]
    plot_path = os.path.join(output_dir, 'demo_curves.png')
    plot_curves(histories, plot_path)
    rows = ['| model | architecture | best top-1 | last top-1 |', '|---|---|---|---|']
    for label, summary in summaries.items():
        rows.append(f"| {label} | {summary['student']} | {summary['best_top1']:.2f} | {summary['last_top1']:.2f} |")
    table = '\n'.join(rows)
    gain = summaries['student+KD']['best_top1'] - summaries['student']['best_top1']
    table += f"\n\nKD vs student alone: {gain:+.2f} top-1 (best epoch), same seed {seed}."
    with open(os.path.join(output_dir, 'demo_table.md'), 'w') as f:
        f.write(table + '\n')
    print('\n' + table)
    print(f"\ncurves: {plot_path}")
    return summaries
