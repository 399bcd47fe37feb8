"""Command-line plumbing shared by the project's scripts."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line on stderr and exits 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def fail(prog: str, message: str, status: int = 1):
    """Ends a script with one clear error line (no traceback)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(status)
