"""Every script under experiments/ and benchmarks/ still imports what it uses and parses its arguments (`--help`
runs every module-level import without training), so a refactor of distill cannot silently break them."""
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SCRIPTS = sorted(path for path in glob.glob(os.path.join(REPO, 'experiments', '**', '*.py'), recursive=True)
                 + glob.glob(os.path.join(REPO, 'benchmarks', '*.py')) if not path.endswith('common.py'))


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda path: os.path.relpath(path, REPO))
def test_script_imports_and_parses_its_arguments(script):
    result = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and 'usage:' in result.stdout, result.stderr[-2000:]
