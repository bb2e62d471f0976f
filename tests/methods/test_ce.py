"""Cross-entropy (label smoothing: Szegedy et al., CVPR 2016) against its reference formula."""
import pytest
import torch

from distill import cross_entropy_loss


def test_cross_entropy_with_label_smoothing_matches_formula():
    logits, targets, eps = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), 0.1
    smooth = torch.full((5, 4), eps / 4).scatter_add_(1, targets[:, None], torch.full((5, 1), 1 - eps))
    expected = -(smooth * torch.log_softmax(logits, 1)).sum(1).mean()
    assert cross_entropy_loss(logits, targets, eps).item() == pytest.approx(expected.item(), rel=1e-6)
