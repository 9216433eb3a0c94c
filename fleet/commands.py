"""What each ``edgevit-fleet`` command does (:mod:`fleet.cli` holds the parser and loads this only to run one)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Column, Table

from agent import bounded_json
from agent.control.protocol import PROTOCOL_VERSION
from agent.engine.bundle import MANIFEST, file_digest
from agent.engine.signing import SignatureError, load_private_key
from fleet.cli import EXIT_HALTED
from fleet.dashboard import Dashboard, MetricsHistory, summary
from fleet.link import Broker, Device, FleetLink
from fleet.locks import Busy, Ownership, driven, planning
from fleet.rollout import (
    ACTIVE,
    Rollout,
    RolloutState,
    Runner,
    TargetState,
    list_rollouts,
    parse_count,
    parse_selector,
    roll_back,
    rollback_plan,
    selects,
)
from fleet.serve import BundleServer
from fleet.text import markup, printable


class FleetError(ValueError):
    """Bad input to the fleet tool; the message says which."""


def _link(args: argparse.Namespace, on_metrics: Callable[[str, dict[str, Any]], None] | None = None) -> FleetLink:
    password = args.password or os.environ.get("EDGEVIT_FLEET_PASSWORD")
    broker = Broker(args.host, args.port, args.prefix, args.username, password, args.ca, args.cert, args.key)
    try:
        key = load_private_key(args.sign) if getattr(args, "sign", None) else None
    except SignatureError as exc:
        raise FleetError(str(exc)) from exc
    return FleetLink(broker, key, on_metrics).connect()


def narrow_table(*headers: str, **options: Any) -> Table:
    """A table that stays readable at 80 columns: headers whole, long values folded onto more lines."""
    columns = [Column(h, min_width=len(h), overflow="fold") for h in headers]
    return Table(*columns, box=box.SIMPLE_HEAD, pad_edge=False, **options)


def _figure(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _table(rows: list[dict[str, Any]]) -> Table:
    """One device per row. Its name heads a column that also holds its labels, its engine, a canary and its
    last event, each on a line of its own: bundle ids run to 35 characters, which a column of their own
    beside the figures would break mid-token at 80 columns."""
    figures = [Column(h, width=w, no_wrap=True) for h, w in (("state", 7), ("fps", 5), ("p99 ms", 6), ("agree", 5))]
    table = Table(
        Column("device", overflow="fold"), *figures, Column("drift", width=5, no_wrap=True),
        box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False,
    )  # fmt: skip
    for r in rows:
        labels = markup(", ".join(f"{k}={v}" for k, v in sorted(r["labels"].items())))
        last = r["last_event"] or ""
        if r["active"] and last.endswith(f" {r['active']}"):  # about the engine named above: the event alone
            last = last[: -len(r["active"]) - 1]
        canary = r["canary"] and f"[yellow]canary {markup(r['canary'])}[/]"
        newer = r["protocol"] > PROTOCOL_VERSION and f"[yellow]protocol {r['protocol']}: update edgevit-fleet[/]"
        lines = [f"[bold]{markup(r['device'])}[/]", labels and f"[dim]{labels}[/]", newer]
        lines += [f"engine {markup(r['active'] or '-')}", canary, last and f"[dim]last: {markup(last)}[/]"]
        state = "[green]online[/]" if r["state"] == "online" else "[red]offline[/]"
        table.add_row(
            "\n".join(filter(None, lines)), state, _figure(r["fps"], 1), _figure(r["p99_ms"], 1),
            _figure(r["agreement"], 3), _figure(r["class_mix_distance"], 3),
        )  # fmt: skip
    return table


WATCHED = ("state", "active", "canary", "last_event", "agreement")  # what --watch reports; fps/p99 move always


def summary_table(devices: list[Device]) -> tuple[str, Table]:
    """A headline (devices, online) and the counts by engine and by label."""
    counts = summary(devices)
    table = narrow_table("", "devices")
    for engine, n in counts["by_engine"].items():
        table.add_row(f"engine {markup(engine)}", str(n))
    for label, n in counts["by_label"].items():
        table.add_row(markup(label), str(n))
    return f"{counts['devices']} devices, {counts['online']} online", table


def changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """One line per device whose watched fields changed (new and vanished devices too)."""
    lines = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            lines.append(printable(f"{name}: {'appeared' if old is None else 'gone'}"))
            continue
        moved = [f"{k} {old[k]} -> {new[k]}" for k in WATCHED if old[k] != new[k]]
        if moved:
            lines.append(printable(f"{name}: {'; '.join(moved)}"))
    return lines


def run_status(args: argparse.Namespace, console: Console) -> int:
    selector = parse_selector(args.select)
    if args.page < 1 or args.per_page < 1:
        raise FleetError("--page and --per-page start at 1")
    link = _link(args)

    def selected() -> list[Device]:
        return [d for _, d in sorted(link.snapshot().items()) if selects(selector, d)]

    try:
        devices = selected()
        if args.json:
            print(json.dumps([d.row() for d in devices], indent=2))
            return 0
        if args.summary:
            headline, table = summary_table(devices)
            console.print(headline)
            console.print(table)
        else:
            pages = max(1, -(-len(devices) // args.per_page))
            shown = devices[(args.page - 1) * args.per_page : args.page * args.per_page]
            console.print(_table([d.row() for d in shown]))
            if pages > 1:
                console.print(
                    f"page {args.page} of {pages} ({len(devices)} devices); --page N for another, --summary for counts"
                )
        if args.watch:
            last = {d.name: d.row() for d in devices}
            while True:
                time.sleep(args.watch)
                now = {d.name: d.row() for d in selected()}
                for line in changes(last, now):
                    console.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, markup=False)
                last = now
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
    return 0


def say(line: str) -> None:
    """A rollout's progress line: plain and flushed at once (rich's rendering per line added up to seconds of
    CPU at 10,000 devices, bench/README.md; whoever follows the output must see each line as it happens).
    Lines carry device text (refusal and revert reasons): printable only."""
    print(printable(line), flush=True)


def bundle_reference(archive: Path, url: str) -> tuple[str, dict[str, Any]]:
    """(bundle id, the deploy command's ``bundle``) for an archive made by ``edgevit-build pack``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            member = next(m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MANIFEST)
            manifest = bounded_json.load(tar.extractfile(member))  # type: ignore[arg-type]
        if not isinstance(manifest, dict) or not isinstance(manifest.get("bundle_id"), str):
            raise ValueError(f"its {MANIFEST} names no bundle_id")
    except (OSError, tarfile.TarError, StopIteration, ValueError) as exc:
        raise FleetError(
            f"{archive} is not a bundle archive (edgevit-build pack makes one): {str(exc)[:200]}"
        ) from None
    digest = file_digest(archive)
    return manifest["bundle_id"], {"url": url, "sha256": digest["sha256"], "size": digest["bytes"]}


def outcomes(rollout: Rollout) -> str:
    """How a rollout's devices ended, in words (its summary line and the history table)."""
    c = rollout.counts()
    return (
        f"{c[TargetState.SUCCEEDED]} succeeded, {c[TargetState.FAILED]} failed, {c[TargetState.ROLLED_BACK]} rolled "
        f"back, {c[TargetState.SKIPPED]} skipped, {c[TargetState.PENDING]} untouched"
    )


def _drive(runner: Runner, console: Console) -> int:
    rollout = runner.run()
    console.print(f"rollout {rollout.id} {rollout.state}: {outcomes(rollout)}", markup=False)
    return 0 if rollout.state == RolloutState.COMPLETED else EXIT_HALTED


def _claimed(folder: Path, rollout: Rollout, others: list[Rollout]) -> str | None:
    """Why ``rollout`` may not drive its devices: another unfinished rollout targets one of them."""
    mine = {t.device for t in rollout.targets if t.wave >= 0}
    for other in others:
        if other.id == rollout.id or other.state not in ACTIVE:
            continue
        shared = sorted(mine & {t.device for t in other.targets if t.wave >= 0})
        if shared:
            how = (
                "its controller is running"
                if driven(folder, other.id)
                else f"its controller stopped: edgevit-fleet resume {other.id} or edgevit-fleet abandon {other.id}"
            )
            more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
            return f"{', '.join(shared[:3])}{more} belong to rollout {other.id} ({other.state}; {how})"
    return None


def run_deploy(args: argparse.Namespace, console: Console) -> int:
    url = args.url or f"{args.url_base.rstrip('/')}/{args.bundle.name}"
    bundle_id, reference = bundle_reference(args.bundle, url)
    try:
        max_failures = float(args.max_failures.rstrip("%"))
        parse_count(args.canary, 1), parse_count(args.step, 1)
    except ValueError as exc:
        raise FleetError(f"--canary/--step take N or N%, --max-failures N%: {exc}") from exc
    link = _link(args)
    rollout = Rollout.new(
        bundle_id,
        reference,
        parse_selector(args.select),
        max_failures_pct=max_failures,
        timeout_s=args.timeout,
        rollback_on_halt=not args.no_rollback,
        force=args.force,
    )
    runner = Runner(rollout, link, args.state_dir, say)
    owner = None
    try:
        with planning(args.state_dir):
            runner.plan(args.canary, args.step)
            path = args.state_dir / "rollouts" / f"{rollout.id}.json"
            if not [t for t in rollout.targets if t.wave >= 0]:
                path.unlink()
                raise FleetError(f"no online device matches --select {args.select!r}")
            conflict = _claimed(args.state_dir, rollout, list_rollouts(args.state_dir)[0])
            if conflict:
                path.unlink()
                raise FleetError(f"refused: {conflict}")
            owner = Ownership(args.state_dir, rollout.id)
        return _drive(runner, console)
    finally:
        if owner:
            owner.release()
        link.close()


def run_resume(args: argparse.Namespace, console: Console) -> int:
    rollouts, problems = list_rollouts(args.state_dir)
    for problem in problems:
        console.print(f"skipped {printable(problem)}", markup=False)
    unfinished = [r for r in rollouts if r.state in ACTIVE and (args.id is None or r.id == args.id)]
    if not unfinished:
        raise FleetError(f"no running or interrupted rollout {args.id or ''} in {args.state_dir}".replace("  ", " "))
    rollout = unfinished[-1]
    try:
        owner = Ownership(args.state_dir, rollout.id)
    except Busy as exc:
        raise FleetError(f"refused: {exc}; it is being driven now") from None
    try:
        sent = [t.device for t in rollout.targets if t.state == TargetState.SENT]
        console.print(
            printable(f"resuming {rollout.id} at wave {rollout.wave}; awaiting {', '.join(sent) or 'nothing'}"),
            markup=False,
        )
        link = _link(args)
        try:
            return _drive(Runner(rollout, link, args.state_dir, say), console)
        finally:
            link.close()
    finally:
        owner.release()


def run_abandon(args: argparse.Namespace, console: Console) -> int:
    """Mark a rollout whose controller stopped as abandoned: its devices may be driven again."""
    rollouts, _ = list_rollouts(args.state_dir)
    rollout = next((r for r in rollouts if r.id == args.id), None)
    if rollout is None or rollout.state not in ACTIVE:
        raise FleetError(f"no running or interrupted rollout {args.id} in {args.state_dir}")
    try:
        owner = Ownership(args.state_dir, rollout.id)
    except Busy as exc:
        raise FleetError(f"refused: {exc}; stop it first") from None
    try:
        rollout.state = RolloutState.ABANDONED
        rollout.log.append(f"{time.strftime('%H:%M:%S')} abandoned by an operator; its devices keep what they run")
        rollout.save(args.state_dir)
    finally:
        owner.release()
    console.print(f"rollout {rollout.id} abandoned; its devices run what they ran when it stopped", markup=False)
    return 0


def run_rollback(args: argparse.Namespace, console: Console) -> int:
    link = _link(args)
    selector = parse_selector(args.select)
    try:
        chosen = {n: d for n, d in link.snapshot().items() if selects(selector, d) and d.online}
        if not chosen:
            raise FleetError(f"no online device matches --select {args.select!r}")
        wanted, skipped = rollback_plan(chosen, args.to)
        for name, why in skipped.items():
            say(f"{name}: left as it is: {why}")
        outcomes = roll_back(link, wanted, args.timeout, say) if wanted else {}
        return 0 if all(ok for ok, _ in outcomes.values()) else EXIT_HALTED
    finally:
        link.close()


def run_history(args: argparse.Namespace, console: Console) -> int:
    rollouts, problems = list_rollouts(args.state_dir)
    if args.json:
        print(json.dumps([{"id": r.id, "bundle_id": r.bundle_id, "state": r.state, **r.counts()} for r in rollouts]))
        for problem in problems:
            print(f"skipped {printable(problem)}", file=sys.stderr)
        return 0
    table = narrow_table("rollout, bundle", "state", "outcomes")  # the bundle id under the rollout's: both whole
    for r in rollouts:
        table.add_row(f"{markup(r.id)}\n[dim]{markup(r.bundle_id)}[/]", r.state, outcomes(r))
    console.print(table)
    for problem in problems:
        console.print(f"skipped {printable(problem)}", markup=False)
    return 0


def run_dashboard(args: argparse.Namespace, console: Console) -> int:
    history = MetricsHistory()
    link = _link(args, history.record)
    page = Dashboard(link, history, args.state_dir, args.bind, args.http_port, tuple(args.allow_host))
    console.print(f"fleet dashboard at {page.url} (read-only); Ctrl-C stops")
    try:
        page.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
        link.close()
    return 0


def run_serve(args: argparse.Namespace, console: Console) -> int:
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = BundleServer(args.folder, args.bind, args.http_port, tls)
    console.print(f"serving {args.folder} at {server.url}/ (Range supported); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


COMMANDS = {
    "status": run_status,
    "deploy": run_deploy,
    "resume": run_resume,
    "abandon": run_abandon,
    "rollback": run_rollback,
    "history": run_history,
    "serve": run_serve,
    "dashboard": run_dashboard,
}
