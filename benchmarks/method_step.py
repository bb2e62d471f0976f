"""Training-step time of every distillation method relative to plain KD, on one pair, measured in one run.

    python benchmarks/method_step.py [--teacher cifar_resnet32x4 --student cifar_resnet8x4 --batch 64 --steps 5]

Each method runs with its default options and weight next to CE (as in its CIFAR-100 recipe), through
``distill.Distiller`` with SGD, in the order listed by ``distill methods``; plain KD (CE 0.1 + KD 0.9) is timed
first and again last, and the ratio uses their mean. Methods that act only in a pre-stage (FSP, AB) are timed on
their pre-stage step; their main stage is a plain cross-entropy step. CRD gets a CIFAR-sized memory bank (50,000
samples, 100 classes); MLKD gets its second view precomputed (the loader makes it; its cost is not in the step).
"""
import timm
import torch

import distill
from common import pair_arguments, time_steps
from distill import Batch, Distiller, list_losses
from distill.losses import Need
from distill.training.prestage import PreStage


def main() -> None:
    args = pair_arguments(__doc__, steps=5)
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, num_classes=100).to(device)
    student = timm.create_model(args.student, num_classes=100).to(device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, 100, (args.batch,), device=device)
    train_targets = torch.arange(50000) % 100
    indices = (torch.randperm(500, device=device)[:args.batch] * 100 + targets)  # samples of the batch's classes

    def step_of(losses, pre_stage=False):
        distiller = Distiller(teacher, student, losses, input_size=(3, args.image_size, args.image_size),
                              train_targets=train_targets).to(device).train()
        if pre_stage:
            for name in distiller.pre_stage_terms(0):
                for module in distiller.loss_terms[name].pre_stage_modules(student):
                    module.requires_grad_(True)
        optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        strong = images.flip(-1) if Need.STRONG_VIEW in distiller.needs else None  # MLKD's second view (the loader's)
        batch = Batch(images, targets, indices, None, strong)

        def step():
            out = PreStage(distiller).forward(batch, 0) if pre_stage else distiller(batch, epoch=30)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        return step

    kd = {'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}}
    results = {'kd (first)': time_steps(step_of(kd), args.steps)}
    for name, cls in sorted(list_losses().items()):
        if name in ('ce', 'kd'):
            continue
        term_only_pre_stage = not cls.main_stage
        results[name + (' (pre-stage)' if term_only_pre_stage else '')] = time_steps(
            step_of({'ce': 1.0, name: {}}, pre_stage=term_only_pre_stage), args.steps)
    results['kd (last)'] = time_steps(step_of(kd), args.steps)
    baseline = (results['kd (first)'] + results['kd (last)']) / 2
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.image_size}px, device {device}, "
          f"torch {torch.__version__}, distill {distill.__version__}, {args.steps} timed steps each")
    print('| method | ms/step | / KD |\n|---|---|---|')
    for name, seconds in results.items():
        print(f'| {name} | {seconds * 1000:.1f} | {seconds / baseline:.2f}x |')


if __name__ == '__main__':
    main()
