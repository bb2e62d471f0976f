"""PKT (Passalis & Tefas, ECCV 2018) against RepDistiller's distiller_zoo/PKT.py."""
import torch

from distill.losses import pkt_loss
from helpers import assert_matches_reference, random_maps


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


def test_pkt_matches_reference_value_and_gradients():
    gen = torch.Generator().manual_seed(0)
    student, teacher = random_maps(gen, (6, 16), (6, 32))
    assert_matches_reference(pkt_loss, ref_pkt, student, teacher)
