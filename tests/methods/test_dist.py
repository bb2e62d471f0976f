"""DIST (Huang et al., NeurIPS 2022) against hunto/image_classification_sota's dist_kd.py."""
import torch

from distill.losses import dist_loss
from helpers import assert_matches_reference, random_logits


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


def test_dist_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_logits(gen)
    assert_matches_reference(lambda s, t: dist_loss(s, t, 2.0, 2.0, 4.0), ref_dist, student, teacher)
