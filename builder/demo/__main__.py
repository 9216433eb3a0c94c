"""``python -m builder.demo train [NAME ...]``: regenerate the demo checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.demo.score import score
from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS, train_demo


def main() -> None:
    root = argparse.ArgumentParser(prog="python -m builder.demo")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the demo models on digits and save them")
    train.add_argument("names", nargs="*", help=f"any of {', '.join(DEMO_MODELS)} (default: all)")
    train.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="folder for the .npz and .json files")
    scorer = commands.add_parser("score", help="top-1 of agent results (JSONL) on a labelled demo video")
    scorer.add_argument("results", type=Path, help="the agent's results file; its last run is scored")
    scorer.add_argument("labels", type=Path, help="the video's .json (written beside it)")
    args = root.parse_args()
    if args.command == "score":
        scored = score(args.results, args.labels)
        video = args.labels.with_suffix(".mp4").name
        print(f"agent top-1 on {video}: {scored.top1:.2%} over {scored.frames} frames")
        if scored.runs > 1:
            print(f"({args.results} holds {scored.runs} agent runs; scored the last, boot {scored.boot})")
        return
    unknown = sorted(set(args.names) - set(DEMO_MODELS))
    if unknown:
        root.error(f"unknown demo model {unknown[0]}; choose from {', '.join(DEMO_MODELS)}")
    for name in args.names or DEMO_MODELS:
        train_demo(name, args.out)


if __name__ == "__main__":
    main()
