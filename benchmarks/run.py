"""`python -m benchmarks.run SUITE [--quick]`: run one benchmark suite (a module here with `main`).

Each suite measures onnxcomp side by side with the anchor tool in one run and writes
benchmarks/results/SUITE.json and SUITE.md (see benchmarks.common).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
NOT_SUITES = {"run", "common", "__init__"}


def suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name not in NOT_SUITES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("suite", choices=suites())
    parser.add_argument("--quick", action="store_true", help="fewer models/repeats, for a smoke run")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"benchmarks.{args.suite}")
    return int(module.main(quick=args.quick, argv=rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
