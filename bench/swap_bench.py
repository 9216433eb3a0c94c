"""Hot swap under load: how long the pipeline pauses when the agent changes engines.

The real agent serves the demo ViT (INT8) from N looping 30 fps cameras; a real
Mosquitto carries ``deploy`` commands, each for whichever of the INT8 and FP32 bundles
of the same model is not live, each verified, swapped, watched through a short canary and
committed or reverted (a revert keeps the old engine live). Measured in one run on this
machine, from the agent's ``swap`` events and its results:

- pause: the inference thread busy swapping (the frames wait, none is dropped);
- gap: the last result of the old engine to the first of the new, against the
  ordinary gap between consecutive batches while no swap happens (p50 and p99);
- failed frames (must be 0) and the canary's figures;
- memory: the RSS of the agent and all its processes together (the engine workers), sampled
  every 0.2 s: its median while serving with no deploy under way, and its peak while each
  deploy loads, verifies, swaps and watches the candidate through the canary (the candidate,
  the previous engine kept for a revert, and the shadow comparisons all live at once).

    python bench/swap_bench.py [--swaps 6] [--cameras 2] [--out bench/results]

Needs the ``mosquitto`` binary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker import start_broker  # noqa: E402
from tree_memory import TreeMemory  # noqa: E402

from builder.bundle.build import build_engine_bundle  # noqa: E402
from builder.bundle.keys import keygen  # noqa: E402
from builder.bundle.options import EngineOptions  # noqa: E402
from builder.demo.evaluate import held_out_indices  # noqa: E402
from builder.demo.train import CHECKPOINT_DIR  # noqa: E402
from builder.demo.video import write_labelled_video  # noqa: E402
from builder.export.job import export_checkpoint  # noqa: E402

CANARY = {"window_s": 3, "min_frames": 60, "shadow_every": 4}


def _batch_gaps(results: list[dict]) -> np.ndarray:
    """Seconds between consecutive batch completions (capture time + latency, per batch)."""
    done = sorted({round(r["captured"] + r["latency_ms"] / 1e3, 4) for r in results})
    return np.diff(done)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--swaps", type=int, default=6)
    args.add_argument("--cameras", type=int, default=2)
    args.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parsed = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, public, _ = keygen(work / "keys")
        export = export_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", work / "export").model_path.parent
        fast = {"profile_seconds": 0.3}
        bundles = [
            build_engine_bundle(export, work / "int8", key, EngineOptions(precision="int8", calib="demo", **fast)).path,
            build_engine_bundle(export, work / "fp32", key, EngineOptions(precision="fp32", **fast)).path,
        ]
        video = work / "digits.mp4"
        write_labelled_video(video, held_out_indices(CHECKPOINT_DIR / "vit-digits.npz"))
        broker, port = start_broker(work)
        agent = None
        try:
            config = {
                "device": "bench",
                "state_dir": str(work / "state"),
                "engine": {"bundle": str(bundles[0]), "trusted_keys": [str(public)]},
                "cameras": [
                    {"name": f"cam{i}", "source": str(video), "loop": True, "fps": 30} for i in range(parsed.cameras)
                ],
                "results": {"jsonl": str(work / "results.jsonl")},
                "mqtt": {"host": "127.0.0.1", "port": port},
                "canary": CANARY,
            }
            (work / "agent.yaml").write_text(yaml.safe_dump(config))
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.daemon", "--config", str(work / "agent.yaml"), "--log-level", "WARNING"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            events: list[dict] = []
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv5)
            client.on_message = lambda c, u, m: events.append(json.loads(m.payload))
            client.connect("127.0.0.1", port)
            client.subscribe("edgevit/bench/events", qos=1)
            client.loop_start()
            memory = TreeMemory(agent.pid, every_s=0.2)
            time.sleep(4)
            swaps = []
            serving: list[float] = []  # the samples with no deploy under way
            since = time.time()
            active = 0  # the bundle the agent serves: a canary that reverts keeps the old one live
            for i in range(parsed.swaps):
                bundle = bundles[1 - active]
                command = {"id": f"swap-{i}", "cmd": "deploy", "bundle": {"path": str(bundle)}}
                time.sleep(2)  # the engine that won settles before the next deploy
                sent = time.time()
                serving += memory.between(since, sent)
                client.publish("edgevit/bench/cmd", json.dumps(command), qos=1)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    done = [
                        e for e in events if e.get("command_id") == command["id"] and e["event"] in ("commit", "revert")
                    ]
                    if done:
                        break
                    time.sleep(0.2)
                swap = next(e for e in events if e.get("command_id") == command["id"] and e["event"] == "swap")
                outcome = done[0]["event"]
                active = 1 - active if outcome == "commit" else active
                since = time.time()
                swaps.append(
                    {
                        **swap,
                        "outcome": outcome,
                        "reason": done[0].get("reason"),
                        "canary": done[0].get("figures", {}),
                        "peak_rss_mib": max(memory.between(sent, since), default=0.0),
                    }
                )
                print(
                    f"  swap {i + 1}: {swap['from']} -> {swap['to']}: {swap['pause_ms']} ms pause, "
                    f"{swap['gap_ms']} ms gap, {outcome} {done[0].get('reason') or ''}",
                    file=sys.stderr,
                    flush=True,
                )
            client.loop_stop()
            memory.stop()
            agent.terminate()
            out, _ = agent.communicate(timeout=60)
        finally:  # a failed run leaves no agent or broker behind
            if agent is not None and agent.poll() is None:
                agent.kill()
            broker.terminate()
        summary = next(json.loads(line)["summary"] for line in out.splitlines() if line.startswith('{"summary"'))
        results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    gaps = _batch_gaps(results) * 1e3
    pause = np.array([s["pause_ms"] for s in swaps])
    gap = np.array([s["gap_ms"] for s in swaps])
    failed = sum(c["failed"] for c in summary["cameras"].values())
    row = {
        "cameras": parsed.cameras,
        "swaps": len(swaps),
        "committed": sum(s["outcome"] == "commit" for s in swaps),
        "pause_ms_median": float(np.median(pause)),
        "pause_ms_max": float(pause.max()),
        "gap_ms_median": float(np.median(gap)),
        "gap_ms_max": float(gap.max()),
        "batch_gap_ms_p50": float(np.percentile(gaps, 50)),
        "batch_gap_ms_p99": float(np.percentile(gaps, 99)),
        "failed_frames": failed,
        "frames": len(results),
        "serving_rss_mib_median": float(np.median(serving)),
        "deploy_rss_mib_peak_max": max(s["peak_rss_mib"] for s in swaps),
    }
    table = (
        f"| cameras (30 fps) | swaps (committed) | pause ms median / max | swap gap ms median / max "
        f"| ordinary batch gap ms p50 / p99 | failed frames | RSS MiB serving / deploy peak |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {row['cameras']} | {row['swaps']} ({row['committed']}) | {row['pause_ms_median']:.2f} / "
        f"{row['pause_ms_max']:.2f} | {row['gap_ms_median']:.1f} / {row['gap_ms_max']:.1f} | "
        f"{row['batch_gap_ms_p50']:.1f} / {row['batch_gap_ms_p99']:.1f} | {failed} of {len(results)} | "
        f"{row['serving_rss_mib_median']:.0f} / {row['deploy_rss_mib_peak_max']:.0f} |\n"
    )
    parsed.out.mkdir(parents=True, exist_ok=True)
    (parsed.out / "swap_bench.json").write_text(json.dumps({"summary": row, "swaps": swaps}, indent=2) + "\n")
    (parsed.out / "swap_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
