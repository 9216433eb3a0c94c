"""Every shell block of the documents runs as written, in reading order, in a folder laid out like a fresh clone
after ``make demo``; blocks that need other machines are listed with the reason (tests/doc_commands.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from doc_commands import NOT_RUN_HERE, REPO, RUN_BY, documents, listed, run_block, sandbox, shell_blocks


def test_every_block_is_run_or_listed_and_pastes() -> None:
    blocks = shell_blocks()
    for table in (NOT_RUN_HERE, RUN_BY):
        for key in table:
            assert sum(listed(b, {key: ""}) is not None for b in blocks) == 1, f"{key!r} names no block, or several"
    for block in blocks:
        for line in block.commands:
            # placeholders belong in the prose around a block, where nobody pastes them
            assert not re.search(r"<[a-z ]+>|\[--|\s\.\.\.(\s|$)", line.split("  #")[0]), f"{block.where}: {line}"


def test_the_documents_commands_run_as_written(demo_run, tmp_path: Path) -> None:
    root = sandbox(tmp_path / "clone", demo_run[0])
    before = {p.name for p in root.iterdir()}
    ran = []
    for block in shell_blocks():
        if listed(block, NOT_RUN_HERE) or listed(block, RUN_BY):
            continue
        done = run_block(block, root)
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        assert done.returncode == 0, f"{block.where} failed:\n{block.text}\n{output}"
        ran.append(block.where)
    assert len(ran) >= 5, ran
    verification = json.loads((root / "out" / "exports" / "vit-digits" / "verification.json").read_text())
    assert verification["passed"], verification  # the export block's report
    assert (root / "out" / "bundles" / "mixer-digits-cpu-fp32" / "manifest.json").is_file()  # the build block's
    passport = json.loads((root / "out" / "bundles" / "mixer-over-vit" / "passport.json").read_text())
    assert passport["baseline"]["bundle_id"].startswith("vit-digits")
    assert (root / "out" / "demo" / "results.jsonl").stat().st_size > 0  # the agent block played the video
    assert {p.name for p in root.iterdir()} == before, "a documented command wrote outside out/"


def test_every_relative_link_in_the_documents_resolves() -> None:
    broken = []
    for path in documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, broken
