"""The student as a timm model folder, and sharing it on the Hugging Face Hub.

Every finished run writes ``<run>/student/``: ``config.json`` (architecture, ``num_classes``, label names and a
``pretrained_cfg`` with the run's mean/std and input size) and ``model.safetensors`` of the best epoch, through
timm's own ``save_for_hf``, plus a model card (``README.md``: teacher, method, top-1, the resolved recipe).
``timm.create_model('local-dir:<run>/student', pretrained=True)`` loads it (a ``cifar_*`` architecture needs
``import distill`` first, which registers it). ``distill push RUN --repo-id ORG/NAME`` uploads that folder.
"""
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List

import torch.nn as nn

from ..errors import DistillError, first_line
from ..files import follow_umask, fsync_directory, space_errors

# pretrained_cfg fields that describe where the architecture's published weights came from (timm's default tag, its
# licence, paper and origin); the exported weights are the run's, so these would misattribute them.
SOURCE_FIELDS = ('tag', 'license', 'description', 'origin_url', 'paper_name', 'paper_ids', 'notes')


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub logs each retry of an unreachable Hub as a warning line; the failure is reported once."""
    from huggingface_hub import logging as hub_logging
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)


def export_data_config(data_cfg, data) -> Dict[str, Any]:
    """The preprocessing the student was trained and evaluated with (``DataConfig``, ``DataBundle``), in timm's
    ``pretrained_cfg`` terms, and the class names."""
    return {'mean': tuple(data.train.mean.flatten().tolist()), 'std': tuple(data.train.std.flatten().tolist()),
            'input_size': (data.channels, data_cfg.image_size, data_cfg.image_size),
            'crop_pct': 1.0 if data_cfg.in_memory else data_cfg.eval_crop_pct, 'label_names': list(data.classes)}


def write_timm_folder(model: nn.Module, folder: str, data_config: Dict[str, Any], card: str) -> None:
    """``model`` as a timm model folder at ``folder`` (``data_config``: ``export_data_config``), replaced whole:
    written beside it, then renamed over it."""
    parent = os.path.dirname(os.path.abspath(folder))
    with space_errors(folder):
        staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + '.', suffix='.tmp', dir=parent)
        try:
            import timm
            data_config = dict(data_config)
            label_names = data_config.pop('label_names')
            timm.models.save_for_hf(model, staging, model_config={'label_names': label_names},
                                    data_config=data_config, safe_serialization=True)
            drop_source_fields(os.path.join(staging, 'config.json'))
            with open(os.path.join(staging, 'README.md'), 'w') as f:
                f.write(card)
            for name in os.listdir(staging):
                follow_umask(os.path.join(staging, name))
                with open(os.path.join(staging, name), 'rb') as f:
                    os.fsync(f.fileno())
            follow_umask(staging)
            previous = folder + '.old.tmp'
            if os.path.isdir(folder):
                os.replace(folder, previous)
            os.replace(staging, folder)
            shutil.rmtree(previous, ignore_errors=True)
            fsync_directory(parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def drop_source_fields(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    for field in SOURCE_FIELDS:
        config['pretrained_cfg'].pop(field, None)
    with open(config_path, 'w') as f:
        json.dump(config, f, indent=2)


def model_card(summary: Dict[str, Any], resolved_yaml: str) -> str:
    terms = ' + '.join(f"{name} {spec if not isinstance(spec, dict) else spec.get('weight', '')}".strip()
                       for name, spec in summary['losses'].items())
    return (f"---\nlibrary_name: timm\ntags:\n- image-classification\n- knowledge-distillation\n- distill\n---\n"
            f"# {summary['student']} distilled with distill\n\n"
            f"| | |\n|---|---|\n| student | `{summary['student']}` |\n| teacher | `{summary['teacher']}` |\n"
            f"| losses | {terms} |\n| epochs | {summary['epochs']} |\n"
            f"| top-1 (best epoch {summary['best_epoch']}) | {summary['best_top1']:.2f} |\n"
            f"| top-1 (last epoch) | {summary['last_top1']:.2f} |\n\n"
            f"Load it with timm: `timm.create_model('hf-hub:<this repo>', pretrained=True)` (architectures named "
            f"`cifar_*` need `import distill` first).\n\n## Recipe\n\n```yaml\n{resolved_yaml}```\n")


def push(run_path: str, repo_id: str, private: bool = False, dry_run: bool = False) -> List[str]:
    """Upload ``<run>/student/`` to the Hub repo ``repo_id`` (created if missing); returns the uploaded files."""
    folder = os.path.join(run_path, 'student')
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise DistillError(f"{run_path} has no exported student (student/config.json): push a finished run "
                           f"directory")
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise DistillError(f"--repo-id {repo_id!r} must look like ORG/NAME, e.g. my-lab/resnet8x4-kd")
    files = sorted(os.listdir(folder))
    if dry_run:
        return files
    from huggingface_hub import HfApi
    try:
        with quiet_hub():
            api = HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message='distill: add student')
    except Exception as exc:  # noqa: BLE001 (HTTP, auth, offline and connection errors: one line each)
        reason = first_line(exc)
        raise DistillError(f"could not push to {repo_id} ({type(exc).__name__}: {reason}); check the network "
                           f"and your token (`hf auth login` or HF_TOKEN)") from None
    return files

