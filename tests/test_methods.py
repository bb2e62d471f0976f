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
from distill.losses import (ab_loss, at_loss, cc_loss, dist_loss, dkd_loss, fitnet_loss, fsp_loss, ft_loss,
                            hcl_loss, kd_loss, list_losses, mlkd_loss, nst_loss, ofa_loss, ofd_loss, pkt_loss,
                            rkd_loss, sp_loss)
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


def ref_kd_logit_standardized(logits_student_in, logits_teacher_in, temperature=2.0):
    """sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py: kd_loss with logit_stand=True."""
    def normalize(logit):
        mean = logit.mean(dim=-1, keepdims=True)
        stdv = logit.std(dim=-1, keepdims=True)
        return (logit - mean) / (1e-7 + stdv)

    logits_student = normalize(logits_student_in)
    logits_teacher = normalize(logits_teacher_in)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


def ref_dist(logits_s, logits_t, beta=2.0, gamma=2.0, T=4.0):
    """hunto/image_classification_sota lib/models/losses/dist_kd.py: DIST.forward and helpers."""
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s = (logits_s / T).softmax(dim=1)
    y_t = (logits_t / T).softmax(dim=1)
    inter_loss = T ** 2 * inter_class_relation(y_s, y_t)
    intra_loss = T ** 2 * intra_class_relation(y_s, y_t)
    return beta * inter_loss + gamma * intra_loss


def ref_nst(g_s, g_t):
    """RepDistiller distiller_zoo/NST.py: NSTLoss.nst_loss (full_loss) and poly_kernel, summed over pairs."""
    def poly_kernel(a, b):
        a = a.unsqueeze(1)
        b = b.unsqueeze(2)
        return (a * b).sum(-1).pow(2)

    losses = []
    for f_s, f_t in zip(g_s, g_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        losses.append(poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
                      - 2 * poly_kernel(f_s, f_t).mean())
    return sum(losses)


def ref_cc(f_s, f_t):
    """RepDistiller distiller_zoo/CC.py: Correlation.forward (on the embedded features)."""
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def ref_fsp(g_s, g_t):
    """RepDistiller distiller_zoo/FSP.py: FSP.forward / compute_fsp / compute_loss, summed as in pretrain.py."""
    def compute_fsp(g):
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            fsp_list.append((bot * top).mean(-1))
        return fsp_list

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


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


def ref_ab(g_s, g_t, margin=1.0):
    """RepDistiller distiller_zoo/AB.py: ABLoss.forward / criterion_alternative_l2, summed as in pretrain.py."""
    feat_num = len(g_s)
    w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
    bsz = g_s[0].shape[0]

    def criterion_alternative_l2(source, target):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float() +
                (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        return torch.abs(loss).sum()

    losses = [criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
    losses = [w * l for w, l in zip(w, losses)]
    losses = [l / bsz for l in losses]
    losses = [l / 1000 * 3 for l in losses]
    return sum(losses)


def ref_ofd(feature_student, feature_teacher, margins):
    """mdistiller distillers/OFD.py: feat_loss and OFD.ofd_loss (after the connectors)."""
    def feat_loss(source, target, margin):
        margin = margin.to(source)
        loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
                + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
                + (source - target) ** 2 * (target > 0).float())
        return torch.abs(loss).mean(dim=0).sum()

    loss_distill = 0
    feat_num = len(feature_student)
    for i in range(feat_num):
        loss_distill = loss_distill + feat_loss(
            feature_student[i], F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            margins[i].unsqueeze(1).unsqueeze(2).unsqueeze(0)) / 2 ** (feat_num - i - 1)
    return loss_distill


def ref_hcl(fstudent, fteacher):
    """mdistiller distillers/ReviewKD.py: hcl_loss."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def ref_mlkd(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong,
             temperature=4.0):
    """Official MLKD mdistiller/distillers/MLKD.py: forward_train's distillation terms (kd, cc and bc on the
    weak view, kd on the strong view), with its kd_loss/cc_loss/bc_loss and numpy percentile gates."""
    import numpy as np

    def kd_loss(s, t, T):
        return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1).mean() * T ** 2

    def cc_loss(s, t, T):
        batch_size, class_num = t.shape
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        return ((torch.mm(pt.transpose(1, 0), pt) - torch.mm(ps.transpose(1, 0), ps)) ** 2).sum() / class_num

    def bc_loss(s, t, T):
        batch_size, class_num = t.shape
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        return ((torch.mm(pt, pt.transpose(1, 0)) - torch.mm(ps, ps.transpose(1, 0))) ** 2).sum() / batch_size

    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0)
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    sw, tw, ss, ts = logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong
    loss_kd_weak = sum((kd_loss(sw, tw, T) * mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    loss_kd_strong = (kd_loss(ss, ts, temperature) + kd_loss(ss, ts, 3.0) + kd_loss(ss, ts, 5.0)
                      + kd_loss(sw, tw, 2.0) + kd_loss(sw, tw, 6.0))
    loss_cc_weak = sum((cc_loss(sw, tw, T) * class_conf_mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    loss_bc_weak = sum((bc_loss(sw, tw, T) * mask).mean() for T in (temperature, 3.0, 5.0, 2.0, 6.0))
    return loss_kd_weak + loss_kd_strong + loss_cc_weak + loss_bc_weak


def ref_ofa(logits_student, logits_teacher, eps=1.5, temperature=2.0):
    """Hao840/OFAKD distillers/ofa.py: ofa_loss (labels as in OFA.forward: one-hot of the integer targets)."""
    target_mask = F.one_hot(TARGETS, logits_student.size(-1))
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    loss = torch.sum(- (prod - target_mask) * torch.log(pred_student), dim=-1)
    return loss.mean()


def ref_fitnet(f_s, f_t):
    """RepDistiller distiller_zoo/FitNet.py: HintLoss = nn.MSELoss()."""
    return torch.nn.MSELoss()(f_s, f_t)


# --- loss functions against the references -----------------------------------------------------------------

def _maps(gen, *shapes):
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def _logits(gen):
    return [3 * torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)]


TARGETS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
MARGINS = [-torch.rand(8, generator=torch.Generator().manual_seed(5)), -torch.rand(16)]

# name -> (ours, reference, inputs(gen) -> (student tensors, teacher tensors), extra args)
CASES = {
    'fitnet': (fitnet_loss, ref_fitnet, lambda g: _maps(g, (4, 8, 4, 4), (4, 8, 4, 4)), ()),
    'at': (lambda s, t: at_loss(s, t), ref_at,
           lambda g: [_maps(g, (4, 8, 8, 8), (4, 16, 4, 4)), _maps(g, (4, 32, 4, 4), (4, 8, 8, 8))], ()),
    'sp': (sp_loss, ref_sp, lambda g: _maps(g, (6, 8, 4, 4), (6, 16, 2, 2)), ()),
    'pkt': (pkt_loss, ref_pkt, lambda g: _maps(g, (6, 16), (6, 32)), ()),
    'rkd': (rkd_loss, ref_rkd, lambda g: _maps(g, (6, 16), (6, 32)), ()),
    'dkd': (dkd_loss, ref_dkd, _logits, (TARGETS, 1.0, 8.0, 4.0)),
    'dkd_logit_standardization': (lambda s, t: dkd_loss(s, t, TARGETS, 1.0, 8.0, 2.0, True),
                                  lambda s, t: ref_dkd(_zscore(s), _zscore(t), TARGETS, 1.0, 8.0, 2.0), _logits, ()),
    'kd_logit_standardization': (lambda s, t: kd_loss(s, t, 2.0, True), ref_kd_logit_standardized, _logits, ()),
    'dist': (lambda s, t: dist_loss(s, t, 2.0, 2.0, 4.0), ref_dist, _logits, ()),
    'nst': (nst_loss, ref_nst,
            lambda g: [_maps(g, (4, 8, 8, 8), (4, 16, 4, 4)), _maps(g, (4, 32, 4, 4), (4, 8, 8, 8))], ()),
    'fsp': (fsp_loss, ref_fsp, lambda g: [_maps(g, (4, 8, 8, 8), (4, 8, 8, 8), (4, 16, 4, 4)),
                                          _maps(g, (4, 8, 8, 8), (4, 8, 8, 8), (4, 16, 4, 4))], ()),
    'ft': (ft_loss, ref_ft, lambda g: _maps(g, (4, 8, 8, 8), (4, 16, 4, 4)), ()),
    'ab': (ab_loss, ref_ab, lambda g: [_maps(g, (4, 8, 8, 8), (4, 16, 4, 4)), _maps(g, (4, 8, 8, 8), (4, 16, 4, 4))],
           ()),
    'ofd': (lambda s, t: ofd_loss(s, t, MARGINS), lambda s, t: ref_ofd(s, t, MARGINS),
            lambda g: [_maps(g, (4, 8, 4, 4), (4, 16, 2, 2)), _maps(g, (4, 8, 8, 8), (4, 16, 4, 4))], ()),
    'reviewkd': (hcl_loss, ref_hcl,
                 lambda g: [_maps(g, (4, 8, 8, 8), (4, 16, 1, 1)), _maps(g, (4, 8, 8, 8), (4, 16, 1, 1))], ()),
    'mlkd': (lambda s, t: mlkd_loss(s[0], t[0], s[1], t[1]), lambda s, t: ref_mlkd(s[0], t[0], s[1], t[1]),
             lambda g: [[3 * torch.randn(8, 10, generator=g), 3 * torch.randn(8, 10, generator=g)],
                        [3 * torch.randn(8, 10, generator=g), 3 * torch.randn(8, 10, generator=g)]], ()),
    'ofa': (lambda s, t: ofa_loss(s, t, TARGETS, 1.5, 2.0), ref_ofa, _logits, ()),
    'cc': (cc_loss, ref_cc, lambda g: [F.normalize(x) for x in _maps(g, (6, 16), (6, 16))], ()),
}


def _zscore(logits):
    """The paper's Z-score (Sun et al. 2024, Algorithm 1), with the official code's unbiased std and eps."""
    return (logits - logits.mean(-1, keepdim=True)) / (1e-7 + logits.std(-1, keepdim=True))


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
    tested = set(CASES) | {'ce', 'kd', 'vid', 'crd', 'ctkd'}  # module tests below (also for ofd, reviewkd)
    untested = set(list_losses()) - tested - {n for n in list_losses() if n.startswith('test_')}
    assert not untested, f'methods without a reference test: {sorted(untested)}'


# --- through the engine ---------------------------------------------------------------------------------

METHODS = {name: {'weight': 1.0} for name in list_losses() if name not in ('ce', 'kd') and not name.startswith('test_')}
METHODS['crd'] = {'weight': 1.0, 'negatives': 64}
TRAIN_TARGETS = torch.arange(40) % 10  # the engine's tests index a 40-sample "training set"


def _pair(teacher_name, student_name, num_classes=10, **kwargs):
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, num_classes=num_classes, **kwargs.get('teacher', {}))
    student = timm.create_model(student_name, num_classes=num_classes, **kwargs.get('student', {}))
    return teacher, student


def _one_step(distiller, images, targets, pre_stage=False):
    """A main-training step (or a pre-stage step) with the teacher checked untouched."""
    distiller.train()
    teacher_state = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    indices = torch.arange(len(images))
    if pre_stage:  # as Trainer.run_pre_stage: the pre-stage modules train even if fixed afterwards
        for name in distiller.pre_stage_terms(0):
            for module in distiller.loss_terms[name].pre_stage_modules(distiller.student):
                module.requires_grad_(True)
    strong = images.flip(-1).roll(1, dims=-2) if distiller.needs_strong_view else None  # a second view (MLKD)
    output = distiller.pre_stage_forward(images, targets, indices, 0) if pre_stage else \
        distiller(images, targets, indices=indices, epoch=0, strong_images=strong)
    output['loss'].backward()
    assert torch.isfinite(output['loss'])
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():  # BN running stats included
        assert torch.equal(value, teacher_state[key]), key
    return output


def _build(method, teacher, student, image_size):
    return Distiller(teacher, student, {'ce': 1.0, method: METHODS[method]}, input_size=(3, image_size, image_size),
                     train_targets=TRAIN_TARGETS)


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
        assert set(output['terms']) == {'ce', method} and output['terms'][method] > 0
        assert all(p.grad is not None for p in distiller.student.parameters())
        for name, param in term.named_parameters():  # adapters trained in the main stage get gradient
            assert (param.grad is not None and param.grad.abs().sum() > 0) == param.requires_grad, name
        # the term alone sends gradient into the student's body (not only through the CE head)
        distiller.zero_grad(set_to_none=True)
        alone = Distiller(teacher, student, {method: METHODS[method]}, input_size=(3, 16, 16),
                          train_targets=TRAIN_TARGETS)
        alone.train()
        alone(images, targets, indices=torch.arange(8), epoch=0, strong_images=images.flip(-1))['loss'].backward()
        assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    if term.pre_stage_epochs > 0:
        distiller.zero_grad(set_to_none=True)
        modules = term.pre_stage_modules(student)
        output = _one_step(distiller, images, targets, pre_stage=True)
        assert set(output['terms']) == {method} and output['loss'] > 0
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
    distiller(torch.randn(8, 3, 16, 16), targets, indices=torch.arange(8))
    assert calls == {'teacher': 1, 'student': 1}


HETEROGENEOUS = [('resnet18', 'vit_tiny_patch16_224'), ('vit_tiny_patch16_224', 'resnet18')]


def _vit_pair(teacher_name, student_name):
    vit_kwargs = {'img_size': 64, 'depth': 4}  # 64 px: resnet18's last map is 2x2, so spatial terms are not trivial
    kwargs = {role: vit_kwargs for role, name in (('teacher', teacher_name), ('student', student_name))
              if name.startswith('vit')}
    return _pair(teacher_name, student_name, **kwargs)


@pytest.mark.parametrize('teacher_name,student_name', HETEROGENEOUS)
@pytest.mark.parametrize('method', sorted(name for name in METHODS if list_losses()[name].pairs == 'any'))
def test_method_runs_on_cnn_vit_pairs(method, teacher_name, student_name):
    teacher, student = _vit_pair(teacher_name, student_name)
    distiller = _build(method, teacher, student, 64)
    images, targets = torch.randn(4, 3, 64, 64), torch.arange(4)
    if distiller.loss_terms[method].main_stage:
        assert _one_step(distiller, images, targets)['terms'][method] > 0
    if distiller.loss_terms[method].pre_stage_epochs > 0:
        assert _one_step(distiller, images, targets, pre_stage=True)['loss'] > 0


def test_fsp_refuses_a_pair_of_different_widths_in_one_line():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    with pytest.raises(distill.DistillError, match=r"loss 'fsp' needs equal channels at every stage, but the "
                                                   r"student has \[16, 16, 32, 64\] and the teacher \[32, 64"):
        _build('fsp', teacher, student, 16)


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


def test_vid_matches_repdistiller_vidloss():
    """RepDistiller distiller_zoo/VID.py VIDLoss, transcribed, with our regressor's weights."""
    from distill.losses.vid import VIDLoss

    class RefVIDLoss(torch.nn.Module):
        def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
            super().__init__()

            def conv1x1(in_channels, out_channels, stride=1):
                return torch.nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False, stride=stride)
            self.regressor = torch.nn.Sequential(
                conv1x1(num_input_channels, num_mid_channel), torch.nn.ReLU(),
                conv1x1(num_mid_channel, num_mid_channel), torch.nn.ReLU(),
                conv1x1(num_mid_channel, num_target_channels))
            import numpy as np
            self.log_scale = torch.nn.Parameter(
                np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels))
            self.eps = eps

        def forward(self, input, target):
            s_H, t_H = input.shape[2], target.shape[2]
            if s_H > t_H:
                input = F.adaptive_avg_pool2d(input, (t_H, t_H))
            elif s_H < t_H:
                target = F.adaptive_avg_pool2d(target, (s_H, s_H))
            pred_mean = self.regressor(input)
            pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
            pred_var = pred_var.view(1, -1, 1, 1)
            neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
            return torch.mean(neg_log_prob)

    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 8, 8, 8, generator=gen), torch.randn(4, 16, 4, 4, generator=gen)]
    teacher = [torch.randn(4, 12, 4, 4, generator=gen), torch.randn(4, 24, 8, 8, generator=gen)]
    term = VIDLoss(student_layers=[1, 2], teacher_layers=[1, 2])
    term.setup(distill.SetupContext(student_shapes={1: student[0].shape, 2: student[1].shape},
                                    teacher_shapes={1: teacher[0].shape, 2: teacher[1].shape}))
    refs = [RefVIDLoss(s.shape[1], t.shape[1], t.shape[1]) for s, t in zip(student, teacher)]
    for ref, ours in zip(refs, term.regressors):
        for ref_conv, our_conv in zip(ref.regressor[::2], ours.mean[::2]):
            ref_conv.weight.data.copy_(our_conv.weight.data)
        torch.testing.assert_close(ref.log_scale.data, ours.log_scale.data)
    step = distill.StepOutputs(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long),
                               student_features={1: student[0], 2: student[1]},
                               teacher_features={1: teacher[0], 2: teacher[1]})
    ours = term(step)
    ref = sum(r(s, t) for r, s, t in zip(refs, student, teacher))
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(term.regressors[0].log_scale.grad, refs[0].log_scale.grad)
    torch.testing.assert_close(term.regressors[1].mean[0].weight.grad, refs[1].regressor[0].weight.grad)


class RefContrastMemory(torch.nn.Module):
    """RepDistiller crd/memory.py ContrastMemory.forward (with contrast_idx given), transcribed."""

    def __init__(self, memory_v1, memory_v2, K, T=0.07, momentum=0.5):
        super().__init__()
        self.K = K
        self.params = torch.tensor([K, T, -1, -1, momentum])
        self.memory_v1, self.memory_v2 = memory_v1.clone(), memory_v2.clone()

    def forward(self, v1, v2, y, idx):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()
        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            self.memory_v1.index_copy_(0, y, l_pos.div(l_norm))
            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            self.memory_v2.index_copy_(0, y, ab_pos.div(ab_norm))
        return out_v1, out_v2


def ref_contrast_loss(x, n_data, eps=1e-7):
    """RepDistiller crd/criterion.py ContrastLoss.forward."""
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1. / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


@pytest.mark.parametrize('num_data', [50, 400])  # K + 1 = 13 rows: whole-bank GEMM (50) and row-gather (400) paths
def test_crd_matches_repdistiller_memory_loss_and_update(num_data):
    from distill.losses.crd import CRDLoss
    train_targets = torch.arange(num_data) % 5
    term = CRDLoss(embed_dim=16, negatives=12)
    term.setup(distill.SetupContext(student_shapes={'pre_logits': torch.Size([2, 8])},
                                    teacher_shapes={'pre_logits': torch.Size([2, 24])}, train_targets=train_targets))
    ref_memory = RefContrastMemory(term.student_memory, term.teacher_memory, K=12)
    gen = torch.Generator().manual_seed(0)
    for step_index in range(3):  # the first call fixes Z, later ones use it and the updated memories
        indices = torch.randperm(num_data, generator=gen)[:6]
        student = torch.randn(6, 8, generator=gen, requires_grad=True)
        teacher = torch.randn(6, 24, generator=gen)
        targets = train_targets[indices]
        torch.manual_seed(step_index)
        negatives = term.sampler(targets, 12)
        assert not (train_targets[negatives] == targets[:, None]).any()  # 'exact' mode: other classes only
        torch.manual_seed(step_index)
        ours = term(distill.StepOutputs(torch.zeros(6, 5), targets, indices=indices,
                                        student_features={'pre_logits': student},
                                        teacher_features={'pre_logits': teacher}))
        our_grad, = torch.autograd.grad(ours, student)

        student_ref = student.detach().clone().requires_grad_()
        f_s, f_t = term.embed_student(student_ref), term.embed_teacher(teacher)
        out_s, out_t = ref_memory(f_s, f_t, indices, torch.cat([indices[:, None], negatives], 1))
        ref = ref_contrast_loss(out_s, num_data) + ref_contrast_loss(out_t, num_data)
        ref_grad, = torch.autograd.grad(ref.sum(), student_ref)
        torch.testing.assert_close(ours, ref.reshape(()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(term.student_memory, ref_memory.memory_v1)
        torch.testing.assert_close(term.teacher_memory, ref_memory.memory_v2)
    torch.testing.assert_close(term.normalizers, ref_memory.params[2:4].float(), rtol=1e-5, atol=0)


def test_crd_negative_sampler_is_uniform_over_other_classes():
    from distill.losses.crd import NegativeSampler
    train_targets = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    sampler = NegativeSampler(train_targets)
    torch.manual_seed(0)
    negatives = sampler(torch.tensor([1]), 90000)[0]
    counts = torch.bincount(negatives, minlength=100).float()
    assert counts[10:40].sum() == 0  # never its own class
    others = torch.cat([counts[:10], counts[40:]])
    assert others.min() > 0 and (others.std() / others.mean()) < 0.05  # 70 others, ~1286 draws each


def test_a_term_given_only_options_gets_its_reference_weight():
    teacher, student = _pair('cifar_resnet8x4', 'cifar_resnet8')
    distiller = Distiller(teacher, student, {'ce': 1.0, 'fitnet': {}, 'kd': {'temperature': 2.0}, 'at': 5.0},
                          input_size=(3, 16, 16))
    assert distiller.loss_weights == {'ce': 1.0, 'fitnet': 100.0, 'kd': 0.9, 'at': 5.0}


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


def test_ofd_margins_match_the_reference_formula():
    """mdistiller OFD.init_ofd_modules: margin per channel of the teacher BN before the ReLU."""
    from scipy.stats import norm
    import math
    from distill.losses.ofd import bn_margin
    bn = torch.nn.BatchNorm2d(6)
    bn.weight.data = torch.tensor([1.0, 0.5, -2.0, 0.1, 1.0, 0.3])
    bn.bias.data = torch.tensor([0.0, 1.0, -1.0, 0.5, 4.0, -0.2])  # channel 4: P(x < 0) < 0.001 -> -3 s
    expected = []
    for s, m in zip(bn.weight.data, bn.bias.data):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            expected.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            expected.append(-3 * s)
    torch.testing.assert_close(bn_margin(bn), torch.tensor(expected, dtype=torch.float32))


def test_reviewkd_review_path_matches_mdistiller_abf():
    """mdistiller ReviewKD.forward_train and ABF.forward, transcribed, with our fusion modules' weights."""
    from distill.losses.reviewkd import ReviewKDLoss

    class ABF(torch.nn.Module):
        def __init__(self, in_channel, mid_channel, out_channel, fuse):
            super().__init__()
            self.conv1 = torch.nn.Sequential(torch.nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                             torch.nn.BatchNorm2d(mid_channel))
            self.conv2 = torch.nn.Sequential(
                torch.nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                torch.nn.BatchNorm2d(out_channel))
            self.att_conv = torch.nn.Sequential(torch.nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                                                torch.nn.Sigmoid()) if fuse else None

        def forward(self, x, y=None, shape=None, out_shape=None):
            n, _, h, w = x.shape
            x = self.conv1(x)
            if self.att_conv is not None:
                y = F.interpolate(y, (shape, shape), mode="nearest")
                z = torch.cat([x, y], dim=1)
                z = self.att_conv(z)
                x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
            if x.shape[-1] != out_shape:
                x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
            y = self.conv2(x)
            return y, x

    gen = torch.Generator().manual_seed(0)
    # student resnet8-like stages 1..3 + pooled; teacher resnet8x4-like preact stages 1..3 + pooled
    student = [torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 32, 4, 4, generator=gen),
               torch.randn(2, 64, 2, 2, generator=gen), torch.randn(2, 64, generator=gen)]
    teacher = [torch.randn(2, 64, 8, 8, generator=gen), torch.randn(2, 128, 4, 4, generator=gen),
               torch.randn(2, 256, 2, 2, generator=gen), torch.randn(2, 256, generator=gen)]
    term = ReviewKDLoss(warmup=20)
    term.student_layers, term.teacher_layers = [1, 2, 3, 'pre_logits'], ['preact:1', 'preact:2', 'preact:3',
                                                                         'pre_logits']
    term.setup(distill.SetupContext(student_shapes=dict(zip(term.student_layers, (f.shape for f in student))),
                                    teacher_shapes=dict(zip(term.teacher_layers, (f.shape for f in teacher)))))
    in_channels, out_channels = [16, 32, 64, 64], [64, 128, 256, 256]
    shapes = out_shapes = [1, 2, 4, 8]  # mdistiller's cfg lists them deepest first
    abfs = torch.nn.ModuleList(ABF(c, min(512, in_channels[-1]), out_channels[i], i < len(in_channels) - 1)
                               for i, c in enumerate(in_channels))[::-1]
    for ref, ours in zip(abfs, term.fusions):
        renamed = {k.replace('reduce', 'conv1').replace('project', 'conv2').replace('attention', 'att_conv.0'): v
                   for k, v in ours.state_dict().items()}
        ref.load_state_dict(renamed)
    term.train(), abfs.train()
    for epoch in (4, 30):
        x = [f.clone().requires_grad_() for f in student]
        step = distill.StepOutputs(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), epoch=epoch - 1,
                                   student_features=dict(zip(term.student_layers, x)),
                                   teacher_features=dict(zip(term.teacher_layers, teacher)))
        ours = term(step)
        features = [f.clone().requires_grad_() for f in student]
        x_ref = (features[:3] + [features[3].unsqueeze(-1).unsqueeze(-1)])[::-1]
        results = []
        out_features, res_features = abfs[0](x_ref[0], out_shape=out_shapes[0])
        results.append(out_features)
        for feat, abf, shape, out_shape in zip(x_ref[1:], abfs[1:], shapes[1:], out_shapes[1:]):
            out_features, res_features = abf(feat, res_features, shape, out_shape)
            results.insert(0, out_features)
        teacher_maps = teacher[:3] + [teacher[3].unsqueeze(-1).unsqueeze(-1)]
        ref = min(epoch / 20, 1.0) * ref_hcl(results, teacher_maps)
        torch.testing.assert_close(ours, ref)
        for ours_grad, ref_grad in zip(torch.autograd.grad(ours, x), torch.autograd.grad(ref, features)):
            torch.testing.assert_close(ours_grad, ref_grad)


def test_methods_without_heterogeneous_support_say_so_in_one_line():
    teacher, student = _vit_pair('vit_tiny_patch16_224', 'resnet18')
    with pytest.raises(distill.DistillError, match="loss 'ofd' needs a teacher whose stages end in BatchNorm"):
        _build('ofd', teacher, student, 64)
    with pytest.raises(distill.DistillError, match="loss 'fsp' needs equal channels"):
        _build('fsp', teacher, student, 64)
    assert _build('ofd', *_vit_pair('resnet18', 'vit_tiny_patch16_224'), 64)  # a CNN teacher is enough


def test_ctkd_is_kd_at_the_learned_temperature_with_a_reversed_curriculum_gradient():
    """zhengli97/CTKD: T = 1 + 20 sigmoid(theta), theta = 1 at start; CosineDecay(0, -1, 10) at 1-based epochs
    gives the gradient-reversal factor; DistillKL = batchmean KL * T^2."""
    import math
    from distill.losses.ctkd import CTKDLoss
    gen = torch.Generator().manual_seed(0)
    student, teacher = _logits(gen)
    term = CTKDLoss()
    for epoch in (0, 4, 20):
        term.zero_grad()
        decay_value = (math.cos(min(epoch + 1, 10) * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
        theta = torch.ones(1, requires_grad=True)
        T = 1 + 20 * torch.sigmoid(theta)
        ref = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction='batchmean') * T * T
        ref_grad, = torch.autograd.grad(ref.sum(), theta)
        ours = term(distill.StepOutputs(student, TARGETS, teacher_logits=teacher, epoch=epoch))
        ours.backward()
        torch.testing.assert_close(ours, ref.reshape(()))
        torch.testing.assert_close(term.theta.grad, decay_value * ref_grad)  # reversed and scaled
        assert (epoch == 20) == math.isclose(decay_value, -1.0)


def test_strong_view_batches_are_reproducible_and_mlkd_trains_and_resumes_exactly(tmp_path):
    """The loader adds a RandAugment view only when a term needs it; a 1-epoch MLKD run resumed to 2 epochs ends
    like a 2-epoch run (the strong views come from the checkpointed data generator)."""
    from distill.data import build_data
    cfg = from_dict(digits_config(tmp_path, epochs=1))
    assert next(iter(build_data(cfg.data, seed=3).train)).strong is None
    first, second = build_data(cfg.data, seed=3), build_data(cfg.data, seed=3)
    first.train.strong_view = second.train.strong_view = True
    (weak, *_, strong, _), again = next(iter(first.train)), next(iter(second.train))
    assert torch.equal(strong, again.strong) and torch.equal(weak, again.images)
    assert strong.shape == weak.shape and not torch.equal(strong, weak)

    teacher_path = str(tmp_path / 'teacher.safetensors')
    torch.manual_seed(1)
    save_file(timm.create_model('cifar_resnet8x4', num_classes=10).state_dict(), teacher_path)
    sections = dict(teacher={'name': 'cifar_resnet8x4', 'checkpoint': teacher_path}, scheduler={'name': 'constant'},
                    losses={'ce': 0.1, 'mlkd': 0.9})
    Trainer(from_dict(digits_config(tmp_path, 'full', epochs=2, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=1, **sections)), quiet=True).fit()
    Trainer(from_dict(digits_config(tmp_path, 'part', epochs=2, **sections)), resume=True, quiet=True).fit()
    metrics = [[json.loads(line) for line in open(tmp_path / run / 'metrics.jsonl')] for run in ('full', 'part')]
    assert strip_times(metrics[0]) == strip_times(metrics[1]) and metrics[0][-1]['train_mlkd'] > 0


ZOO_PAIRS = [('cifar_wrn_40_2', 'cifar_wrn_16_2'), ('cifar_vgg13', 'cifar_vgg8'), ('cifar_resnet32x4', 'cifar_vgg8')]


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
            assert torch.isfinite(_one_step(distiller, images, targets)['terms'][method]), method
        if term.pre_stage_epochs > 0:
            assert _one_step(distiller, images, targets, pre_stage=True)['loss'] > 0, method
