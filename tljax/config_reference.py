"""The config reference, docs/config.md, generated from the comments in `base_config`.

  python -m tljax.config_reference            # print the page
  python -m tljax.config_reference --write    # write docs/config.md

`tljax.config.base_config` is the one place a key and its default are defined, so the comment
beside the key is where it is documented and the page can never list a key the code lacks. A
key's meaning is the comment block on the lines directly above it plus the comment trailing its
first line; a section (`c.optim = dict(`, `schedule=dict(`) is documented the same way. Comments
are read with `tokenize` and keys with `ast`, from source text, so tests can check the rules on
a source of their own.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import sys
import tokenize
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from tljax import cli
from tljax import config as config_lib

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                        'config.md')
FUNCTION = 'base_config'
COMMAND = 'python -m tljax.config_reference --write'


class ConfigReferenceError(ValueError):
  """Source whose comments cannot be attributed to one key."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """A key or section defined in the source: its dotted path and its comments, joined."""
  path: str
  meaning: str
  line: int
  section: bool


def _comments(source: str) -> dict[int, tuple[str, bool]]:
  """Line -> (comment text without '#', whether the comment is the whole line)."""
  lines = source.splitlines()
  found = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row, col = token.start
      found[row] = (token.string.lstrip('#').strip(), not lines[row - 1][:col].strip())
  return found


def _target_path(node: ast.expr) -> list[str] | None:
  """`c.a.b` -> ['a', 'b'] (the name of the config variable dropped); None for other targets."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return parts[::-1] if parts and isinstance(node, ast.Name) else None


def _is_section(value: ast.expr) -> bool:
  """`dict(k=...)` or `ConfigDict()`: what base_config writes a section as."""
  if not isinstance(value, ast.Call):
    return False
  func = value.func
  name = func.id if isinstance(func, ast.Name) else getattr(func, 'attr', None)
  return ((name == 'dict' and not value.args and all(k.arg for k in value.keywords))
          or (name == 'ConfigDict' and not value.args and not value.keywords))


def _definitions(body: Sequence[ast.stmt]) -> Iterator[tuple[str, int, bool]]:
  """(dotted path, first line, is a section) of every key and section, in source order."""
  def keys(prefix: str, value: ast.Call) -> Iterator[tuple[str, int, bool]]:
    for keyword in value.keywords:
      path, section = f'{prefix}.{keyword.arg}', _is_section(keyword.value)
      yield path, keyword.lineno, section
      if section:
        yield from keys(path, keyword.value)

  for statement in body:
    if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
      continue
    parts = _target_path(statement.targets[0])
    if not parts:
      continue
    path, section = '.'.join(parts), _is_section(statement.value)
    yield path, statement.lineno, section
    if section:
      yield from keys(path, statement.value)


def extract(source: str, function: str = FUNCTION) -> dict[str, Entry]:
  """Every key and section that `function` in `source` defines, with its comments.

  A comment belongs to the one key or section whose definition starts on its line; a comment
  on a line where two start is ambiguous and raises ConfigReferenceError (one key per line).
  """
  tree = ast.parse(source)
  defs = [node for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.name == function]
  if len(defs) != 1:
    raise ConfigReferenceError(f'the source defines {len(defs)} functions named {function!r}')
  comments = _comments(source)
  definitions = list(_definitions(defs[0].body))
  starts: dict[int, list[str]] = {}
  for path, line, _ in definitions:
    starts.setdefault(line, []).append(path)
  entries = {}
  for path, line, section in definitions:
    above = []
    row = line - 1
    while row in comments and comments[row][1]:
      above.insert(0, comments[row][0])
      row -= 1
    trailing = [comments[line][0]] if line in comments and not comments[line][1] else []
    if (above or trailing) and len(starts[line]) > 1:
      raise ConfigReferenceError(f'line {line}: a comment there would document each of '
                                 f'{", ".join(starts[line])}; put each key on a line of its own')
    meaning = ' '.join(' '.join(above + trailing).split())
    entries[path] = Entry(path, meaning, line, section)
  return entries


def documented_paths(config: ml_collections.ConfigDict, prefix: str = ''
                     ) -> dict[str, Any]:
  """Every path that needs a meaning -> its value: each section (free-form ones included) and
  each key, sections recursed into."""
  paths = {}
  for key in config:
    path, value = f'{prefix}{key}', config[key]
    paths[path] = value
    if isinstance(value, ml_collections.ConfigDict):
      paths.update(documented_paths(value, f'{path}.'))
  return paths


def undocumented(entries: dict[str, Entry], config: ml_collections.ConfigDict) -> list[str]:
  """The paths of `config` that `entries` gives no meaning."""
  return [path for path in documented_paths(config)
          if path not in entries or not entries[path].meaning]


def source_entries() -> dict[str, Entry]:
  """The entries of tljax.config.base_config as the module's source defines it now."""
  return extract(inspect.getsource(config_lib))


def default_text(value: Any) -> str:
  """The default as the page shows it: the repr of what the resolved base_config holds."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def _sentence(text: str) -> str:
  """A comment as a table cell reads best: capitalised, without a closing full stop."""
  text = text[:1].upper() + text[1:]
  return text[:-1] if text.endswith('.') else text


def _cell(text: str, code: bool = False) -> str:
  """Text for a markdown table cell: `|` escaped, and `<` outside code spans (not HTML)."""
  text = text.replace('|', '\\|')
  if code:
    return f'`{text}`'
  parts = text.split('`')
  return '`'.join(p if i % 2 else p.replace('<', '\\<') for i, p in enumerate(parts))


def render(entries: dict[str, Entry] | None = None,
           config: ml_collections.ConfigDict | None = None) -> str:
  """docs/config.md: one table per section (top-level keys together), in definition order.

  Raises ConfigReferenceError naming the keys without a comment, or comments of keys that
  `config` lacks.
  """
  entries = source_entries() if entries is None else entries
  config = config_lib.base_config() if config is None else config
  values = documented_paths(config)
  missing = undocumented(entries, config)
  if missing:
    raise ConfigReferenceError(f'keys of {FUNCTION} without a comment: {", ".join(missing)}')
  extra = [path for path in entries if path not in values]
  if extra:
    raise ConfigReferenceError(f'{FUNCTION} source defines keys its config lacks: '
                               f'{", ".join(extra)}')
  tables: dict[str, list[str]] = {}  # section ('' for the top level) -> its key paths
  for entry in sorted(entries.values(), key=lambda e: e.line):
    parent = entry.path.rpartition('.')[0]
    if entry.section:
      tables.setdefault(entry.path, [])
    else:
      tables.setdefault(parent, []).append(entry.path)
  out = [
      '# Config reference', '',
      f'Generated by `{COMMAND}` from the comments in',
      '`tljax.config.base_config`: to change this page, change those comments and run the',
      'command (tests/test_docs.py fails while the two differ).', '',
      'Every key a run reads is here, with its default as `base_config()` holds it (None:',
      'unset). A config file sets the keys it changes; `--config.KEY=VALUE` overrides one on',
      'the command line. The free-form sections (`model`, `eval_groupings`) take keys of their',
      'own; anywhere else an unknown key is an error.', '']
  for section, paths in tables.items():
    if section:
      out += [f'## `{section}`', '', _cell(entries[section].meaning), '']
    else:
      out += ['## Top level', '']
    if not paths:  # an empty free-form section: its default is the whole section
      paths = [section]
    out += ['| key | default | meaning |', '| --- | --- | --- |']
    for path in paths:
      meaning = entries[path].meaning if path != section else 'no keys by default'
      out.append(f'| {_cell(path, code=True)} | {_cell(default_text(values[path]), code=True)} '
                 f'| {_cell(_sentence(meaning))} |')
    out.append('')
  return '\n'.join(out)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m tljax.config_reference',
                              description=__doc__.split('\n')[0])
  parser.add_argument('--write', action='store_true', help=f'write {DOC_PATH}')
  args = parser.parse_args(argv)
  try:
    page = render()
  except ConfigReferenceError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not args.write:
    sys.stdout.write(page)
    return
  with open(DOC_PATH, 'w', encoding='utf-8') as f:
    f.write(page)
  print(f'wrote {DOC_PATH}')


if __name__ == '__main__':
  main()
