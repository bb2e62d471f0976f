"""KD epoch throughput and accuracy: distill vs torchdistill, same pair, data, loss, optimizer and batch, one run.

    pip install torchdistill --no-deps && pip install scipy
    python benchmarks/vs_torchdistill.py [--data ../shared/data/cifar10-jpeg --per-class 500 --epochs 3]

1. distill trains a teacher (``--teacher``, default cifar_resnet20) on the data, so both frameworks distil from
   the same real teacher.
2. The student (``--student``, default cifar_resnet8) is distilled for ``--epochs`` epochs with CE 0.1 + KD 0.9
   at T = 4, SGD (lr 0.05, momentum 0.9, wd 5e-4, constant lr), batch 64, crop (pad 4) + flip, from the same
   initial weights:
   - torchdistill 1.1: its ``DistillationBox`` (KDLoss with alpha 0.1), its DataLoader over the same uint8 images
     with torchvision transforms (``--workers`` processes, as its CIFAR configs);
   - distill, live teacher: ``Trainer`` with its in-memory, batched augmentation;
   - distill, cached teacher: the same run with ``teacher_cache`` filled by an earlier run with the same seed (in
     a grid: the other logit methods of that seed, e.g. KD then DKD, DIST); another seed hits part of the views.
Prints train images/s of each, the ratios, and top-1 on the validation images after the last epoch.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import timm
import torch

import distill
from common import PILImages
from distill.config import from_dict
from distill.training.trainer import Trainer, evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def distill_config(args, out_dir, run_name, **sections):
    cfg = {
        'student': {'name': args.student},
        'data': {'name': 'imagefolder', 'root': args.data, 'train_per_class': args.per_class,
                 'val_per_class': args.per_class // 5, 'batch_size': 64, 'augment': 'crop_flip', 'crop_padding': 4},
        'losses': {'ce': 1.0},
        'optimizer': {'name': 'momentum', 'lr': 0.05, 'weight_decay': 5e-4},
        'scheduler': {'name': 'constant'},
        'trainer': {'epochs': args.epochs, 'seed': 0, 'output_dir': out_dir, 'run_name': run_name,
                    'device': args.device, 'progress': False},
    }
    cfg.update(sections)
    return from_dict(cfg)


def timed_distill(cfg, student_init: str):
    """Train images/s over the epochs (training only, no evaluation) and the last top-1."""
    trainer = Trainer(cfg, quiet=True)
    trainer.distiller.student.load_state_dict(torch.load(student_init, weights_only=True))
    seconds = 0.0
    for epoch in range(cfg.trainer.epochs):
        started = time.perf_counter()
        trainer.train_one_epoch(epoch)
        seconds += time.perf_counter() - started
    top1 = trainer._evaluate(trainer.distiller.student)['top1']
    images = cfg.trainer.epochs * len(trainer.data.train.split)
    return images / seconds, top1, trainer


def timed_torchdistill(args, teacher, student, split, val_split, mean, std, device):
    from torch.utils.data import RandomSampler, SequentialSampler
    from torchvision import transforms
    from torchdistill.core.distillation import get_distillation_box

    normalize = transforms.Normalize(mean.tolist(), std.tolist())
    train_tf = transforms.Compose([transforms.RandomCrop(split.images.shape[-1], padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.ToTensor(), normalize])
    datasets = {'train': PILImages(split.images, split.labels, train_tf),
                'val': PILImages(val_split.images, val_split.labels, val_tf)}
    loader = {'batch_size': 64, 'num_workers': args.workers, 'drop_last': False}
    train_config = {
        'num_epochs': args.epochs,
        'train_data_loader': {'dataset_id': 'train', 'sampler': {'class_or_func': RandomSampler, 'kwargs': {}},
                              'kwargs': loader, 'requires_supp': True},
        'val_data_loader': {'dataset_id': 'val', 'sampler': {'class_or_func': SequentialSampler, 'kwargs': {}},
                            'kwargs': {**loader, 'batch_size': 256}},
        'teacher': {'sequential': [], 'requires_grad': False, 'forward_proc': 'forward_batch_only'},
        'student': {'adaptations': None, 'sequential': [], 'requires_grad': True, 'frozen_modules': [],
                    'forward_proc': 'forward_batch_only'},
        'optimizer': {'key': 'SGD', 'kwargs': {'lr': 0.05, 'momentum': 0.9, 'weight_decay': 5e-4}},
        'criterion': {'key': 'WeightedSumLoss', 'kwargs': {'sub_terms': {'kd': {'criterion': {
            'key': 'KDLoss', 'kwargs': {'student_module_path': '.', 'student_module_io': 'output',
                                        'teacher_module_path': '.', 'teacher_module_io': 'output',
                                        'temperature': 4.0, 'alpha': 0.1, 'reduction': 'batchmean'}},
            'weight': 1.0}}}},
    }
    box = get_distillation_box(teacher, student, datasets, train_config, device, None, False, 1)
    seconds = 0.0
    for epoch in range(args.epochs):
        started = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for images, targets, supp in box.train_data_loader:
            loss = box.forward_process(images.to(device), targets.to(device), supp)
            box.post_forward_process(loss=loss)
        seconds += time.perf_counter() - started
    from distill.data import BatchLoader
    val_loader = BatchLoader(val_split, 256, mean, std, False)
    top1 = evaluate(box.student_model, val_loader, device)['top1']
    return args.epochs * len(split) / seconds, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'cifar10-jpeg'))
    parser.add_argument('--teacher', default='cifar_resnet20')
    parser.add_argument('--student', default='cifar_resnet8')
    parser.add_argument('--per-class', type=int, default=500)
    parser.add_argument('--teacher-epochs', type=int, default=8)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"data not found: {args.data}; pass --data <ImageFolder root with train/ and test/>")
    device = torch.device(args.device)
    out_dir = tempfile.mkdtemp(prefix='vs_torchdistill-')
    try:
        teacher_cfg = distill_config(args, out_dir, 'teacher', student={'name': args.teacher},
                                     optimizer={'name': 'momentum', 'lr': 0.1, 'weight_decay': 5e-4},
                                     scheduler={'name': 'cosine'})
        teacher_cfg.trainer.epochs = args.teacher_epochs
        teacher_top1 = Trainer(teacher_cfg, quiet=True).fit()['best_top1']
        teacher_file = os.path.join(out_dir, 'teacher', 'student_best.safetensors')
        torch.manual_seed(0)
        init = os.path.join(out_dir, 'student_init.pt')
        torch.save(timm.create_model(args.student, num_classes=10).state_dict(), init)

        kd = {'teacher': {'name': args.teacher, 'checkpoint': teacher_file}, 'losses': {'ce': 0.1, 'kd': 0.9}}
        cache = {'enabled': True, 'dir': os.path.join(out_dir, 'cache')}
        live_rate, live_top1, trainer = timed_distill(distill_config(args, out_dir, 'live', **kd), init)
        timed_distill(distill_config(args, out_dir, 'fill', **kd, teacher_cache=cache), init)  # an earlier run
        cached_rate, cached_top1, _ = timed_distill(distill_config(args, out_dir, 'cached', **kd,
                                                                   teacher_cache=cache), init)

        teacher = timm.create_model(args.teacher, num_classes=10)
        teacher.load_state_dict(trainer.distiller.teacher.state_dict())
        student = timm.create_model(args.student, num_classes=10)
        student.load_state_dict(torch.load(init, weights_only=True))
        data = trainer.data
        td_rate, td_top1 = timed_torchdistill(args, teacher.to(device), student.to(device),
                                              _cpu(data.train.split), _cpu(data.val.split),
                                              data.train.mean.flatten().cpu(), data.train.std.flatten().cpu(), device)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    import torchdistill
    print(f"{args.teacher} (top-1 {teacher_top1:.2f}) -> {args.student}, {len(data.train.split)} train / "
          f"{len(data.val.split)} val images of {args.data}, {args.epochs} epochs, batch 64, device {device}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, distill {distill.__version__}, torchdistill "
          f"{torchdistill.__version__} ({args.workers} loader workers)")
    print(f"  torchdistill          {td_rate:8.0f} img/s  top-1 {td_top1:.2f}")
    print(f"  distill, live teacher {live_rate:8.0f} img/s  top-1 {live_top1:.2f}  ({live_rate / td_rate:.2f}x)")
    print(f"  distill, cached       {cached_rate:8.0f} img/s  top-1 {cached_top1:.2f}  ({cached_rate / td_rate:.2f}x)")


def _cpu(split):
    from distill.data import ImageSplit
    return ImageSplit(split.images.cpu(), split.labels.cpu(), split.classes)


if __name__ == '__main__':
    main()
