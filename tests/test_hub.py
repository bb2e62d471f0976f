"""timm- and Hub-native models: every name timm.create_model takes, checked without a download; hf-hub: fetch
failures and pretrained heads that do not fit the data as one line; local-dir: folders written by timm's
save_for_hf as teachers and students."""
import json
import os
import subprocess
import sys

import pytest
import timm
import yaml

import distill  # noqa: F401
from distill.cli import main
from distill.config import ModelConfig
from distill.errors import DistillError
from distill.models.factory import check_model_config
from helpers import digits_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def save_timm_folder(folder, name, num_classes, **kwargs):
    """A pretrained-model folder as the Hub holds them (config.json with pretrained_cfg, model.safetensors)."""
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return model


@pytest.mark.parametrize('name, pretrained', [('resnet18', False), ('resnet18.a1_in1k', True),
                                              ('hf-hub:timm/resnet18.a1_in1k', True), ('cifar_resnet8', False)])
def test_every_timm_name_scheme_is_accepted_without_a_download(name, pretrained):
    check_model_config(ModelConfig(name=name, pretrained=pretrained), 'teacher')


@pytest.mark.parametrize('name, pretrained, message', [
    ('resnet18.a1_in1kk', True, "no pretrained weights with that tag for teacher.name (did you mean "
                                "'resnet18.a1_in1k'?)"),
    ('hf-hub:resnet18', True, 'a Hub model is named hf-hub:<org>/<repo>'),
    ('timm/resnet18.a1_in1k', True, "Use 'hf-hub:timm/resnet18.a1_in1k' to load from the Hub"),
    ('hub:timm/x', True, "Unknown model source 'hub'"),
    ('resnet1888', False, "unknown model 'resnet1888' for teacher.name (did you mean 'resnet18'?)"),
])
def test_a_wrong_model_name_is_one_line(name, pretrained, message):
    with pytest.raises(DistillError) as error:
        check_model_config(ModelConfig(name=name, pretrained=pretrained), 'teacher')
    assert message in str(error.value) and '\n' not in str(error.value)


def test_a_local_dir_without_config_json_is_one_line(tmp_path):
    with pytest.raises(DistillError, match='holds no config.json; point it at a folder written by timm'):
        check_model_config(ModelConfig(name=f'local-dir:{tmp_path}', pretrained=True), 'teacher')


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_on_stderr(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump(digits_config(tmp_path / 'runs', epochs=1, data={'image_size': 32}, teacher={
        'name': 'hf-hub:timm/resnet18.a1_in1k', 'pretrained': True}, losses={'ce': 0.1, 'kd': 0.9})))
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    result = subprocess.run([sys.executable, '-m', 'distill', 'train', str(recipe)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('distill: error: could not fetch hf-hub:timm/resnet18.a1_in1k (') and \
        'name a local-dir: folder' in line
    assert not (tmp_path / 'runs').exists()


def test_a_pretrained_teacher_with_another_head_size_is_refused_and_a_student_gets_a_new_head(tmp_path, capsys):
    save_timm_folder(tmp_path / 'seven', 'resnet10t', 7)
    sections = dict(data={'image_size': 32}, losses={'ce': 0.1, 'kd': 0.9})
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump(digits_config(tmp_path / 'runs', epochs=1, teacher={
        'name': f'local-dir:{tmp_path / "seven"}', 'pretrained': True}, **sections)))
    assert main(['train', str(recipe)]) == 2
    assert ("the pretrained teacher local-dir:" in capsys.readouterr().err and
            not (tmp_path / 'runs').exists())
    with pytest.raises(DistillError, match=r'classifies 7 classes but the data has 10; set teacher_finetune to fit '
                                           r'a new head on this data first, or train on data with the teacher'):
        from distill.models.factory import create_model
        create_model(ModelConfig(name=f'local-dir:{tmp_path / "seven"}', pretrained=True), 10, 'teacher')
    notes = []
    student = create_model(ModelConfig(name=f'local-dir:{tmp_path / "seven"}', pretrained=True), 10, 'student',
                           notes=notes)
    assert student.get_classifier().out_features == 10
    assert notes == [f'student: new 10-class head (the pretrained head of local-dir:{tmp_path / "seven"} has 7 '
                     f'classes)']


LOGITS = """
import json, sys, torch, timm
{imports}
model = timm.create_model('local-dir:{folder}', pretrained=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    print(json.dumps(model(torch.rand(2, 3, {size}, {size})).tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize('student, size, imports', [('resnet10t', 32, ''), ('cifar_resnet8', 8, 'import distill')])
def test_the_exported_student_loads_with_plain_timm_and_reproduces_the_run(tmp_path, capsys, student, size, imports):
    """Every run writes <run>/student/ with timm's save_for_hf: a fresh process loads it with timm alone (a cifar_
    architecture after `import distill`), with the best epoch's weights; `distill eval` of the folder gives the
    run's best top-1 at the run's normalisation and size; `distill push --dry-run` lists it."""
    import json
    import torch
    from safetensors.torch import load_file
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump(digits_config(tmp_path / 'runs', epochs=2, student={'name': student},
                                                   data={'image_size': size})))
    assert main(['train', str(recipe), '--quiet']) == 0
    run = tmp_path / 'runs' / 'run'
    config = json.load(open(run / 'student' / 'config.json'))
    summary = json.load(open(run / 'summary.json'))
    checkpoint = torch.load(run / 'checkpoints' / 'best.pt', weights_only=True)
    assert (config['architecture'], config['num_classes'], config['label_names']) == (student, 10,
                                                                                     [str(i) for i in range(10)])
    assert config['pretrained_cfg']['mean'] == pytest.approx(checkpoint['normalization']['mean'].tolist())
    assert config['pretrained_cfg']['input_size'] == [3, size, size]
    # timm's default weights' tag and origin would misattribute the run's weights
    assert not {'tag', 'origin_url', 'license'} & set(config['pretrained_cfg'])
    code = LOGITS.format(imports=imports, folder=run / 'student', size=size)
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reference = timm.create_model(student, num_classes=10).eval()
    reference.load_state_dict(load_file(run / 'student_best.safetensors'))
    torch.manual_seed(0)
    with torch.no_grad():
        expected = reference(torch.rand(2, 3, size, size))
    assert torch.equal(torch.tensor(json.loads(result.stdout)), expected)
    capsys.readouterr()
    assert main(['eval', str(run / 'student'), '--data', 'digits']) == 0
    assert f"top-1 {summary['best_top1']:.2f}" in capsys.readouterr().out
    assert main(['push', str(run), '--repo-id', 'my-lab/student', '--dry-run']) == 0
    assert 'would upload' in capsys.readouterr().out and (run / 'student' / 'README.md').is_file()


def test_push_mistakes_and_an_unreachable_hub_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(['push', str(tmp_path), '--repo-id', 'a/b']) == 2
    assert 'has no exported student (student/config.json)' in capsys.readouterr().err
    save_timm_folder(tmp_path / 'student', 'resnet10t', 3)
    assert main(['push', str(tmp_path), '--repo-id', 'no-slash']) == 2
    assert "must look like ORG/NAME" in capsys.readouterr().err
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_TOKEN', 'hf_' + 'a' * 34)
    assert main(['push', str(tmp_path), '--repo-id', 'my-lab/student']) == 2
    err = capsys.readouterr().err
    assert err.startswith('distill: error: could not push to my-lab/student (') and len(err.splitlines()) == 1


@pytest.mark.slow
def test_each_pretrained_model_sees_its_own_normalisation_and_size(tmp_path):
    """A local-dir: teacher (resnet10t, mean/std 0.5, 64 px) and student (vit_tiny at 32 px, other mean/std): the
    loader normalises for the student; the teacher receives the same pixels re-normalised with its statistics and
    resized to 64 px (bilinear, antialiased); data.image_size defaults to the student's 32; the run trains."""
    import torch
    import torch.nn.functional as F
    from distill.config import from_dict
    from distill.training.trainer import Trainer
    teacher_stats, student_stats = ((0.5,) * 3, (0.5,) * 3), ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    teacher = timm.create_model('resnet10t', num_classes=10)
    timm.models.save_for_hf(teacher, str(tmp_path / 't'), safe_serialization=True, data_config={
        'mean': teacher_stats[0], 'std': teacher_stats[1], 'input_size': (3, 64, 64), 'interpolation': 'bilinear'})
    student = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32)
    timm.models.save_for_hf(student, str(tmp_path / 's'), safe_serialization=True, data_config={
        'mean': student_stats[0], 'std': student_stats[1], 'input_size': (3, 32, 32)})
    cfg = digits_config(tmp_path / 'runs', epochs=1, losses={'ce': 0.1, 'kd': 0.9},
                        student={'name': f'local-dir:{tmp_path / "s"}', 'pretrained': True},
                        teacher={'name': f'local-dir:{tmp_path / "t"}', 'pretrained': True})
    del cfg['data']['image_size']
    trainer = Trainer(from_dict(cfg), quiet=True)
    assert trainer.cfg.data.image_size == 32
    assert torch.equal(trainer.data.train.mean.flatten(), torch.tensor(student_stats[0]))
    seen = {}
    trainer.distiller.teacher.model.register_forward_pre_hook(lambda m, args: seen.__setitem__('teacher', args[0]))
    trainer.distiller.student.register_forward_pre_hook(lambda m, args: seen.__setitem__('student', args[0]))
    batch = next(iter(trainer.data.train))
    trainer.distiller.train()
    trainer.distiller(batch, epoch=0)
    assert torch.equal(seen['student'], batch.images)
    pixels = batch.images * torch.tensor(student_stats[1]).view(1, 3, 1, 1) + \
        torch.tensor(student_stats[0]).view(1, 3, 1, 1)
    expected = F.interpolate((pixels - 0.5) / 0.5, size=(64, 64), mode='bilinear', antialias=True)
    torch.testing.assert_close(seen['teacher'], expected, rtol=1e-5, atol=1e-5)
    assert 'teacher input: mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5], resized to 64 px (bilinear)' in \
        ' '.join(trainer.model_notes)
    assert trainer.fit()['epochs'] == 1


@pytest.mark.slow
def test_a_cached_teacher_with_its_own_input_gives_the_live_teachers_logits(tmp_path):
    """The teacher cache stores what the adapted teacher computes, under a key that includes its input."""
    import torch
    from distill.config import from_dict
    from distill.training.trainer import Trainer
    teacher = timm.create_model('resnet10t', num_classes=10)
    timm.models.save_for_hf(teacher, str(tmp_path / 't'), safe_serialization=True, data_config={
        'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'input_size': (3, 48, 48)})
    cfg = digits_config(tmp_path / 'runs', epochs=1, data={'image_size': 32}, losses={'ce': 0.1, 'kd': 0.9},
                        teacher={'name': f'local-dir:{tmp_path / "t"}', 'pretrained': True},
                        teacher_cache={'enabled': True, 'dir': str(tmp_path / 'cache')})
    trainer = Trainer(from_dict(cfg), quiet=True)
    cached = trainer.distiller.teacher
    assert cached.adapter is not None and cached.adapter.size == 48
    batch = next(iter(trainer.data.train))
    live = cached.model(cached.adapter(batch.images))
    torch.testing.assert_close(cached(batch)[0], live.float(), rtol=1e-3, atol=1e-3)  # stored as fp16
    assert 'teacher_input' in json.load(open(next((tmp_path / 'cache').glob('*/meta.json'))))
