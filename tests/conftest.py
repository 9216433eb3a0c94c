"""Shared fixtures (checkpoints written by the tests themselves in the published layout, the demo's builds,
a real broker), and the test tiers.

Tiers: a test is ``integration`` when it needs the demo build, a broker or real processes, and
``browser`` when it drives Chromium. Both are marked here from the fixtures a test uses, so a new test
cannot forget; a test outside them that starts a service anyway fails and says which marker it lacks.
``make test-fast`` runs the rest (the unit tier); ``make test`` runs everything.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from filelock import FileLock

from builder.export.architecture import MixerConfig, ModelConfig, ViTConfig
from builder.export.checkpoint import save_checkpoint
from builder.export.models import init_params

T = TypeVar("T")

# What puts a test in a tier: fixtures (their own, or through the fixtures they use).
INTEGRATION_FIXTURES = {"demo_exports", "demo_bundle", "demo_run", "digits_video", "mosquitto"}
BROWSER_FIXTURES = {"chromium"}
# What the unit tier never starts (its guard below): brokers, browsers, RTSP servers, agents serving a config,
# the fleet tool's servers and demo, the demo build. Quick commands (--help, a refusal) are fine.
SERVICES = (
    re.compile(r"mosquitto|chromium|chromedriver|rtsp|fleet\.demo"),
    re.compile(r"(agent\.daemon|edgevit-agent)\b.*--config"),
    re.compile(r"(fleet\.cli|edgevit-fleet)\b.*\b(serve|dashboard|deploy|resume)\b"),
    re.compile(r"(builder\.cli|edgevit-build)\b.*\bdemo\b"),
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if used & (INTEGRATION_FIXTURES | BROWSER_FIXTURES):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that starts a service fails at once, naming the marker it lacks."""
    if request.node.get_closest_marker("integration"):
        return
    original = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        command = " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
        quick = "--help" in command or "--version" in command
        if not quick and any(service.search(command) for service in SERVICES):
            raise AssertionError(
                f"{request.node.nodeid} starts {command[:120]!r}: use a fixture of the integration tier "
                f"({', '.join(sorted(INTEGRATION_FIXTURES))}) or mark it @pytest.mark.integration"
            )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


# Small members of each family the original repository defines: same structure,
# fewer channels, so a real export takes seconds.
SMALL_VIT = ViTConfig(
    patch_size=16, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, num_classes=7, image_size=64
)
SMALL_MIXER = MixerConfig(
    patch_size=16, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64, num_blocks=2, num_classes=7, image_size=64
)


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """write_checkpoint(cfg | params, name=..., rename=fn) -> path of a published-layout .npz."""

    def write(
        source: ModelConfig | dict[str, np.ndarray],
        name: str = "model.npz",
        rename: Callable[[str], str] = lambda k: k,
        seed: int = 0,
    ) -> Path:
        params = init_params(source, seed) if isinstance(source, (ViTConfig, MixerConfig)) else source
        path = tmp_path / name
        save_checkpoint(path, {rename(k): v for k, v in params.items()})
        return path

    return write


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], T]) -> T:
    """What ``make(folder)`` returns, made once per test run and read-only to the tests.

    Session fixtures are per process, and under pytest-xdist each worker would make its own: the demo
    builds cost minutes of both cores each on a slow runner. There the first worker to ask makes it in
    the run's shared folder, under a lock, and the other waits for it and reads what it returned.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / "shared"  # this run's, beside each worker's own
    shared.mkdir(exist_ok=True)
    made = shared / f"{name}.pickle"
    with FileLock(shared / f"{name}.lock"):
        if not made.exists():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # a worker's attempt that failed
            folder.mkdir()
            made.write_bytes(pickle.dumps(make(folder)))
        found: T = pickle.loads(made.read_bytes())
        return found


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled demo checkpoints, exported once per test run."""
    from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS
    from builder.export.job import export_checkpoint

    def make(root: Path) -> dict[str, Path]:
        return {
            name: export_checkpoint(CHECKPOINT_DIR / f"{name}.npz", root / name).model_path.parent
            for name in DEMO_MODELS
        }

    return once_per_run(tmp_path_factory, "demo-exports", make)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) key files made by ``edgevit-build keygen``'s function."""
    from builder.bundle.keys import keygen

    def make(folder: Path) -> tuple[Path, Path]:
        private, public, _ = keygen(folder)
        return private, public

    return once_per_run(tmp_path_factory, "keys", make)


@pytest.fixture(scope="session")
def demo_bundle(demo_exports: dict[str, Path], signing_key: tuple[Path, Path], tmp_path_factory) -> Path:
    """The demo ViT as a signed INT8 CPU bundle, as ``edgevit-build demo`` makes it."""
    from builder.bundle.build import build_engine_bundle
    from builder.bundle.options import EngineOptions

    # ONNX Runtime: the agent tests' engine variants (hanging, slow) rewrite this ONNX file for that runtime
    options = EngineOptions(
        precision="int8", eval="demo", calib="demo", calibration_images=64, profile_seconds=0.2, runtime="onnxruntime"
    )

    def make(folder: Path) -> Path:
        return build_engine_bundle(demo_exports["vit-digits"], folder / "vit-int8", signing_key[0], options).path

    return once_per_run(tmp_path_factory, "bundle", make)


@pytest.fixture(scope="session")
def digits_video(tmp_path_factory) -> Path:
    """A labelled video of 120 held-out digits (labels in the .json beside it)."""
    from builder.demo.evaluate import held_out_indices
    from builder.demo.train import CHECKPOINT_DIR
    from builder.demo.video import write_labelled_video

    def make(folder: Path) -> Path:
        path = folder / "digits.mp4"
        write_labelled_video(path, held_out_indices(CHECKPOINT_DIR / "vit-digits.npz")[:120])
        return path

    return once_per_run(tmp_path_factory, "video", make)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """A real headless Chromium, driven through WebDriver; quit after the test."""
    from browser import headless_chromium

    browser = headless_chromium()
    yield browser
    browser.quit()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto broker on a free loopback port; yields the port."""
    from agent_helpers import start_mosquitto

    port = free_port()
    proc = start_mosquitto(tmp_path, port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``edgevit-build demo`` run once as a user runs it: (its output folder, the finished process)."""

    def make(out: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
        proc = subprocess.run(
            [sys.executable, "-m", "builder.cli", "demo", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert proc.returncode == 0, proc.stderr
        return out, proc

    return once_per_run(tmp_path_factory, "demo", make)
