"""Loss terms: each a plain function plus a thin registered module (``create_loss(name, **options)``)."""
from .base import LossTerm, StepOutputs, create_loss, list_losses, register_loss
from .ce import CrossEntropyLoss, cross_entropy_loss
from .kd import KDLoss, kd_loss
from .fitnet import FitNetLoss, fitnet_loss
from .at import ATLoss, at_loss
from .sp import SPLoss, sp_loss
from .pkt import PKTLoss, pkt_loss
from .rkd import RKDLoss, rkd_loss
from .dkd import DKDLoss, dkd_loss

__all__ = ['LossTerm', 'StepOutputs', 'create_loss', 'list_losses', 'register_loss',
           'CrossEntropyLoss', 'cross_entropy_loss', 'KDLoss', 'kd_loss', 'FitNetLoss', 'fitnet_loss',
           'ATLoss', 'at_loss', 'SPLoss', 'sp_loss', 'PKTLoss', 'pkt_loss', 'RKDLoss', 'rkd_loss',
           'DKDLoss', 'dkd_loss']
