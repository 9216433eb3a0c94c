"""The shell blocks of the README and docs/, and how the suite runs each of them as written.

A command block that no test runs goes stale the first time an option is renamed, so every
``sh`` block is either run by a test (here, or by the test named in ``RUN_BY``) or listed in
``NOT_RUN_HERE`` with the reason; ``test_doc_commands`` fails on a block in neither.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_FENCES = ("sh", "bash", "shell", "console")

# The start of a command line in a block -> why this machine cannot run that block.
NOT_RUN_HERE: dict[str, str] = {
    "sudo useradd": "installs a system service as root on a device (tests/test_systemd.py checks the unit file)",
    "sudo scripts/jetson-install": "needs a Jetson (tests/test_tensorrt_path.py runs its --dry-run per L4T release)",
}
# The start of a command line in a block -> the test that runs the block (it needs what that test sets up).
RUN_BY: dict[str, str] = {
    "make demo": "tests/test_cli.py::test_demo_main_job runs make demo's steps; make test is what CI runs",
    "make fleet-demo": "tests/test_fleet_demo.py",
    "make test-fast": "CI runs make check and make test (.ci/run); make test-fast is a subset of make test",
    "source out/fleet-demo/fleet.env": "tests/test_fleet_demo.py, against the running fleet demo",
}


@dataclass(frozen=True)
class Block:
    document: str  # relative to the repository
    line: int  # of the opening fence
    text: str

    @property
    def commands(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def documents() -> list[Path]:
    """The README first (its blocks build on each other in reading order), then the other top-level documents
    and docs/, by name."""
    top = sorted(p for p in REPO.glob("*.md") if p.name != "README.md")
    return [REPO / "README.md", *top, *sorted((REPO / "docs").rglob("*.md"))]


def shell_blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in documents():
        lines = path.read_text().splitlines()
        start: int | None = None
        for number, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\S*)", line)
            if not fence:
                continue
            if start is None:
                start, language = number, fence.group(1)
            else:
                if language in SHELL_FENCES:
                    text = "\n".join(lines[start : number - 1])
                    blocks.append(Block(str(path.relative_to(REPO)), start, text))
                start = None
    return blocks


def listed(block: Block, table: dict[str, str]) -> str | None:
    """The key of ``table`` one of the block's command lines starts with."""
    return next((key for key in table if any(line.startswith(key) for line in block.commands)), None)


def sandbox(root: Path, demo: Path) -> Path:
    """A folder laid out like a fresh clone after ``make demo``: the project's files linked, ``out/demo`` a copy
    of the suite's demo run (the blocks write beside it), nothing else."""
    root.mkdir(parents=True)
    for name in ("builder", "agent", "fleet", "scripts", "Makefile"):
        (root / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "configs", root / "configs")  # its paths are relative to the file: a link would escape
    (root / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(demo, root / "out" / "demo", ignore=shutil.ignore_patterns("state", "results.jsonl"))
    return root


def run_block(block: Block, cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    """The block as a user pastes it into bash in ``cwd``: stop at the first failing command; jobs it left in
    the background are ended with it. The venv is not on PATH unless the block puts it there."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEVIT_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["HOME"] = str(cwd.parent / "home")  # outside the clone: what a command writes there is not the tree's
    Path(env["HOME"]).mkdir(exist_ok=True)
    script = "set -eo pipefail\ntrap 'set +e; kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + block.text + "\n"
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
