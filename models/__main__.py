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
    build.add_argument("--data", action="store_true",
                       help="also write NAME.calibration.npz and NAME.evaluation.npz beside the output "
                            "(the evaluation file carries `labels` when the model has them)")
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
    if args.data:
        for kind, feeds in (("calibration", entry.calibration()), ("evaluation", entry.evaluation())):
            target = Path(path).with_suffix(f".{kind}.npz")
            write_npz(target, feeds, entry.labels() if kind == "evaluation" and hasattr(entry, "labels") else None)
            print(target)
    return 0


def write_npz(path: Path, feeds: list[dict], labels=None) -> None:
    """Feeds (each with a batch of one) stacked along axis 0; only feeds of one shape per input."""
    import numpy as np

    arrays = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez_compressed(path, **arrays)


if __name__ == "__main__":
    sys.exit(main())
