"""`python -m models build NAME [-o PATH]`: build (or find) a zoo model and print where it is.

`python -m models list` prints every name with its availability.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from models import zoo

    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a zoo model (cached) and print its path")
    build.add_argument("name", choices=zoo.names())
    build.add_argument("-o", "--output", type=Path, help="also copy the model here")
    sub.add_parser("list", help="list the zoo models")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in zoo.names():
            entry = zoo.get(name)
            ok, reason = entry.available()
            print(f"{name:14s} {'ok' if ok else 'unavailable: ' + reason}  {entry.description}")
        return 0
    entry = zoo.get(args.name)
    ok, reason = entry.available()
    if not ok:
        print(f"error: {args.name}: {reason}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = entry.path
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.output)
        path = args.output
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
