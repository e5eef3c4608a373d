"""The documentation against the code: docs/config.md is what base_config's comments say now,
every key has a comment, and docs/architecture.md names only modules and functions that exist."""

import ast
import difflib
import inspect
import os
import re

import ml_collections
import pytest

from tljax import config as config_lib
from tljax import config_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PAGE = os.path.join(ROOT, 'docs', 'config.md')
ARCHITECTURE_PAGE = os.path.join(ROOT, 'docs', 'architecture.md')


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """Dotted path -> value of every leaf key; a free-form section counts as one leaf."""
  leaves = {}
  for key in config:
    path, value = f'{prefix}{key}', config[key]
    if isinstance(value, ml_collections.ConfigDict) and path not in config_lib.FREE_FORM:
      leaves.update(_leaf_keys(value, f'{path}.'))
    else:
      leaves[path] = value
  return leaves


def _value(config: ml_collections.ConfigDict, path: str):
  for part in path.split('.'):
    config = config[part]
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


# (a) Every key is documented by a comment in base_config.

def test_every_key_of_base_config_has_a_meaning():
  entries = config_reference.source_entries()
  config = config_lib.base_config()
  required = [*_leaf_keys(config), 'model.name', 'model.num_classes']
  uncommented = [path for path in required if path not in entries or not entries[path].meaning]
  assert uncommented == [], 'keys of tljax.config.base_config without a comment'
  assert config_reference.undocumented(entries, config) == []  # the sections too
  assert set(entries) == set(config_reference.documented_paths(config))


def _config_of(source: str) -> ml_collections.ConfigDict:
  """What base_config returns when its source is `source`."""
  namespace = dict(vars(config_lib))
  exec(compile(source, 'base_config', 'exec'), namespace)  # noqa: S102 (our own source)
  return namespace['base_config']()


def test_a_key_added_without_a_comment_fails_the_check():
  source = inspect.getsource(config_lib.base_config)
  assert '      cache_features=False,\n' in source and '  return c\n' in source
  added = source.replace('      cache_features=False,\n',
                         '      cache_features=False,\n      new_flag=True,\n')
  added = added.replace('  return c\n', '  c.new_top = 2\n  return c\n')
  config = _config_of(added)
  entries = config_reference.extract(added)
  before = set(config_reference.undocumented(config_reference.extract(source),
                                             config_lib.base_config()))
  after = set(config_reference.undocumented(entries, config))
  assert after - before == {'data.new_flag', 'new_top'}
  with pytest.raises(config_reference.ConfigReferenceError, match='data.new_flag.*new_top'):
    config_reference.render(entries, config)

  documented = source.replace('      cache_features=False,\n',
                              '      cache_features=False,\n      new_flag=True,  # a flag\n')
  documented = documented.replace('  return c\n', '  # A top key.\n  c.new_top = 2\n  return c\n')
  entries = config_reference.extract(documented)
  assert set(config_reference.undocumented(entries, _config_of(documented))) == before
  assert entries['data.new_flag'].meaning == 'a flag'
  assert entries['new_top'].meaning == 'A top key.'


SMALL = '''
def base_config():
  c = ml_collections.ConfigDict()
  # The section,
  # in two lines.
  c.sec = dict(
      # Above a,
      # still a.
      a=1,  # and trailing a
      b=2,  # only b
      c=3,
      # a comment left after a blank line

      d=4,
      inner=dict(
          e=5,  # e
      ),
  )
  c.top = 0
  return c
'''


def test_comment_rules_on_a_small_source():
  entries = config_reference.extract(SMALL)
  meanings = {path: entry.meaning for path, entry in entries.items()}
  assert meanings == {'sec': 'The section, in two lines.', 'sec.a': 'Above a, still a. and '
                      'trailing a', 'sec.b': 'only b', 'sec.c': '', 'sec.d': '',
                      'sec.inner': '', 'sec.inner.e': 'e', 'top': ''}
  assert [e.path for e in entries.values() if e.section] == ['sec', 'sec.inner']


def test_a_comment_shared_by_two_keys_is_refused():
  shared = SMALL.replace('      c=3,\n', '      c=3, x=4,  # c or x?\n')
  with pytest.raises(config_reference.ConfigReferenceError, match='sec.c, sec.x'):
    config_reference.extract(shared)


# (b) docs/config.md is what the generator makes of base_config now.

def test_config_page_is_current():
  expected, page = config_reference.render(), _read(CONFIG_PAGE)
  if page != expected:
    diff = ''.join(list(difflib.unified_diff(
        page.splitlines(True), expected.splitlines(True), 'docs/config.md', 'generated'))[:40])
    pytest.fail('docs/config.md differs from the comments in tljax.config.base_config; run '
                f'`{config_reference.COMMAND}`\n{diff}')


def test_command_prints_and_writes_the_page(tmp_path, monkeypatch, capsys):
  config_reference.main([])
  printed = capsys.readouterr().out
  assert printed == config_reference.render()
  target = tmp_path / 'config.md'
  monkeypatch.setattr(config_reference, 'DOC_PATH', str(target))
  config_reference.main(['--write'])
  assert target.read_text(encoding='utf-8') == printed


# (c) Every default on the page is what the resolved base_config holds.

def _table_rows(page: str) -> list[list[str]]:
  rows = []
  for line in page.splitlines():
    if line.startswith('| `'):
      cells = [c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]]
      rows.append([c.replace('\\|', '|') for c in cells])
  return rows


def test_config_page_defaults_are_the_resolved_defaults():
  config = config_lib.base_config()
  rows = _table_rows(_read(CONFIG_PAGE))
  shown = {}
  for key, default, meaning in rows:
    assert key.startswith('`') and key.endswith('`') and default.startswith('`'), (key, default)
    assert meaning, key
    shown[key.strip('`')] = ast.literal_eval(default.strip('`'))
  # every leaf key, and the free-form model section by its keys
  expected = {*_leaf_keys(config), 'model.name', 'model.num_classes'} - {'model'}
  assert set(shown) == expected
  for path, value in shown.items():
    resolved = _value(config, path)
    assert value == resolved and repr(value) == repr(resolved), path


# The architecture page names only modules, files and functions that exist.

def _code_text(page: str) -> str:
  """The text inside code blocks and `code spans`, where the page names code."""
  blocks = re.findall(r'```.*?```', page, re.DOTALL)
  rest = re.sub(r'```.*?```', '', page, flags=re.DOTALL)
  return '\n'.join(blocks + re.findall(r'`([^`\n]+)`', rest))


def _top_level_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
  names = {}
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names[node.name] = node
    elif isinstance(node, ast.Assign):
      names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names[node.target.id] = node
  return names


def _defines(path: str, attributes: list[str]) -> bool:
  """Whether the module file defines `a.b` (a function, class, constant or class member)."""
  node: ast.AST = ast.parse(_read(path))
  for attribute in attributes:
    names = _top_level_names(getattr(node, 'body', []))
    if attribute not in names:
      return False
    node = names[attribute] if isinstance(names[attribute], ast.ClassDef) else ast.Module([])
  return True


def _resolves(dotted: str) -> bool:
  """`tljax.a.b.c`: the longest prefix that is a module of the package, and the rest defined
  in it (read from the source: nothing is imported)."""
  parts = dotted.split('.')
  for count in range(len(parts), 0, -1):
    base = os.path.join(ROOT, *parts[:count])
    for path in (f'{base}.py', os.path.join(base, '__init__.py')):
      if os.path.isfile(path):
        return _defines(path, parts[count:])
  return False


def broken_references(page: str) -> list[str]:
  """The `tljax/...` paths and `tljax.x.y` names in the page's code that do not exist."""
  code = _code_text(page)
  paths = {p.rstrip('.') for p in re.findall(r'\btljax/[\w/.*-]*', code)}
  names = set(re.findall(r'\btljax(?:\.\w+)+', code))
  return sorted([p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
                + [n for n in names if not _resolves(n)])


def test_reference_check_finds_what_is_missing():
  page = ('`tljax/train.py`, `tljax.resolve.resolve_config`, `tljax.models.ModelEntry.stages`,\n'
          '`tljax/nowhere.py`, `tljax.train.no_such_function`, `tljax.nomodule.f`, and\n'
          '```\ntljax.freeze.not_there()\n```\n')
  assert broken_references(page) == ['tljax.freeze.not_there', 'tljax.nomodule.f',
                                     'tljax.train.no_such_function', 'tljax/nowhere.py']


def test_architecture_page_references_exist():
  page = _read(ARCHITECTURE_PAGE)
  code = _code_text(page)
  assert len(re.findall(r'\btljax(?:\.\w+)+|\btljax/', code)) > 100  # the page names code
  assert broken_references(page) == [], 'docs/architecture.md names code that does not exist'


def test_architecture_page_names_every_module():
  page = _code_text(_read(ARCHITECTURE_PAGE))
  unnamed = []
  for directory, _, files in os.walk(os.path.join(ROOT, 'tljax')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.relpath(os.path.join(directory, name), ROOT)
        # a package's __init__.py is described by naming the package's folder
        named = [path, os.path.dirname(path) + '/'] if name == '__init__.py' else [path]
        if not any(re.search(rf'(?<![\w/]){re.escape(n)}', page) for n in named):
          unnamed.append(path)
  assert sorted(unnamed) == [], 'modules docs/architecture.md does not describe'
