"""Training-step time of distill's engine against a hand-written PyTorch KD loop, measured side by side.

    python benchmarks/kd_step.py [--teacher cifar_resnet32x4 --student cifar_resnet8x4 --batch 64 --steps 20]

Prints, for one teacher/student pair on this machine: student-only step, hand-written KD step (teacher under
no_grad, CE 0.1 + KD 0.9 at T=4, SGD), the same KD step through ``distill.Distiller`` with a live teacher and with
a filled teacher cache (``teacher_cache``: logits looked up by image and view); then the ratios (engine /
hand-written is the engine's overhead, KD / student-only the teacher's cost, cached KD / student-only what is left
of it).
"""
import tempfile

import timm
import torch
import torch.nn.functional as F

import distill
from common import pair_arguments, time_steps
from distill import Batch, CachedTeacher, Distiller
from distill.teaching.cache import TeacherCache


def main() -> None:
    args = pair_arguments(__doc__, steps=10)
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, num_classes=100).to(device).eval().requires_grad_(False)
    student = timm.create_model(args.student, num_classes=100).to(device).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, 100, (args.batch,), device=device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def student_only():
        loss = F.cross_entropy(student(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def hand_written_kd():
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = student(images)
        kl = F.kl_div(F.log_softmax(student_logits / 4, 1), F.softmax(teacher_logits / 4, 1), reduction='batchmean')
        loss = 0.1 * F.cross_entropy(student_logits, targets) + 0.9 * 16 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    distiller = Distiller(teacher, student, {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}).train()

    def engine_kd():
        loss = distiller(Batch(images, targets)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    table = TeacherCache(tempfile.mkdtemp(prefix='kd_step_cache-'), args.batch, 1, 100, 'float16', device, meta={})
    cached = Distiller(CachedTeacher(teacher, table), student,
                       {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}).train()
    indices, views = torch.arange(args.batch, device=device), torch.zeros(args.batch, dtype=torch.long, device=device)
    batch = Batch(images, targets, indices, views)
    cached(batch)  # fills the table: every timed step reads it

    def cached_kd():
        loss = cached(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results = {}
    for name, step in (('student only', student_only), ('hand-written KD', hand_written_kd),
                       ('distill KD', engine_kd), ('distill cached KD', cached_kd)):
        results[name] = time_steps(step, args.steps)
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.image_size}px, device {device}, "
          f"torch {torch.__version__}, distill {distill.__version__}")
    for name, seconds in results.items():
        print(f"  {name:18s} {seconds * 1000:8.1f} ms/step")
    print(f"  distill KD / hand-written KD:     {results['distill KD'] / results['hand-written KD']:.3f}x")
    print(f"  distill KD / student only:        {results['distill KD'] / results['student only']:.3f}x")
    print(f"  distill cached KD / student only: {results['distill cached KD'] / results['student only']:.3f}x")


if __name__ == '__main__':
    main()
