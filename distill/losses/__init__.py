"""Loss terms: each a plain function plus a thin registered module (``create_loss(name, **options)``)."""
from .base import LossTerm, SetupContext, StepOutputs, create_loss, list_losses, register_loss
from .ce import CrossEntropyLoss, cross_entropy_loss
from .kd import KDLoss, kd_loss
from .fitnet import FitNetLoss, fitnet_loss
from .at import ATLoss, at_loss
from .sp import SPLoss, sp_loss
from .pkt import PKTLoss, pkt_loss
from .rkd import RKDLoss, rkd_loss
from .dkd import DKDLoss, dkd_loss
from .dist import DISTLoss, dist_loss
from .nst import NSTLoss, nst_loss
from .cc import CCLoss, cc_loss
from .vid import VIDLoss, vid_loss
from .crd import CRDLoss, crd_loss
from .fsp import FSPLoss, fsp_loss
from .ft import FTLoss, ft_loss
from .ab import ABLoss, ab_loss
from .ofd import OFDLoss, ofd_loss
from .reviewkd import ReviewKDLoss, hcl_loss
from .ctkd import CTKDLoss
from .mlkd import MLKDLoss, mlkd_loss
from .ofa import OFALoss, ofa_loss

__all__ = ['LossTerm', 'SetupContext', 'StepOutputs', 'create_loss', 'list_losses', 'register_loss',
           'CrossEntropyLoss', 'cross_entropy_loss', 'KDLoss', 'kd_loss', 'FitNetLoss', 'fitnet_loss',
           'ATLoss', 'at_loss', 'SPLoss', 'sp_loss', 'PKTLoss', 'pkt_loss', 'RKDLoss', 'rkd_loss',
           'DKDLoss', 'dkd_loss', 'DISTLoss', 'dist_loss', 'NSTLoss', 'nst_loss', 'CCLoss', 'cc_loss', 'VIDLoss',
           'vid_loss', 'CRDLoss', 'crd_loss', 'FSPLoss', 'fsp_loss', 'FTLoss', 'ft_loss', 'ABLoss', 'ab_loss',
           'OFDLoss', 'ofd_loss', 'ReviewKDLoss', 'hcl_loss', 'CTKDLoss',
           'MLKDLoss', 'mlkd_loss', 'OFALoss', 'ofa_loss']
