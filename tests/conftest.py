"""Shared helpers: checkpoints written by the tests themselves in the published layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from builder.architecture import MixerConfig, ModelConfig, ViTConfig
from builder.checkpoint import save_checkpoint
from builder.models import init_params

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


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled demo checkpoints, exported once per test session."""
    from builder.demo.train import CHECKPOINT_DIR, DEMO_MODELS
    from builder.export import export_checkpoint

    root = tmp_path_factory.mktemp("demo-exports")
    return {
        name: export_checkpoint(CHECKPOINT_DIR / f"{name}.npz", root / name).model_path.parent for name in DEMO_MODELS
    }


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) key files made by ``edgevit-build keygen``'s function."""
    from builder.keys import keygen

    private, public, _ = keygen(tmp_path_factory.mktemp("keys"))
    return private, public
