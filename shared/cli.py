"""`autoresearch`: the command line.

    autoresearch target prepare targets/cpu_gpt              build the tokenized data (cached)
    autoresearch target run targets/cpu_gpt [--budget-steps N | --budget-tokens N | --budget-seconds S]
    autoresearch target download climbmix --shards 8        fetch parquet shards (needs internet)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from shared.target.config import TargetError, load_target
from shared.target.data import DOWNLOADABLE, download, prepare
from shared.target.records import Budget, Progress
from shared.target.runner import run_target


def _budget(args: argparse.Namespace) -> Budget | None:
    for unit in ("steps", "tokens", "seconds"):
        amount = getattr(args, f"budget_{unit}")
        if amount is not None:
            return Budget(unit, amount)  # type: ignore[arg-type]
    return None


def _print_progress(record: Progress) -> None:
    loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
    print(f"  {record.phase:<10} step {record.step:>6}  train {record.elapsed_train_s:7.1f}s  "
          f"loss {loss:>7}  tokens {record.tokens:>10,}  mem {record.peak_mem_mb:7.0f} MB", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    target = load_target(args.target)
    source = Path(args.train_py).read_text() if args.train_py else None
    result = run_target(target, source, budget=_budget(args), seed=args.seed, device=args.device,
                        on_progress=None if args.quiet else _print_progress)
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    return 0 if result.status == "ok" else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    config = load_target(args.target).config
    data = prepare(config.corpus, config.tokenizer)
    print(msgspec.json.format(msgspec.json.encode(data.manifest)).decode())
    print(f"prepared under {data.folder}", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    folder = download(args.dataset, args.shards, Path(args.dest) if args.dest else None, args.base_url)
    print(f"{args.shards} shards in {folder}; point a target's CONFIG.corpus at this folder")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="autoresearch", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    target = commands.add_parser("target", help="research targets: prepare data, run one experiment")
    verbs = target.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="train and evaluate a target's train.py; print the result record")
    run.add_argument("target", help="target folder, e.g. targets/cpu_gpt")
    run.add_argument("--train-py", help="train this file instead of the target's train.py")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=float, help="training seconds (default: the target's T_max)")
    budget.add_argument("--budget-steps", type=int, help="deterministic budget: batches drawn from env.batches()")
    budget.add_argument("--budget-tokens", type=int, help="deterministic budget: training tokens")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=["cpu", "cuda"], help="override the target's device")
    run.add_argument("--quiet", action="store_true", help="print only the result record")
    run.set_defaults(handler=cmd_run)

    prep = verbs.add_parser("prepare", help="build the target's tokenized train/val data")
    prep.add_argument("target")
    prep.set_defaults(handler=cmd_prepare)

    fetch = verbs.add_parser("download", help="download parquet shards of a public corpus")
    fetch.add_argument("dataset", choices=sorted(DOWNLOADABLE))
    fetch.add_argument("--shards", type=int, required=True)
    fetch.add_argument("--dest", help="folder (default: <data root>/datasets/<dataset>)")
    fetch.add_argument("--base-url", help="mirror to download from")
    fetch.set_defaults(handler=cmd_download)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (TargetError, OSError, ValueError, RuntimeError) as error:
        print(f"autoresearch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
