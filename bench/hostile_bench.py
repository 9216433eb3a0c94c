"""10,000+ hostile MQTT messages and settings against a real agent, checked after every batch.

A real Mosquitto and a real agent (the demo ViT, INT8, two looping cameras at 15 fps) take
batches of generated hostile input (``tests/hostile.py``: deep nesting, huge numbers, floats
at the limits, odd Unicode, wrong types, raw bytes, extreme settings). After each batch the
settings are put back and the agent must answer ``ping``, serve every camera its status calls
connected, keep its inference thread alive and keep publishing; at the end every result it
wrote after the collector subscribed must have reached the broker (nothing lost from the
outbox). Prints messages sent, replies, batches, time, and results lost.

    python bench/hostile_bench.py [--messages 10000] [--batch 50] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent_helpers import device_over_mqtt, read_results  # noqa: E402
from hostile import CAMERAS, check_alive_and_truthful, extreme_setting, restore, structural  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_hostile_input import ORIGINAL, ResultCollector  # noqa: E402


def demo_device(work: Path) -> tuple[Path, Path, Path]:
    """(bundle, public key, video): the demo ViT as an INT8 ONNX Runtime bundle, and a labelled digits video."""
    from builder.bundle.build import build_engine_bundle
    from builder.bundle.keys import keygen
    from builder.bundle.options import EngineOptions
    from builder.demo.evaluate import held_out_indices
    from builder.demo.train import CHECKPOINT_DIR
    from builder.demo.video import write_labelled_video
    from builder.export.job import export_checkpoint

    private, public, _ = keygen(work / "keys")
    export = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "export").model_path.parent
    options = EngineOptions(precision="int8", eval="demo", calib="demo", profile_seconds=0.2, runtime="onnxruntime")
    bundle = build_engine_bundle(export, work / "bundle", private, options).path
    video = work / "digits.mp4"
    write_labelled_video(video, held_out_indices(CHECKPOINT_DIR / "vit-digits.npz")[:120])
    return bundle, public, video


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--messages", type=int, default=10_000)
    args.add_argument("--batch", type=int, default=50)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parsed = args.parse_args()
    stats = {"messages": 0, "replies": 0, "refused": 0, "accepted": 0, "batches": 0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, public, video = demo_device(work)
        started = time.monotonic()
        with device_over_mqtt(work / "device", bundle, public, video, 15) as operator:
            collector = ResultCollector(operator.client.port)
            time.sleep(0.5)
            since = time.time()

            def results() -> int:
                return len((work / "device" / "results.jsonl").read_text().splitlines())

            messages = st.one_of(structural(), extreme_setting().map(lambda c: json.dumps(c).encode()))

            @settings(
                max_examples=-(-parsed.messages // parsed.batch),
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.lists(messages, min_size=parsed.batch, max_size=parsed.batch))
            def run_batch(batch: list[bytes]) -> None:
                replies = operator.send_many(batch)
                stats["messages"] += len(batch)
                stats["replies"] += len(replies)
                stats["refused"] += sum(not r["ok"] for r in replies)
                stats["accepted"] += sum(bool(r["ok"]) for r in replies)
                stats["batches"] += 1
                restore(operator, dict.fromkeys(CAMERAS, ORIGINAL))
                check_alive_and_truthful(operator, results)
                if stats["batches"] % 20 == 0:
                    print(f"  {stats['messages']} messages, all answered; agent serving", file=sys.stderr, flush=True)

            run_batch()
            time.sleep(1)
        collector.close()
        written = {
            (r["camera"], r["boot"], r["seq"])
            for r in read_results(work / "device" / "results.jsonl")
            if r["captured"] > since
        }
        stats.update(
            seconds=round(time.monotonic() - started, 1),
            results_written=len(written),
            results_lost=len(written - collector.seen),
        )
    table = (
        "| hostile messages | answered | refused | accepted (valid extreme settings) | batches checked "
        "| seconds | results written | results lost |\n|---|---|---|---|---|---|---|---|\n"
        f"| {stats['messages']} | {stats['replies']} | {stats['refused']} | {stats['accepted']} | {stats['batches']} "
        f"| {stats['seconds']} | {stats['results_written']} | {stats['results_lost']} |\n"
    )
    parsed.out.mkdir(parents=True, exist_ok=True)
    (parsed.out / "hostile_bench.json").write_text(json.dumps(stats, indent=2) + "\n")
    (parsed.out / "hostile_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
