"""What a recorded teacher (``teacher_cache.mode: record / replay``, distill/teaching/record.py) costs and saves:
the timings as ratios of runs measured side by side in one process, the storage from a shard written by distill.

    python benchmarks/recorded_teacher.py [--parts step storage epoch] [--teacher resnet50 --student resnet18
        --batch 16 --image-size 224 --steps 5 --rounds 3] [--shard-images 1281167] [--per-class 50 --epochs 4]

step: one training step of ``distill.Distiller`` (student forward, loss, backward, SGD) at ImageNet scale
    (``--teacher`` -> ``--student``, ``--num-classes`` 1000, random weights and images), CE 0.1 + KD 0.9 at T = 1:
    student only, KD with the live teacher, KD while recording the teacher's top-k (``RecordingTeacher``) and KD
    replaying that recording (``ReplayTeacher``: the batch's logits rebuilt from a real float16 top-k shard, no
    teacher forward). ``--rounds`` rounds time ``--steps`` steps of each in turn (after 2 untimed); the
    fastest round's mean counts (the least disturbed by other work on the machine).
storage: one recorded epoch of ``--shard-images`` images (default ImageNet's 1,281,167) at ``--top-k`` 10 of 1000
    classes in float16 (``teacher_cache: {top_k: 10, dtype: float16}``), written by ``RecordingTeacher`` itself
    (fed random logits in place of a teacher's): the shard's bytes, per tensor and in all.
epoch: whole training epochs through ``distill.training.trainer.Trainer`` on a streamed tree of the first ``--per-class``
    shared CIFAR-10 training images per class (cifar_resnet32x4 -> cifar_resnet8x4: a teacher 6x the student, as
    in kd_step.py; 32 px, RandomResizedCrop + flip + RandAugment, batch 32, 2 workers, and torch threads in the
    training process for the cores the workers leave, at least 1): a live KD run next to a recording one (its shard
    written at each epoch end), then a student-only run next to a replay of that recording, epoch by epoch in turn.
    Epoch 0 of each run is untimed (worker start-up); the fastest of the others counts.
"""
import os
import tempfile
import time
from types import SimpleNamespace

import torch

from common import SHARED_CIFAR10, pair_parser, time_steps
from distill.data.imagefolder import link_subset

KD_LOSSES = {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 1.0}}
IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCH_TEACHER, EPOCH_STUDENT, EPOCH_WORKERS = 'cifar_resnet32x4', 'cifar_resnet8x4', 2


def arguments():
    parser = pair_parser(__doc__, steps=5, teacher='resnet50', student='resnet18', batch=16, image_size=224)
    parser.add_argument('--parts', nargs='+', choices=['step', 'storage', 'epoch'],
                        default=['step', 'storage', 'epoch'])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--top-k', type=int, default=10)
    parser.add_argument('--shard-images', type=int, default=IMAGENET_TRAIN_IMAGES)
    parser.add_argument('--data', default=SHARED_CIFAR10, help='ImageFolder root with train/ and test/')
    parser.add_argument('--per-class', type=int, default=50)
    parser.add_argument('--epochs', type=int, default=4)
    return parser.parse_args()


def stream(count: int) -> SimpleNamespace:
    """What ``RecordingTeacher`` and ``ReplayTeacher`` read of a streamed loader: epoch 0 of ``count`` images in
    index order, epoch seed 0, in one process."""
    return SimpleNamespace(split=range(count), epoch=0, epoch_order=torch.arange(count), epoch_seed=0, replay=None,
                           rank=0, world_size=1)


def recorder(model, folder: str, loader: SimpleNamespace, top_k: int, num_classes: int):
    from distill.teaching.record import Recording
    from distill.teaching.recorded import RecordingTeacher
    info = {'seed': 0, 'top_k': top_k, 'dtype': 'float16', 'num_classes': num_classes, 'teacher_precision': 'fp32'}
    return RecordingTeacher(model, None, Recording(folder, {'benchmark': 'recorded_teacher'}), loader, top_k,
                            'float16', info)


def step_part(args, work: str) -> None:
    import timm
    from distill import Batch, Distiller
    from distill.teaching.recorded import ReplayTeacher
    from distill.teaching.teachers import LiveTeacher
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, num_classes=args.num_classes).to(device)
    student = timm.create_model(args.student, num_classes=args.num_classes).to(device).train()
    batch = Batch(torch.randn(args.batch, 3, args.image_size, args.image_size, device=device),
                  torch.randint(0, args.num_classes, (args.batch,), device=device),
                  torch.arange(args.batch, device=device), torch.zeros(args.batch, dtype=torch.long, device=device))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    loader = stream(args.batch)
    recording_teacher = recorder(teacher, os.path.join(work, 'step'), loader, args.top_k, args.num_classes)
    recording_teacher(batch)
    recording_teacher.end_epoch()  # epoch 0's shard: the batch's top-k, what the replay reads
    replay_teacher = ReplayTeacher(teacher, None, recording_teacher.recording, loader, args.num_classes)
    distillers = {'student only': Distiller(None, student, {'ce': 1.0}),
                  'live KD': Distiller(LiveTeacher(teacher), student, KD_LOSSES),
                  'recording KD': Distiller(recording_teacher, student, KD_LOSSES),
                  'replay KD': Distiller(replay_teacher, student, KD_LOSSES)}

    def training_step(distiller):
        def step():
            loss = distiller(batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    rounds = {name: [] for name in distillers}
    for _ in range(args.rounds):
        for name, distiller in distillers.items():
            rounds[name].append(time_steps(training_step(distiller.train()), args.steps, warmup=2))
    seconds = {name: min(times) for name, times in rounds.items()}
    print(f"\nstep: {args.teacher} -> {args.student}, {args.num_classes} classes, batch {args.batch}, "
          f"{args.image_size} px, CE 0.1 + KD 0.9 (T 1), SGD, top-{args.top_k} float16; fastest of {args.rounds} "
          f"rounds x {args.steps} steps; device {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}\n")
    print("| step | ms | / student only | / live KD |\n|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {1000 * value:.0f} | {value / seconds['student only']:.2f}x | "
              f"{value / seconds['live KD']:.2f}x |")


def storage_part(args, work: str) -> None:
    count, chunk = args.shard_images, 32768
    loader = stream(count)
    loader.epoch_order = torch.randperm(count)
    recording_teacher = recorder(torch.nn.Identity(), os.path.join(work, 'storage'), loader, args.top_k,
                                 args.num_classes)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, count, chunk):
        indices = torch.arange(start, min(start + chunk, count))
        logits = 3 * torch.randn(len(indices), args.num_classes, generator=generator)  # the Identity's output
        recording_teacher(SimpleNamespace(images=logits, indices=indices))  # what the recorder reads of a Batch
    recording_teacher.end_epoch()
    recording = recording_teacher.recording
    shard_bytes = os.path.getsize(recording.shard(0))
    tensors = recording.epoch(0)
    per_image = {name: tensor.numel() * tensor.element_size() / count for name, tensor in tensors.items()
                 if name != 'seed'}
    fixed = shard_bytes - count * sum(per_image.values())  # safetensors header and the epoch seed
    print(f"\nstorage: one recorded epoch of {count:,} images, {args.num_classes} classes, top-{args.top_k} float16: "
          f"a {shard_bytes:,}-byte shard\n")
    print("| tensor | dtype | bytes per image | MB per ImageNet epoch |\n|---|---|---|---|")
    for name, size in sorted(per_image.items(), key=lambda item: -item[1]):
        print(f"| {name} | {str(tensors[name].dtype).replace('torch.', '')} | {size:g} | "
              f"{size * IMAGENET_TRAIN_IMAGES / 1e6:.1f} |")
    imagenet = fixed + sum(per_image.values()) * IMAGENET_TRAIN_IMAGES
    print(f"| shard (with {fixed:.0f} bytes of header and seed) | | {sum(per_image.values()):g} | "
          f"{imagenet / 1e6:.1f} |\n\nper ImageNet epoch ({IMAGENET_TRAIN_IMAGES:,} images): {imagenet / 1e9:.4f} GB")


def epoch_part(args, work: str) -> None:
    from safetensors.torch import save_file
    import timm
    from distill.config import from_dict
    from distill.training.trainer import Trainer
    work = os.path.join(work, 'epoch')
    root = link_subset(args.data, os.path.join(work, 'data'), {'train': args.per_class, 'test': 1})
    torch.manual_seed(0)
    teacher_weights = os.path.join(work, 'teacher.safetensors')
    classes = len(os.listdir(os.path.join(root, 'train')))
    save_file(timm.create_model(EPOCH_TEACHER, num_classes=classes).state_dict(), teacher_weights)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - EPOCH_WORKERS))  # workers and threads share the cores
    data = {'name': 'imagefolder', 'root': root, 'in_memory': False, 'workers': EPOCH_WORKERS, 'image_size': 32,
            'augment': 'random_resized_crop', 'auto_augment': 'rand-m9-mstd0.5-inc1', 'batch_size': 32}
    records = os.path.join(work, 'records')

    def trainer(run_name, mode=None):
        sections = {} if mode is None else {'teacher_cache': {'enabled': True, 'mode': mode, 'dir': records,
                                                              'top_k': args.top_k, 'dtype': 'float16'}}
        if run_name != 'student only':
            sections.update(teacher={'name': EPOCH_TEACHER, 'checkpoint': teacher_weights}, losses=KD_LOSSES)
        return Trainer(from_dict({'student': {'name': EPOCH_STUDENT}, 'losses': {'ce': 1.0}, 'data': data,
                                  'scheduler': {'name': 'none'},
                                  'trainer': {'epochs': args.epochs, 'seed': 0, 'output_dir': work, 'device': 'cpu',
                                              'run_name': run_name.replace(' ', '-'), 'progress': False},
                                  **sections}), quiet=True)

    def timed_epochs(trainers) -> dict:
        """The fastest of epochs 1.. of each trainer in seconds, run in turn epoch by epoch (epoch 0 untimed)."""
        seconds = {name: [] for name in trainers}
        for epoch in range(args.epochs):
            for name, run in trainers.items():
                started = time.perf_counter()
                run.train_one_epoch(epoch)
                seconds[name].append(time.perf_counter() - started)
        return {name: min(times[1:]) for name, times in seconds.items()}

    live = trainer('live KD')
    recorded = timed_epochs({'live KD': live, 'recording KD': trainer('recording KD', 'record')})
    replayed = timed_epochs({'student only': trainer('student only'), 'replay KD': trainer('replay KD', 'replay')})
    print(f"\nepoch: {EPOCH_TEACHER} -> {EPOCH_STUDENT}, {len(live.data.train.split)} streamed images of "
          f"{live.data.num_classes} classes, 32 px, batch 32, {EPOCH_WORKERS} workers, {torch.get_num_threads()} "
          f"thread(s), CE 0.1 + KD 0.9 (T 1), top-{args.top_k} float16; fastest of epochs 2-{args.epochs}\n")
    print("| run | s / epoch | ratio |\n|---|---|---|")
    for runs, reference in ((recorded, 'live KD'), (replayed, 'student only')):
        for name, value in runs.items():
            print(f"| {name} | {value:.2f} | {value / runs[reference]:.2f}x {reference} |")


def main() -> None:
    args = arguments()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix='recorded_teacher-') as work:
        for part in args.parts:
            {'step': step_part, 'storage': storage_part, 'epoch': epoch_part}[part](args, work)


if __name__ == '__main__':
    main()
