#!/usr/bin/env bash
# The GPU check as one command from the repository root (see benchmarks/gpu/bench.py for what it measures):
#   bash benchmarks/gpu/run.sh              on a CUDA machine: about 7 minutes, results in $OUT (or runs/gpu_bench)
#   bash benchmarks/gpu/run.sh --cpu-smoke  every part on CPU in seconds (tests/test_scripts.py runs it)
# Uses the machine's own python (PYTHON, default python3) with its torch, torchvision and timm; installs distill from
# this tree without dependencies. Wheels in benchmarks/gpu/wheels/ (e.g. `pip download timm==1.0.31 --no-deps -d
# benchmarks/gpu/wheels`) are installed first where that python lacks or has an older version of them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if compgen -G "benchmarks/gpu/wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/distill-gpu-site \
        benchmarks/gpu/wheels/*.whl
    export PYTHONPATH=/tmp/distill-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import distill, os, sys; sys.exit(os.path.dirname(distill.__path__[0]) != os.getcwd())" \
        2> /dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
        || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # a read-only site-packages: import from the tree
fi
PYTHONUNBUFFERED=1 exec "$PYTHON" benchmarks/gpu/bench.py "$@"
