"""SDD (Wei et al., CVPR 2024) against the official code: the multi-scale pooling and region logits of its models,
the region-weighted DKD and KD losses; SDD at scale 1 alone is its base loss; and the term through the engine."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Batch, Distiller
from distill.models.features import FeatureExtractor
from distill.losses import create_loss
from distill.losses.dkd import dkd_loss
from distill.losses.kd import kd_loss
from distill.losses.sdd import SDDLoss, region_logits, region_weights, sdd_loss
from helpers import assert_matches_reference


# --- reference transcriptions (shicaiwei123/SDD-CVPR2024; `.cuda()` dropped, `torch.tensor(mask)` -> `mask.clone()`)

def ref_spp_patch_score(x, fc, class_num, M='[1,2,4]'):
    """mdistiller/models/cifar/utils.py: SPP.forward, then the ``patch_score`` lines of
    mdistiller/models/cifar/resnet.py: ResNet_SDD.forward (B x classes x regions)."""
    x_4x4 = nn.AdaptiveAvgPool2d((4, 4))(x)
    x_2x2 = nn.AdaptiveAvgPool2d((2, 2))(x_4x4)
    x_1x1 = nn.AdaptiveAvgPool2d((1, 1))(x_4x4)
    x_4x4_flatten = torch.flatten(x_4x4, start_dim=2, end_dim=3)
    x_2x2_flatten = torch.flatten(x_2x2, start_dim=2, end_dim=3)
    x_1x1_flatten = torch.flatten(x_1x1, start_dim=2, end_dim=3)
    if M == '[1,2,4]':
        x_feature = torch.cat((x_1x1_flatten, x_2x2_flatten, x_4x4_flatten), dim=2)
    elif M == '[1,2]':
        x_feature = torch.cat((x_1x1_flatten, x_2x2_flatten), dim=2)
    else:
        x_feature = x_1x1_flatten
    x_spp = x_feature.permute((2, 0, 1))
    m, b, c = x_spp.shape[0], x_spp.shape[1], x_spp.shape[2]
    x_spp = torch.reshape(x_spp, (m * b, c))
    patch_score = fc(x_spp)
    patch_score = torch.reshape(patch_score, (m, b, class_num))
    patch_score = patch_score.permute((1, 2, 0))
    return patch_score


def _ref_masks(out_t, out_t_multi, target, target_r):
    """The consistent/complementary masks shared by ``multi_dkd`` and ``sdd_kd_loss``."""
    out_t_predict = torch.argmax(out_t, dim=1)
    mask_true = out_t_predict == target_r
    mask_false = out_t_predict != target_r
    global_prediction = out_t_predict[0:len(target)]
    global_prediction_true_mask = global_prediction == target
    global_prediction_false_mask = global_prediction != target
    global_prediction_true_mask_repeat = global_prediction_true_mask.clone().repeat(out_t_multi.shape[2])
    global_prediction_false_mask_repeat = global_prediction_false_mask.clone().repeat(out_t_multi.shape[2])
    mask_false[global_prediction_false_mask_repeat] = False
    mask_false[0:len(target)] = False
    gt_lw = mask_false
    mask_true[global_prediction_true_mask_repeat] = False
    mask_true[0:len(target)] = False
    gw_lt = mask_true
    mask_false = out_t_predict != target_r
    mask_true = out_t_predict == target_r
    mask_false[global_prediction_true_mask_repeat] = False
    gw_lw = mask_false
    mask_true[global_prediction_false_mask_repeat] = False
    gt_lt = mask_true
    return gw_lw, gt_lt, gw_lt, gt_lw


def ref_multi_dkd(out_s_multi, out_t_multi, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller/distillers/SDD_DKD.py: multi_dkd with its dkd_loss (per-row, divided by N * B)."""
    def dkd_rows(logits_student, logits_teacher, target):
        gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
        other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

        def cat_mask(t, mask1, mask2):
            return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

        pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
        pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
        log_pred_student = torch.log(pred_student)
        tckd_loss = (F.kl_div(log_pred_student, pred_teacher, reduction='none') * (temperature ** 2)
                     / target.shape[0])
        pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
        log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
        nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction='none') * (temperature ** 2)
                     / target.shape[0])
        return alpha * torch.sum(tckd_loss, dim=1) + beta * torch.sum(nckd_loss, dim=1)

    out_s_multi_t = out_s_multi.permute(2, 0, 1)
    out_t_multi_t = out_t_multi.permute(2, 0, 1)
    out_t = torch.reshape(out_t_multi_t, (out_t_multi_t.shape[0] * out_t_multi_t.shape[1], out_t_multi_t.shape[2]))
    out_s = torch.reshape(out_s_multi_t, (out_s_multi_t.shape[0] * out_s_multi_t.shape[1], out_s_multi_t.shape[2]))
    target_r = target.repeat(out_t_multi.shape[2])
    loss = dkd_rows(out_s, out_t, target_r)
    gw_lw, gt_lt, gw_lt, gt_lw = _ref_masks(out_t, out_t_multi, target, target_r)
    assert torch.sum(gt_lt) + torch.sum(gw_lw) + torch.sum(gt_lw) + torch.sum(gw_lt) == target_r.shape[0]
    index = torch.zeros_like(loss).float()
    index[gw_lw] = 1.0
    index[gt_lt] = 1.0
    index[gw_lt] = 2.0
    index[gt_lw] = 2.0
    return torch.sum(loss * index)


def ref_sdd_kd(out_s_multi, out_t_multi, target, T=4.0):
    """mdistiller/distillers/KD.py: sdd_kd_loss."""
    out_s_multi = out_s_multi.permute(2, 0, 1)
    out_t_multi = out_t_multi.permute(2, 0, 1)
    out_t = torch.reshape(out_t_multi, (out_t_multi.shape[0] * out_t_multi.shape[1], out_t_multi.shape[2]))
    out_s = torch.reshape(out_s_multi, (out_s_multi.shape[0] * out_s_multi.shape[1], out_s_multi.shape[2]))
    target_r = target.repeat(out_t_multi.shape[0])
    p_s = F.log_softmax(out_s / T, dim=1)
    p_t = F.softmax(out_t / T, dim=1)
    loss_kd = F.kl_div(p_s, p_t, reduction='none') * (T ** 2)
    loss_kd[torch.isnan(loss_kd)] = torch.tensor(0.0)
    loss_kd = torch.sum(loss_kd, dim=1)
    # the masks as in multi_dkd, on the B x C x N layout
    gw_lw, gt_lt, gw_lt, gt_lw = _ref_masks(out_t, out_t_multi.permute(1, 2, 0), target, target_r)
    index = torch.zeros_like(loss_kd).float()
    index[gw_lw] = 1.0
    index[gt_lt] = 1.0
    index[gw_lt] = 2
    index[gt_lw] = 2
    return torch.sum(loss_kd * index) / target_r.shape[0]


# --- inputs ---------------------------------------------------------------------------------------------------

BATCH, CLASSES, REGIONS = 8, 10, 21


def _region_inputs(seed=0):
    """Region logits with a teacher right on some regions and wrong on others (both weights occur)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    student = 2 * torch.randn(BATCH, CLASSES, REGIONS, generator=gen)
    boost = 4 * (torch.rand(BATCH, 1, REGIONS, generator=gen) < 0.5).float()
    teacher = 2 * torch.randn(BATCH, CLASSES, REGIONS, generator=gen) + boost * F.one_hot(targets, CLASSES)[..., None]
    return student, teacher, targets


def test_inputs_have_consistent_and_complementary_regions():
    _, teacher, targets = _region_inputs()
    rows = teacher.permute(2, 0, 1).reshape(-1, CLASSES)
    weights = region_weights(rows, targets.repeat(REGIONS), BATCH, 2.0)
    assert {1.0, 2.0} == set(weights.tolist()) and (weights[:BATCH] == 1).all()


def test_sdd_dkd_matches_multi_dkd_in_value_and_gradient():
    student, teacher, targets = _region_inputs()
    term = SDDLoss()
    assert (term.base, term.scales, term.complementary_weight, term.alpha, term.beta, term.temperature,
            term.warmup) == ('dkd', [1, 2, 4], 2.0, 1.0, 8.0, 4.0, 20)
    assert_matches_reference(sdd_loss, ref_multi_dkd, student, teacher, targets)


def test_sdd_kd_matches_sdd_kd_loss_in_value_and_gradient():
    student, teacher, targets = _region_inputs(1)
    ours = lambda s, t, y: sdd_loss(s, t, y, 'kd')  # noqa: E731
    assert_matches_reference(ours, ref_sdd_kd, student, teacher, targets)
    assert SDDLoss(base='kd').warmup == 0  # SDD_KD has no warm-up


def test_region_logits_and_loss_from_feature_maps_match_spp_and_patch_score():
    gen = torch.Generator().manual_seed(2)
    student_map, teacher_map = torch.randn(BATCH, 16, 8, 8, generator=gen), torch.randn(BATCH, 32, 8, 8, generator=gen)
    targets = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    torch.manual_seed(2)
    student_fc, teacher_fc = nn.Linear(16, CLASSES), nn.Linear(32, CLASSES)
    with torch.no_grad():
        teacher_fc.weight.mul_(4)

    def ours(s, t, y):
        with torch.no_grad():
            teacher_regions = region_logits(t, teacher_fc, [1, 2, 4])
        return sdd_loss(region_logits(s, student_fc, [1, 2, 4]), teacher_regions, y)

    def reference(s, t, y):
        with torch.no_grad():
            teacher_regions = ref_spp_patch_score(t, teacher_fc, CLASSES)
        return ref_multi_dkd(ref_spp_patch_score(s, student_fc, CLASSES), teacher_regions, y)

    assert_matches_reference(ours, reference, student_map, teacher_map, targets)
    for scales, m in (([1, 2], '[1,2]'), ([1], '[1]')):
        for size in (8, 4, 2):  # the CIFAR maps' sides: the same numbers as pooling through the 4x4 grid
            x = student_map[:, :, :size, :size]
            torch.testing.assert_close(region_logits(x, student_fc, scales), ref_spp_patch_score(x, student_fc,
                                                                                                  CLASSES, m))


@pytest.mark.parametrize('base', ['dkd', 'kd'])
def test_scale_one_alone_is_the_base_loss_on_the_models_own_logits(base):
    gen = torch.Generator().manual_seed(3)
    student_map, teacher_map = torch.randn(BATCH, 16, 8, 8, generator=gen), torch.randn(BATCH, 16, 8, 8, generator=gen)
    targets = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    torch.manual_seed(3)
    fc_s, fc_t = nn.Linear(16, CLASSES), nn.Linear(16, CLASSES)
    student_logits, teacher_logits = fc_s(student_map.mean((2, 3))), fc_t(teacher_map.mean((2, 3)))
    student_regions, teacher_regions = region_logits(student_map, fc_s, [1]), region_logits(teacher_map, fc_t, [1])
    torch.testing.assert_close(student_regions[:, :, 0], student_logits)
    ours = sdd_loss(student_regions, teacher_regions, targets, base, complementary_weight=5.0)
    expected = dkd_loss(student_logits, teacher_logits, targets) if base == 'dkd' else \
        kd_loss(student_logits, teacher_logits)
    torch.testing.assert_close(ours, expected)
    # with more regions, the complementary weight matters (it multiplies only the regions that disagree)
    student_regions, teacher_regions = region_logits(student_map, fc_s, [1, 2, 4]), \
        region_logits(teacher_map, fc_t, [1, 2, 4])
    assert sdd_loss(student_regions, teacher_regions, targets, base, 5.0) > \
        sdd_loss(student_regions, teacher_regions, targets, base, 2.0)


def test_complementary_regions_are_those_where_the_teacher_disagrees_with_itself():
    targets = torch.tensor([0, 1])
    # rows region-major: region 0 (global) for both samples, then region 1 for both
    teacher_rows = torch.tensor([[5.0, 0.0], [5.0, 0.0],    # global: sample 0 right, sample 1 wrong
                                 [0.0, 5.0], [0.0, 5.0]])   # region 1: sample 0 wrong, sample 1 right
    assert region_weights(teacher_rows, targets.repeat(2), 2, 3.0).tolist() == [1.0, 1.0, 3.0, 3.0]
    teacher_rows[2:] = teacher_rows[:2]  # the region agrees with the global prediction: consistent
    assert region_weights(teacher_rows, targets.repeat(2), 2, 3.0).tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize('options,message', [({'scales': [2, 4]}, 'scales must be increasing grid sizes starting'),
                                             ({'scales': [1, 4, 2]}, 'scales must be increasing'),
                                             ({'base': 'nkd'}, 'base must be one of'),
                                             ({'temperature': -1.0}, 'temperature must be > 0'),
                                             ({'complementary_weight': -1.0}, 'complementary_weight must be >= 0')])
def test_bad_options_are_refused(options, message):
    with pytest.raises(distill.DistillError, match=message):
        create_loss('sdd', **options)


# --- through the engine ---------------------------------------------------------------------------------------

def test_sdd_through_the_engine_trains_the_student_and_registers_no_model_parameter():
    torch.manual_seed(0)
    teacher = timm.create_model('cifar_resnet8x4', num_classes=10)
    student = timm.create_model('cifar_resnet8', num_classes=10)
    distiller = Distiller(teacher, student, {'ce': 1.0, 'sdd': {}}, input_size=(3, 16, 16),
                          train_targets=torch.arange(40) % 10)
    term = distiller.loss_terms['sdd']
    assert (term.student_layers, term.teacher_layers) == ([-1], [-1])
    assert list(term.parameters()) == [] and list(term.buffers()) == [] and not term.state_dict()
    model_parameters = {id(p) for p in list(student.parameters()) + list(teacher.parameters())}
    assert not model_parameters & {id(p) for p in distiller.trainable_modules()['loss_terms'].parameters()}
    distiller.train()
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    output = distiller(Batch(images, targets, torch.arange(8)), epoch=0)
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.terms['sdd'] > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # the term alone: gradient reaches the student's classifier (through the region logits) and its body
    student.zero_grad(set_to_none=True)
    alone = Distiller(teacher, student, {'sdd': {}}, input_size=(3, 16, 16), train_targets=torch.arange(40) % 10)
    alone.train()
    first = alone(Batch(images, targets, torch.arange(8)), epoch=0)
    first.loss.backward()
    assert student.fc.weight.grad.abs().sum() > 0 and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the DKD warm-up: (epoch + 1) / 20 with our 0-based epochs, full from epoch 19
    later = alone(Batch(images, targets, torch.arange(8)), epoch=19)
    torch.testing.assert_close(later.terms['sdd'], 20 * first.terms['sdd'])


def test_the_map_entering_the_pooling_is_tapped_after_a_final_conv_or_norm():
    """MobileNetV2's 1x1 conv2 and the pre-activation WRN's closing BN-ReLU follow the last stage (as in the official
    SDD models, whose SPP reads the map after them): region 0 gives each model's own logits."""
    torch.manual_seed(0)
    teacher = timm.create_model('cifar_wrn_16_2', num_classes=10)
    student = timm.create_model('cifar_mobilenetv2', num_classes=10)
    distiller = Distiller(teacher, student, {'ce': 1.0, 'sdd': {}}, input_size=(3, 32, 32))
    term = distiller.loss_terms['sdd']
    assert (term.student_layers, term.teacher_layers) == (['conv2'], ['relu'])
    images = torch.randn(4, 3, 32, 32)
    for model, layer in ((student.eval(), 'conv2'), (teacher, 'relu')):
        with torch.no_grad():
            logits, (feature_map,) = FeatureExtractor(model, [layer])(images)
            regions = region_logits(feature_map, model.get_classifier(), term.scales)
        assert regions.shape == (4, 10, 21)
        torch.testing.assert_close(regions[:, :, 0], logits, rtol=1e-4, atol=1e-5)
    distiller.train()
    output = distiller(Batch(images, torch.arange(4)), epoch=0)
    output.loss.backward()
    assert torch.isfinite(output.loss) and student.classifier[0].weight.grad.abs().sum() > 0


def test_a_vit_is_refused_in_one_line():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, depth=1)
    cnn = timm.create_model('cifar_resnet8', num_classes=10)
    with pytest.raises(distill.DistillError, match=r"loss 'sdd' needs CNNs whose head is global average pooling"):
        Distiller(vit, cnn, {'ce': 1.0, 'sdd': {}}, input_size=(3, 32, 32))
    assert SDDLoss.pairs != 'any'
