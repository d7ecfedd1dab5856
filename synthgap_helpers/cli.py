"""Command line for the suite and for long GPU jobs outside notebooks.

    python -m synthgap_helpers run --profile smoke [--only 01,04] [--set key=value ...]
    python -m synthgap_helpers generate sd --profile gpu-small [--run-dir DIR] [--shard i/n|auto]
    python -m synthgap_helpers invert train|sample --profile paper [--shard auto]
    python -m synthgap_helpers train --profile paper [--shard i/n]
    python -m synthgap_helpers gradcam --profile paper
    python -m synthgap_helpers gap --profile paper
    python -m synthgap_helpers lowdata sweep|finetune --profile paper [--shard i/n]
    python -m synthgap_helpers curate --profile paper [--shard i/n]
    python -m synthgap_helpers merge runs/paper/synthetic/sd
    python -m synthgap_helpers cost --profile paper [--rate sd=<images/s> --rate train=<images/s> ...]
    python -m synthgap_helpers publish [--remote origin] [--html _build/html]

Relative paths (--run-dir, --profile FILE.yaml, and path parameters in --set) are taken from the folder the
command is started in. An expected failure (bad parameters, data, files or folders; a failed notebook) is
printed as one line, `error: <what> ... <fix>`, on stderr, and the exit status is 2; so is a write the disk
refuses (no space, a file-size limit, a read-only file system), wherever it happens. Ctrl-C and SIGTERM print
`interrupted; rerun the same command to resume` and exit with 130 and 143. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pandas as pd

from synthgap_helpers import config, runner
from synthgap_helpers.cost import RATES as COST_RATES
from synthgap_helpers.errors import INTERRUPTED, Terminated, UserError, WriteFailed
from synthgap_helpers.storage import WRITE_FIXES, refused_by_disk
from synthgap_helpers.workload import merge_shards, parse_shard

EXIT_USER_ERROR = 2  # an expected failure, reported in one line (argparse uses 2 for its usage errors too)
EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's statuses for a command stopped by Ctrl-C and by SIGTERM
EXIT_TERMINATED = 128 + signal.SIGTERM
# Failures of paths the user gave (run directory, data folders, files) and the fix each calls for.
PATH_ERRORS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path (relative paths are taken from the folder the command was started in)",
    PermissionError: "fix the permissions of that path (chmod / chgrp), or choose a location you can write to",
    NotADirectoryError: "a file stands where that path needs a folder: move the file or choose another path",
    IsADirectoryError: "a folder stands where that path needs a file: choose the file itself",
    FileExistsError: "a file stands where a folder is to be created: move it or choose another path",
}

# (command, action) -> (module, function): every stage entry point takes (cfg, shard) and returns a summary.
STAGES: dict[tuple[str, str | None], tuple[str, str]] = {
    ("generate", "sd"): ("synthgap_helpers.sd.stage", "run"),
    ("invert", "train"): ("synthgap_helpers.inversion.stage", "train_embeddings"),
    ("invert", "sample"): ("synthgap_helpers.inversion.stage", "sample"),
    ("train", None): ("synthgap_helpers.train.stage", "run"),
    ("gradcam", None): ("synthgap_helpers.gradcam.stage", "run"),
    ("gap", None): ("synthgap_helpers.gap.stage", "run"),
    ("lowdata", "sweep"): ("synthgap_helpers.lowdata.stage", "sweep"),
    ("lowdata", "finetune"): ("synthgap_helpers.lowdata.stage", "finetune"),
    ("curate", None): ("synthgap_helpers.curation.stage", "run"),
}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="smoke", help=f"one of {', '.join(config.PROFILES)}, or a .yaml file")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<profile>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set data.val_per_class=50 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m synthgap_helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks with papermill into book/executed/, then build the book")
    _add_run_options(run)
    run.add_argument("--only", default=None, help="comma-separated notebook numbers or names, e.g. 01,04")
    run.add_argument("--no-book", action="store_true", help="execute the notebooks but do not build the book")
    actions: dict[str, list[str]] = {}
    for command, action in STAGES:
        actions.setdefault(command, []).extend([action] if action else [])
    for command, choices in actions.items():
        stage = commands.add_parser(command, help=f"the {command} stage, for long jobs outside notebooks")
        if choices:
            stage.add_argument("action", choices=choices)
        _add_run_options(stage)
        stage.add_argument("--shard", default=None, help="i/n (0-based) or 'auto' (torchrun/accelerate or a SLURM array)")
    merge = commands.add_parser("merge", help="join the shard manifests of an image folder into manifest.jsonl")
    merge.add_argument("folder")
    cost = commands.add_parser("cost", help="a profile's work per stage and disk; hours from rates you measured")
    _add_run_options(cost)
    rates = "; ".join(f"{key}: {unit} from {bench}" for key, (unit, bench) in COST_RATES.items())
    cost.add_argument("--rate", dest="rates", action="append", default=[], metavar="KEY=NUMBER",
                      help=f"measured rate of a stage (repeatable). {rates}")
    publish = commands.add_parser("publish", help="push the built book to the gh-pages branch of a git remote "
                                                  "(ghp-import; builds nothing: run `make book` first)")
    publish.add_argument("--remote", default="origin", help="git remote: a name, a URL or a path (default: origin)")
    publish.add_argument("--html", default=None, help="the built book (default: _build/html)")
    return parser


def _print_cost(args: argparse.Namespace) -> str:
    """The profile's work table (with hours where a rate is given) and its disk table, as text."""
    from synthgap_helpers import cost

    estimate = cost.profile_cost(config.resolve(args.profile, run_dir=args.run_dir, overrides=args.overrides))
    try:
        rates = cost.parse_rates(args.rates)
        work = estimate.with_hours(rates)
        hours, missing = estimate.total_hours(rates)
    except ValueError as exc:  # all three check only the user's --rate values
        raise config.ConfigError(str(exc)) from None
    total = f"\nhours at the given rates: {hours:.1f} (without a rate, not counted: {', '.join(missing) or 'none'})"
    with pd.option_context("display.width", 200, "display.max_colwidth", 90):
        return f"{work.to_string()}{total if rates else ''}\n\n" \
               f"{estimate.disk.assign(size=estimate.disk['bytes'].map(cost.human_bytes)).to_string()}" \
               f"\ntotal of the known items: {cost.human_bytes(estimate.disk_bytes)}"


def _run_stage(args: argparse.Namespace) -> Any:
    """Resolve the config and call the stage's entry point on this shard."""
    module_name, function = STAGES[(args.command, getattr(args, "action", None))]
    shard = parse_shard(args.shard)  # before load: a bad shard creates no run directory
    cfg = config.load(args.profile, run_dir=args.run_dir, overrides=args.overrides)
    return getattr(importlib.import_module(module_name), function)(cfg, shard=shard)


def one_line(exc: BaseException) -> str:
    """An expected failure as one line: its message's lines joined; an OSError raised by the system (it has an
    errno, and names only the path and the reason) gets the fix for its kind."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith((":", ".", ";", ",")) else "; ") + line
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, UserError):
        fix = next((fix for kind, fix in PATH_ERRORS.items() if isinstance(exc, kind)), None)
        text = f"{text}; {fix}" if fix else text
    return re.sub(r"\s+", " ", text)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise Terminated on SIGTERM (SLURM preemption, `kill`) while the command runs, so it stops as on Ctrl-C:
    temporary files removed, partial manifest appends taken back. Only the main thread can install handlers."""
    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding application): leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, or 2 with a one-line message on stderr for an expected failure
    (`errors.UserError`, which covers config.ConfigError, data errors, runner.NotebookFailed and the stages'
    own errors, or a path that is missing, not writable or of the wrong kind), or 130 (Ctrl-C) / 143 (SIGTERM)
    with `errors.INTERRUPTED` on stderr. Other exceptions are bugs and propagate with their traceback."""
    args = _parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return _dispatch(args)
    except KeyboardInterrupt as exc:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except (UserError, config.ConfigError, runner.NotebookFailed, *PATH_ERRORS) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a full, read-only or size-limited disk under a writer of a library (model caches)
        if not refused_by_disk(exc):
            raise
        print(f"error: {one_line(WriteFailed(exc.filename or 'a file', exc, WRITE_FIXES[exc.errno]))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; returns 0 (failures propagate to `main`)."""
    if hasattr(args, "overrides"):
        args.overrides = config.absolute_overrides(args.overrides)  # relative to where the command was started
    if args.command == "run":
        index = runner.run(args.profile, run_dir=args.run_dir,
                           only=args.only.split(",") if args.only is not None else None,
                           overrides=args.overrides, build=not args.no_book)
        if index is not None:
            print(f"book: {index}")
    elif args.command == "cost":
        print(_print_cost(args))
    elif args.command == "publish":
        print(runner.publish(args.html, remote=args.remote))
    elif args.command == "merge":
        print(f"{args.folder}: {merge_shards(args.folder)} images listed in manifest.jsonl")
    else:
        print(_run_stage(args))
    return 0
