"""Small real-data configs shared by the tests (scikit-learn digits, 8x8, no download)."""
import copy
import os
from typing import Any, Dict

SHARED_CIFAR10 = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-jpeg')


def digits_config(output_dir, run_name='run', epochs=3, **sections: Dict[str, Any]) -> Dict[str, Any]:
    """A fast digits run: cifar_resnet8 on 8x8 digits, SGD + cosine, a few epochs."""
    cfg = {
        'student': {'name': 'cifar_resnet8'},
        'data': {'name': 'digits', 'image_size': 8, 'augment': 'crop', 'crop_padding': 1, 'batch_size': 64},
        'losses': {'ce': 1.0},
        'optimizer': {'name': 'momentum', 'lr': 0.05, 'weight_decay': 5e-4},
        'scheduler': {'name': 'cosine'},
        'trainer': {'epochs': epochs, 'seed': 0, 'output_dir': str(output_dir), 'run_name': run_name,
                    'device': 'cpu', 'progress': False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict) and section != 'losses':
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = copy.deepcopy(values)
    return cfg


def strip_times(records):
    return [{k: v for k, v in r.items() if k != 'epoch_time'} for r in records]
