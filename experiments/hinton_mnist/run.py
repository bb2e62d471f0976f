"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", §3 on MNIST, end to end through
`distill train` and `distill eval`:

    python experiments/hinton_mnist/run.py [--mnist ../shared/data/mnist] [--jobs 2] [--quick]

Rows (recipes beside this file): the dropout + max-norm + jitter teacher (teacher.yaml), the student alone
(student.yaml, --seeds), the student distilled at T 20 (kd.yaml, --seeds), the temperature sweep (students of 300 and
30 units per layer, one run per T), the mythical 3 (mythical3.yaml: no 3 in the transfer set, then the 3's bias
fitted) and only 7s and 8s (only78.yaml, then both biases fitted). Each run is a `distill train` process (--jobs at a
time, one thread each); a finished run is reused and an interrupted one resumed, so a rerun continues where the last
stopped. The biases are fitted by `distill eval RUN --fit-bias` on the test set (as the paper did) and on the last
5,000 training images. Errors are the last epoch's, out of the 10,000 test images (no epoch is picked on the test
set). The teacher-logit tables live in the output folder, filled by this experiment's own runs (a table left in
~/.cache/distill by an older distill could hold entries another run computed a few at a time, a few last bits off,
which moved a KD row by an error). Writes results.json, the table (stdout, README.md's table) and PNGs to --output; --quick runs the same code
on 3,000 training and 1,000 test images for 2 epochs (a check of the path, not of the numbers).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED_MNIST = os.path.join(REPO, '..', 'shared', 'data', 'mnist')
PAPER = {'teacher': 67, 'student_alone': 146, 'kd': 74, 'mythical_3': (206, 133, 109, 14), 'only_7_8': (0.473, 0.132)}
PUBLIC = 'yaroslavvb/hinton-problems distillation-mnist-omitted-3: teacher 161 errors; KD student 91.9% of test 3s ' \
         'right before its bias correction, 97.8% after'
SWEEP_T = (1.0, 2.0, 3.0, 4.0, 8.0, 20.0)
SWEEP_STUDENTS = {'300': 'mnist_mlp_300', '30': 'mnist_mlp_30'}


class Run:
    """One `distill train` run: a recipe of this folder with overrides, named ``name`` under the output folder."""

    def __init__(self, args, name, recipe, *overrides, needs_teacher=False, sweep=False, after=None):
        self.name, self.needs_teacher, self.after = name, needs_teacher, after
        self.folder = os.path.join(args.output, name)
        epochs = ['trainer.epochs=2'] if args.quick else ([f'trainer.epochs={args.sweep_epochs}'] if sweep else [])
        self.command = [sys.executable, '-m', 'distill', 'train', os.path.join(HERE, recipe),
                        f'data.root={os.path.abspath(args.mnist)}', f'trainer.output_dir={args.output}',
                        f'trainer.run_name={name}', *args.data_overrides, *epochs, *overrides]
        if needs_teacher:  # the teacher-logit tables in the output folder: filled by this experiment's runs alone
            self.command += [f'teacher.checkpoint={teacher_weights(args)}',
                             f'teacher_cache.dir={os.path.join(args.output, "teacher_logits")}']

    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, 'summary.json'))

    def first_epoch_done(self) -> bool:
        metrics = os.path.join(self.folder, 'metrics.jsonl')
        return self.finished() or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0)

    def ready(self, teacher_done: bool) -> bool:
        """The teacher trained (if it needs it), and the run that fills its teacher-logit table through its first
        epoch (``after``) past it: the table then holds the teacher's logits for every image, and the runs reading
        it never run the teacher (two runs filling it at once would store the same bits, computing many twice)."""
        return (teacher_done or not self.needs_teacher) and (self.after is None or self.after.first_epoch_done())

    def start(self, log_folder: str) -> subprocess.Popen:
        resume = ['--resume'] if os.path.isfile(os.path.join(self.folder, 'checkpoints', 'last.pt')) else []
        log = open(os.path.join(log_folder, f'{self.name}.log'), 'a')
        return subprocess.Popen(self.command + resume, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})

    def summary(self):
        return json.load(open(os.path.join(self.folder, 'summary.json')))

    def errors(self, test_images: int) -> int:
        return round((100.0 - self.summary()['last_top1']) * test_images / 100.0)


def teacher_weights(args) -> str:
    return os.path.join(args.output, 'teacher-s0', 'student_last.safetensors')


def plan(args):
    runs = {'teacher': [Run(args, 'teacher-s0', 'teacher.yaml')],
            'student_alone': [Run(args, f'student-s{s}', 'student.yaml', f'trainer.seed={s}') for s in args.seeds],
            'kd': [Run(args, f'kd-s{s}', 'kd.yaml', f'trainer.seed={s}', needs_teacher=True) for s in args.seeds],
            'mythical_3': [Run(args, 'mythical3-s0', 'mythical3.yaml', needs_teacher=True)],
            'only_7_8': [Run(args, 'only78-s0', 'only78.yaml', needs_teacher=True)]}
    for units, model in SWEEP_STUDENTS.items():
        runs[f'sweep_{units}'] = [Run(args, f'sweep{units}-T{t:g}', 'kd.yaml', f'student.name={model}',
                                      f'losses.kd.temperature={t}', needs_teacher=True, sweep=True)
                                  for t in args.temperatures]
    filler = runs['kd'][0]  # the KD seeds and the sweep share one teacher-logit table (same teacher, images, views)
    for run in runs['kd'][1:] + runs['sweep_300'] + runs['sweep_30']:
        run.after = filler
    return runs


def train_all(runs, jobs: int, log_folder: str) -> dict:
    """Every run, ``jobs`` at a time, the teacher's students once the teacher has finished; seconds per run."""
    waiting = [run for group in runs.values() for run in group if not run.finished()]
    waiting.sort(key=lambda run: run.needs_teacher)  # the teacher and the students alone first
    active, seconds = {}, {}
    while waiting or active:
        teacher_done = runs['teacher'][0].finished()
        for run in [run for run in waiting if run.ready(teacher_done)][:jobs - len(active)]:
            waiting.remove(run)
            active[run] = (run.start(log_folder), time.time())
            print(f"started {run.name}", flush=True)
        if not active:
            blocker = next((run.after for run in waiting if run.after is not None), runs['teacher'][0])
            raise SystemExit(f"{blocker.name} did not finish: see {log_folder}/{blocker.name}.log")
        time.sleep(1.0)
        for run, (process, started) in list(active.items()):
            if process.poll() is not None:
                del active[run]
                seconds[run.name] = time.time() - started
                if process.returncode != 0:
                    raise SystemExit(f"{run.name} failed (exit {process.returncode}): see {log_folder}/{run.name}.log")
                print(f"finished {run.name} in {seconds[run.name]:.0f} s", flush=True)
    return seconds


def fitted_bias(args, run: Run, classes: str, fit_on: str) -> dict:
    """`distill eval RUN --fit-bias CLASSES --fit-on FIT_ON --json`: the δ and the test errors before and after."""
    report = os.path.join(args.output, f'{run.name}-bias-{fit_on.replace(":", "")}.json')
    subprocess.run([sys.executable, '-m', 'distill', 'eval', run.folder, '--fit-bias', classes, '--fit-on', fit_on,
                    '--json', report], check=True, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                   stdout=subprocess.DEVNULL)
    return json.load(open(report))


def mean_std(values):
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def results_of(args, runs, seconds) -> dict:
    test = 1000 if args.quick else 10000
    errors = {row: [run.errors(test) for run in runs[row]] for row in ('teacher', 'student_alone', 'kd')}
    holdout = f'train:{500 if args.quick else 5000}'
    biases = {}
    for row, classes in (('mythical_3', '3'), ('only_7_8', '7,8')):
        biases[row] = {fit: fitted_bias(args, runs[row][0], classes, fit) for fit in ('test', holdout)}
    three = biases['mythical_3']
    result = {name: {'errors': values} for name, values in errors.items()}
    result['mythical_3'] = {
        'errors_before': three['test']['before']['errors'],
        'threes_wrong_before': three['test']['before']['class_errors'][3],
        'threes': three['test']['before']['class_counts'][3],
        'bias': three['test']['delta'], 'errors_after': three['test']['after']['errors'],
        'threes_wrong_after': three['test']['after']['class_errors'][3],
        'heldout': {'bias': three[holdout]['delta'], 'errors_after': three[holdout]['after']['errors'],
                    'threes_wrong_after': three[holdout]['after']['class_errors'][3]},
        'class_accuracy_before': accuracy_per_class(three['test']['before']),
        'class_accuracy_after': accuracy_per_class(three['test']['after'])}
    only = biases['only_7_8']
    result['only_7_8'] = {'error_rate_before': only['test']['before']['errors'] / test,
                          'bias': only['test']['delta'], 'error_rate_after': only['test']['after']['errors'] / test,
                          'heldout': {'bias': only[holdout]['delta'],
                                      'error_rate_after': only[holdout]['after']['errors'] / test}}
    result['temperature_sweep'] = {units: {f'{t:g}': run.errors(test) for t, run in zip(args.temperatures,
                                                                                        runs[f'sweep_{units}'])}
                                   for units in SWEEP_STUDENTS}
    result['run_seconds'] = {name: round(value) for name, value in sorted(seconds.items())}
    result['test_images'], result['heldout_images'] = test, int(holdout.split(':')[1])
    return result


def accuracy_per_class(report: dict) -> list:
    return [round(100.0 * (1 - wrong / count), 2) for wrong, count in zip(report['class_errors'],
                                                                         report['class_counts'])]


def table(result: dict) -> str:
    teacher, alone, kd = (statistics.mean(result[row]['errors']) for row in ('teacher', 'student_alone', 'kd'))
    three, only = result['mythical_3'], result['only_7_8']
    per_seed = lambda row: ', '.join(str(e) for e in result[row]['errors'])  # noqa: E731
    recovered = 100.0 * (alone - kd) / (alone - teacher) if alone != teacher else float('nan')
    lines = ["| row | paper | distill (mean ± std) | per seed |", "|---|---|---|---|",
             f"| teacher 1200-1200, dropout + max-norm + jitter | 67 | {mean_std(result['teacher']['errors'])} | "
             f"{per_seed('teacher')} |",
             f"| student 800-800 alone | 146 | {mean_std(result['student_alone']['errors'])} | "
             f"{per_seed('student_alone')} |",
             f"| student 800-800, KD at T 20 | 74 | {mean_std(result['kd']['errors'])} | {per_seed('kd')} |",
             f"| KD: share of the student-teacher gap recovered | 91% | {recovered:.0f}% | |",
             f"| mythical 3: errors (3s wrong of {three['threes']}) | 206 (133) | {three['errors_before']} "
             f"({three['threes_wrong_before']}) | |",
             f"| mythical 3, bias fitted on the test set (paper: +3.5) | 109 (14) | {three['errors_after']} "
             f"({three['threes_wrong_after']}), δ {three['bias']:+.2f} | |",
             f"| mythical 3, bias fitted on {result['heldout_images']:,} training images | – | "
             f"{three['heldout']['errors_after']} "
             f"({three['heldout']['threes_wrong_after']}), δ {three['heldout']['bias']:+.2f} | |",
             f"| only 7s and 8s: test error rate | 47.3% | {100 * only['error_rate_before']:.1f}% | |",
             f"| only 7s and 8s, bias fitted on the test set (paper: -7.6) | 13.2% | "
             f"{100 * only['error_rate_after']:.1f}%, δ {only['bias']:+.2f} | |",
             f"| only 7s and 8s, bias fitted on {result['heldout_images']:,} training images | – | "
             f"{100 * only['heldout']['error_rate_after']:.1f}%, δ {only['heldout']['bias']:+.2f} | |"]
    sweep = result['temperature_sweep']
    lines += ["", "| test errors at T | " + " | ".join(sweep['300']) + " |",
              "|---|" + "---|" * len(sweep['300'])]
    lines += [f"| {units} units per layer | " + " | ".join(str(e) for e in sweep[units].values()) + " |"
              for units in sweep]
    return "\n".join(lines)


def plots(args, result: dict, runs) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for units, errors in result['temperature_sweep'].items():
        axes[0].plot([float(t) for t in errors], list(errors.values()), marker='o', label=f'{units} units per layer')
    axes[0].set(xscale='log', xlabel='temperature T', ylabel=f"test errors (of {result['test_images']:,})",
                title='KD students vs T')
    axes[0].legend()
    width = 0.4
    for shift, key, label in ((-width / 2, 'class_accuracy_before', 'before'),
                              (width / 2, 'class_accuracy_after', f"after δ {result['mythical_3']['bias']:+.2f}")):
        axes[1].bar([c + shift for c in range(10)], result['mythical_3'][key], width, label=label)
    axes[1].set(xticks=range(10), ylim=(0, 101), xlabel='digit', ylabel='test accuracy (%)',
                title='mythical 3: no 3 in the transfer set')
    axes[1].legend(loc='lower left')
    for row in ('teacher', 'student_alone', 'kd'):
        records = [json.loads(line) for line in open(os.path.join(runs[row][0].folder, 'metrics.jsonl'))]
        axes[2].plot([r['epoch'] for r in records], [100 - r['val_top1'] for r in records], label=row)
    axes[2].set(yscale='log', xlabel='epoch', ylabel='test error (%)', title='learning curves (seed 0)')
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output, 'hinton_mnist.png'), dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mnist', default=SHARED_MNIST, help='the folder of the four MNIST IDX files')
    parser.add_argument('--output', default=None, help='default runs/hinton_mnist (--quick: runs/hinton_mnist_quick)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--temperatures', type=float, nargs='+', default=list(SWEEP_T))
    parser.add_argument('--sweep-epochs', type=int, default=20)
    parser.add_argument('--jobs', type=int, default=2, help='runs at once (one thread each)')
    parser.add_argument('--quick', action='store_true', help='3,000 training / 1,000 test images, 2 epochs')
    args = parser.parse_args()
    args.output = os.path.abspath(args.output or os.path.join(REPO, 'runs', 'hinton_mnist_quick' if args.quick
                                                              else 'hinton_mnist'))
    args.data_overrides = ['data.train_per_class=300', 'data.val_per_class=100'] if args.quick else []
    if args.quick:
        args.seeds, args.temperatures = args.seeds[:2], [2.0, 20.0]
    os.makedirs(os.path.join(args.output, 'logs'), exist_ok=True)
    started = time.time()
    runs = plan(args)
    seconds = train_all(runs, args.jobs, os.path.join(args.output, 'logs'))
    result = results_of(args, runs, seconds)
    result['wall_seconds'] = round(time.time() - started)
    json.dump(result, open(os.path.join(args.output, 'results.json'), 'w'), indent=1)
    plots(args, result, runs)
    print(table(result))
    print(f"\npublic reproduction: {PUBLIC}\nwall time of this call: {result['wall_seconds']} s; runs, results.json "
          f"and hinton_mnist.png in {args.output}")


if __name__ == '__main__':
    main()
