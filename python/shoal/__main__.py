"""The ``shoal`` command: the Rust CLI (clap) inside the extension module."""

from __future__ import annotations

import os
import sys

from ._core import cli_main


def main() -> None:
    argv = ["shoal", *sys.argv[1:]]
    package = os.path.dirname(os.path.abspath(__file__))
    sys.exit(cli_main(argv, sys.version, package, sys.executable))


if __name__ == "__main__":
    main()
