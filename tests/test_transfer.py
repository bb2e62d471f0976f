"""Transfer learning: local pretrained weights in every format, a new head, freeze modes, per-layer learning rates
and gradual unfreezing, through the real trainer on digits."""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import distill  # noqa: F401
from distill import DistillError
from distill.runs.checkpoint import load_checkpoint
from distill.files import atomic_save
from distill.config import ModelConfig, TransferConfig, from_dict
from distill.training.trainer import Trainer, create_model
from distill.models.transfer import StageFreezer, layer_groups, replace_head
from helpers import digits_config, strip_times


def _pretrained(tmp_path, fmt, name='cifar_resnet8', num_classes=7):
    """A model 'pretrained' on another task (7 classes), saved in one of the supported formats."""
    torch.manual_seed(3)
    model = timm.create_model(name, num_classes=num_classes)
    state = model.state_dict()
    path = str(tmp_path / f'pretrained.{fmt}')
    if fmt == 'safetensors':
        save_file(state, path)
    elif fmt == 'pth':
        torch.save(state, path)
    elif fmt == 'repdistiller':  # RepDistiller / mdistiller: {'model': state_dict, 'epoch': ...}
        torch.save({'model': state, 'epoch': 240, 'best_acc': 70.0}, path)
    elif fmt == 'distill':
        atomic_save({'model': state, 'epoch': 3, 'config': {}}, path)
    return path, state


@pytest.mark.parametrize('fmt', ['safetensors', 'pth', 'repdistiller', 'distill'])
def test_local_pretrained_weights_load_with_a_new_head_and_the_old_head_is_reported(tmp_path, fmt):
    path, state = _pretrained(tmp_path, fmt)
    notes = []
    model = create_model(ModelConfig(name='cifar_resnet8', checkpoint=path), 10, 'student',
                         TransferConfig(new_head=True), notes)
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith('fc.'):
            assert torch.equal(own[key], value), key
    assert own['fc.weight'].shape == (10, 64)
    assert notes == [f"student: loaded {path} except its classifier (fc.bias (7,), fc.weight (7, 64)); "
                     f"new head for 10 classes"]


def test_a_class_count_mismatch_without_a_new_head_says_how_to_fix_it(tmp_path):
    path, _ = _pretrained(tmp_path, 'safetensors')
    with pytest.raises(DistillError, match="classifier has 7 classes but the data has 10; .*transfer.new_head=true"):
        create_model(ModelConfig(name='cifar_resnet8', checkpoint=path), 10, 'student')


def test_hub_weights_without_internet_are_a_one_line_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # fail at once, as with no network
    with pytest.raises(DistillError) as info:
        create_model(ModelConfig(name='resnet18', pretrained=True), 10, 'student')
    message = str(info.value)
    assert message.startswith('could not fetch resnet18 (') and 'student.checkpoint=' in message
    assert '\n' not in message


@pytest.mark.parametrize('name, classifier', [('cifar_resnet8', 'fc'), ('vit_tiny_patch16_224', 'head')])
def test_new_head_with_hidden_layer_and_dropout_on_a_cnn_and_a_vit(name, classifier):
    kwargs = {'img_size': 32, 'depth': 2} if name.startswith('vit') else {}
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(classifier + '.')}
    replace_head(model, 4, hidden=32, dropout=0.2)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Sequential) and dict(model.named_modules())[classifier] is head
    assert [type(m).__name__ for m in head] == ['Dropout', 'Linear', 'ReLU', 'Dropout', 'Linear']
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the backbone is untouched
    replace_head(model, 3)
    assert isinstance(model.get_classifier(), torch.nn.Linear) and model.get_classifier().out_features == 3


def _trainer(tmp_path, run, epochs=1, **transfer):
    path, _ = _pretrained(tmp_path, 'safetensors')
    cfg = digits_config(tmp_path, run, epochs=epochs, student={'name': 'cifar_resnet8', 'checkpoint': path},
                        transfer={'new_head': True, **transfer}, scheduler={'name': 'constant'})
    return Trainer(from_dict(cfg), quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize('freeze, frozen_stages, trainable_prefixes', [
    ('linear_probe', 0, ('fc.',)),
    ('partial', 1, ('layer2.', 'layer3.', 'fc.')),
    ('partial', 0, ('layer1.', 'layer2.', 'layer3.', 'fc.')),
    ('full', 0, ('conv1.', 'bn1.', 'layer1.', 'layer2.', 'layer3.', 'fc.')),
])
def test_freeze_modes_train_exactly_the_unfrozen_parameters_and_frozen_bn_stays_in_eval(
        tmp_path, freeze, frozen_stages, trainable_prefixes):
    trainer = _trainer(tmp_path, 'run', freeze=freeze, frozen_stages=frozen_stages)
    student = trainer.distiller.student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.fit()
    after = student.state_dict()
    for key in before:
        trained = key.startswith(trainable_prefixes)
        if key.endswith('num_batches_tracked'):
            continue
        # parameters and BN running statistics change exactly where the model is trainable
        assert torch.equal(before[key], after[key]) != trained, key
    trainer.distiller.train()
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.training == (name + '.').startswith(trainable_prefixes), name
    log = open(tmp_path / 'run' / 'log.txt').read()
    assert 'head (fc...): 650 trainable, 0 frozen' in log


def test_backbone_lr_scale_and_layer_decay_give_each_layer_its_rate(tmp_path):
    trainer = _trainer(tmp_path, 'lr', backbone_lr_scale=0.1, layer_decay=0.5)
    layers = layer_groups(trainer.distiller.student, coarse=False)  # stem, layer1, layer2, layer3, fc
    rates = {}
    for group in trainer.optimizer.param_groups:
        for param in group['params']:
            rates[id(param)] = group['lr']
    params = dict(trainer.distiller.student.named_parameters())
    head = len(layers) - 1
    for index, names in enumerate(layers):
        expected = 0.05 if index == head else 0.05 * 0.1 * 0.5 ** (head - index)
        for name in names:
            assert rates[id(params[name])] == pytest.approx(expected), name


@pytest.mark.slow
def test_gradual_unfreezing_opens_one_stage_per_period_and_resumes_exactly(tmp_path):
    trainer = _trainer(tmp_path, 'plan', epochs=3, freeze='linear_probe', unfreeze_every=1)
    freezer = trainer.freezer
    assert [freezer.frozen_groups(e) for e in range(6)] == [4, 3, 2, 1, 0, 0]  # stem + 3 stages, then none
    _trainer(tmp_path, 'full', epochs=3, freeze='linear_probe', unfreeze_every=1).fit()
    _trainer(tmp_path, 'part', epochs=1, freeze='linear_probe', unfreeze_every=1).fit()
    path, _ = _pretrained(tmp_path, 'safetensors')
    cfg = digits_config(tmp_path, 'part', epochs=3, student={'name': 'cifar_resnet8', 'checkpoint': path},
                        transfer={'new_head': True, 'freeze': 'linear_probe', 'unfreeze_every': 1},
                        scheduler={'name': 'constant'})
    Trainer(from_dict(cfg), resume=True, quiet=True).fit()
    metrics = [[json.loads(line) for line in open(tmp_path / run / 'metrics.jsonl')] for run in ('full', 'part')]
    assert strip_times(metrics[0]) == strip_times(metrics[1])
    full = load_checkpoint(str(tmp_path / 'full' / 'checkpoints' / 'last.pt'))['model']
    part = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))['model']
    assert all(torch.equal(full[k], part[k]) for k in full)
    assert 'unfrozen down to 2 frozen layer groups' in open(tmp_path / 'full' / 'log.txt').read()


@pytest.mark.parametrize('transfer, fragment', [
    ({'freeze': 'partial', 'frozen_stages': 5}, 'transfer.frozen_stages=5 but CifarResNet has 3 stages'),
    ({'freeze': 'linear'}, "transfer.freeze must be one of ['full', 'partial', 'linear_probe'], got 'linear'"),
    ({'backbone_lr_scale': 0.0}, 'transfer.backbone_lr_scale must be > 0, got 0.0'),
    ({'head_dropout': 1.0}, 'transfer.head_dropout must be in [0, 1), got 1.0'),
])
def test_bad_transfer_settings_are_one_line_errors(tmp_path, transfer, fragment):
    with pytest.raises(DistillError) as info:
        _trainer(tmp_path, 'bad', **transfer)
    assert fragment in str(info.value) and '\n' not in str(info.value)


def test_stages_come_from_timm_group_matchers_for_cnns_and_vits():
    for name, kwargs, stages in [('cifar_resnet8', {}, 3), ('resnet18', {}, 4),
                                 ('vit_tiny_patch16_224', {'img_size': 32, 'depth': 3}, 3)]:
        model = timm.create_model(name, num_classes=4, **kwargs)
        freezer = StageFreezer(model, TransferConfig(freeze='partial', frozen_stages=stages))
        freezer.apply(0)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        head = layer_groups(model, coarse=True)[-1]
        assert trainable == head, name


def test_parameter_transfer_copies_what_fits_maps_prefixes_and_reports_the_rest(tmp_path):
    from distill.models.transfer import transfer_parameters
    torch.manual_seed(0)
    teacher = timm.create_model('cifar_resnet20', num_classes=10)  # 3 blocks per stage
    student = timm.create_model('cifar_resnet8', num_classes=10)  # 1 block per stage, same widths
    source = teacher.state_dict()
    report = transfer_parameters(student, source, {'layer3.2.': 'layer3.0.'})
    own = student.state_dict()
    assert torch.equal(own['layer1.0.conv1.weight'], source['layer1.0.conv1.weight'])  # same name and shape
    assert torch.equal(own['layer3.0.conv2.weight'], source['layer3.2.conv2.weight'])  # mapped prefix
    assert torch.equal(own['fc.weight'], source['fc.weight'])
    assert 'layer3.0.downsample.0.weight (absent)' in report['not_copied']  # layer3.2 has no downsample
    assert len(report['copied']) + len(report['not_copied']) == len(own) and not report['resized']


def test_parameter_transfer_resamples_vit_position_and_patch_embeddings():
    from distill.models.transfer import transfer_parameters
    source = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, num_classes=4).state_dict()
    student = timm.create_model('vit_tiny_patch16_224', img_size=48, patch_size=8, depth=2, num_classes=4)
    report = transfer_parameters(student, source)  # 4x4 grid of 16 px patches -> 6x6 grid of 8 px patches
    assert report['resized'] == ['pos_embed (1, 17, 192) -> (1, 37, 192)',
                                 'patch_embed.proj.weight (192, 3, 16, 16) -> (192, 3, 8, 8)']
    own = student.state_dict()
    torch.testing.assert_close(own['pos_embed'][:, :1], source['pos_embed'][:, :1])  # the class token's own
    assert 'blocks.1.mlp.fc2.weight' in report['copied']


@pytest.mark.slow
def test_init_from_through_the_trainer_logs_the_report(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / 'teacher.safetensors')
    save_file(timm.create_model('cifar_resnet20', num_classes=10).state_dict(), path)
    cfg = digits_config(tmp_path, 'init', epochs=1, student={'name': 'cifar_resnet8'},
                        transfer={'init_from': path, 'init_map': {'layer3.2.': 'layer3.0.'}})
    Trainer(from_dict(cfg), quiet=True).fit()
    log = open(tmp_path / 'init' / 'log.txt').read()
    assert f'student initialised from {path}: copied 49 tensors' in log
    assert "not copied 7 ['layer3.0.conv1.weight ((64, 64, 3, 3) vs (64, 32, 3, 3))'" in log
    bad = digits_config(tmp_path, 'bad', epochs=1, transfer={'init_from': str(tmp_path / 'nope.safetensors')})
    with pytest.raises(DistillError, match='transfer.init_from not found'):
        Trainer(from_dict(bad), quiet=True)


@pytest.mark.slow
def test_extract_then_probe_matches_a_linear_probe_run_through_the_trainer(tmp_path, capsys):
    """A trained digits backbone, frozen: stored-feature probing (L-BFGS on pooled features) reaches the accuracy
    of a linear-probe run through the trainer (new head, backbone frozen, no augmentation) within 2 points.
    The backbone trains 8 epochs: on a barely trained one (3 epochs) the two probes' regularisation differs enough
    to split them by ~3 points."""
    from distill.cli import main
    from distill.tools.probe import load_features
    Trainer(from_dict(digits_config(tmp_path, 'backbone', epochs=8)), quiet=True).fit()
    weights = str(tmp_path / 'backbone' / 'student_last.safetensors')
    for out in ('f.safetensors', 'f.npz'):
        assert main(['extract', '--model', 'cifar_resnet8', '--checkpoint', weights, '--data', 'digits',
                     '--image-size', '8', '--layer', '2', '--out', str(tmp_path / out)]) == 0
    stored = load_features(str(tmp_path / 'f.safetensors'))
    assert stored['train_features'].shape == (1438, 64) and stored['val_layer'].shape == (359, 32)
    npz = load_features(str(tmp_path / 'f.npz'))
    assert all(torch.equal(stored[k], npz[k]) for k in stored)
    capsys.readouterr()
    assert main(['probe', str(tmp_path / 'f.safetensors')]) == 0
    probe_top1 = float(capsys.readouterr().out.split('val top-1 ')[1].split()[0])
    cfg = digits_config(tmp_path, 'linear_probe', epochs=20, student={'name': 'cifar_resnet8', 'checkpoint': weights},
                        data={'augment': 'none'}, optimizer={'lr': 0.2},
                        transfer={'new_head': True, 'freeze': 'linear_probe'})
    trainer_top1 = Trainer(from_dict(cfg), quiet=True).fit()['last_top1']
    # two different probes of one frozen backbone: both find what it separates (their regularisation differs, so
    # their gap depends on the machine's rounding; it is not asserted)
    assert probe_top1 > 90 and trainer_top1 > 90, (probe_top1, trainer_top1)
    assert main(['probe', str(tmp_path / 'missing.safetensors')]) == 2
    assert 'features file not found' in capsys.readouterr().err


@pytest.mark.slow
def test_two_stage_recipe_fine_tunes_the_teacher_then_distills_from_its_checkpoint(tmp_path, capsys):
    import yaml
    from distill.cli import main
    pretrained, _ = _pretrained(tmp_path, 'safetensors', name='cifar_resnet8x4')  # 7 classes, "another task"
    recipe = digits_config(tmp_path / 'runs', 'pipeline', epochs=2, student={'name': 'cifar_resnet8'},
                           teacher={'name': 'cifar_resnet8x4', 'checkpoint': pretrained},
                           losses={'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4.0}},
                           teacher_finetune={'epochs': 2, 'transfer': {'new_head': True, 'freeze': 'partial',
                                                                       'frozen_stages': 1}})
    path = tmp_path / 'pipeline.yaml'
    path.write_text(yaml.safe_dump(recipe))
    assert main(['train', str(path), '--quiet']) == 0
    first = json.load(open(tmp_path / 'runs' / 'pipeline-teacher' / 'summary.json'))
    second = json.load(open(tmp_path / 'runs' / 'pipeline' / 'summary.json'))
    assert first['student'] == 'cifar_resnet8x4' and first['epochs'] == 2
    assert second['teacher_top1'] == first['best_top1']  # stage 2 distills from stage 1's best weights
    resolved = yaml.safe_load(open(tmp_path / 'runs' / 'pipeline' / 'resolved.yaml'))
    assert resolved['teacher']['checkpoint'].endswith('pipeline-teacher/student_best.safetensors')
    assert 'stem (conv1...): 0 trainable' in open(tmp_path / 'runs' / 'pipeline-teacher' / 'log.txt').read()
    # running it on for another epoch reuses the finished teacher stage and resumes stage 2
    capsys.readouterr()
    assert main(['train', str(path), 'trainer.epochs=3', '--resume']) == 0
    assert 'teacher fine-tuning already done' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'runs' / 'pipeline' / 'summary.json'))['epochs'] == 3
    assert json.load(open(tmp_path / 'runs' / 'pipeline-teacher' / 'summary.json')) == first


def test_two_stage_recipe_without_a_teacher_is_a_one_line_error(tmp_path):
    cfg = digits_config(tmp_path, 'x', teacher_finetune={'epochs': 1})
    with pytest.raises(DistillError, match='teacher_finetune needs a teacher to fine-tune'):
        from_dict(cfg)


@pytest.mark.slow
def test_class_subsets_random_per_class_subsets_and_sparse_evaluation(tmp_path):
    from distill.config import DataConfig
    from distill.data import load_split
    cfg = DataConfig(name='digits', classes=['7', '3'], train_per_class=20, subset_seed=1)
    split = load_split(cfg, train=True)
    assert split.classes == ['7', '3'] and split.labels.bincount().tolist() == [20, 20]
    other = load_split(DataConfig(name='digits', classes=['7', '3'], train_per_class=20, subset_seed=2), True)
    first = load_split(DataConfig(name='digits', classes=['7', '3'], train_per_class=20), True)
    assert not torch.equal(split.images, other.images) and not torch.equal(split.images, first.images)
    with pytest.raises(DistillError, match=r"data.classes \['cat'\] not in digits"):
        load_split(DataConfig(name='digits', classes=['cat']), True)
    cfg = digits_config(tmp_path, 'sparse', epochs=5, trainer={'eval_every': 2})
    summary = Trainer(from_dict(cfg), quiet=True).fit()
    records = [json.loads(line) for line in open(tmp_path / 'sparse' / 'metrics.jsonl')]
    assert ['val_top1' in r for r in records] == [False, True, False, True, True]
    assert summary['best_epoch'] in (2, 4, 5) and summary['last_top1'] == records[-1]['val_top1']


@pytest.mark.slow
def test_a_teacher_recipe_trains_the_teacher_once_when_no_checkpoint_is_given(tmp_path, capsys):
    """A pair table's runs: the pair's teacher recipe (relative to the table) runs first when ``teacher.checkpoint``
    is not given; a second method of the pair (as in a grid) reuses the finished teacher run; the pair's loss
    options reach the method's term."""
    import yaml
    from distill.cli import main
    os.makedirs(tmp_path / 'pair' / 'methods')
    kd = digits_config(tmp_path / 'runs', 'kd', epochs=1, teacher={'name': 'cifar_resnet14', 'recipe': 'teacher.yaml'},
                       losses={'ce': 0.1, 'kd': 0.9})
    protocol = {key: value for key, value in kd.items() if key not in ('student', 'teacher', 'losses')}
    protocol['trainer'] = {key: value for key, value in kd['trainer'].items() if key != 'run_name'}
    (tmp_path / 'pair' / 'protocol.yaml').write_text(yaml.safe_dump(protocol))
    (tmp_path / 'pair' / 'teacher.yaml').write_text(yaml.safe_dump(
        digits_config(tmp_path / 'runs', 'the-teacher', epochs=2, student={'name': 'cifar_resnet14'})))
    (tmp_path / 'pair' / 'methods' / 'kd.yaml').write_text(yaml.safe_dump({'losses': kd['losses']}))
    (tmp_path / 'pair' / 'methods' / 'dkd.yaml').write_text(yaml.safe_dump({'losses': {'ce': 1.0, 'dkd': 1.0}}))
    table = tmp_path / 'pair' / 'pairs.yaml'
    table.write_text(yaml.safe_dump({'protocol': 'protocol.yaml', 'methods': 'methods', 'pairs': {
        'r14-r8': {'teacher': 'teacher.yaml', 'student': 'cifar_resnet8', 'losses': {'dkd': {'beta': 2.0}}}}}))
    assert main(['train', str(table), '--pair', 'r14-r8', '--method', 'kd', '--quiet']) == 0
    teacher = json.load(open(tmp_path / 'runs' / 'the-teacher' / 'summary.json'))
    assert json.load(open(tmp_path / 'runs' / 'r14-r8-kd' / 'summary.json'))['teacher_top1'] == teacher['best_top1']
    capsys.readouterr()
    assert main(['train', str(table), '--pair', 'r14-r8', '--method', 'dkd']) == 0
    assert 'teacher training' in capsys.readouterr().out  # "... already done"
    assert json.load(open(tmp_path / 'runs' / 'the-teacher' / 'summary.json')) == teacher
    resolved = yaml.safe_load(open(tmp_path / 'runs' / 'r14-r8-dkd' / 'resolved.yaml'))
    assert resolved['losses'] == {'ce': 1.0, 'dkd': {'weight': 1.0, 'beta': 2.0}}
    # the Python API never trains silently from a teacher without weights
    with pytest.raises(DistillError, match='the teacher has no weights yet'):
        Trainer(from_dict({**kd, 'teacher': {'name': 'cifar_resnet14', 'recipe': 'x.yaml'}}), quiet=True)
    # a plain recipe whose teacher recipe trains another model is refused
    (tmp_path / 'pair' / 'wrong.yaml').write_text(yaml.safe_dump(
        {**kd, 'teacher': {'name': 'cifar_resnet20', 'recipe': 'teacher.yaml'}}))
    assert main(['train', str(tmp_path / 'pair' / 'wrong.yaml')]) == 2
    assert 'trains cifar_resnet14, not the teacher cifar_resnet20' in capsys.readouterr().err
