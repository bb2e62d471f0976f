"""Output-bias adjustment (Hinton, Vinyals & Dean 2015, §3): a student distilled on a transfer set without some
classes under-predicts them; adding one δ to those classes' logits (equivalently to their output biases) recovers
them. ``fit_bias_on`` finds the δ that minimises the errors on a labelled set exactly, ``bias_report`` gives the
errors, top-1 and per-class errors of logits with a δ applied.

With ``C`` the adjusted classes, a sample is predicted in ``C`` iff ``max_C z + δ > max_rest z``, so its correctness
changes only at ``δ = max_rest z - max_C z``: sweeping those breakpoints in order gives the exact error curve.
"""
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DistillError


def add_bias(logits: torch.Tensor, classes: Sequence[int], delta: float) -> torch.Tensor:
    adjusted = logits.clone()
    adjusted[:, list(classes)] += delta
    return adjusted


def bias_report(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int] = (),
                delta: float = 0.0) -> Dict[str, object]:
    """Errors, top-1 (%) and errors per class (and images per class) of ``logits`` with ``delta`` on ``classes``."""
    predictions = add_bias(logits, classes, delta).argmax(1)
    wrong = predictions != labels
    num_classes = logits.shape[1]
    return {'errors': int(wrong.sum()), 'top1': 100.0 * float((~wrong).float().mean()),
            'class_errors': torch.bincount(labels[wrong], minlength=num_classes).tolist(),
            'class_counts': torch.bincount(labels, minlength=num_classes).tolist()}


def fit_bias_on(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> float:
    """The δ on ``classes`` with the fewest errors on (``logits``, ``labels``): the middle of the best interval
    between breakpoints (the one nearest 0 among equals); an open end gets its breakpoint +- 1."""
    chosen = torch.zeros(logits.shape[1], dtype=torch.bool)
    chosen[list(classes)] = True
    logits = logits.double()
    best_in, arg_in = logits[:, chosen].max(1)
    best_out, arg_out = logits[:, ~chosen].max(1)
    in_label = chosen[labels]
    right_if_in = in_label & (chosen.nonzero().flatten()[arg_in] == labels)
    right_if_out = ~in_label & ((~chosen).nonzero().flatten()[arg_out] == labels)
    breaks = best_out - best_in  # predicted in C iff δ > breaks
    order = breaks.argsort()
    breaks, right_if_in, right_if_out = breaks[order], right_if_in[order], right_if_out[order]
    # errors(δ) with δ just above breaks[j]: samples 0..j predicted in C, the rest outside
    wrong_in = torch.cumsum((~right_if_in).long(), 0)
    wrong_out_after = (~right_if_out).long().flip(0).cumsum(0).flip(0)
    errors = torch.cat([wrong_out_after[:1], wrong_in + torch.cat([wrong_out_after[1:], wrong_out_after.new_zeros(1)])])
    edges = torch.cat([breaks[:1] - 2.0, breaks, breaks[-1:] + 2.0])
    middles = (edges[:-1] + edges[1:]) / 2  # interval k lies between edges k and k + 1
    candidates = (errors == errors.min()).nonzero().flatten()
    return float(middles[candidates][middles[candidates].abs().argmin()])


def parse_classes(text: str, num_classes: int, option: str) -> List[int]:
    """``"7,8"`` -> [7, 8], each a class index of the model."""
    try:
        classes = [int(part) for part in text.split(',')]
    except ValueError:
        raise DistillError(f"{option} {text!r}: give class indices separated by commas, e.g. 3 or 7,8") from None
    if not all(0 <= c < num_classes for c in classes) or len(set(classes)) != len(classes):
        raise DistillError(f"{option} {text!r}: class indices must be distinct, in 0..{num_classes - 1}")
    return classes


def parse_logit_bias(text: str, num_classes: int) -> Tuple[List[int], float]:
    """``"3=+3.5"`` -> ([3], 3.5); ``"7,8=-7.6"`` -> ([7, 8], -7.6)."""
    classes, _, delta = text.partition('=')
    try:
        return parse_classes(classes, num_classes, '--logit-bias'), float(delta)
    except ValueError:
        raise DistillError(f"--logit-bias {text!r}: write CLASSES=DELTA, e.g. 3=+3.5 or 7,8=-7.6") from None


def _line(report: Dict[str, object]) -> str:
    errors = ' '.join(f"{c}:{e}/{n}" for c, (e, n) in enumerate(zip(report['class_errors'], report['class_counts'])))
    return f"{report['errors']} errors, top-1 {report['top1']:.2f}; errors per class {errors}"


def bias_eval(name: str, logits: torch.Tensor, labels: torch.Tensor, logit_bias: Optional[str],
              fit_bias: Optional[str], fit_on: str, fit_data: Optional[Tuple[torch.Tensor, torch.Tensor]],
              json_path: Optional[str]) -> Dict[str, object]:
    """``distill eval --logit-bias / --fit-bias``: the report of ``logits`` as they are and with the δ given or
    fitted on ``fit_data`` (None: on these logits, the test set, as Hinton et al. did), printed and written to
    ``json_path``."""
    num_classes = logits.shape[1]
    result: Dict[str, object] = {'model': name, 'images': len(labels), 'before': bias_report(logits, labels)}
    print(f"{name} ({len(labels)} images): {_line(result['before'])}")
    if logit_bias or fit_bias:
        if fit_bias:
            classes = parse_classes(fit_bias, num_classes, '--fit-bias')
            delta = fit_bias_on(*(fit_data or (logits, labels)), classes)
            how = 'fitted on the test set (as Hinton et al. 2015)' if fit_data is None else f'fitted on {fit_on}'
        else:
            (classes, delta), how = parse_logit_bias(logit_bias, num_classes), 'given'
        result.update(classes=classes, delta=delta, fit_on=fit_on if fit_bias else None,
                      after=bias_report(logits, labels, classes, delta))
        print(f"with δ {delta:+.3f} on classes {','.join(map(str, classes))} ({how}): {_line(result['after'])}")
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(result, f, indent=1)
    return result
