"""The package's shape: the import graph of ``distill/`` (module-level and function-level imports alike) has no
circle, every module sits in one layer of ``LAYERS`` and imports only from its own layer or those below, and no
module outgrows one job (300 lines, none over 120 characters)."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), '..', 'distill')
# bottom up: a module imports from its own layer and the layers below, never from one above
LAYERS = [
    ('core: errors and atomic files', ('distill.errors', 'distill.files', 'distill._startup')),
    ('config: recipes as typed configs', ('distill.config',)),
    ("runs: a run's files", ('distill.runs',)),
    ('models and loss terms', ('distill.models', 'distill.losses')),
    ('data', ('distill.data',)),
    ('teaching: live, cached and replayed teachers', ('distill.teaching',)),
    ('training', ('distill.training',)),
    ('many runs and tools', ('distill.sweeps', 'distill.tools')),
    # distill.launch and distill.run_dir: the names grids pickled before this layout (requeued jobs unpickle them)
    ('the command and the package', ('distill.cli', 'distill.__main__', 'distill', 'distill.launch',
                                     'distill.run_dir')),
]
MAX_LINES = 300
MAX_LINE_LENGTH = 120


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == '__init__':
                    parts = parts[:-1]
                yield '.'.join(parts), path


def import_graph():
    """``{module: {distill modules it imports}}``; ``from .x import y`` counts as importing ``x`` (and ``x.y`` when
    that is a module)."""
    modules = dict(_modules())
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(anchor + ([base] if base else []))
                targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != module)
        graph[module] = edges
    return graph


def _cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for target in sorted(graph[node]):
            if state.get(target) == 'open':
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target, stack + [target])
                if found:
                    return found
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert 'distill.training.trainer' in graph and graph['distill.training.trainer']
    cycle = _cycle(graph)
    assert cycle is None, ' -> '.join(cycle)
    # the package init imports its subpackages, which import back into it: only the package itself may (and
    # does) sit above everything; a package __init__ is never imported by its own modules
    for module, edges in graph.items():
        parent = module.rsplit('.', 1)[0]
        assert parent == module or parent not in edges or parent == 'distill', (module, parent)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) is None


def layer_of(module):
    """The index in ``LAYERS`` of the layer holding ``module`` (the package ``distill`` itself: the top)."""
    for index, (_, members) in enumerate(LAYERS):
        if any(module == member or (member != 'distill' and module.startswith(member + '.')) for member in members):
            return index
    raise AssertionError(f'{module} is in no layer: add it (or its subpackage) to LAYERS in tests/test_layout.py')


def test_every_module_imports_only_from_its_layer_or_below():
    graph = import_graph()
    upward = [f'{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})'
              for module, edges in sorted(graph.items()) for target in sorted(edges)
              if layer_of(target) > layer_of(module)]
    assert not upward, '\n'.join(upward)


def test_the_layers_order_what_the_code_depends_on():
    assert layer_of('distill.training.trainer') > layer_of('distill.data.sources') > layer_of('distill.config.schema')
    assert layer_of('distill') == len(LAYERS) - 1 and layer_of('distill.losses.kd') == layer_of('distill.models')


@pytest.mark.parametrize('module, path', sorted(_modules()))
def test_no_module_outgrows_one_job(module, path):
    lines = open(path).read().splitlines()
    assert len(lines) <= MAX_LINES, module
    long = [number for number, line in enumerate(lines, 1) if len(line) > MAX_LINE_LENGTH]
    assert not long, f"{module}: lines {long} are over {MAX_LINE_LENGTH} characters"


def test_only_public_timm_apis_are_used():
    """setup.cfg's timm lower bound is what the tests run on; private timm modules may change in any release."""
    import re
    private = re.compile(r'\btimm(\.[A-Za-z]\w*)*\._\w+')
    for module, path in _modules():
        source = open(path).read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('timm'):
                assert not any(part.startswith('_') for part in node.module.split('.')), (module, node.module)
        assert not private.search(source), (module, private.search(source).group(0))


def test_every_folder_of_the_package_installs():
    """setup.cfg's find: takes packages with an __init__.py; a folder without one (or one git ignores) would work
    from a checkout and be missing from a wheel."""
    import subprocess
    from setuptools import find_packages
    folders = sorted(os.path.relpath(root, os.path.dirname(PACKAGE)).replace(os.sep, '.')
                     for root, _, files in os.walk(PACKAGE) if any(name.endswith('.py') for name in files))
    assert sorted(find_packages(os.path.join(PACKAGE, '..'), include=['distill*'])) == folders
    tracked = subprocess.run(['git', 'ls-files', '--', 'distill'], cwd=os.path.join(PACKAGE, '..'),
                             capture_output=True, text=True).stdout.split()
    if tracked:  # a git checkout: every package's __init__.py is committed
        assert {f'{folder.replace(".", "/")}/__init__.py' for folder in folders} <= set(tracked)
