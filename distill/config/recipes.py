"""Reading recipes into plain mappings (``config`` types and checks them): YAML files with ``base:`` inheritance,
pair tables, and dotted ``key=value`` overrides.

A pair table (``experiments/cifar100/pairs.yaml``) replaces one file per (teacher -> student pair, method)::

    protocol: crd_base.yaml              # the recipe every run starts from (data, optimizer, schedule, epochs)
    methods: methods                     # folder of <method>.yaml: each method's losses (baseline.yaml: no teacher)
    pairs:
      vgg13-vgg8:
        teacher: teachers/vgg13.yaml     # the recipe that trains the teacher; its model is the pair's teacher
        student: cifar_vgg8
        lr: 0.05                         # optional: optimizer.lr of the pair's runs
        skip: [fsp]                      # optional: methods this pair does not run
        losses: {dkd: {beta: 6.0}}       # optional: options merged into a method's term of that name
        methods:                         # optional: options for one method's terms only (after 'losses')
          dkd_ls: {dkd: {alpha: 15.0, beta: 30.0}}

Run ``(pair, method)`` is the protocol, then the pair's models (and lr), then ``methods/<method>.yaml`` (its
``losses`` replace the protocol's), then the pair's ``losses`` and ``methods`` exceptions, with run name
``<pair>-<method>`` (underscores as dashes). Paths are relative to the file that names them.
"""
import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..errors import DistillError, nearest
from ..files import load_yaml_mapping

TABLE_KEYS = ('protocol', 'methods', 'pairs')
PAIR_KEYS = ('teacher', 'student', 'lr', 'skip', 'losses', 'methods')


def read_recipe(path: str, chain: Sequence[str] = ()) -> Dict[str, Any]:
    """A recipe file with its ``base:`` recipes merged under it; ``teacher.recipe`` made relative to the caller."""
    if os.path.abspath(path) in chain:
        cycle = ' -> '.join(os.path.relpath(p) for p in list(chain) + [os.path.abspath(path)])
        raise DistillError(f"recipe {path} includes itself through base: ({cycle}); remove one of these base: "
                           f"entries")
    if not os.path.isfile(path):
        raise DistillError(f"recipe not found: {path} (check the path; recipes live under experiments/)")
    data = load_yaml_mapping(path, 'recipe')
    teacher = data.get('teacher')
    if isinstance(teacher, dict) and isinstance(teacher.get('recipe'), str):  # relative to the naming recipe
        teacher['recipe'] = os.path.normpath(os.path.join(os.path.dirname(path), teacher['recipe']))
    base = data.pop('base', None)
    if base is None:
        return data
    merged: Dict[str, Any] = {}
    for item in [base] if isinstance(base, str) else base:  # 'base:' paths are relative to the recipe naming them
        merged = merge(merged, read_recipe(os.path.join(os.path.dirname(path), item), [*chain, os.path.abspath(path)]))
    return merge(merged, data)


def merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != 'losses':
            out[key] = merge(out[key], value)
        else:  # a recipe's losses replace its base's, so a KD recipe never inherits stray terms
            out[key] = value
    return out


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML: 2, 0.1, true, null, [1, 2]; ``name:`` is a string,
    a mapping is written in braces)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if '=' not in item:
            raise DistillError(f"override '{item}' must look like section.key=value, e.g. trainer.epochs=2")
        path, raw = item.split('=', 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and list(value.values()) == [None] and not raw.lstrip().startswith('{'):
            value = raw  # student.name=hf-hub: is that name, not YAML's one-key mapping {'hf-hub': None}
        keys = path.split('.')
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


def run_name(pair: str, method: str) -> str:
    return f"{pair}-{method.replace('_', '-')}"


class PairTable:
    """The runs of a pair table: ``pairs``, ``methods(pair)`` and each run's recipe (``recipe(pair, method)``)."""

    def __init__(self, path: str, table: Optional[Dict[str, Any]] = None):
        """``table``: the file's mapping, when the caller has read it already."""
        self.path, self.folder = path, os.path.dirname(path)
        table = load_yaml_mapping(path, 'pair table') if table is None else table
        self._check_keys(table, TABLE_KEYS, 'a pair table has')
        missing = [key for key in TABLE_KEYS if key not in table]
        if missing:
            raise DistillError(f"{path}: '{missing[0]}' is missing; a pair table has {', '.join(TABLE_KEYS)}")
        self.protocol = os.path.join(self.folder, table['protocol'])
        self.methods_dir = os.path.join(self.folder, table['methods'])
        self.all_methods = sorted(name[:-5] for name in os.listdir(self.methods_dir) if name.endswith('.yaml')) \
            if os.path.isdir(self.methods_dir) else []
        if not self.all_methods:
            raise DistillError(f"{path}: methods folder {self.methods_dir} holds no <method>.yaml; fix 'methods:'")
        if not isinstance(table['pairs'], dict) or not table['pairs']:
            raise DistillError(f"{path}: 'pairs' must map pair names to their teacher and student")
        self.pairs: Dict[str, Dict[str, Any]] = table['pairs']
        for pair, spec in self.pairs.items():
            self._check_pair(pair, spec)
        self._files: Dict[str, Dict[str, Any]] = {}  # a grid reads each file once

    def _read(self, path: str) -> Dict[str, Any]:
        if path not in self._files:
            self._files[path] = read_recipe(path)
        return copy.deepcopy(self._files[path])

    def _check_keys(self, mapping: Dict[str, Any], known: Sequence[str], what: str, where: str = '') -> None:
        for key in mapping:
            if key not in known:
                raise DistillError(f"{self.path}: unknown key '{where}{key}'{nearest(key, known)}; {what} "
                                   f"{', '.join(known)}")

    def _check_pair(self, pair: str, spec: Any) -> None:
        if not isinstance(spec, dict) or not {'teacher', 'student'} <= set(spec):
            raise DistillError(f"{self.path}: pair {pair!r} needs 'teacher' (the recipe that trains it) and "
                               f"'student' (a model name)")
        self._check_keys(spec, PAIR_KEYS, 'a pair has', f"{pair}.")
        for method in [*(spec.get('skip') or []), *(spec.get('methods') or {})]:
            if method not in self.all_methods:
                raise DistillError(f"{self.path}: pair {pair!r} names unknown method {method!r}"
                                   f"{nearest(method, self.all_methods)}")
        term_options = [(f'{pair}.losses', spec.get('losses') or {})] + [
            (f'{pair}.methods.{method}', terms or {}) for method, terms in (spec.get('methods') or {}).items()]
        for where, terms in term_options:
            for term, options in terms.items():
                if not isinstance(options, dict):
                    raise DistillError(f"{self.path}: {where}.{term} must be a mapping of options, e.g. "
                                       f"{{beta: 6.0}}")

    def methods(self, pair: str) -> List[str]:
        return [method for method in self.all_methods if method not in (self.pairs[pair].get('skip') or [])]

    def recipe(self, pair: Optional[str], method: Optional[str]) -> Dict[str, Any]:
        if pair not in self.pairs:
            hint = nearest(pair, self.pairs) if pair else ''
            raise DistillError(f"{self.path} is a pair table: choose --pair{hint} (one of {', '.join(self.pairs)})"
                               if not pair else f"unknown pair {pair!r} in {self.path}{hint}; pairs: "
                               f"{', '.join(self.pairs)}")
        if method not in self.methods(pair):
            skipped = method in self.all_methods
            raise DistillError(f"pair {pair} does not run {method} ({self.path} skips it)" if skipped else
                               f"choose --method{nearest(method, self.all_methods) if method else ''}: one of "
                               f"{', '.join(self.methods(pair))} ({os.path.relpath(self.methods_dir)}/<method>.yaml)")
        spec = self.pairs[pair]
        teacher_recipe = os.path.normpath(os.path.join(self.folder, spec['teacher']))
        teacher_name = (self._read(teacher_recipe).get('student') or {}).get('name')
        layer: Dict[str, Any] = {'student': {'name': spec['student']},
                                 'teacher': {'name': teacher_name, 'recipe': teacher_recipe},
                                 'trainer': {'run_name': run_name(pair, method)}}
        if 'lr' in spec:
            layer['optimizer'] = {'lr': spec['lr']}
        method_file = self._read(os.path.join(self.methods_dir, f'{method}.yaml'))
        data = merge(merge(self._read(self.protocol), layer), method_file)
        losses = data.get('losses') or {}
        for terms in (spec.get('losses') or {}, (spec.get('methods') or {}).get(method) or {}):
            for term, options in terms.items():
                if term in losses:  # a bare weight becomes {weight: w} so that options can join it
                    current = losses[term] if isinstance(losses[term], dict) else {'weight': losses[term]}
                    losses[term] = merge(current, options)
        return data


def recipe_data(path: str, pair: Optional[str] = None, method: Optional[str] = None,
                table: Optional[PairTable] = None) -> Tuple[Dict[str, Any], str]:
    """``(mapping, default run name)`` of a recipe file, or of run (pair, method) of a pair table (``table``: that
    table, already read)."""
    if table is None and os.path.isfile(path):
        mapping = load_yaml_mapping(path, 'recipe')
        table = PairTable(path, mapping) if 'pairs' in mapping else None
    if table is not None:
        return table.recipe(pair, method), run_name(pair, method)
    if pair or method:
        raise DistillError(f"--pair/--method choose a run of a pair table; {path} is a plain recipe (drop them)")
    return read_recipe(path), os.path.splitext(os.path.basename(path))[0]
