"""The engine store, safe archive extraction, bundle references and signed commands, without an agent."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.command_auth import CommandAuthError, CommandVerifier, sign_command
from agent.engine.bundle import BundleError, verify_bundle
from agent.engine.signing import load_private_key, load_public_key
from agent.lifecycle.archive import safe_extract
from agent.lifecycle.fetch import BundleRef, fetch
from agent.lifecycle.store import Canary, EngineState, EngineStore, Mark
from builder.bundle.keys import keygen
from builder.bundle.pack import pack_bundle


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_pack_then_extract_round_trip(demo_bundle: Path, signing_key, tmp_path: Path) -> None:
    first = pack_bundle(demo_bundle, tmp_path / "a.tar.gz", [load_public_key(signing_key[1])])
    second = pack_bundle(demo_bundle, tmp_path / "b.tar.gz", None)
    assert first == second, "packing is reproducible: the sha256 names the bundle"
    (tmp_path / "out").mkdir()
    root = safe_extract(tmp_path / "a.tar.gz", tmp_path / "out", 50 * 2**20)
    assert verify_bundle(root, [load_public_key(signing_key[1])]).bundle_id == first["bundle_id"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"/etc/cron.d/x": b"x"}, "points outside the bundle"),
        ({"a/../../x": b"x"}, "points outside the bundle"),
        ({"big.bin": b"x" * 2048}, "over the 1024 limit"),
        ({f"f{i}": b"x" for i in range(70)}, "more than 64 members, the limit"),
        ({"manifest.txt": b"x"}, "holds no manifest.json"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    archive = _tar(tmp_path / "x.tar.gz", members)
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match=message):
        safe_extract(archive, tmp_path / "out", 1024)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_an_archive_of_many_empty_members_is_refused_at_once(tmp_path: Path) -> None:
    """100,000 empty members (a few MB): refused at the 65th header, fast and without reading the rest."""
    import tracemalloc

    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("x")
        for i in range(100_000):
            info.name = f"m{i}"
            tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "out").mkdir()
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(BundleError, match="more than 64 members"):
        safe_extract(archive, tmp_path / "out", 50 * 2**20)
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 2 * 2**20, (elapsed, peak)
    assert not any((tmp_path / "out").iterdir())


def test_truncated_archive_is_refused(demo_bundle: Path, tmp_path: Path) -> None:
    pack_bundle(demo_bundle, tmp_path / "a.tar.gz", None)
    data = (tmp_path / "a.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="cut.tar.gz is not a readable bundle archive"):
        safe_extract(tmp_path / "cut.tar.gz", tmp_path / "out", 50 * 2**20)


def test_bundle_references_are_validated() -> None:
    assert BundleRef.parse({"path": "/x"}, 10).path == Path("/x")
    with pytest.raises(ValueError, match="at most 10"):
        BundleRef.parse({"url": "http://h/b", "sha256": "a" * 64, "size": 11}, 10)
    with pytest.raises(ValueError, match="'bundle.url' must be an http"):
        BundleRef.parse({"url": "file:///etc/passwd", "sha256": "a" * 64, "size": 1}, 10)
    with pytest.raises(ValueError, match="must be an object"):
        BundleRef.parse("/x", 10)


def test_fetch_refuses_what_is_neither_folder_nor_archive(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="neither a bundle folder nor a .tar"):
        fetch(BundleRef(path=tmp_path / "model.onnx"), tmp_path / "dl", tmp_path, 100)
    with pytest.raises(BundleError, match="does not exist on this device"):
        fetch(BundleRef(path=tmp_path / "nothing"), tmp_path / "dl", tmp_path, 100)


def test_store_installs_once_and_state_is_atomic(demo_bundle: Path, signing_key, tmp_path: Path) -> None:
    store = EngineStore(tmp_path / "state")
    keys = [load_public_key(signing_key[1])]
    bundle = store.install(demo_bundle, lambda p: verify_bundle(p, keys))
    assert bundle.root == store.path(bundle.bundle_id) and store.installed() == [bundle.bundle_id]
    assert store.install(demo_bundle, lambda p: verify_bundle(p, keys)).root == bundle.root
    marks = {"c": Mark("p90 latency", False, "latency", {"estimate": 2.0}, 1.0), "d": Mark("golden set FAILED")}
    state = EngineState(active=bundle.bundle_id, canary=Canary("b", "a", None, time.time()), bad=marks)
    store.save(state)
    assert store.load() == state
    old = EngineState.from_json({"active": "a", "bad": {"e": "an earlier release's reason"}})
    assert old.bad["e"] == Mark("an earlier release's reason") and old.bad["e"].refuse, "older state files still load"
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.startswith(".")] == []
    (tmp_path / "state" / "engines" / ".incoming-x-1").mkdir()
    EngineStore(tmp_path / "state")  # a restart clears an interrupted copy
    assert store.installed() == [bundle.bundle_id] and not (tmp_path / "state" / "engines" / ".incoming-x-1").exists()


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000])
def test_unreadable_state_is_named(tmp_path: Path, text: str) -> None:
    store = EngineStore(tmp_path)
    store.state_path.write_text(text)
    with pytest.raises(RuntimeError, match="engines.json is unreadable"):
        store.load()


@pytest.fixture(scope="module")
def operator_keys(tmp_path_factory) -> tuple[Path, Path]:
    private, public, _ = keygen(tmp_path_factory.mktemp("operator"), "operator")
    return private, public


def test_signed_commands(operator_keys, tmp_path: Path) -> None:
    private, public = load_private_key(operator_keys[0]), load_public_key(operator_keys[1])
    verifier = CommandVerifier([public], 60, tmp_path / "nonces.sqlite")
    command = sign_command({"id": "c1", "cmd": "ping"}, private)
    assert verifier.check(command)
    with pytest.raises(CommandAuthError, match="already used: a replayed command"):
        verifier.check(command)
    restarted = CommandVerifier([public], 60, tmp_path / "nonces.sqlite")
    with pytest.raises(CommandAuthError, match="already used"):
        restarted.check(command)
    tampered = {**sign_command({"id": "c2", "cmd": "ping"}, private), "cmd": "deploy"}
    with pytest.raises(CommandAuthError, match="does not match"):
        verifier.check(tampered)
    with pytest.raises(CommandAuthError, match="from this device's clock"):
        verifier.check(sign_command({"id": "c3", "cmd": "ping", "ts": time.time() - 3600}, private))
    with pytest.raises(CommandAuthError, match="unsigned"):
        verifier.check({"id": "c4", "cmd": "ping"})


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ts", "nonce", "sig", "id", "cmd"]),
        st.none() | st.text() | st.floats() | st.integers() | st.dictionaries(st.text(), st.text()),
    )
)
def test_garbage_signatures_are_refused_cleanly(garbage_verifier: CommandVerifier, command: dict) -> None:
    with pytest.raises(CommandAuthError):
        garbage_verifier.check(command)


@pytest.fixture(scope="module")
def garbage_verifier(operator_keys, tmp_path_factory) -> CommandVerifier:
    return CommandVerifier([load_public_key(operator_keys[1])], 60, tmp_path_factory.mktemp("n") / "n.sqlite")


def test_download_over_https_from_a_private_store(demo_bundle: Path, tmp_path: Path) -> None:
    """edgevit-fleet serve with TLS; the device trusts the store's CA through engine.download_ca."""
    from test_agent_security import make_pki

    from agent.lifecycle.fetch import download
    from fleet.serve import BundleServer

    pki = make_pki(tmp_path / "pki")
    reference = pack_bundle(demo_bundle, tmp_path / "store" / "b.tar.gz", None)
    with BundleServer(tmp_path / "store", tls=(pki / "broker.pem", pki / "broker.key")) as server:
        assert server.url.startswith("https://")
        ref = BundleRef(url=f"{server.url}/b.tar.gz", sha256=reference["sha256"], size=reference["size"])
        with pytest.raises(BundleError, match="CERTIFICATE_VERIFY_FAILED"):
            download(ref, tmp_path / "untrusting")  # the system CAs do not know this store
        archive = download(ref, tmp_path / "dl", ca=pki / "ca.pem")
    assert archive.stat().st_size == reference["size"]
