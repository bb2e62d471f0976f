"""CRD (Tian et al., ICLR 2020) against RepDistiller's crd/memory.py and crd/criterion.py, and its negative
sampler."""
import pytest
import torch

import distill


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


def test_crd_negatives_are_distinct_when_the_other_classes_hold_enough_samples():
    """As RepDistiller's np.random.choice(..., replace=False): no repeats within a row (with replacement, 16,384
    draws from 49,500 CIFAR-100 negatives repeat ~15% of them)."""
    from distill.losses.crd import NegativeSampler
    train_targets = torch.arange(1000) % 10
    sampler = NegativeSampler(train_targets)
    torch.manual_seed(0)
    negatives = sampler(torch.tensor([3, 7]), 800)
    for row, target in zip(negatives, (3, 7)):
        assert len(row.unique()) == 800 and (train_targets[row] != target).all()
    assert sampler(torch.tensor([3]), 950).shape == (1, 950)  # more than the 900 others: with replacement


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
