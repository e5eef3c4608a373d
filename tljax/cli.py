"""Command-line parsing for tljax's argparse tools: a mistake is one `error:` line, exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with its usage block replaced by one line that ends with where to look."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (see python -m {self.prog.split()[-1]} --help)', file=sys.stderr)
    sys.exit(2)
