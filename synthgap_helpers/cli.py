"""Command line: `python -m synthgap_helpers run --profile smoke [--only 01,04] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from synthgap_helpers import config, runner


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m synthgap_helpers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks with papermill into book/executed/, then build the book")
    run.add_argument("--profile", default="smoke", help=f"one of {', '.join(config.PROFILES)}, or a .yaml file")
    run.add_argument("--run-dir", default=None, help="run directory (default: runs/<profile>)")
    run.add_argument("--only", default=None, help="comma-separated notebook numbers or names, e.g. 01,04")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter, e.g. --set data.val_per_class=50 (repeatable)")
    run.add_argument("--no-book", action="store_true", help="execute the notebooks but do not build the book")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with a one-paragraph message on a known failure)."""
    args = _parser().parse_args(argv)
    try:
        index = runner.run(args.profile, run_dir=args.run_dir, only=args.only.split(",") if args.only else None,
                           overrides=args.overrides, build=not args.no_book)
    except (config.ConfigError, runner.NotebookFailed, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if index is not None:
        print(f"book: {index}")
    return 0
