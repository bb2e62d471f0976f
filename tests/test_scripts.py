"""Every script under experiments/ and benchmarks/ still imports what it uses and parses its arguments (`--help`
runs every module-level import without training), so a refactor of distill cannot silently break them."""
import glob
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SCRIPTS = sorted(path for path in glob.glob(os.path.join(REPO, 'experiments', '**', '*.py'), recursive=True)
                 + glob.glob(os.path.join(REPO, 'benchmarks', '**', '*.py'), recursive=True)
                 if not path.endswith('common.py'))


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda path: os.path.relpath(path, REPO))
def test_script_imports_and_parses_its_arguments(script, monkeypatch, capsys):
    """In this process (the quick loop: torch and timm are imported once): the script as ``__main__`` with
    ``--help``, its folder first on the path as when Python runs it, the modules of other scripts (each folder's
    ``common``) forgotten."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    monkeypatch.setattr(sys, 'path', [os.path.dirname(script)] + sys.path)
    folders = tuple(os.path.join(REPO, folder) + os.sep for folder in ('experiments', 'benchmarks'))
    for name, module in list(sys.modules.items()):
        if (getattr(module, '__file__', None) or '').startswith(folders):
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as exit_, torch.random.fork_rng():  # a script may seed torch when imported
        runpy.run_path(script, run_name='__main__')
    assert exit_.value.code in (0, None) and 'usage:' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS, ids=lambda path: os.path.relpath(path, REPO))
def test_script_runs_in_a_fresh_interpreter(script):
    result = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and 'usage:' in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_in_its_cpu_smoke_mode(tmp_path):
    """benchmarks/gpu/run.sh --cpu-smoke: every method x batch x variant of the matrix, the goals, the baseline
    loop, both training runs and the streamed record / replay epochs complete without wandb importable, and the
    JSON and Markdown reports say so."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    result = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu', 'run.sh'), '--cpu-smoke'], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.load(open(tmp_path / 'gpu_bench.json'))
    assert report['failed'] == [] and report['skipped'] == [] and report['machine']['smoke']
    matrix = {(r['method'], r['batch'], r['variant']) for r in report['results'] if r['part'] == 'matrix'}
    assert len(matrix) == 6 * 2 * 4 and all(r['img_s'] > 0 for r in report['results'] if 'img_s' in r)
    parts = [r['name'] for r in report['results'] if r['part'] != 'matrix']
    assert [name.split(',')[0] for name in parts] == ['plain PyTorch loop', 'teacher cifar_resnet20',
                                                      'KD cifar_resnet20 -> cifar_resnet8', 'student only',
                                                      'KD live', 'KD replay']
    assert any(note.startswith('streamed: epoch time / student-only: replay') for note in report['notes'])
    assert [goal['goal'] for goal in report['goals']] == ['KD live, batch 64', 'KD cached, batch 512',
                                                          'KD live / torchdistill']
    assert '| KD cached | 8 |' in open(tmp_path / 'gpu_bench.md').read()


def test_vs_timm_times_each_epoch_from_the_lines_a_run_writes(tmp_path, monkeypatch):
    """benchmarks/vs_timm.py's outside timer: the steady epoch is the mean interval between the epoch lines a run
    appends (a CSV's header is not an epoch), whatever the run's own clock says."""
    monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))
    vs_timm = runpy.run_path(os.path.join(REPO, 'benchmarks', 'vs_timm.py'))
    summary = tmp_path / 'summary.csv'
    script = tmp_path / 'epochs.py'
    script.write_text(f"import time\nwith open({str(summary)!r}, 'w') as out:\n    out.write('epoch,top1\\n')\n"
                      f"    for epoch in range(3):\n        time.sleep(0.5)\n"
                      f"        out.write(f'{{epoch}},1.0\\n'); out.flush()\n")
    measured = vs_timm['run']([str(script)], str(tmp_path / 'log'), str(summary))
    assert vs_timm['epoch_lines'](str(summary)) == 3
    assert 0.45 <= measured['epoch_seconds'] <= 2.0 and measured['seconds'] >= 1.5 and measured['peak_mib'] > 0
    # seed by seed the runs' order rotates, the warm-cache run always right after the run that fills the cache
    orders = [vs_timm['rotated'](['timm', 'streamed', 'memory', 'warm'], turn) for turn in range(3)]
    assert orders == [['timm', 'streamed', 'memory', 'warm'], ['streamed', 'memory', 'warm', 'timm'],
                      ['memory', 'warm', 'timm', 'streamed']]
