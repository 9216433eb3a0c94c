"""``edgevit-fleet``: see and change which engine a fleet of edgevit agents runs, wave by wave."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.command_line import new_parser, subcommands

EXIT_BAD_INPUT, EXIT_HALTED = 2, 5


def _connection(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--host",
        default=os.environ.get("EDGEVIT_MQTT_HOST", "127.0.0.1"),
        help="MQTT broker, or $EDGEVIT_MQTT_HOST (a cluster's load balancer works the same)",
    )
    cmd.add_argument(
        "--port",
        type=int,
        default=os.environ.get("EDGEVIT_MQTT_PORT", "1883"),
        help="MQTT broker port, or $EDGEVIT_MQTT_PORT (8883 is the usual TLS port)",
    )
    cmd.add_argument("--prefix", default="edgevit", help="the agents' mqtt.prefix")
    cmd.add_argument("--username", help="MQTT user name")
    cmd.add_argument(
        "--password", help="MQTT password (or the EDGEVIT_FLEET_PASSWORD environment variable, kept out of ps)"
    )
    cmd.add_argument("--ca", type=Path, help="CA certificate: connect with TLS")
    cmd.add_argument("--cert", type=Path, help="client certificate (with --ca)")
    cmd.add_argument("--key", type=Path, help="client certificate's key (with --ca)")
    _state_dir(cmd)


def _state_dir(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get("EDGEVIT_FLEET_STATE", str(Path.home() / ".edgevit-fleet")),
        help="rollouts are kept here, or in $EDGEVIT_FLEET_STATE",
    )


def _signing(cmd: argparse.ArgumentParser) -> None:
    """Only the commands that send commands sign them."""
    cmd.add_argument("--sign", type=Path, help="Ed25519 key to sign commands (agents with mqtt.signed_commands)")


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
    deploy.add_argument("--canary", default="1", help="devices in the first wave: N or N%%")
    deploy.add_argument("--step", default="25%", help="devices per later wave: N or N%%")
    deploy.add_argument("--max-failures", default="0%", help="halt beyond this share of failed devices")
    deploy.add_argument("--timeout", type=float, default=900, help="seconds a device has to report an outcome")
    deploy.add_argument("--no-rollback", action="store_true", help="on a halt, leave updated devices as they are")
    deploy.add_argument("--force", action="store_true", help="deploy even to devices that marked the bundle bad")
    resume = commands.add_parser("resume", help="continue a rollout a stopped controller or a lost broker left")
    resume.add_argument("id", nargs="?", help="rollout id (default: the latest running or interrupted one)")
    abandon = commands.add_parser("abandon", help="give up a rollout whose controller stopped (frees its devices)")
    abandon.add_argument("id", help="rollout id")
    rollback = commands.add_parser(
        "rollback",
        help="swap selected devices back to their previous engine (devices a rollback already took off a bundle "
        "stay as they are), or --to a named one",
    )
    rollback.add_argument(
        "--select", required=True, help="labels of the devices to roll back, e.g. site=lab (device=NAME works too)"
    )
    rollback.add_argument("--to", help="an installed bundle id instead of each device's previous")
    rollback.add_argument("--timeout", type=float, default=300, help="seconds a device has to answer")
    history = commands.add_parser("history", help="rollouts this controller ran, with their outcome")
    history.add_argument("--json", action="store_true", help="machine-readable")
    serve = commands.add_parser("serve", help="serve bundle archives over HTTP(S) with Range (resumable)")
    serve.add_argument("folder", type=Path, help="folder of bundle archives (edgevit-build pack)")
    serve.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
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
    for cmd in (deploy, resume, rollback):
        _signing(cmd)
    _state_dir(abandon)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # the commands (rich, the MQTT link, the rollout rules) load only now: --help stays fast
    from rich.console import Console

    from fleet.commands import COMMANDS, FleetError
    from fleet.text import markup

    console = Console()
    console.soft_wrap = not console.is_terminal  # a log keeps each line whole
    try:
        return COMMANDS[args.command](args, console)
    except (FleetError, ValueError, ConnectionError, OSError) as exc:
        Console(stderr=True).print(f"[red]error:[/] {markup(exc)}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
