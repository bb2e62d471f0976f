"""What the experiment scripts under experiments/<name>/run.py share: their command line (the shared CIFAR-10 images
beside the checkout, an output folder, seeds) and how they print a mean over seeds."""
import argparse
import os
import statistics
from typing import Sequence

SHARED_CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                              'cifar10-jpeg')


def experiment_parser(doc: str, output: str) -> argparse.ArgumentParser:
    """``--data`` (an ImageFolder root, default the shared CIFAR-10 images), ``--output`` and ``--seeds``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=SHARED_CIFAR10)
    parser.add_argument('--output', default=output)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    return parser


def mean_std(values: Sequence[float]) -> str:
    """'mean +- std' over seeds (std 0 for one seed)."""
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"
