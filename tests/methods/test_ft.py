"""FT (Kim et al., NeurIPS 2018) against RepDistiller's distiller_zoo/FT.py, and its paraphraser's pre-stage
(run together with FSP's) through the trainer."""
import pytest
import timm
import torch
import torch.nn.functional as F

from safetensors.torch import save_file

from distill.runs.checkpoint import load_checkpoint
from distill.config import from_dict
from distill.losses import ft_loss
from distill.training.trainer import Trainer
from helpers import assert_matches_reference, digits_config, random_maps


def ref_ft(f_s, f_t, p1=2, p2=1):
    """RepDistiller distiller_zoo/FT.py: FactorTransfer.factor_loss."""
    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    if p2 == 1:
        return (factor(f_s) - factor(f_t)).abs().mean()
    return (factor(f_s) - factor(f_t)).pow(p2).mean()


def test_ft_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_maps(gen, (4, 8, 8, 8), (4, 16, 4, 4))
    assert_matches_reference(ft_loss, ref_ft, student, teacher)


@pytest.mark.slow
def test_pre_stage_runs_before_epoch_one_then_fixes_the_paraphraser_and_resumes(tmp_path):
    """FT's paraphraser learns in the pre-stage (its reconstruction loss falls) and stays fixed afterwards; FSP's
    pre-stage changes the student's body but not its classifier; a resumed run skips the pre-stage."""
    teacher_path = str(tmp_path / 'teacher.safetensors')
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet20', num_classes=10).state_dict(), teacher_path)
    sections = dict(teacher={'name': 'cifar_resnet20', 'checkpoint': teacher_path}, scheduler={'name': 'constant'},
                    losses={'ce': 1.0, 'ft': {'pre_stage_epochs': 3}, 'fsp': {'pre_stage_epochs': 2}})
    trainer = Trainer(from_dict(digits_config(tmp_path, 'pre', epochs=1, **sections)), quiet=True)
    ft, student = trainer.distiller.loss_terms['ft'], trainer.distiller.student
    before = {k: v.clone() for k, v in {**{f'ft.{k}': v for k, v in ft.state_dict().items()},
                                        **student.state_dict()}.items()}
    trainer.run_pre_stage()
    assert not torch.equal(ft.paraphraser.encoder[0].weight, before['ft.paraphraser.encoder.0.weight'])
    assert torch.equal(ft.translator[0].weight, before['ft.translator.0.weight'])  # main-stage adapter
    assert not torch.equal(student.conv1.weight, before['conv1.weight'])  # FSP trained the body...
    assert torch.equal(student.fc.weight, before['fc.weight'])  # ...but not the classifier
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    log = open(tmp_path / 'pre' / 'log.txt').read()
    losses = [float(line.rsplit('loss ', 1)[1]) for line in log.splitlines() if 'pre-stage epoch' in line]
    assert len(losses) == 3 and 'pre-stage epoch 3/3 (ft)' in log and 'pre-stage epoch 2/3 (ft, fsp)' in log
    assert losses[2] < losses[0]

    Trainer(from_dict(digits_config(tmp_path, 'full', epochs=2, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=1, **sections)), quiet=True).fit()
    resumed = Trainer(from_dict(digits_config(tmp_path, 'part', epochs=2, **sections)), resume=True, quiet=True)
    resumed.fit()
    assert open(tmp_path / 'part' / 'log.txt').read().count('pre-stage epoch') == 3  # not run again
    full = load_checkpoint(str(tmp_path / 'full' / 'checkpoints' / 'last.pt'))
    part = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))
    assert all(torch.equal(full['model'][k], part['model'][k]) for k in full['model'])
    assert all(torch.equal(full['loss_terms'][k], part['loss_terms'][k]) for k in full['loss_terms'])
    # same seed and pre-stage as `trainer` above: two main epochs later the paraphraser is unchanged
    for key, value in ft.paraphraser.state_dict().items():
        assert torch.equal(value, full['loss_terms'][f'ft.paraphraser.{key}']), key
    assert not torch.equal(ft.translator[0].weight, full['loss_terms']['ft.translator.0.weight'])
