"""The package's shape: the import graph of ``distill/`` (module-level and function-level imports alike) has no
circle, the orchestrating modules are imported only by those above them, and no module outgrows one job."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), '..', 'distill')
# who may import the orchestration modules (everything else sits below them)
ORCHESTRATORS = {'distill.trainer': {'distill', 'distill.pipeline', 'distill.demo'},
                 'distill.pipeline': {'distill.cli', 'distill.launch'}, 'distill.grid': {'distill.cli'},
                 'distill.demo': {'distill.cli'}, 'distill.cli': {'distill.__main__'}}
MAX_LINES = 340


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
    assert 'distill.trainer' in graph and graph['distill.trainer']
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


def test_orchestrators_are_imported_only_from_above():
    graph = import_graph()
    for module, edges in graph.items():
        for target in edges & set(ORCHESTRATORS):
            assert module in ORCHESTRATORS[target], f'{module} imports {target}'


@pytest.mark.parametrize('module, path', sorted(_modules()))
def test_no_module_outgrows_one_job(module, path):
    assert len(open(path).read().splitlines()) <= MAX_LINES, module


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
