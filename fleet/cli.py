"""``edgevit-fleet``: see and change which engine a fleet of edgevit agents runs, wave by wave."""

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

from agent.command_line import new_parser, subcommands
from agent.engine.bundle import MANIFEST, file_digest
from agent.engine.signing import SignatureError, load_private_key
from fleet.dashboard import Dashboard, MetricsHistory, summary
from fleet.link import Broker, Device, FleetLink
from fleet.locks import ACTIVE, Busy, Ownership, driven, planning
from fleet.rollout import (
    FAILED,
    SENT,
    SUCCEEDED,
    Rollout,
    Runner,
    list_rollouts,
    parse_count,
    parse_selector,
    roll_back,
    selects,
)
from fleet.serve import BundleServer
from fleet.text import markup, printable

EXIT_BAD_INPUT, EXIT_HALTED = 2, 5


class FleetError(ValueError):
    """Bad input to the fleet tool; the message says which."""


def _connection(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--host", default="127.0.0.1", help="MQTT broker (a cluster's load balancer works the same)")
    cmd.add_argument("--port", type=int, default=1883, help="MQTT broker port (8883 is the usual TLS port)")
    cmd.add_argument("--prefix", default="edgevit", help="the agents' mqtt.prefix")
    cmd.add_argument("--username", help="MQTT user name")
    cmd.add_argument(
        "--password", help="MQTT password (or the EDGEVIT_FLEET_PASSWORD environment variable, kept out of ps)"
    )
    cmd.add_argument("--ca", type=Path, help="CA certificate: connect with TLS")
    cmd.add_argument("--cert", type=Path, help="client certificate (with --ca)")
    cmd.add_argument("--key", type=Path, help="client certificate's key (with --ca)")
    cmd.add_argument("--sign", type=Path, help="Ed25519 key to sign commands (agents with mqtt.signed_commands)")
    cmd.add_argument("--state-dir", type=Path, default=Path.home() / ".edgevit-fleet", help="rollouts are kept here")


def parser() -> argparse.ArgumentParser:
    root = new_parser("edgevit-fleet", __doc__)
    commands = subcommands(root)
    status = commands.add_parser("status", help="every device on the broker: state, labels, engine, figures")
    status.add_argument("--select", default="", help="labels, e.g. site=lab,hardware=orin (device=NAME works too)")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.add_argument(
        "--watch", type=float, metavar="S", help="then every S seconds, one line per device whose state changed"
    )
    status.add_argument("--summary", action="store_true", help="counts only: online, by engine, by label")
    status.add_argument("--page", type=int, default=1, help="page of the device table")
    status.add_argument("--per-page", type=int, default=100, help="devices per page of the table")
    deploy = commands.add_parser("deploy", help="roll a bundle archive out in waves")
    deploy.add_argument("bundle", type=Path, help="bundle archive (edgevit-build pack)")
    where = deploy.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="where devices download the archive")
    where.add_argument("--url-base", help="devices download <url-base>/<archive name>")
    deploy.add_argument("--select", default="", help="labels the devices must carry (default: every device)")
    deploy.add_argument("--canary", default="1", help="devices in the first wave: N or N%% (default 1)")
    deploy.add_argument("--step", default="25%", help="devices per later wave: N or N%% (default 25%%)")
    deploy.add_argument("--max-failures", default="0%", help="halt beyond this share of failed devices")
    deploy.add_argument("--timeout", type=float, default=900, help="seconds a device has to report an outcome")
    deploy.add_argument("--no-rollback", action="store_true", help="on a halt, leave updated devices as they are")
    deploy.add_argument("--force", action="store_true", help="deploy even to devices that marked the bundle bad")
    resume = commands.add_parser("resume", help="continue a rollout a stopped controller or a lost broker left")
    resume.add_argument("id", nargs="?", help="rollout id (default: the latest running or interrupted one)")
    abandon = commands.add_parser("abandon", help="give up a rollout whose controller stopped (frees its devices)")
    abandon.add_argument("id", help="rollout id")
    rollback = commands.add_parser("rollback", help="swap selected devices back to their previous engine")
    rollback.add_argument("--select", required=True)
    rollback.add_argument("--to", help="an installed bundle id instead of each device's previous")
    rollback.add_argument("--timeout", type=float, default=300)
    history = commands.add_parser("history", help="rollouts this controller ran, with their outcome")
    history.add_argument("--json", action="store_true", help="machine-readable")
    serve = commands.add_parser("serve", help="serve bundle archives over HTTP(S) with Range (resumable)")
    serve.add_argument("folder", type=Path)
    serve.add_argument("--bind", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP(S) port")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (with --tls-key)")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key")
    dashboard = commands.add_parser("dashboard", help="a read-only web page of the live fleet and its rollout")
    dashboard.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    dashboard.add_argument("--http-port", type=int, default=8080, help="HTTP port (0: any free one)")
    dashboard.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the page may be reached by (IP addresses and localhost always may); repeatable",
    )
    for cmd in (status, deploy, resume, rollback, history, dashboard):
        _connection(cmd)
    abandon.add_argument(
        "--state-dir", type=Path, default=Path.home() / ".edgevit-fleet", help="rollouts are kept here"
    )
    return root


def _link(args: argparse.Namespace, on_metrics: Callable[[str, dict[str, Any]], None] | None = None) -> FleetLink:
    password = args.password or os.environ.get("EDGEVIT_FLEET_PASSWORD")
    broker = Broker(args.host, args.port, args.prefix, args.username, password, args.ca, args.cert, args.key)
    try:
        key = load_private_key(args.sign) if args.sign else None
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
    """One device per row; its labels and last event on lines under its name, a canary under its engine."""
    table = narrow_table("device", "state", "engine", "fps", "p99 ms", "agree", "drift")
    for r in rows:
        labels = markup(",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())))
        last = r["last_event"] and f"[dim]{markup(r['last_event'])}[/]"
        who = "\n".join(filter(None, [markup(r["device"]), f"[dim]{labels}[/]" if labels else "", last]))
        engine = markup(r["active"] or "-") + (f"\n[yellow]canary {markup(r['canary'])}[/]" if r["canary"] else "")
        state = "[green]online[/]" if r["state"] == "online" else "[red]offline[/]"
        table.add_row(
            who, state, engine, _figure(r["fps"], 1), _figure(r["p99_ms"], 1), _figure(r["agreement"], 3),
            _figure(r["class_mix_distance"], 3),
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
    """A rollout's progress line: plain and flushed at once (rich costs 140 µs a line; a 10,000-device
    rollout prints 20,000 of them, and whoever follows the output must see each as it happens). Lines
    carry device text (refusal and revert reasons): printable only."""
    print(printable(line), flush=True)


def bundle_reference(archive: Path, url: str) -> tuple[str, dict[str, Any]]:
    """(bundle id, the deploy command's ``bundle``) for an archive made by ``edgevit-build pack``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            member = next(m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MANIFEST)
            manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (OSError, tarfile.TarError, StopIteration, ValueError) as exc:
        raise FleetError(f"{archive} is not a bundle archive (edgevit-build pack makes one): {exc}") from exc
    digest = file_digest(archive)
    return manifest["bundle_id"], {"url": url, "sha256": digest["sha256"], "size": digest["bytes"]}


def _drive(runner: Runner, console: Console) -> int:
    rollout = runner.run()
    counts = rollout.counts()
    console.print(
        f"rollout {rollout.id} {rollout.state}: {counts[SUCCEEDED]} succeeded, {counts[FAILED]} failed, "
        f"{counts['rolled-back']} rolled back, {counts['skipped']} skipped, {counts['pending']} untouched",
        markup=False,
    )
    return 0 if rollout.state == "completed" else EXIT_HALTED


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
        sent = [t.device for t in rollout.targets if t.state == SENT]
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
        rollout.state = "abandoned"
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
        outcomes = roll_back(link, dict.fromkeys(sorted(chosen), args.to), args.timeout, say)
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
    table = narrow_table("rollout", "bundle", "state", "outcomes")
    for r in rollouts:
        c = r.counts()
        outcomes = (
            f"{c[SUCCEEDED]} succeeded, {c[FAILED]} failed, {c['rolled-back']} rolled back, {c['skipped']} skipped, "
            f"{c['pending']} untouched"
        )
        table.add_row(markup(r.id), markup(r.bundle_id), r.state, outcomes)
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    console.soft_wrap = not console.is_terminal  # a log keeps each line whole
    try:
        return COMMANDS[args.command](args, console)
    except (FleetError, ValueError, ConnectionError, OSError) as exc:
        Console(stderr=True).print(f"[red]error:[/] {markup(exc)}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
