"""Every registered method has its own test file, tests/methods/test_<name>.py, that tests it against a reference
(a transcription of the official code, or the formula)."""
import os

import pytest

import distill  # noqa: F401
from distill.losses import list_losses

HERE = os.path.dirname(os.path.abspath(__file__))
REGISTERED = sorted(name for name in list_losses() if not name.startswith('test_'))


def test_methods_are_registered():
    assert REGISTERED


@pytest.mark.parametrize('name', REGISTERED)
def test_registered_method_has_a_test_file_with_a_reference_test(name):
    path = os.path.join(HERE, f'test_{name}.py')
    assert os.path.isfile(path), f'method {name!r} is registered but has no test file tests/methods/test_{name}.py'
    text = open(path, encoding='utf-8').read()
    assert 'assert_matches_reference(' in text or 'ref_' in text or 'reference' in text.lower(), \
        f'tests/methods/test_{name}.py does not compare {name!r} to a reference (assert_matches_reference or ref_*)'
