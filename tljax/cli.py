"""Command-line parsing for tljax's argparse tools: a mistake is one `error:` line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from tljax.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with its usage block replaced by one line that ends with where to look."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (see python -m {self.prog.split()[-1]} --help)', file=sys.stderr)
    sys.exit(2)


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(the other arguments, [(KEY, TEXT) of each `--config.KEY=TEXT` or `--config.KEY TEXT`], in
  order): the overrides tljax.train and tljax.transferability apply to a config file."""
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if arg.startswith('--config.'):
      key, has_value, text = arg[len('--config.'):].partition('=')
      if not has_value:
        text = next(args, None)
        if text is None:
          raise UserError(f'{arg} needs a value ({arg}=VALUE)')
      overrides.append((key, text))
    else:
      rest.append(arg)
  return rest, overrides
