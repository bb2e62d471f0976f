"""Every method through the engine: one step on CNN pairs (gradients reach the student and its adapters only, the
teacher and its BN statistics never change), on CNN <-> ViT pairs and on the CIFAR zoo pairs; one forward per model;
adapters checkpointed and resumed. Each method's reference test is in tests/methods/test_<method>.py."""
import json

import pytest
import timm
import torch

from safetensors.torch import load_file, save_file

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Batch, Distiller
from distill.runs.checkpoint import load_checkpoint
from distill.config import from_dict
from distill.losses import Need, list_losses
from distill.training.prestage import PreStage
from distill.training.trainer import Trainer
from engine_helpers import METHODS, TRAIN_TARGETS, _build, _pair
from helpers import digits_config, quick_sample, strip_times


def _one_step(distiller, images, targets, pre_stage=False):
    """A main-training step (or a pre-stage step) with the teacher checked untouched."""
    distiller.train()
    teacher_state = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    indices = torch.arange(len(images))
    if pre_stage:  # as PreStage.run: the pre-stage modules train even if fixed afterwards
        for name in PreStage(distiller).active(0):
            for module in distiller.loss_terms[name].pre_stage_modules(distiller.student):
                module.requires_grad_(True)
    strong = images.flip(-1).roll(1, dims=-2) if Need.STRONG_VIEW in distiller.needs else None  # MLKD's 2nd view
    batch = Batch(images, targets, indices, None, strong)
    output = PreStage(distiller).forward(batch, 0) if pre_stage else distiller(batch, epoch=0)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():  # BN running stats included
        assert torch.equal(value, teacher_state[key]), key
    return output


SAME_WIDTH_PAIR = {'fsp': ('cifar_resnet20', 'cifar_resnet8')}  # FSP needs equal channels per stage


@pytest.mark.parametrize('method', sorted(METHODS))
def test_method_trains_student_and_adapters_only_on_cnn_pair(method):
    teacher, student = _pair(*SAME_WIDTH_PAIR.get(method, ('cifar_resnet8x4', 'cifar_resnet8')))
    distiller = _build(method, teacher, student, 16)
    term = distiller.loss_terms[method]
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    assert term.main_stage or term.pre_stage_epochs > 0
    if term.main_stage:
        output = _one_step(distiller, images, targets)
        assert set(output.terms) == {'ce', method} and output.terms[method] > 0
        assert all(p.grad is not None for p in distiller.student.parameters())
        for name, param in term.named_parameters():  # adapters trained in the main stage get gradient
            assert (param.grad is not None and param.grad.abs().sum() > 0) == param.requires_grad, name
        # the term alone sends gradient into the student's body (not only through the CE head)
        distiller.zero_grad(set_to_none=True)
        alone = Distiller(teacher, student, {method: METHODS[method]}, input_size=(3, 16, 16),
                          train_targets=TRAIN_TARGETS)
        alone.train()
        alone(Batch(images, targets, torch.arange(8), None, images.flip(-1)), epoch=0).loss.backward()
        assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    if term.pre_stage_epochs > 0:
        distiller.zero_grad(set_to_none=True)
        modules = term.pre_stage_modules(student)
        output = _one_step(distiller, images, targets, pre_stage=True)
        assert set(output.terms) == {method} and output.loss > 0
        trained = {id(p) for module in modules for p in module.parameters()}
        assert trained and all(p.grad is not None and p.grad.abs().sum() > 0
                               for module in modules for p in module.parameters() if p.dim() > 1)
        others = [p for p in list(student.parameters()) + list(term.parameters()) if id(p) not in trained]
        assert all(p.grad is None for p in others)  # e.g. the student's classifier in FSP's pre-stage


def test_features_come_from_one_forward_per_model():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    calls = {'teacher': 0, 'student': 0}
    teacher.conv1.register_forward_hook(lambda *a: calls.__setitem__('teacher', calls['teacher'] + 1))
    student.conv1.register_forward_hook(lambda *a: calls.__setitem__('student', calls['student'] + 1))
    # (FSP needs equal widths; MLKD runs both models on a second, strongly augmented view by design)
    methods = {name: options for name, options in METHODS.items() if name not in SAME_WIDTH_PAIR and name != 'mlkd'}
    distiller = Distiller(teacher, student, {'ce': 1.0, 'kd': 1.0, **methods}, input_size=(3, 16, 16),
                          train_targets=TRAIN_TARGETS)
    calls.update(teacher=0, student=0)  # the dry run that sized the adapters
    distiller.train()
    targets = torch.arange(8) % 10
    distiller(Batch(torch.randn(8, 3, 16, 16), targets, torch.arange(8)))
    assert calls == {'teacher': 1, 'student': 1}


HETEROGENEOUS = [('resnet18', 'vit_tiny_patch16_224'), ('vit_tiny_patch16_224', 'resnet18')]


def _vit_pair(teacher_name, student_name):
    vit_kwargs = {'img_size': 64, 'depth': 4}  # 64 px: resnet18's last map is 2x2, so spatial terms are not trivial
    kwargs = {role: vit_kwargs for role, name in (('teacher', teacher_name), ('student', student_name))
              if name.startswith('vit')}
    return _pair(teacher_name, student_name, **kwargs)


VIT_RUNS = [(method, *pair) for method in sorted(name for name in METHODS if list_losses()[name].pairs == 'any')
            for pair in HETEROGENEOUS]


@pytest.mark.parametrize('method, teacher_name, student_name', quick_sample(VIT_RUNS, lambda run: run[1:]),
                         ids=['-'.join(run) for run in VIT_RUNS])
def test_method_runs_on_cnn_vit_pairs(method, teacher_name, student_name):
    teacher, student = _vit_pair(teacher_name, student_name)
    distiller = _build(method, teacher, student, 64)
    images, targets = torch.randn(4, 3, 64, 64), torch.arange(4)
    if distiller.loss_terms[method].main_stage:
        assert _one_step(distiller, images, targets).terms[method] > 0
    if distiller.loss_terms[method].pre_stage_epochs > 0:
        assert _one_step(distiller, images, targets, pre_stage=True).loss > 0


@pytest.mark.slow
def test_adapters_train_are_checkpointed_resume_exactly_and_stay_out_of_the_export(tmp_path):
    """FitNet's regressor and CRD's memory banks train with the student, are saved in checkpoints (loss_terms),
    restored on resume (a 1-epoch run resumed to 2 epochs ends like a 2-epoch run) and absent from the export."""
    teacher_path = str(tmp_path / 'teacher.safetensors')
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), teacher_path)
    sections = dict(teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher_path},
                    losses={'ce': 1.0, 'fitnet': 100.0, 'crd': {'weight': 0.8, 'negatives': 256}},
                    scheduler={'name': 'constant'})
    Trainer(from_dict(digits_config(tmp_path, 'full', epochs=2, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=1, **sections)), quiet=True).fit()
    first = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=2, **sections)), resume=True, quiet=True).fit()

    full = load_checkpoint(str(tmp_path / 'full' / 'checkpoints' / 'last.pt'))
    part = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))
    regressor_keys = [k for k in full['loss_terms'] if k.startswith('fitnet.regressor.')]
    assert 'fitnet.regressor.conv.weight' in regressor_keys and 'fitnet.regressor.bn.running_mean' in regressor_keys
    assert full['loss_terms']['crd.student_memory'].shape == (1438, 128)  # CRD's memory banks resume too
    assert not torch.equal(first['loss_terms']['crd.student_memory'], full['loss_terms']['crd.student_memory'])
    assert not torch.equal(first['loss_terms']['fitnet.regressor.conv.weight'],
                           full['loss_terms']['fitnet.regressor.conv.weight'])  # it trained in epoch 2
    for key in full['loss_terms']:
        assert torch.equal(full['loss_terms'][key], part['loss_terms'][key]), key
    for key in full['model']:
        assert torch.equal(full['model'][key], part['model'][key]), key
    metrics = [[json.loads(line) for line in open(tmp_path / run / 'metrics.jsonl')] for run in ('full', 'part')]
    assert strip_times(metrics[0]) == strip_times(metrics[1]) and 'train_fitnet' in metrics[0][0]
    exported = load_file(str(tmp_path / 'full' / 'student_last.safetensors'))
    assert exported.keys() == timm.create_model('cifar_resnet8', num_classes=10).state_dict().keys()


def test_a_term_given_only_options_gets_its_reference_weight():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    distiller = Distiller(teacher, student, {'ce': 1.0, 'fitnet': {}, 'kd': {'temperature': 2.0}, 'at': 5.0},
                          input_size=(3, 16, 16))
    assert distiller.loss_weights == {'ce': 1.0, 'fitnet': 100.0, 'kd': 0.9, 'at': 5.0}


def test_methods_without_heterogeneous_support_say_so_in_one_line():
    teacher, student = _vit_pair('vit_tiny_patch16_224', 'resnet18')
    with pytest.raises(distill.DistillError, match="loss 'ofd' needs a teacher whose stages end in BatchNorm"):
        _build('ofd', teacher, student, 64)
    with pytest.raises(distill.DistillError, match="loss 'fsp' needs equal channels"):
        _build('fsp', teacher, student, 64)
    assert _build('ofd', *_vit_pair('resnet18', 'vit_tiny_patch16_224'), 64)  # a CNN teacher is enough


ZOO_PAIRS = [('cifar_wrn_40_2', 'cifar_wrn_16_2'), ('cifar_vgg13', 'cifar_vgg8'), ('cifar_resnet32x4', 'cifar_vgg8')]


@pytest.mark.slow
@pytest.mark.parametrize('teacher_name,student_name', ZOO_PAIRS)
def test_every_method_steps_on_cifar_zoo_pairs(teacher_name, student_name):
    """CRD-benchmark pairs (same family with other widths, VGG, and a cross-family pair) at 32 px."""
    teacher, student = _pair(teacher_name, student_name)
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    for method in sorted(METHODS):
        if method == 'fsp' and [i['num_chs'] for i in teacher.feature_info] != \
                [i['num_chs'] for i in student.feature_info]:
            with pytest.raises(distill.DistillError, match="loss 'fsp' needs equal channels"):
                _build(method, teacher, student, 32)
            continue
        student.zero_grad(set_to_none=True)
        distiller = _build(method, teacher, student, 32)
        term = distiller.loss_terms[method]
        if term.main_stage:
            assert torch.isfinite(_one_step(distiller, images, targets).terms[method]), method
        if term.pre_stage_epochs > 0:
            assert _one_step(distiller, images, targets, pre_stage=True).loss > 0, method


def test_a_term_on_teacher_batch_statistics_refuses_the_teacher_cache():
    """Need.TEACHER_BATCH_STATISTICS (e.g. OFD's teacher_batch_statistics): the teacher's logits depend on the
    batch, so no (image, view) table can serve them, even for a logit-only term."""
    from distill import CachedTeacher, DistillError, LossTerm
    from distill.losses import register_loss

    @register_loss('test_batch_statistics')
    class BatchStatistics(LossTerm):
        needs = frozenset({Need.TEACHER_LOGITS, Need.TEACHER_BATCH_STATISTICS})

        def forward(self, step):
            return (step.student_logits - step.teacher_logits).pow(2).mean()

    teacher, student = (timm.create_model(name, num_classes=10) for name in ('cifar_resnet14', 'cifar_resnet8'))
    with pytest.raises(DistillError, match='a teacher on batch statistics'):
        Distiller(CachedTeacher(teacher, cache=None), student, {'test_batch_statistics': 1.0}, input_size=(3, 16, 16),
                  train_targets=TRAIN_TARGETS)
    distiller = Distiller(teacher, student, {'test_batch_statistics': 1.0}, input_size=(3, 16, 16),
                          train_targets=TRAIN_TARGETS).train()
    assert distiller.teacher.model.training and not distiller.eval().teacher.model.training
