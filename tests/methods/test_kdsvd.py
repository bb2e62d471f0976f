"""KDSVD (Lee, Kim & Song, ECCV 2018) against mdistiller's transcription of the authors' code, with the authors'
(B, H*W, C) flattening; its invariances (spatial layout, sign and order of the singular vectors) and a finite
gradient where PyTorch's SVD gradient is NaN."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import distill  # noqa: F401  (registers the cifar_ models)
from distill import Batch, DistillError, Distiller
from distill.losses import create_loss
from distill.losses.kdsvd import KDSVDLoss, _SafeSVD, kdsvd_loss
from helpers import assert_matches_reference, random_maps


def ref_kdsvd(g_s, g_t, k=1, flatten='authors'):
    """mdistiller mdistiller/distillers/KDSVD.py: kdsvd_loss, svd, removenan, align_rsv (a transcription of
    sseung0703/KD_methods_with_TF nets/Shared.py::KD_SVD and nets/SVP.py). ``svd`` reshapes as the authors'
    TensorFlow code does (NHWC -> (B, H*W, C), i.e. NCHW -> (B, C, H*W) transposed) unless ``flatten='mdistiller'``
    (mdistiller's own ``feat.view(B, C*H, W)``); ``torch.svd`` written as ``torch.linalg.svd``."""
    def removenan(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def svd(feat, n=1):
        size = feat.shape
        assert len(size) == 4
        if flatten == 'authors':
            x = feat.view(size[0], size[1], size[2] * size[3]).transpose(1, 2).float()
        else:
            x = feat.view(size[0], size[1] * size[2], size[3]).float()
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        u, s, v = removenan(u), removenan(s), removenan(v)
        if n > 0:
            u = F.normalize(u[:, :, :n], dim=1)
            s = F.normalize(s[:, :n], dim=1)
            v = F.normalize(v[:, :, :n], dim=1)
        return u, s, v

    def align_rsv(a, b):
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
        a = torch.matmul(a, mask)
        return a, b

    v_sb = None
    v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = svd(f_t, k)
        u_s, s_s, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            losses.append(l2loss.sum())
        v_tb = v_t
        v_sb = v_s
    bsz = g_s[0].shape[0]
    losses = [l / bsz for l in losses]
    return sum(losses)


# Equal channels per stage (the original method's requirement), different spatial sizes for the teacher (any size
# works with the authors' flattening); the last student stage is wide (H*W = 4 < C = 32).
STUDENT_SHAPES = [(4, 8, 6, 6), (4, 16, 4, 4), (4, 32, 2, 2)]
TEACHER_SHAPES = [(4, 8, 8, 8), (4, 16, 5, 5), (4, 32, 3, 3)]


def _features(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return random_maps(gen, *STUDENT_SHAPES), random_maps(gen, *TEACHER_SHAPES)


def test_kdsvd_matches_reference_value_and_gradients():
    student, teacher = _features()
    term = KDSVDLoss()
    assert term.k == 1 and KDSVDLoss.default_weight == 1.0  # mdistiller's CIFAR-100 setting
    assert_matches_reference(kdsvd_loss, ref_kdsvd, student, teacher, term.k)
    assert_matches_reference(kdsvd_loss, ref_kdsvd, student, teacher, 2)


def test_kdsvd_ignores_the_students_spatial_layout_unlike_mdistillers_flattening():
    # V lies in channel space: shuffling the positions of the student's maps leaves V unchanged up to sign, which the
    # alignment to the teacher fixes. mdistiller's (B, C*H, W) flattening takes singular vectors along the width,
    # which a shuffle changes. (The teacher's own sign is the SVD's convention, as in the reference: the RBF between
    # stages depends on it, so the loss is not invariant to the teacher's vector signs.)
    gen = torch.Generator().manual_seed(1)
    student, teacher = random_maps(gen, *STUDENT_SHAPES), random_maps(gen, *STUDENT_SHAPES)  # mdistiller: equal W
    shuffled = []
    for m in student:
        order = torch.randperm(m.shape[2] * m.shape[3], generator=gen)
        shuffled.append(m.flatten(2)[:, :, order].view_as(m))
    ours = kdsvd_loss(student, teacher)
    assert ours > 1e-3
    torch.testing.assert_close(kdsvd_loss(shuffled, teacher), ours, rtol=1e-4, atol=1e-6)
    mdistiller = ref_kdsvd(student, teacher, flatten='mdistiller')
    assert not torch.allclose(ref_kdsvd(shuffled, teacher, flatten='mdistiller'), mdistiller, rtol=1e-3)


def _maps_from_svd(u, s, v, height, width):
    """(B, C, H, W) maps whose (H*W, C) matrices are u diag(s) v^T."""
    matrices = u @ torch.diag_embed(s) @ v.transpose(1, 2)
    return matrices.transpose(1, 2).reshape(u.shape[0], v.shape[1], height, width)


def _orthonormal(gen, batch, rows, cols):
    return torch.linalg.qr(torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64))[0]


def test_student_with_the_teachers_vectors_reordered_and_sign_flipped_has_zero_loss():
    # Align_rsv: each teacher vector is matched to the student vector (among its first K + 3) of largest |cosine|
    # and its sign is fixed. A student whose 1st and 2nd singular values are swapped and whose vectors have flipped
    # signs (its leading vector is the teacher's 2nd) carries the same knowledge: zero loss.
    gen = torch.Generator().manual_seed(3)
    batch, students, teachers, unrelated = 3, [], [], []
    for channels, height, width in [(8, 4, 4), (16, 4, 4), (12, 2, 3)]:
        rank = min(channels, height * width)
        v = _orthonormal(gen, batch, channels, rank)
        teacher_s = torch.linspace(5.0, 1.0, rank, dtype=torch.float64).expand(batch, rank)
        student_s = teacher_s.clone()
        student_s[:, [0, 1]] = student_s[:, [1, 0]]
        signs = torch.where(torch.rand(batch, 1, rank, generator=gen) < 0.5, -1.0, 1.0).double()
        teachers.append(_maps_from_svd(_orthonormal(gen, batch, height * width, rank), teacher_s, v, height, width))
        students.append(_maps_from_svd(_orthonormal(gen, batch, height * width, rank), student_s, v * signs,
                                       height, width))
        unrelated.append(_maps_from_svd(_orthonormal(gen, batch, height * width, rank), teacher_s,
                                        _orthonormal(gen, batch, channels, rank), height, width))
    students, teachers, unrelated = ([m.float() for m in maps] for maps in (students, teachers, unrelated))
    assert kdsvd_loss(students, teachers).item() == pytest.approx(0.0, abs=1e-8)
    assert kdsvd_loss(unrelated, teachers).item() > 1e-3


def test_gradient_is_finite_for_rank_deficient_maps():
    # Dead channels and a rank-1 stage: several equal (zero) singular values, where the SVD gradient of PyTorch
    # divides 0 by 0. The loss reads only the leading vectors, and its gradient stays finite and non-zero.
    gen = torch.Generator().manual_seed(4)
    student, teacher = random_maps(gen, *STUDENT_SHAPES), random_maps(gen, *TEACHER_SHAPES)
    student[0] = F.relu(student[0])
    student[0][:, 3:] = 0  # 5 of 8 channels dead: rank 3 for a 36 x 8 matrix
    student[1] = (torch.randn(4, 16, 1, 1, generator=gen) * torch.randn(4, 1, 4, 4, generator=gen))  # rank 1
    inputs = [x.clone().requires_grad_() for x in student]
    value = kdsvd_loss(inputs, teacher)
    grads = torch.autograd.grad(value, inputs)
    assert torch.isfinite(value) and value > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize('shape', [(3, 10, 4), (3, 4, 10), (2, 6, 6)], ids=['tall', 'wide', 'square'])
def test_safe_svd_backward_is_the_exact_svd_gradient_for_distinct_singular_values(shape):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    rank = min(shape[1:])
    weights_s = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
    weights_v = torch.randn(shape[0], shape[2], 2, generator=gen, dtype=torch.float64)

    def objective(s, v):  # sign-invariant in each vector, as any loss of an SVD must be
        return (s * weights_s).sum() + (v[..., :2].pow(2) * weights_v).sum()

    ours = torch.autograd.grad(objective(*_SafeSVD.apply(x)), x)[0]
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    exact = torch.autograd.grad(objective(s, vh.transpose(-2, -1)), x)[0]
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)


def test_options_are_checked():
    with pytest.raises(DistillError, match='k .* must be an integer >= 1'):
        create_loss('kdsvd', k=0)
    teacher, student = (timm.create_model(name, num_classes=10) for name in ('cifar_resnet8x4', 'cifar_resnet8'))
    with pytest.raises(DistillError, match="match_channels: false needs equal channels"):
        Distiller(teacher, student, {'ce': 1.0, 'kdsvd': {'match_channels': False}}, input_size=(3, 16, 16))


def test_kdsvd_through_the_distiller_trains_the_student_and_its_channel_maps():
    torch.manual_seed(0)
    teacher = timm.create_model('cifar_resnet8x4', num_classes=10)
    student = timm.create_model('cifar_resnet8', num_classes=10)
    distiller = Distiller(teacher, student, {'ce': 1.0, 'kdsvd': {}}, input_size=(3, 16, 16),
                          train_targets=torch.arange(40) % 10)
    distiller.train()
    term = distiller.loss_terms['kdsvd']
    assert (term.student_layers, term.teacher_layers) == ([1, 2, 3], [1, 2, 3])  # every stage but the stem
    # widths 16/32/64 -> 64/128/256: one bias-free linear map per stage
    assert [(m.in_features, m.out_features) for m in term.adapters] == [(16, 64), (32, 128), (64, 256)]
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    output = distiller(Batch(images, targets, torch.arange(8)), epoch=0)
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.terms['kdsvd'] > 0
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in term.adapters)
    assert all(p.grad is None for p in teacher.parameters())


def test_same_width_pair_uses_no_channel_map():
    teacher, student = (timm.create_model(name, num_classes=10) for name in ('cifar_resnet20', 'cifar_resnet8'))
    distiller = Distiller(teacher, student, {'ce': 1.0, 'kdsvd': {}}, input_size=(3, 16, 16))
    assert all(isinstance(m, nn.Identity) for m in distiller.loss_terms['kdsvd'].adapters)
    assert not list(distiller.loss_terms['kdsvd'].parameters())
