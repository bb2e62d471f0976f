"""The method zoo: each loss against a straight transcription of the reference code that produced the paper's
table (loss and gradients), then every method through the engine on CNN pairs and CNN <-> ViT pairs."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from safetensors.torch import load_file, save_file

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Distiller
from distill.checkpoint import load_checkpoint
from distill.config import from_dict
from distill.losses import at_loss, dkd_loss, fitnet_loss, kd_loss, list_losses, pkt_loss, rkd_loss, sp_loss
from distill.trainer import Trainer
from helpers import digits_config, strip_times


# --- reference transcriptions (kept close to the reference code's own statements) -------------------------

def ref_at(f_s_list, f_t_list, p=2):
    """RepDistiller distiller_zoo/AT.py: Attention.forward / at_loss / at."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    losses = []
    for f_s, f_t in zip(f_s_list, f_t_list):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        losses.append((at(f_s) - at(f_t)).pow(2).mean())
    return sum(losses)


def ref_sp(f_s, f_t):
    """RepDistiller distiller_zoo/SP.py: Similarity.similarity_loss."""
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def ref_pkt(output_net, target_net, eps=1e-7):
    """RepDistiller distiller_zoo/PKT.py: PKT.cosine_similarity_loss."""
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net = torch.where(output_net != output_net, torch.zeros_like(output_net), output_net)
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net = torch.where(target_net != target_net, torch.zeros_like(target_net), target_net)
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def ref_rkd(f_s, f_t, w_d=25, w_a=50):
    """RepDistiller distiller_zoo/RKD.py: RKDLoss.forward and pdist."""
    def pdist(e, squared=False, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        if not squared:
            res = res.sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    student = f_s.view(f_s.shape[0], -1)
    teacher = f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = (student.unsqueeze(0) - student.unsqueeze(1))
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def ref_dkd(logits_student, logits_teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller mdistiller/distillers/DKD.py: dkd_loss, _get_gt_mask, _get_other_mask, cat_mask."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction='sum') * temperature ** 2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction='sum') * temperature ** 2 \
        / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def ref_fitnet(f_s, f_t):
    """RepDistiller distiller_zoo/FitNet.py: HintLoss = nn.MSELoss()."""
    return torch.nn.MSELoss()(f_s, f_t)


# --- loss functions against the references -----------------------------------------------------------------

def _maps(gen, *shapes):
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def _logits(gen):
    return [3 * torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)]


TARGETS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])

# name -> (ours, reference, inputs(gen) -> (student tensors, teacher tensors), extra args)
CASES = {
    'fitnet': (fitnet_loss, ref_fitnet, lambda g: _maps(g, (4, 8, 4, 4), (4, 8, 4, 4)), ()),
    'at': (lambda s, t: at_loss(s, t), ref_at,
           lambda g: [_maps(g, (4, 8, 8, 8), (4, 16, 4, 4)), _maps(g, (4, 32, 4, 4), (4, 8, 8, 8))], ()),
    'sp': (sp_loss, ref_sp, lambda g: _maps(g, (6, 8, 4, 4), (6, 16, 2, 2)), ()),
    'pkt': (pkt_loss, ref_pkt, lambda g: _maps(g, (6, 16), (6, 32)), ()),
    'rkd': (rkd_loss, ref_rkd, lambda g: _maps(g, (6, 16), (6, 32)), ()),
    'dkd': (dkd_loss, ref_dkd, _logits, (TARGETS, 1.0, 8.0, 4.0)),
}


def _leaves(value):
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize('name', sorted(CASES))
def test_loss_matches_reference_value_and_gradients(name):
    ours_fn, ref_fn, make_inputs, extra = CASES[name]
    gen = torch.Generator().manual_seed(0)
    student, teacher = make_inputs(gen)
    values, grads = [], []
    for fn in (ours_fn, ref_fn):
        inputs = [x.clone().requires_grad_() for x in _leaves(student)]
        value = fn(inputs if isinstance(student, list) else inputs[0], teacher, *extra)
        values.append(value)
        grads.append(torch.autograd.grad(value, inputs))
    assert values[0].ndim == 0 and values[0].dtype == torch.float32
    assert values[0].item() > 0
    torch.testing.assert_close(values[0], values[1].reshape(()), rtol=1e-5, atol=1e-7)
    for ours, ref in zip(*grads):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-8)


def test_dkd_equals_kd_decomposition_at_alpha_beta_one_weighted_by_target_probability():
    # DKD paper, eq. 4: KD = TCKD + (1 - p_t^T) * NCKD; with alpha = 1, beta = 1 DKD drops the (1 - p_t) factor,
    # so DKD >= KD whenever NCKD >= 0, with equality when the teacher puts all mass on the target.
    gen = torch.Generator().manual_seed(1)
    student, teacher = _logits(gen)
    assert dkd_loss(student, teacher, TARGETS, 1.0, 1.0, 4.0) >= kd_loss(student, teacher, 4.0) - 1e-6


def test_every_registered_method_has_a_reference_test():
    untested = set(list_losses()) - set(CASES) - {'ce', 'kd'} - {n for n in list_losses() if n.startswith('test_')}
    assert not untested, f'methods without a reference test: {sorted(untested)}'


# --- through the engine ---------------------------------------------------------------------------------

METHODS = {name: {'weight': 1.0} for name in CASES}


def _pair(teacher_name, student_name, num_classes=10, **kwargs):
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, num_classes=num_classes, **kwargs.get('teacher', {}))
    student = timm.create_model(student_name, num_classes=num_classes, **kwargs.get('student', {}))
    return teacher, student


def _one_step(distiller, images, targets):
    distiller.train()
    teacher_state = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    output = distiller(images, targets, indices=torch.arange(len(images)), epoch=0)
    output['loss'].backward()
    assert torch.isfinite(output['loss'])
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():  # BN running stats included
        assert torch.equal(value, teacher_state[key]), key
    return output


@pytest.mark.parametrize('method', sorted(METHODS))
def test_method_trains_student_and_adapters_only_on_cnn_pair(method):
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    distiller = Distiller(teacher, student, {'ce': 1.0, method: METHODS[method]}, input_size=(3, 16, 16))
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    output = _one_step(distiller, images, targets)
    assert set(output['terms']) == {'ce', method}
    assert output['terms'][method] > 0
    grads = {name: p.grad for name, p in distiller.student.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, param in distiller.loss_terms.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the term alone sends gradient into the student's body (not only through the CE head)
    distiller.zero_grad(set_to_none=True)
    alone = Distiller(teacher, student, {method: METHODS[method]}, input_size=(3, 16, 16))
    alone.loss_terms.load_state_dict(distiller.loss_terms.state_dict())
    alone.train()
    alone(images, targets, epoch=0)['loss'].backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0


def test_features_come_from_one_forward_per_model():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    calls = {'teacher': 0, 'student': 0}
    teacher.conv1.register_forward_hook(lambda *a: calls.__setitem__('teacher', calls['teacher'] + 1))
    student.conv1.register_forward_hook(lambda *a: calls.__setitem__('student', calls['student'] + 1))
    distiller = Distiller(teacher, student, {'ce': 1.0, 'kd': 1.0, **METHODS}, input_size=(3, 16, 16))
    calls.update(teacher=0, student=0)  # the dry run that sized the adapters
    distiller.train()
    distiller(torch.randn(8, 3, 16, 16), torch.arange(8) % 10)
    assert calls == {'teacher': 1, 'student': 1}


HETEROGENEOUS = [('resnet18', 'vit_tiny_patch16_224'), ('vit_tiny_patch16_224', 'resnet18')]


@pytest.mark.parametrize('teacher_name,student_name', HETEROGENEOUS)
@pytest.mark.parametrize('method', sorted(METHODS))
def test_method_runs_on_cnn_vit_pairs(method, teacher_name, student_name):
    vit_kwargs = {'img_size': 32, 'depth': 4}
    kwargs = {role: vit_kwargs for role, name in (('teacher', teacher_name), ('student', student_name))
              if name.startswith('vit')}
    teacher, student = _pair(teacher_name, student_name, **kwargs)
    distiller = Distiller(teacher, student, {'ce': 1.0, method: METHODS[method]}, input_size=(3, 32, 32))
    output = _one_step(distiller, torch.randn(4, 3, 32, 32), torch.arange(4))
    assert output['terms'][method] > 0


def test_adapters_train_are_checkpointed_resume_exactly_and_stay_out_of_the_export(tmp_path):
    """FitNet's regressor trains with the student, is saved in checkpoints (loss_terms), restored on resume
    (a 1-epoch run resumed to 2 epochs ends like a 2-epoch run) and is absent from the exported student."""
    teacher_path = str(tmp_path / 'teacher.safetensors')
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), teacher_path)
    sections = dict(teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher_path},
                    losses={'ce': 1.0, 'fitnet': 100.0}, scheduler={'name': 'constant'})
    Trainer(from_dict(digits_config(tmp_path, 'full', epochs=2, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=1, **sections)), quiet=True).fit()
    first = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=2, **sections)), resume=True, quiet=True).fit()

    full = load_checkpoint(str(tmp_path / 'full' / 'checkpoints' / 'last.pt'))
    part = load_checkpoint(str(tmp_path / 'part' / 'checkpoints' / 'last.pt'))
    regressor_keys = [k for k in full['loss_terms'] if k.startswith('fitnet.regressor.')]
    assert 'fitnet.regressor.conv.weight' in regressor_keys and 'fitnet.regressor.bn.running_mean' in regressor_keys
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
