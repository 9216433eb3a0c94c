"""``python -m builder.demo train [NAME ...]``: regenerate the demo checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS, train_demo


def main() -> None:
    root = argparse.ArgumentParser(prog="python -m builder.demo")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the demo models on digits and save them")
    train.add_argument("names", nargs="*", help=f"any of {', '.join(DEMO_MODELS)} (default: all)")
    train.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    args = root.parse_args()
    unknown = sorted(set(args.names) - set(DEMO_MODELS))
    if unknown:
        root.error(f"unknown demo model {unknown[0]}; choose from {', '.join(DEMO_MODELS)}")
    for name in args.names or DEMO_MODELS:
        train_demo(name, args.out)


if __name__ == "__main__":
    main()
