"""experiments/hinton_mnist/run.py --quick: every row of the Hinton et al. (2015) §3 experiment through `distill
train` and `distill eval --fit-bias` on 3,000 MNIST images, and a rerun reuses every finished run."""
import json
import os
import subprocess
import sys

import pytest

from test_mnist import needs_mnist

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def quick(output):
    done = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'hinton_mnist', 'run.py'), '--quick',
                           '--output', str(output)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, json.load(open(output / 'results.json'))


@needs_mnist
@pytest.mark.slow
def test_the_quick_experiment_runs_every_row_and_a_rerun_reuses_the_runs(tmp_path):
    out, result = quick(tmp_path / 'quick')
    assert result['test_images'] == 1000
    assert [len(result[row]['errors']) for row in ('teacher', 'student_alone', 'kd')] == [1, 2, 2]
    three = result['mythical_3']
    assert three['threes'] == 100 and 0 <= three['threes_wrong_after'] <= three['threes']
    assert three['errors_after'] <= three['errors_before']  # the fitted δ minimises the test errors
    assert result['only_7_8']['error_rate_after'] <= result['only_7_8']['error_rate_before']
    assert set(result['temperature_sweep']) == {'300', '30'} and list(result['temperature_sweep']['30']) == ['2', '20']
    assert '| student 800-800, KD at T 20 | 74 |' in out and (tmp_path / 'quick' / 'hinton_mnist.png').stat().st_size
    tables = os.listdir(tmp_path / 'quick' / 'teacher_logits')  # the experiment's own: KD seeds + sweep, 3, 7 and 8
    assert len(tables) == 3 and all(os.path.isfile(tmp_path / 'quick' / 'teacher_logits' / t / 'logits.npy')
                                    for t in tables)
    assert sorted(result['run_seconds']) == sorted(name[:-4] for name in os.listdir(tmp_path / 'quick' / 'logs'))
    again, rerun = quick(tmp_path / 'quick')  # every run finished: reused, the same numbers
    assert 'started' not in again and rerun['run_seconds'] == {}
    for key in ('teacher', 'student_alone', 'kd', 'mythical_3', 'only_7_8', 'temperature_sweep'):
        assert rerun[key] == result[key]
