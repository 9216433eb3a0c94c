"""What the three commands' ``--help`` and ``--version`` share.

Each command's description is its module docstring, written for readers of the code
(reStructuredText literals); :func:`plain` makes it text for a terminal. Every option's
default is shown after its help unless it has none.
"""

from __future__ import annotations

import argparse
import re
from functools import partial


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs kept), each option's default appended when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, "", argparse.SUPPRESS) or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def plain(docstring: str | None) -> str:
    """A module docstring as terminal text: ``literal`` becomes literal."""
    return re.sub(r"``([^`]+)``", r"\1", docstring or "").strip()


def edgevit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # slow to import: only when asked

    try:
        return version("edgevit")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, reading the installed version only when asked (``--help`` stays fast)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} (edgevit) {edgevit_version()}")
        parser.exit()


def new_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The root parser of an edgevit command: plain description, defaults shown, ``--version``."""
    root = argparse.ArgumentParser(prog=prog, description=plain(description), formatter_class=HelpFormatter)
    root.add_argument("--version", action=_Version, help="show the version and exit")
    return root


def subcommands(root: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``root``'s sub-commands, each formatted like the root."""
    commands: argparse._SubParsersAction[argparse.ArgumentParser] = root.add_subparsers(  # type: ignore[call-overload]
        dest="command", required=True, parser_class=partial(argparse.ArgumentParser, formatter_class=HelpFormatter)
    )
    return commands
