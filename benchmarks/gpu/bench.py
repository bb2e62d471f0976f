"""GPU proof of distill: training throughput, peak memory and a short real run on one GPU, inside a time budget.

    bash benchmarks/gpu/run.sh [--cpu-smoke]     (the device run's one command; writes $OUT/gpu_bench.{json,md})
    python benchmarks/gpu/bench.py --out DIR [--cpu-smoke] [--budget 420] [--data FILE.npz]

The pair is the CIFAR-100 table's cifar_resnet32x4 -> cifar_resnet8x4, each method with its recipe from
experiments/cifar100/pairs.yaml, on benchmarks/gpu/data/cifar10_12k.npz (make_data.py: 10,000 train + 2,000 test
CIFAR-10 images) or, where that file did not travel, random images of the same shape (throughput only). Parts, most
important first, each inside its share of the budget (what did not fit is listed as skipped):

1. goals: KD with a live teacher at batch 64 (bf16, channels_last, torch.compile reduce-overhead: CUDA graphs, as a
   batch-64 step is bound by kernel launches), KD with the cached teacher at batch 512, and the baseline: the same
   KD step in a plain PyTorch loop over a torchvision DataLoader of uint8 arrays (PIL + transforms per sample,
   8 workers, fp32, loss.item() and top-1 every step: RepDistiller's train_distill), and torchdistill's
   DistillationBox where torchdistill is installed.
2. real training: the teacher 15 epochs, then 15 epochs of KD (cosine lr) on the 10,000 images; top-1 on the 2,000
   test images, wall time, and the projected time of the protocol's 240 epochs x 50,000 images.
3. streamed data and the recorded teacher: ResNet-50 -> ResNet-18 at 224 px (random weights) on an ImageFolder tree
   of 2,000 of the images, RandomResizedCrop + flip + RandAugment in 8 workers, bf16 + channels_last: a live KD
   epoch that records the teacher's logits, a replay epoch of that recording (no teacher), and a student-only epoch
   (the side-stream prefetch and the record/replay path on CUDA; goal replay / student-only time <= 1.05).
4. the matrix: student only, KD, KD cached, DKD, CRD, ReviewKD x batch 64 / 512 x fp32 / bf16 / bf16 +
   channels_last / + compile (eager ones first).

A throughput is training images/s of distill's own ``Trainer`` epoch (its GPU-resident data pipeline and batched
augmentation, the loss terms, the optimizer step, metrics), over whole epochs after a warm-up epoch, with the peak
GPU memory of that configuration. The cached teacher replays its warm-up epoch's views (the same seed), so every
lookup hits: what the later methods of one seed in a grid see. ``--cpu-smoke`` runs every part on CPU in seconds so
that the script cannot rot (its numbers mean nothing): the small pair cifar_resnet20 -> cifar_resnet8 with the same
recipes, batches 4 and 8 of 16 random images, fp32 where a variant says bf16 (this CPU has no fast bf16), compile
switched off by TORCH_COMPILE_DISABLE, wandb made unimportable, and no time budget (nothing is skipped for time, so a
loaded machine cannot fail it).
"""
import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from typing import Optional, Tuple

if '--cpu-smoke' in sys.argv:
    os.environ['TORCH_COMPILE_DISABLE'] = '1'  # the compiled variants run their code path eagerly
    sys.modules['wandb'] = None  # the device has no wandb: distill must train without it (wandb.mode disabled)

import numpy as np
import timm
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: common.py, vs_torchdistill.py

import distill  # noqa: E402 (after the smoke switches above)
from distill.config import from_dict  # noqa: E402
from distill.config.recipes import merge, recipe_data  # noqa: E402
from distill.training.trainer import Trainer  # noqa: E402

TABLE = os.path.join(ROOT, 'experiments', 'cifar100', 'pairs.yaml')
PAIR, MODELS, SMOKE_MODELS = 'resnet32x4-resnet8x4', ('cifar_resnet32x4', 'cifar_resnet8x4'), ('cifar_resnet20',
                                                                                               'cifar_resnet8')
METHODS = {'student only': 'baseline', 'KD': 'kd', 'KD cached': 'kd', 'DKD': 'dkd', 'CRD': 'crd',
           'ReviewKD': 'reviewkd'}
COMPILED = 'bf16+cl+compile'
VARIANTS = {'fp32': {'precision': 'fp32', 'channels_last': False},
            'bf16': {'precision': 'bf16', 'channels_last': False},
            'bf16+cl': {'precision': 'bf16', 'channels_last': True},
            COMPILED: {'precision': 'bf16', 'channels_last': True, 'compile': True, 'compile_mode': 'reduce-overhead'}}
GOALS = (('KD live, batch 64', 40_000), ('KD cached, batch 512', 100_000), ('KD live / torchdistill', 2.0))


class Clock:
    """The script's deadline and each part's share of it; a measurement starts only if its estimate fits."""

    def __init__(self, seconds: float, unlimited: bool = False):
        """``unlimited``: every measurement fits (the CPU smoke run checks that each part runs, whatever the
        machine's speed or load)."""
        self.end = time.monotonic() + seconds
        self.part_end, self.unlimited = self.end, unlimited

    def part(self, seconds: float) -> None:
        self.part_end = min(self.end, time.monotonic() + seconds)

    def fits(self, estimate: float) -> bool:
        return self.unlimited or time.monotonic() + estimate <= self.part_end


class Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.cpu_smoke
        self.device = torch.device('cpu' if self.smoke else 'cuda')
        self.batches = (4, 8) if self.smoke else (64, 512)
        self.teacher, self.student = SMOKE_MODELS if self.smoke else MODELS
        self.work = tempfile.mkdtemp(prefix='gpu_bench-')
        self.clock = Clock(args.budget, unlimited=self.smoke)
        self.results, self.skipped, self.failed, self.notes = [], [], [], []
        self.data, self.real_data = self._data()
        with np.load(self.data) as arrays:
            self.num_classes = int(arrays['train_labels'].max()) + 1
        self.teacher_weights = os.path.join(self.work, 'teacher_init.pt')
        torch.manual_seed(0)
        torch.save(timm.create_model(self.teacher, num_classes=self.num_classes).state_dict(), self.teacher_weights)

    def _data(self):
        if not self.smoke and os.path.isfile(self.args.data):
            return self.args.data, True
        count, test = (16, 8) if self.smoke else (10_000, 2_000)
        self.notes.append(f"data: {self.args.data} absent, random images of the same shape (throughput only)"
                          if not self.smoke else f"data: {count} random images (smoke)")
        generator = np.random.default_rng(0)
        path = os.path.join(self.work, 'random.npz')
        np.savez(path, train_images=generator.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 train_labels=np.arange(count) % 10, test_images=generator.integers(0, 256, (test, 32, 32, 3),
                                                                                    dtype=np.uint8),
                 test_labels=np.arange(test) % 10)
        return path, False

    def config(self, method: str, batch: int, variant: str, epochs: int, run_name: str, **sections):
        """Run ``method`` of the table's pair on the bench data, with ``variant``'s precision/layout/compile."""
        recipe, _ = recipe_data(TABLE, PAIR, method)
        trainer = dict(VARIANTS[variant], precision='fp32') if self.smoke else VARIANTS[variant]
        override = {'student': {'name': self.student},
                    'data': {'name': 'npz', 'root': self.data, 'batch_size': batch, 'num_classes': None,
                             'mean': None, 'std': None, 'download': False},
                    'trainer': {**trainer, 'epochs': epochs, 'output_dir': self.work,
                                'run_name': run_name, 'device': self.device.type, 'progress': False,
                                'eval_every': epochs},
                    'wandb': {'mode': 'disabled'}}
        if recipe.get('teacher'):
            override['teacher'] = {'name': self.teacher, 'checkpoint': self.teacher_weights}
        return from_dict(merge(merge(recipe, override), sections))

    def measure(self, part: str, name: str, estimate: float, function, **fields) -> None:
        """Run ``function() -> dict`` if it fits the part's budget; record its result, a skip or a failure."""
        row = {'part': part, 'name': name, **fields}
        if not self.clock.fits(estimate):
            self.skipped.append(row)
            print(f"[skip] {part}: {name} (needs ~{estimate:.0f} s, the part's budget is spent)", flush=True)
            return
        started = time.monotonic()
        try:
            row.update(function())
        except Exception as exc:  # noqa: BLE001 (one failed configuration must not cost the others' numbers)
            traceback.print_exc()
            row['error'] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
            self.failed.append(row)
        row['seconds'] = round(time.monotonic() - started, 1)
        if 'error' not in row:
            self.results.append(row)
        shown = {k: v for k, v in row.items() if k not in ('part', 'name')}
        print(f"[{part}] {name}: {shown}", flush=True)
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()

    def reset_memory(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if self.device.type == 'cuda' else 0.0

    def trainer_rate(self, label: str, batch: int, variant: str):
        """Images/s of ``Trainer.train_one_epoch`` over timed epochs after a warm-up epoch."""
        def run():
            cached = label == 'KD cached'
            sections = {'teacher_cache': {'enabled': True, 'dir': os.path.join(self.work, 'cache')}} if cached else {}
            timed = 1 if self.smoke or batch < 256 else 2
            cfg = self.config(METHODS[label], batch, variant, 1 + timed,
                              f"{label}-{batch}-{variant}".replace(' ', '_'), **sections)
            self.reset_memory()
            trainer = Trainer(cfg, quiet=True)
            views = trainer.data.train.generator.get_state()
            trainer.train_one_epoch(0)  # warm-up: compilation, CUDA graph capture, cuDNN autotuning, cache fill
            started = time.perf_counter()
            for epoch in range(1, 1 + timed):
                if cached:  # replay the warm-up epoch's views: every teacher lookup hits
                    trainer.data.train.generator.set_state(views)
                trainer.train_one_epoch(epoch)  # ends with a host read of the epoch's sums: synchronised
            seconds = time.perf_counter() - started
            return {'img_s': round(timed * len(trainer.data.train.split) / seconds), 'peak_mib': self.peak_mib(),
                    'compiled': bool(trainer.forward.active) if VARIANTS[variant].get('compile') else False}
        return run

    def estimate(self, variant: str) -> float:
        return 0.0 if self.smoke else (75.0 if 'compile' in variant else 12.0)

    def goals(self) -> None:
        self.clock.part(0.4 * self.args.budget)
        small, large = self.batches
        for label, batch, variant in (('KD', small, COMPILED), ('KD cached', large, 'bf16+cl')):
            self.matrix_cell(label, batch, variant)
        self.measure('baseline', f"plain PyTorch loop, DataLoader, fp32, b{small}", 0 if self.smoke else 25,
                     self.baseline_rate(small), batch=small)
        import importlib.util
        if importlib.util.find_spec('torchdistill') is None:
            self.notes.append('torchdistill is not installed here: its ratio is not measured')
        else:
            self.measure('baseline', f"torchdistill DistillationBox, fp32, b{small}", 0 if self.smoke else 40,
                         self.torchdistill_rate(), batch=small)
        self.matrix_cell('KD cached', large, COMPILED)

    def matrix_cell(self, label: str, batch: int, variant: str) -> None:
        self.measure('matrix', f"{label} b{batch} {variant}", self.estimate(variant),
                     self.trainer_rate(label, batch, variant), method=label, batch=batch, variant=variant)

    def _split(self, train: bool):
        from distill.config import DataConfig
        from distill.data import load_split
        return load_split(DataConfig(name='npz', root=self.data), train=train)

    def _pair_models(self):
        torch.manual_seed(0)
        teacher = timm.create_model(self.teacher, num_classes=self.num_classes)
        teacher.load_state_dict(torch.load(self.teacher_weights, weights_only=True))
        student = timm.create_model(self.student, num_classes=self.num_classes)
        return teacher.to(self.device).eval(), student.to(self.device)

    def baseline_rate(self, batch: int):
        def run():
            from torchvision import transforms
            from common import PILImages
            split = self._split(True)
            mean, std = (split.images.float().div(255).mean((0, 2, 3)).tolist(),
                         split.images.float().div(255).std((0, 2, 3)).tolist())
            transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                            transforms.ToTensor(), transforms.Normalize(mean, std)])
            workers = 0 if self.smoke else min(8, os.cpu_count() or 1)
            loader = torch.utils.data.DataLoader(PILImages(split.images, split.labels, transform), batch_size=batch,
                                                 shuffle=True, num_workers=workers,
                                                 pin_memory=self.device.type == 'cuda')
            teacher, student = self._pair_models()
            optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

            def epoch():
                student.train()
                losses, hits = 0.0, 0.0
                for images, labels in loader:
                    images, labels = images.to(self.device), labels.to(self.device)
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    logits = student(images)
                    kl = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(teacher_logits / 4, 1),
                                  reduction='batchmean')
                    loss = 0.1 * F.cross_entropy(logits, labels) + 0.9 * 16 * kl
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses += loss.item()  # the reference loops' meters read both every step
                    hits += (logits.argmax(1) == labels).float().sum().item()
            self.reset_memory()
            epoch()  # warm-up (cuDNN autotuning); each timed epoch starts its workers, as the reference loops do
            started = time.perf_counter()
            epoch()
            return {'img_s': round(len(split) / (time.perf_counter() - started)), 'peak_mib': self.peak_mib(),
                    'workers': workers}
        return run

    def torchdistill_rate(self):
        def run():
            from vs_torchdistill import timed_torchdistill
            split, val_split = self._split(True), self._split(False)
            teacher, student = self._pair_models()
            mean = split.images.float().div(255).mean((0, 2, 3))
            std = split.images.float().div(255).std((0, 2, 3))
            self.reset_memory()
            rate, _ = timed_torchdistill(argparse.Namespace(epochs=2, workers=0 if self.smoke else 8), teacher,
                                         student, split, val_split, mean, std, self.device)
            return {'img_s': round(rate), 'peak_mib': self.peak_mib()}
        return run

    def training(self) -> None:
        """A teacher, then KD from it, each a real run through ``Trainer.fit`` (evaluation and checkpoints too)."""
        self.clock.part(0.3 * self.args.budget)
        epochs = 2 if self.smoke else 15
        if not (self.real_data or self.smoke):
            self.notes.append('training: skipped, no real data travelled (benchmarks/gpu/make_data.py)')
        small = self.batches[0]

        def teacher_run():
            cfg = self.config('baseline', small, 'bf16+cl', epochs, 'train_teacher', scheduler={'name': 'cosine'},
                              student={'name': self.teacher})
            summary = Trainer(cfg, quiet=True).fit()
            self.teacher_weights = os.path.join(self.work, 'train_teacher', 'student_best.safetensors')
            return {'top1': summary['best_top1'], 'wall_s': round(summary['train_time_s'], 1)}

        def student_run():
            cfg = self.config('kd', small, COMPILED, epochs, 'train_kd', scheduler={'name': 'cosine'})
            trainer = Trainer(cfg, quiet=True)
            started = time.perf_counter()
            summary = trainer.fit()
            wall = time.perf_counter() - started
            steady = trainer.state.history[1:]  # the first epoch compiles and captures the graphs
            per_image = sum(r['epoch_time'] for r in steady) / (len(steady) * len(trainer.data.train.split))
            return {'top1': summary['last_top1'], 'best_top1': summary['best_top1'], 'wall_s': round(wall, 1),
                    'steady_img_s': round(1 / per_image), 'projected_240x50k_min': round(per_image * 240 * 50_000
                                                                                         / 60, 1)}
        if self.real_data or self.smoke:
            self.measure('training', f"teacher {self.teacher}, {epochs} epochs, bf16+cl, b{small}",
                         0 if self.smoke else 40, teacher_run)
            self.measure('training', f"KD {self.teacher} -> {self.student}, {epochs} epochs, {COMPILED}, b{small}",
                         0 if self.smoke else 60, student_run)

    def streamed(self) -> None:
        self.clock.part(0.15 * self.args.budget)
        teacher, student, size, batch, count = ((self.teacher, self.student, 32, 4, 16) if self.smoke else
                                                ('resnet50', 'resnet18', 224, 128, 2000))
        tree, count = self._image_tree(count)
        torch.manual_seed(0)
        weights = os.path.join(self.work, f'{teacher}.pt')
        torch.save(timm.create_model(teacher, num_classes=self.num_classes).state_dict(), weights)

        def epoch_rate(run_name: str, losses: dict, mode: Optional[str]):
            def run():
                cfg = {'student': {'name': student}, 'losses': losses,
                       'data': {'name': 'imagefolder', 'root': tree, 'in_memory': False, 'image_size': size,
                                'workers': 0 if self.smoke else min(8, os.cpu_count() or 1), 'batch_size': batch,
                                'augment': 'random_resized_crop', 'auto_augment': 'rand-m9-mstd0.5-inc1'},
                       'optimizer': {'name': 'momentum', 'lr': 0.1}, 'scheduler': {'name': 'none'},
                       'trainer': {'epochs': 2, 'precision': 'fp32' if self.smoke else 'bf16', 'channels_last':
                                   not self.smoke, 'device': self.device.type, 'output_dir': self.work,
                                   'run_name': run_name, 'progress': False}, 'wandb': {'mode': 'disabled'}}
                if mode:
                    cfg['teacher'] = {'name': teacher, 'checkpoint': weights}
                    cfg['teacher_cache'] = {'enabled': True, 'mode': mode, 'top_k': 10,
                                            'dir': os.path.join(self.work, 'records')}
                self.reset_memory()
                trainer = Trainer(from_dict(cfg), quiet=True)
                trainer.train_one_epoch(0)  # warm-up: workers, cuDNN autotuning (and the first recorded epoch)
                started = time.perf_counter()
                trainer.train_one_epoch(1)
                return {'img_s': round(count / (time.perf_counter() - started), 1), 'peak_mib': self.peak_mib()}
            return run

        kd = {'ce': 0.5, 'kd': {'weight': 0.5, 'temperature': 1.0}}
        for name, losses, mode in (('student only', {'ce': 1.0}, None), ('KD live, recording', kd, 'record'),
                                   ('KD replay', kd, 'replay')):
            self.measure('streamed', f"{name}, {teacher} -> {student}, {size} px, b{batch}", 0 if self.smoke else 25,
                         epoch_rate(name.replace(' ', '_').replace(',', ''), losses, mode))
        rates = {r['name'].split(',')[0]: r['img_s'] for r in self.results if r['part'] == 'streamed'}
        if len(rates) == 3:
            self.notes.append(f"streamed: epoch time / student-only: replay "
                              f"{rates['student only'] / rates['KD replay']:.3f} (goal <= 1.05), live recording "
                              f"{rates['student only'] / rates['KD live']:.3f}")

    def _image_tree(self, count: int) -> Tuple[str, int]:
        """About ``count`` bench training images, as many of each class, as an ImageFolder tree of PNG files (the
        first of each class also as validation), and how many it holds."""
        from PIL import Image
        root = os.path.join(self.work, 'tree')
        with np.load(self.data) as arrays:
            images, labels = arrays['train_images'], arrays['train_labels']
        per_class = [np.flatnonzero(labels == c)[:max(1, count // self.num_classes)] for c in range(self.num_classes)]
        for split, members in (('train', np.concatenate(per_class)), ('val', [indices[0] for indices in per_class])):
            for index in members:
                folder = os.path.join(root, split, f'class_{labels[index]:02d}')
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(images[index]).save(os.path.join(folder, f'{index}.png'))
        return root, sum(len(indices) for indices in per_class)

    def matrix(self) -> None:
        self.clock.part(self.args.budget)
        done = {(r.get('method'), r.get('batch'), r.get('variant')) for r in self.results}
        order = [(label, batch, variant) for variant in VARIANTS for batch in self.batches for label in METHODS]
        order.sort(key=lambda item: item[2] == COMPILED)  # every eager number before any compilation
        for label, batch, variant in order:
            if (label, batch, variant) not in done:
                self.matrix_cell(label, batch, variant)

    def report(self) -> dict:
        device = torch.cuda.get_device_name() if self.device.type == 'cuda' else f'CPU {platform.machine()}'
        machine = {'device': device,
                   'torch': torch.__version__, 'cuda': torch.version.cuda, 'timm': timm.__version__,
                   'distill': distill.__version__, 'python': platform.python_version(), 'cpus': os.cpu_count(),
                   'date': time.strftime('%Y-%m-%d'), 'smoke': self.smoke}
        return {'machine': machine, 'goals': self.goal_rows(), 'results': self.results, 'skipped': self.skipped,
                'failed': self.failed, 'notes': self.notes}

    def rate(self, method: str, batch: int) -> float:
        """The best throughput of ``method`` at ``batch`` over the variants measured."""
        return max((r['img_s'] for r in self.results if (r.get('method'), r.get('batch')) == (method, batch)),
                   default=0.0)

    def goal_rows(self):
        small, large = self.batches
        torchdistill = [r['img_s'] for r in self.results if r['name'].startswith('torchdistill')]
        values = (self.rate('KD', small), self.rate('KD cached', large),
                  self.rate('KD', small) / torchdistill[0] if torchdistill else None)
        return [{'goal': name, 'target': target, 'measured': value,
                 'met': None if value is None or self.smoke else value >= target}
                for (name, target), value in zip(GOALS, values)]


def markdown(report: dict) -> str:
    m = report['machine']
    lines = [f"# distill GPU check, {m['date']}", '',
             f"{m['device']}, torch {m['torch']} (CUDA {m['cuda']}), timm {m['timm']}, distill {m['distill']}, "
             f"Python {m['python']}, {m['cpus']} CPUs{' (CPU smoke run: numbers mean nothing)' if m['smoke'] else ''}",
             '', '| goal | target | measured | met |', '|---|---|---|---|']
    for goal in report['goals']:
        measured = 'not measured' if goal['measured'] is None else f"{goal['measured']:,.2f}"
        lines.append(f"| {goal['goal']} | {goal['target']:,} | {measured} | {goal['met']} |")
    matrix = [r for r in report['results'] if r['part'] == 'matrix']
    batches = sorted({r['batch'] for r in matrix})
    lines += ['', 'Training img/s (peak MiB) of distill\'s Trainer epoch:', '',
              '| method | batch | ' + ' | '.join(VARIANTS) + ' |', '|---|---|' + '---|' * len(VARIANTS)]
    for label in METHODS:
        for batch in batches:
            cells = []
            for variant in VARIANTS:
                row = next((r for r in matrix if (r['method'], r['batch'], r['variant']) == (label, batch, variant)),
                           None)
                cells.append(f"{row['img_s']:,} ({row['peak_mib']:,.0f})" if row else '-')
            lines.append(f"| {label} | {batch} | " + ' | '.join(cells) + ' |')
    lines += [''] + [f"- {r['part']}: {r['name']}: " + ', '.join(f"{k} {v}" for k, v in r.items()
                                                               if k not in ('part', 'name', 'method', 'batch',
                                                                            'variant'))
                     for r in report['results'] if r['part'] != 'matrix']
    lines += [f"- skipped ({r['part']}): {r['name']}" for r in report['skipped']]
    lines += [f"- FAILED ({r['part']}): {r['name']}: {r['error']}" for r in report['failed']]
    lines += [f"- {note}" for note in report['notes']]
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.environ.get('OUT', os.path.join(ROOT, 'runs', 'gpu_bench')))
    parser.add_argument('--data', default=os.path.join(HERE, 'data', 'cifar10_12k.npz'))
    parser.add_argument('--budget', type=float, default=420.0, help='seconds for all parts (default 7 minutes)')
    parser.add_argument('--cpu-smoke', action='store_true', help='every part on CPU in seconds; numbers mean nothing')
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit('no CUDA device: run on a GPU machine, or pass --cpu-smoke')
    torch.backends.cudnn.benchmark = True
    bench = Bench(args)
    try:
        for part in (bench.goals, bench.training, bench.streamed, bench.matrix):
            part()
    finally:  # the runs' checkpoints and the teacher cache are scratch
        shutil.rmtree(bench.work, ignore_errors=True)
    report = bench.report()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_bench.json'), 'w') as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, 'gpu_bench.md'), 'w') as f:
        f.write(text)
    print(text)
    sys.exit(1 if report['failed'] else 0)


if __name__ == '__main__':
    main()
