"""RepDistiller's ``init`` stage (FSP, FT, AB): before epoch 1, each such term trains its pre-stage modules on its
``pre_stage_loss`` for its ``pre_stage_epochs`` (in train mode, everything else in eval mode), with SGD at the
recipe's momentum and weight decay and the term's ``pre_stage_lr`` (or the recipe's). A run killed here restarts
from scratch."""
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..data.batching import Batch
from .distiller import Distiller, StepResult
from .guard import FiniteGuard, stop_if_nonfinite
from .stepping import Stepper


class PreStage:
    """The pre-stage of a ``Distiller``'s terms: which run at an epoch, what they train, and their step."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller
        self.terms = distiller.loss_terms
        self.epochs = max((term.pre_stage_epochs for term in self.terms.values()), default=0)

    def active(self, epoch: int) -> List[str]:
        """Terms whose pre-stage still runs at pre-stage epoch ``epoch`` (0-based)."""
        return [name for name, term in self.terms.items() if epoch < term.pre_stage_epochs]

    def groups(self, lr: float) -> Tuple[List[Dict[str, Any]], List[nn.Module]]:
        """Optimizer parameter groups (one per term, at its ``pre_stage_lr`` or ``lr``) and the modules trained."""
        groups, trained, seen = [], [], set()
        for name in self.active(0):
            term = self.terms[name]
            modules = list(term.pre_stage_modules(self.distiller.student))
            params = [p for m in modules for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            groups.append({'params': params, 'lr': term.pre_stage_lr or lr})
            trained += modules
        return groups, trained

    def forward(self, batch: Batch, epoch: int) -> StepResult:
        """The unweighted sum of each active term's ``pre_stage_loss`` (no top-1: no classifier trains)."""
        distiller = self.distiller
        step = distiller.step_outputs(batch, epoch, distiller.teacher is not None)
        terms = {name: self.terms[name].pre_stage_loss(distiller.term_step(name, step)) for name in self.active(epoch)}
        return StepResult(sum(terms.values()), {name: value.detach() for name, value in terms.items()})

    def run(self, loader, runtime, cfg, logger, last_checkpoint: str) -> None:
        """Train the pre-stage modules for ``epochs`` (nothing when no term has a pre-stage)."""
        if self.epochs == 0:
            return
        opt, device, dist = cfg.optimizer, runtime.device, runtime.dist
        groups, trained = self.groups(opt.lr)
        frozen = [p for group in groups for p in group['params'] if not p.requires_grad]
        for p in frozen:  # e.g. FT's paraphraser: trained here, fixed in the main stage
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
        stepper = Stepper(runtime, optimizer, scaler, [p for group in groups for p in group['params']],
                          cfg.trainer.grad_clip, reduce_grads=True)
        for epoch in range(self.epochs):
            self.distiller.eval()
            for module in trained:
                module.train()
            guard = FiniteGuard(1, device)
            totals = torch.zeros(2, device=device)  # loss sum, count
            for step, batch in enumerate(loader):
                out = stepper.update(self.forward, batch, epoch)
                stop_if_nonfinite(guard.observe(out, step), epoch, last_checkpoint)
                totals += torch.stack([out.loss.detach().float() * len(batch.labels),
                                       torch.tensor(float(len(batch.labels)), device=device)])
            total, count = dist.all_sum(totals).tolist()
            logger.info(f"pre-stage epoch {epoch + 1}/{self.epochs} ({', '.join(self.active(epoch))}) "
                        f"loss {total / count:.4f}")
        for p in frozen:
            p.requires_grad_(False)
