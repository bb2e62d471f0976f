"""One trainer per run directory: a second `distill train` on a run another live trainer writes is refused in one
line naming the holder; a killed trainer leaves no stale lock; a grid job's training dies with its job process, so
a grid rerun at once resumes every run to what its uninterrupted twin computes."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import yaml

from distill.cli import main
from helpers import digits_config
from test_launch import metrics, read, wait_for, write_recipes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def distill_train(*args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'distill', 'train', *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, **kwargs)


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    recipe = tmp_path / 'run.yaml'
    recipe.write_text(yaml.safe_dump(digits_config(tmp_path / 'runs', 'run', epochs=200)))
    run = tmp_path / 'runs' / 'run'
    first = distill_train(str(recipe))
    try:
        wait_for(lambda: (run / 'metrics.jsonl').exists() and (run / 'metrics.jsonl').read_text(), 'an epoch')
        second = distill_train(str(recipe), '--resume')  # (without --resume: "already holds a run")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and len(err.strip().splitlines()) == 1, err
        assert f"run directory {run} is being written by a running trainer (pid {first.pid} on " \
               f"{socket.gethostname()}); wait for it to end" in err
        assert open(run / 'log.txt').read().count('resumed') == 0  # the refused trainers wrote nothing
    finally:
        first.kill()
        first.wait()
    done = len(metrics(run))
    resumed = distill_train(str(recipe), '--resume', f'trainer.epochs={done + 1}')
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err  # the kernel released the killed trainer's lock
    assert len(metrics(run)) == done + 1


@pytest.mark.slow
def test_a_grid_job_killed_takes_its_training_along_and_a_rerun_at_once_ends_as_its_twin(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    write_recipes(tmp_path, 'ab', epochs=4, data={'batch_size': 32})  # b-seed0 is a-seed0's uninterrupted twin
    runs = tmp_path / 'runs'
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['a.yaml', 'b.yaml'], 'seeds': [0], 'output_dir': str(runs)}))
    codes = []
    first = threading.Thread(target=lambda: codes.append(main(['grid', str(grid), '--parallel', '2'])), daemon=True)
    first.start()
    wait_for(lambda: (runs / 'a-seed0' / 'checkpoints' / 'last.pt').exists(), 'a first epoch')
    training = int(open(runs / 'a-seed0' / 'checkpoints' / '..' / 'trainer.lock').read().split()[1])
    os.kill(read(runs / 'a-seed0' / 'job_state.json')['pid'], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f'/proc/{training}') or
             open(f'/proc/{training}/stat').read().split()[2] == 'Z', 'the training to die with its job', 30)
    first.join(timeout=600)
    assert not first.is_alive() and codes == [2]
    capsys.readouterr()
    assert main(['grid', str(grid)]) == 0  # at once: no orphan holds the run
    a, b = runs / 'a-seed0', runs / 'b-seed0'
    assert len(metrics(a)) == 4 and metrics(a) == metrics(b)
    summaries = [{k: v for k, v in read(run / 'summary.json').items() if k != 'train_time_s'} for run in (a, b)]
    assert summaries[0] == summaries[1]
    assert open(a / 'student_last.safetensors', 'rb').read() == open(b / 'student_last.safetensors', 'rb').read()
