"""A bundle's passport for people: every candidate, the gate, latency per batch size, the recipe.

Everything here fits 80 columns: what does not fit a column (a candidate's recipe, the
gate's misses) goes on lines under the candidate's label.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from builder.bundle.layout import label


def recipe(quantization: dict | None) -> str:
    """How a candidate was made, in a few words: method, calibration, smoothing, layers left in float."""
    if not quantization:
        return "-"
    parts = [quantization["method"]]
    if quantization.get("calibration"):
        parts.append(quantization["calibration"])
    alpha = quantization.get("smoothing_alpha")
    parts.append(f"α={alpha:g}" if alpha is not None else quantization.get("smoothing", "no smoothing"))
    if quantization.get("float_layers"):
        parts.append(f"{len(quantization['float_layers'])} layers float")
    if quantization.get("dense_outputs") == "float":
        parts.append("Dense outputs float")
    if quantization.get("token_mixing"):
        parts.append(f"token mixing: {quantization['token_mixing']}")
    if quantization.get("gelu"):
        parts.append("GELU: erf form")
    return ", ".join(parts)


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.1f}"


def _mixed_precision_line(decision: dict[str, Any] | None) -> str:
    """Why layers were, or were not, searched in float from this candidate."""
    if not decision:
        return ""
    if decision["searched"]:
        return "[dim]mixed precision searched from here[/]"
    return (
        f"[dim]mixed precision not searched: {_rate(decision['images_per_s'])} img/s, not faster than "
        f"{_rate(decision['fastest_inside_gate_images_per_s'])} inside the gate[/]"
    )


def _head_to_head_line(runoff: dict[str, Any] | None) -> str:
    """How the candidate fared timed head to head against the other close ones (the choice's figure)."""
    if not runoff:
        return ""
    low, high = runoff["interval"]
    return f"[dim]head to head {runoff['speed_vs_fastest']:.2f}× ({low:.2f}–{high:.2f})[/]"


def _layout_line(layouts: dict[str, Any] | None) -> str:
    """The serving layouts timed for the candidate that ships, each as a fraction of the fastest."""
    if not layouts:
        return ""
    timed = ", ".join(f"{k}: {speed['speed_vs_fastest']:.2f}×" for k, speed in layouts["timed"].items())
    return f"[dim]serves {label(layouts['kept'])} (timed: {timed})[/]"


def _row_split_line(split: dict[str, Any] | None) -> str:
    """Whether the candidate that ships had its Dense layers split by rows for the threads, and why."""
    if not split:
        return ""
    outcome = "kept" if split["kept"] else "not kept" + ("" if split["same_outputs"] else ": outputs differ")
    where = f"at row {split['first_rows']} for {split['threads']} threads"
    return f"[dim]Dense layers split {where}: {split['speed_vs_as_built']:.2f}× at batch 1, {outcome}[/]"


def candidate_table(candidates: list[dict], chosen: str, title: str) -> Table:
    """The candidates of a build (their passport summaries), the one that ships marked."""
    table = Table(
        "", "candidate", "top-1", "agree", "Δlogit", "b1", "img/s", "gate", title=title, box=box.SIMPLE_HEAD,
        caption=(
            "top-1 on the evaluation set; agree: top-1 agreement with FP32; Δlogit: max |logit error|; "
            "b1: img/s at batch 1; img/s at the largest batch; head to head: speed against the fastest close "
            "candidate, timed in turns in one process (95 % interval); serves: the OpenVINO engine's images per "
            "CPU stream, each layout timed against the fastest the same way; ▶ ships"
        ),
    )  # fmt: skip
    for c in candidates:
        a = c["accuracy"] or {}
        lines = [c["label"], f"[dim]{recipe(c['quantization'])}[/]" if c["quantization"] else ""]
        lines += [f"[red]✗ {miss}[/]" for miss in [*c["gate_misses"], *filter(None, [c.get("over_memory")])]]
        lines.append(_mixed_precision_line((c["quantization"] or {}).get("mixed_precision")))
        lines.append(_head_to_head_line(c.get("head_to_head")))
        lines.append(_layout_line(c.get("serving_layouts")))
        lines.append(_row_split_line(c.get("row_split")))
        table.add_row(
            "▶" if c["label"] == chosen else "",
            "\n".join(line for line in lines if line),
            f"{a['engine_top1']:.1%}" if a else "-",
            f"{a['top1_agreement']:.1%}" if a else "-",
            f"{a['max_abs_logit_error']:.2g}" if a else "-",
            _rate(c["latency"][0]["images_per_s"]) if c["latency"] else "-",
            _rate(c["latency"][-1]["images_per_s"]) if c["latency"] else "-",
            "pass" if not c["gate_misses"] and not c.get("over_memory") else "[red]miss[/]",
        )
    return table


def not_tried_lines(entries: list[dict[str, str]] | None) -> list[str]:
    """What a build left out because of its machine, one line each with what would add it."""
    return [f"[yellow]not tried: {e['what']}: {e['why']}; {e['add']}[/]" for e in entries or []]


def latency_table(built: list[dict], here: list[dict] | None) -> Table:
    """Latency per batch size as built; beside it, what this machine measured now (``--profile``)."""
    columns = ["batch", "img/s", "p50 ms", "p99 ms"]
    if here is not None:
        columns += ["here img/s", "here p99", "here/built"]
    table = Table(*columns, title="latency per batch size", box=box.SIMPLE_HEAD)
    if any("timed_at" in row for row in built):
        table.caption = "(as N): same requests, timed at N"
    now = {row["batch"]: row for row in here or []}
    for row in built:
        shared = f" (as {row['timed_at']})" if "timed_at" in row else ""
        cells = [f"{row['batch']}{shared}", _rate(row["images_per_s"]), f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}"]
        if here is not None:
            mine = now.get(row["batch"])
            cells += (
                [
                    f"{mine['images_per_s']:.1f}",
                    f"{mine['p99_ms']:.2f}",
                    f"{mine['images_per_s'] / row['images_per_s']:.2f}×",
                ]
                if mine
                else ["-", "-", "-"]
            )
        table.add_row(*cells)
    return table


def show_passport(console: Console, passport: dict[str, Any], here: dict | None = None) -> None:
    """The whole passport; ``here`` is a fresh profile of the engine on this machine, shown beside it."""
    engine, gate, accuracy = passport["engine"], passport["gate"], passport["accuracy"]
    measured = passport["measured_on"]
    versions = ", ".join(f"{k} {measured[k]}" for k in ("onnxruntime", "openvino", "tensorrt") if measured.get(k))
    console.print(
        f"engine: {engine['chosen']} ({engine['precision']} on {engine['target']}); "
        f"recipe: {recipe(engine.get('quantization'))}"
        + (f"; exact rewrites: {', '.join(engine['rewrites'])}" if engine.get("rewrites") else "")
    )
    console.print(
        f"accuracy on {passport['evaluation_set']['description']}: top-1 {accuracy['engine_top1']:.2%} "
        f"(FP32 {accuracy['reference_top1']:.2%}, drop {accuracy['top1_drop_points']:.2f} pts), agreement "
        f"{accuracy['top1_agreement']:.2%}, max |Δlogit| {accuracy['max_abs_logit_error']:.3g}"
    )
    verdict = "passed" if gate["passed"] else "MISSED: " + "; ".join(gate["misses"])
    accepted = " (shipped anyway: --accept-accuracy-loss)" if gate["accepted_accuracy_loss"] else ""
    console.print(
        f"gate: top-1 drop ≤ {gate['max_top1_drop_points']:g} pts, agreement ≥ {gate['min_top1_agreement']:.0%}; "
        f"{verdict}{accepted}"
    )
    console.print(
        f"built {passport['built']} on {measured['cpu']} ({versions}); calibration: "
        f"{passport.get('calibration_set') or '-'}; peak RSS {passport['peak_rss_mib']:.0f} MiB"
    )
    if baseline := passport.get("baseline"):
        low, high = baseline["interval"]
        accepted = " (shipped anyway: --accept-accuracy-loss)" if baseline.get("accepted_accuracy_loss") else ""
        console.print(
            f"against the baseline {baseline['name']}: top-1 agreement {baseline['top1_agreement']:.2%} "
            f"(95 % interval {low:.2%}-{high:.2%}, what a device's canary expects); top-1 "
            f"{baseline['engine_top1']:.2%} against {baseline['baseline_top1']:.2%} "
            f"({baseline['top1_change_points']:+.2f} pts){accepted}"
        )
    if passport.get("latency"):
        console.print(latency_table(passport["latency"], here and here["latency"]))
        if here:
            console.print(f"peak RSS here {here['peak_rss_mib']:.0f} MiB (built: {passport['peak_rss_mib']:.0f} MiB)")
    console.print(candidate_table(passport["candidates"], engine["chosen"], "candidates"))
    for line in not_tried_lines(passport.get("not_tried")):
        console.print(line)
