"""`distill grid` through submitit: local jobs (preempted -> requeued and resumed in the same call; killed -> the
next call resumes that run alone, bit-exactly), the sbatch scripts of the SLURM executor (fake sbatch/srun/sacct on
PATH, no cluster), the status table, and grid files refused before anything is submitted."""
import json
import os
import signal
import sys
import threading
import time

import pytest
import yaml

from distill.sweeps import child as training_child, stages
from distill.errors import DistillError
from distill.cli import main
from helpers import digits_config, strip_times


def write_recipes(tmp_path, names, **sections):
    for name in names:
        cfg = digits_config(tmp_path / 'unused', name, **sections)
        del cfg['trainer']['output_dir'], cfg['trainer']['run_name']
        (tmp_path / f'{name}.yaml').write_text(yaml.safe_dump(cfg))


def wait_for(condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.01)


def read(path):
    return json.load(open(path))


def metrics(run):
    return strip_times([json.loads(line) for line in open(run / 'metrics.jsonl')])


def test_a_jobs_training_is_forked_with_the_environment_and_signals_of_a_fresh_process(monkeypatch):
    """The job forks its training from its own interpreter (distill is imported once per job): the child runs the
    command (here a stand-in for distill train, which only a fork of this process has), with the job's environment
    overrides, OpenMP threads included, and the signal dispositions a fresh `distill train` has; its stderr lines and
    exit code reach the job."""
    def report(**command):
        import torch
        print(json.dumps({
            'command': command, 'threads': torch.get_num_threads(), 'visible': os.environ.get('CUDA_VISIBLE_DEVICES'),
            'unset': 'DISTILL_TEST_UNSET' in os.environ,
            'sigint': signal.getsignal(signal.SIGINT) is signal.default_int_handler,
            'sigterm': signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            'preemption': signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN}), file=sys.stderr)
        raise DistillError('stand-in stopped')

    monkeypatch.setattr(stages, 'train', report)
    monkeypatch.setenv('DISTILL_TEST_UNSET', '1')
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as submitit's job process has
    try:
        overrides = {'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'DISTILL_TEST_UNSET': None}
        child, stderr = training_child.start_training({'recipe': 'r.yaml', 'quiet': True}, overrides)
        with stderr:
            lines = stderr.read().splitlines()
        child.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert child.exitcode == 2 and child.pid != os.getpid()
    assert lines[-1] == 'distill: error: stand-in stopped'
    assert json.loads(lines[-2]) == {'command': {'recipe': 'r.yaml', 'quiet': True}, 'threads': 1, 'visible': '',
                                     'unset': False, 'sigint': True, 'sigterm': True, 'preemption': True}
    assert os.environ['DISTILL_TEST_UNSET'] == '1'  # the job's own environment is untouched


@pytest.mark.slow
def test_local_jobs_resume_after_preemption_and_a_killed_run_resumes_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # 2 cores, 2 runs at once (and the same arithmetic in every run)
    # a and b are the same recipe under two names: b's runs are a's uninterrupted twins
    write_recipes(tmp_path, 'ab', epochs=3, data={'batch_size': 32})
    runs = tmp_path / 'runs'
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['a.yaml', 'b.yaml'], 'seeds': [0, 1], 'output_dir': str(runs)}))
    codes = []
    first = threading.Thread(target=lambda: codes.append(main(['grid', str(grid), '--parallel', '2'])), daemon=True)
    first.start()
    # a-seed0 and a-seed1 run first. After its first epoch, a-seed0's job is preempted (the signal SLURM, or
    # submitit's local controller near the time limit, sends the job's task) and a-seed1's training process killed
    act = {'a-seed0': lambda: os.kill(read(runs / 'a-seed0' / 'job_state.json')['pid'], signal.SIGUSR2),
           'a-seed1': lambda: os.kill(read(runs / 'a-seed1' / 'job_state.json')['training_pid'], signal.SIGKILL)}
    while act:
        wait_for(lambda: any((runs / run / 'checkpoints' / 'last.pt').exists() for run in act), 'a first epoch')
        for run in [run for run in act if (runs / run / 'checkpoints' / 'last.pt').exists()]:
            act.pop(run)()
    first.join(timeout=600)
    assert not first.is_alive()
    captured = capsys.readouterr()
    assert codes == [2] and len(captured.err.strip().splitlines()) == 1
    assert "1 of 4 runs did not finish (a-seed1; a-seed1: signal SIGKILL" in captured.err
    assert "--status` lists them, and running the grid again resumes them" in captured.err
    # preempted: requeued within its job, resumed from its checkpoint and finished
    assert 'resumed' in (runs / 'a-seed0' / 'log.txt').read_text()
    assert read(runs / 'a-seed0' / 'job_state.json')['state'] == 'ended'
    jobs = {run: read(runs / run / 'job.json')['job_id'] for run in ('a-seed0', 'a-seed1', 'b-seed0', 'b-seed1')}
    assert main(['grid', str(grid), '--status']) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['run', 'state', 'epochs', 'job', 'last', 'log', 'line']
    rows = {line.split()[0]: line.split(None, 5) for line in table[1:-1]}
    assert rows['a-seed0'][1:5] == ['finished', '3/3', 'local', jobs['a-seed0']]
    killed_after = len(metrics(runs / 'a-seed1'))
    assert killed_after < 3 and rows['a-seed1'][1:5] == ['failed', f'{killed_after}/3', 'local', jobs['a-seed1']]
    assert rows['a-seed1'][5].startswith('signal SIGKILL')
    assert table[-1] == '4 runs: 3 finished, 1 failed'
    # the next call resumes that run alone
    assert main(['grid', str(grid)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ['finished', 'failed', 'finished',
                                                                                  'finished']
    assert 'resumed' in (runs / 'a-seed1' / 'log.txt').read_text()
    assert read(runs / 'a-seed1' / 'job.json')['job_id'] != jobs['a-seed1']
    assert {run: read(runs / run / 'job.json')['job_id'] for run in ('a-seed0', 'b-seed0', 'b-seed1')} == \
        {run: jobs[run] for run in ('a-seed0', 'b-seed0', 'b-seed1')}
    for seed in (0, 1):  # bit for bit what the uninterrupted twin computed
        a, b = runs / f'a-seed{seed}', runs / f'b-seed{seed}'
        assert len(metrics(a)) == 3 and metrics(a) == metrics(b)
        summaries = [{k: v for k, v in read(run / 'summary.json').items() if k != 'train_time_s'} for run in (a, b)]
        assert summaries[0] == summaries[1]


FAKE_SLURM = {
    'srun': 'exit 0\n',
    # sbatch: job ids 4242, 4243, ... (the script itself is kept by submitit in its folder)
    'sbatch': 'n=$(cat "$0.last" 2>/dev/null || echo 4241); n=$((n+1)); echo $n > "$0.last"\n'
              'echo "Submitted batch job $n"\n',
    'sacct': 'cat "$0.out" 2>/dev/null || echo "JobID|State|NodeList"\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and sacct on PATH that submit nothing: the folder that holds them."""
    folder = tmp_path / 'bin'
    folder.mkdir()
    for name, body in FAKE_SLURM.items():
        (folder / name).write_text('#!/bin/sh\n' + body)
        (folder / name).chmod(0o755)
    monkeypatch.setenv('PATH', f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def pair_table(tmp_path):
    """A pair table whose kd runs train the teacher (teacher.yaml) first, and whose baseline runs need none."""
    os.makedirs(tmp_path / 'methods')
    protocol = digits_config(tmp_path / 'unused', 'unused', epochs=1)
    for key in ('student', 'losses'):
        del protocol[key]
    del protocol['trainer']['run_name']
    protocol['trainer']['output_dir'] = str(tmp_path / 'teachers')
    (tmp_path / 'protocol.yaml').write_text(yaml.safe_dump(protocol))
    (tmp_path / 'teacher.yaml').write_text(yaml.safe_dump({'base': 'protocol.yaml', 'losses': {'ce': 1.0},
                                                            'student': {'name': 'cifar_resnet14'}}))
    (tmp_path / 'methods' / 'baseline.yaml').write_text(yaml.safe_dump({'teacher': None, 'losses': {'ce': 1.0}}))
    (tmp_path / 'methods' / 'kd.yaml').write_text(yaml.safe_dump({'losses': {'ce': 0.1, 'kd': 0.9}}))
    (tmp_path / 'pairs.yaml').write_text(yaml.safe_dump({'protocol': 'protocol.yaml', 'methods': 'methods', 'pairs': {
        'r14-r8': {'teacher': 'teacher.yaml', 'student': 'cifar_resnet8'}}}))


SLURM = {'partition': 'gpu', 'gpus_per_node': 2, 'timeout_min': 720, 'cpus_per_task': 8, 'mem_gb': 32,
         'slurm_account': 'lab', 'slurm_setup': ['module load cuda'], 'slurm_array_parallelism': 64}


def test_the_slurm_executor_submits_sbatch_arrays_after_their_teacher(tmp_path, fake_slurm, capsys):
    pair_table(tmp_path)
    runs = tmp_path / 'runs'
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'table': 'pairs.yaml', 'seeds': [0, 1], 'output_dir': str(runs), 'slurm': SLURM}))
    assert main(['grid', str(grid), '--executor', 'slurm']) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:-1]] == ['new'] * 5  # the teacher, then 2 x 2 runs
    assert out[-1].startswith(f"submitted to SLURM (teacher {tmp_path / 'teachers' / 'teacher'}: job 4242; 2 runs: "
                              f"job array 4243 (2 tasks) after it; 2 runs: job array 4244 (2 tasks))")
    scripts = {job: (runs / '.submitit' / job / f'{job}_submission.sh').read_text() for job in ('4242', '4243', '4244')}
    for text in scripts.values():
        for line in ('#SBATCH --partition=gpu', '#SBATCH --gpus-per-node=2', '#SBATCH --ntasks-per-node=2',
                     '#SBATCH --nodes=1', '#SBATCH --time=720', '#SBATCH --cpus-per-task=8', '#SBATCH --mem=32GB',
                     '#SBATCH --account=lab', '#SBATCH --signal=USR2@90', 'module load cuda'):
            assert line in text.splitlines(), (line, text)
        assert f"-u -m submitit.core._submit {runs / '.submitit' / '%j'}" in text.splitlines()[-1]
        assert text.splitlines()[-1].startswith(f"srun --unbuffered --output {runs / '.submitit'}/")
    assert '#SBATCH --array' not in scripts['4242'] and '#SBATCH --dependency' not in scripts['4244']
    assert '#SBATCH --array=0-1%2' in scripts['4243'] and '#SBATCH --dependency=afterok:4242' in scripts['4243']
    # what each job runs: distill train of its run (resuming, in the job, when the run has a checkpoint)
    import submitit
    job = submitit.SlurmJob(runs / '.submitit' / '%j', '4243_1').submission().function
    assert job.command == {'recipe': str(tmp_path / 'pairs.yaml'), 'pair': 'r14-r8', 'method': 'kd', 'quiet': True,
                           'overrides': ['trainer.seed=1', f'trainer.output_dir={runs}',
                                         'trainer.run_name=r14-r8-kd-seed1']}
    assert job.run_dir.path == str(runs / 'r14-r8-kd-seed1')
    # sacct: one kd run trains, the other's node failed; the baseline array still waits in the queue
    (fake_slurm / 'sacct.out').write_text('JobID|State|NodeList\n4242|COMPLETED|n1\n4243_0|RUNNING|n2\n'
                                          '4243_1|NODE_FAIL|n3\n4244_[0-1%2]|PENDING|\n')
    (runs / 'r14-r8-kd-seed0').mkdir(exist_ok=True)
    (runs / 'r14-r8-kd-seed0' / 'log.txt').write_text('epoch 1/1 lr 0.05 loss 2.1\n')
    assert main(['grid', str(grid), '--executor', 'slurm', '--status']) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 5) for line in table[1:-1]}
    assert rows['r14-r8-kd-seed0'][1:5] == ['running', '0/1', 'slurm', '4243_0']
    assert rows['r14-r8-kd-seed1'][1:] == ['failed', '0/1', 'slurm', '4243_1',
                                           'the job ended without reporting (SLURM state NODE_FAIL)']
    assert rows['r14-r8-baseline-seed1'][1:5] == ['running', '0/1', 'slurm', '4244_1']
    # the teacher's job ended without training it (not on disk): it counts as failed and is submitted again
    assert rows['teacher'][1:5] == ['(teacher)', 'failed', '0/1', 'slurm']
    assert table[-1] == '5 runs: 3 running, 2 failed'
    assert main(['grid', str(grid), '--executor', 'slurm']) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"submitted to SLURM (teacher {tmp_path / 'teachers' / 'teacher'}: job 4245; 1 run: job 4246 after it)")
    assert '#SBATCH --dependency=afterok:4245' in (runs / '.submitit' / '4246' / '4246_submission.sh').read_text()
    # sbatch refusing a job is one line
    (fake_slurm / 'sbatch').write_text('#!/bin/sh\n'
                                       'echo "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    (runs / 'r14-r8-kd-seed1' / 'job.json').unlink()
    assert main(['grid', str(grid), '--executor', 'slurm']) == 2
    err = capsys.readouterr().err
    assert err.startswith('distill: error: sbatch refused the jobs: sbatch: error: invalid partition specified: gpu;')
    assert len(err.strip().splitlines()) == 1


def test_slurm_arrays_stay_within_the_array_size_limit(tmp_path, fake_slurm, capsys, monkeypatch):
    from distill.sweeps import launch
    monkeypatch.setattr(launch, 'MAX_ARRAY', 2)  # SLURM's default limit is 1001 tasks
    write_recipes(tmp_path, 'a', epochs=1)
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['a.yaml'], 'seeds': [0, 1, 2], 'output_dir': str(tmp_path / 'runs'),
                                    'slurm': SLURM}))
    assert main(['grid', str(grid), '--executor', 'slurm']) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith('submitted to SLURM (3 runs: job arrays 4242, 4243 (3 '
                                                               'tasks))')
    assert [read(tmp_path / 'runs' / f'a-seed{seed}' / 'job.json')['job_id'] for seed in range(3)] == [
        '4242_0', '4242_1', '4243']


@pytest.mark.parametrize('grid, args, message', [
    ({'executor': 'slrum'}, [], "unknown executor 'slrum' (did you mean 'slurm'?): choose local"),
    ({}, ['--executor', 'pbs'], "unknown executor 'pbs': choose local (this machine) or slurm"),
    ({'slurm': {'timeout_min': 60}}, ['--executor', 'slurm'], "needs slurm.partition, the partition to submit to"),
    ({'slurm': {'partition': 'gpu'}}, ['--executor', 'slurm'], "needs slurm.timeout_min, each job's wall-clock"),
    ({'slurm': {**SLURM, 'gpu_per_node': 2}}, ['--executor', 'slurm'],
     "unknown slurm option 'gpu_per_node' (did you mean 'gpus_per_node'?); slurm: takes timeout_min"),
    ({'slurm': {**SLURM, 'nodes': 0}}, ['--executor', 'slurm'], "slurm.nodes must be a whole number >= 1, got 0"),
    ({'slurm': {**SLURM, 'slurm_acount': 'x'}}, ['--executor', 'slurm'], "slurm options: Unknown argument 'acount'"),
    ({'local': {'nodes': 2}}, [], "unknown local option 'nodes'"),
    ({'recipes': ['missing.yaml']}, ['--executor', 'slurm'], "recipe pattern 'missing.yaml' matches no file"),
    ('recipes: [a.yaml\n', [], "is not valid YAML"),
])
def test_bad_grid_files_are_one_line_before_anything_is_submitted(grid, args, message, tmp_path, fake_slurm,
                                                                  capsys):
    write_recipes(tmp_path, 'a', epochs=1)
    path = tmp_path / 'grid.yaml'
    if isinstance(grid, str):
        path.write_text(grid)
    else:
        path.write_text(yaml.safe_dump({'recipes': ['a.yaml'], 'output_dir': str(tmp_path / 'runs'),
                                        'slurm': SLURM, **grid}))
    assert main(['grid', str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'runs').exists() and not (fake_slurm / 'sbatch.last').exists()


@pytest.mark.slow
def test_a_local_job_with_two_tasks_trains_as_two_torch_distributed_ranks(tmp_path, capsys, monkeypatch):
    """tasks_per_node: 2 starts each run as two processes with torchrun's env (gloo on CPU), as on a 2-GPU node."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    write_recipes(tmp_path, 'a', epochs=1)
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'recipes': ['a.yaml'], 'output_dir': str(tmp_path / 'runs'),
                                    'local': {'tasks_per_node': 2}}))
    assert main(['grid', str(grid), '--executor', 'local']) == 0
    assert 'x 2 processes' in (tmp_path / 'runs' / 'a-seed0' / 'log.txt').read_text()
    assert read(tmp_path / 'runs' / 'a-seed0' / 'summary.json')['epochs'] == 1


def test_a_job_pickled_before_the_layout_unpickles(tmp_path, monkeypatch):
    """Grids submitted before the package layout pickled ``distill.launch.TrainJob`` holding a
    ``distill.run_dir.RunDir``; a requeue unpickles those names (as cloudpickle writes them: by reference)."""
    import pickle

    import cloudpickle

    import distill.launch  # noqa: F401  (the old version had them imported when it pickled)
    import distill.run_dir  # noqa: F401
    from distill.runs.directory import RunDir
    from distill.sweeps.launch import TrainJob
    job = TrainJob({'recipe': 'r.yaml', 'overrides': ['trainer.epochs=2']}, RunDir(str(tmp_path), 'run'),
                   {'OMP_NUM_THREADS': '1'})
    monkeypatch.setattr(TrainJob, '__module__', 'distill.launch')  # where the old version defined them
    monkeypatch.setattr(RunDir, '__module__', 'distill.run_dir')
    old = cloudpickle.dumps(job)
    assert b'distill.launch' in old and b'distill.run_dir' in old and b'distill.sweeps' not in old
    monkeypatch.undo()
    again = pickle.loads(old)
    assert type(again) is TrainJob and type(again.run_dir) is RunDir
    assert (again.command, again.run_dir.path, again.env) == (job.command, job.run_dir.path, job.env)
