"""The agent's configuration: YAML, validated entirely at start-up.

Every error names the key at fault (``cameras.1.fps: ...``), so a typo fails the
start, not a camera at 3 a.m. Which settings a reload (SIGHUP or a file change) may
apply without a restart is decided in :mod:`agent.daemon`.

Every number is bounded by what the code can honour, not only by its sign: the same
models validate the file and the fleet's ``set`` commands, and a value that passes
(an fps of 1e-300, a budget of 1e300 ms, a stall timeout of 1e300 s) must not overflow
a timer, park a thread for ever or end one. The bounds are generous for real use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


HOUR, DAY = 3600.0, 86400.0
# user:password@ in any URL, and password-like key=value pairs (query strings, GStreamer properties)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s]*@")
_KEY_SECRET = re.compile(r"(?i)\b((?:user-pw|password|passwd|pwd|pass|token|secret|key|auth)=)([^\s&!\"']+)")
_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def redact(text: str) -> str:
    """``text`` with credentials masked: ``rtsp://admin:***@cam/...``, ``user-pw=***``.

    Every camera source that reaches an event, a reply, the status, a metric label or a log line goes
    through here: a camera password must never leave the device.
    """
    return _KEY_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))


MAX_PIXELS = 16384  # width or height of any real camera frame


class Reconnect(Strict):
    initial_s: float = Field(0.5, ge=0.01, le=HOUR)
    max_s: float = Field(30.0, ge=0.01, le=HOUR)
    jitter: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if self.initial_s > self.max_s:
            raise ValueError(f"initial_s ({self.initial_s:g}) must not exceed max_s ({self.max_s:g})")
        return self


class CameraConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    source: str | int
    backend: Literal["auto", "ffmpeg", "v4l2", "gstreamer"] = "auto"
    rtsp_transport: Literal["auto", "tcp", "udp"] = Field(
        "auto", description="RTSP over TCP (through firewalls, no loss) or UDP (lower latency); FFmpeg backend"
    )
    hw_decode: Literal["off", "vaapi", "mfx", "jetson", "nvcodec"] = Field(
        "off",
        description="decode on the device's video hardware: vaapi or mfx (Intel, through OpenCV's FFmpeg), "
        "jetson (NVDEC through GStreamer's nvv4l2decoder), nvcodec (NVIDIA x86, GStreamer's nvcodec)",
    )
    loop: bool = False
    fps: float = Field(0.0, ge=0, le=1000, description="cap on frames taken per second; 0 = every frame")
    stride: int = Field(1, ge=1, le=10_000, description="take every n-th decoded frame")
    region: tuple[int, int, int, int] | None = Field(
        None, description="x, y, width, height cropped first (checked again against each stream's frame size)"
    )
    stall_timeout_s: float = Field(5.0, ge=0.1, le=HOUR)
    reconnect: Reconnect = Reconnect()
    paused: bool = False

    def public(self) -> dict[str, Any]:
        """The settings as JSON with the source's credentials masked (for replies and status)."""
        data = self.model_dump(mode="json")
        data["source"] = redact(str(self.source)) if isinstance(self.source, str) else self.source
        return data

    @field_validator("fps")
    @classmethod
    def _fps(cls, value: float) -> float:
        if 0 < value < 0.01:
            raise ValueError("fps must be 0 (every frame) or at least 0.01 (one frame every 100 s)")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if value is not None and (value[0] < 0 or value[1] < 0 or value[2] <= 0 or value[3] <= 0):
            raise ValueError("region is x, y, width, height with x, y >= 0 and width, height > 0")
        if value is not None and (value[0] + value[2] > MAX_PIXELS or value[1] + value[3] > MAX_PIXELS):
            raise ValueError(f"region must lie within {MAX_PIXELS} x {MAX_PIXELS} pixels")
        return value


class EngineConfig(Strict):
    bundle: Path = Field(description="the first engine; installed into state_dir, made active when it changes")
    trusted_keys: list[Path] = Field(default_factory=list)
    require_signature: bool = True
    threads: int | None = Field(None, ge=1, le=256)
    onnxruntime_tensorrt: bool = Field(False, description="run a cuda ONNX bundle through ORT's TensorRT provider")
    inbox: Path | None = Field(None, description="folder watched for bundle archives or folders to deploy")
    batch_timeout_s: float = Field(10.0, ge=0.1, le=HOUR, description="a batch running longer kills the engine worker")
    load_timeout_s: float = Field(300.0, ge=1, le=4 * HOUR, description="an engine loading longer is refused")
    tensorrt_build_timeout_s: float = Field(
        1800.0,
        ge=1,
        le=4 * HOUR,
        description="the same for ONNX Runtime's TensorRT provider, whose first start "
        "builds TensorRT engines (minutes on a Jetson; cached afterwards)",
    )
    worker_max_rss_mib: float | None = Field(
        None, gt=0, le=2**20, description="a worker growing past this is restarted (on Jetson its GPU memory counts)"
    )
    max_bundle_mib: float = Field(2048, gt=0, le=2**20, description="cap on a downloaded or unpacked bundle")
    download_ca: Path | None = Field(None, description="CA of a private HTTPS bundle store (default: system CAs)")
    keep_installed: int = Field(4, ge=2, le=100, description="installed bundles kept (active, previous and newest)")

    @model_validator(mode="after")
    def _keys(self) -> EngineConfig:
        if self.require_signature and not self.trusted_keys:
            raise ValueError("trusted_keys must list at least one public key while require_signature is true")
        return self


def _removed(data: Any, section: str, removed: dict[str, str]) -> Any:
    """Refuse settings an earlier release had, saying what replaced them (a bare 'extra input' would not)."""
    if isinstance(data, dict):
        for key, instead in removed.items():
            if key in data:
                raise ValueError(f"{key} was removed from {section}: {instead}")
    return data


class SwapConfig(Strict):
    """The checks a candidate engine passes beside the serving one before it goes live."""

    latency_runs: int = Field(
        30, ge=3, le=1000, description="at most this many back-to-back pairs of timed runs (fewer once decided)"
    )
    max_latency_ratio: float = Field(
        2.0, ge=1, le=1e6, description="candidate median latency / the serving engine's, timed here, together"
    )
    slack_ms: float = Field(2.0, ge=0, le=60_000, description="added to that limit: tiny engines time noisily")
    min_free_mib: float = Field(
        256.0,
        ge=0,
        le=2**20,
        description="memory that must stay available with a candidate loaded beside the serving engine",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        instead = "the candidate is compared with the serving engine timed here (swap.max_latency_ratio)"
        return _removed(data, "swap", {"max_passport_ratio": instead, "max_current_ratio": instead})


class CanaryConfig(Strict):
    """After a swap: judged by sequential tests (agent.lifecycle.canary), committed when the window passes."""

    window_s: float = Field(300.0, gt=0, le=7 * DAY)
    min_frames: int = Field(200, ge=0, le=10**9, description="the window also lasts until this many frames were served")
    alpha: float = Field(
        0.01, gt=0, le=0.5, description="probability that a good bundle is reverted by chance, per canary"
    )
    shadow_every: int = Field(4, ge=1, le=10**6, description="every n-th batch also runs on the previous engine")
    latency_every: int = Field(
        4, ge=1, le=10**6, description="every n-th batch is served by the previous engine, timed beside the new one"
    )
    block_s: float = Field(
        2.0, gt=0, le=HOUR, description="shortest unit of agreement evidence; longer when disagreements come in runs"
    )
    max_block_s: float = Field(60.0, gt=0, le=DAY, description="longest unit of agreement evidence")
    agreement_tolerance: float = Field(
        0.02, ge=0, le=1, description="agreement below the builds' expectation for the pair that is still accepted"
    )
    confidence_tolerance: float = Field(
        0.05, ge=0, le=1, description="without an expectation: shift in mean top-1 confidence accepted"
    )
    class_mix_tolerance: float = Field(
        0.1, ge=0, le=1, description="without an expectation: extra class-mix distance accepted"
    )
    latency_quantile: float = Field(0.9, ge=0.5, le=0.99, description="the tail latency compared")
    max_latency_ratio: float = Field(
        1.2, ge=1, le=1e6, description="that tail vs the previous engine's, timed together on live batches"
    )
    latency_slack_ms: float = Field(
        2.0, ge=0, le=60_000, description="added to that limit: millisecond tails are noise"
    )
    max_errors: int = Field(
        0, ge=0, le=10**9, description="failed batches (errors, timeouts, worker crashes) tolerated"
    )
    max_restarts: int = Field(2, ge=0, le=1000, description="agent restarts during the window before it reverts")
    golden_recheck: bool = True

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _removed(
            data,
            "canary",
            {
                "min_agreement": "agreement is tested against what the builds expect of the pair, less "
                "canary.agreement_tolerance",
                "min_shadow_frames": "the sequential tests need no minimum; canary.alpha sets their error rate",
                "min_latency_pairs": "the sequential tests need no minimum; canary.alpha sets their error rate",
            },
        )

    @model_validator(mode="after")
    def _blocks(self) -> CanaryConfig:
        if self.block_s > self.max_block_s:
            raise ValueError(f"block_s ({self.block_s:g}) must not exceed max_block_s ({self.max_block_s:g})")
        return self


class BatchingConfig(Strict):
    latency_budget_ms: float = Field(100.0, ge=1, le=60_000, description="frame-to-result p99 target")
    mode: Literal["adaptive", "fixed"] = "adaptive"
    fixed_batch: int = Field(1, ge=1, le=1024)
    max_batch: int | None = Field(None, ge=1, le=1024, description="default: the bundle's maximum")


class ResultsConfig(Strict):
    jsonl: Path | None = None
    top_k: int = Field(3, ge=1, le=100)


class TLSConfig(Strict):
    ca: Path
    cert: Path | None = None
    key: Path | None = None


class CommandAuth(Strict):
    """Ed25519-signed commands: each carries ts, nonce and sig (see agent.control.command_auth)."""

    keys: list[Path] = Field(min_length=1, description="public keys of operators allowed to command")
    max_age_s: float = Field(300.0, gt=0, le=DAY, description="clock skew and delay allowed for 'ts'")


class MQTTConfig(Strict):
    host: str
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = Field("edgevit", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    username: str | None = None
    password: str | None = None
    tls: TLSConfig | None = None
    keepalive_s: int = Field(30, ge=5, le=65535)
    outbox_max_results: int = Field(
        100_000, ge=1, le=10**8, description="results kept on disk while the broker is away"
    )
    signed_commands: CommandAuth | None = Field(None, description="require signed commands")


class MetricsConfig(Strict):
    prometheus_port: int = Field(0, ge=0, le=65535, description="0 = no Prometheus endpoint")
    publish_every_s: float = Field(10.0, ge=0.1, le=HOUR)
    print_every_s: float = Field(
        0.0, ge=0, le=HOUR, description="standalone: print a live line every n seconds; 0 = never"
    )


class AgentConfig(Strict):
    device: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    labels: dict[str, str] = Field(
        default_factory=dict, description="site, hardware, camera group...: what fleet rollouts select on"
    )
    state_dir: Path = Field(Path("/var/lib/edgevit"), description="installed engines, their state, the outbox")
    engine: EngineConfig
    swap: SwapConfig = SwapConfig()
    canary: CanaryConfig = CanaryConfig()
    cameras: list[CameraConfig] = Field(min_length=1)
    batching: BatchingConfig = BatchingConfig()
    results: ResultsConfig = ResultsConfig()
    mqtt: MQTTConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    exit_when_sources_end: bool = Field(False, description="stop once every non-looping file has ended")

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.fullmatch(r"[a-z0-9_-]{1,32}", key) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
                raise ValueError(f"label {key}={value!r}: keys [a-z0-9_-]{{1,32}}, values [A-Za-z0-9_.:-]{{1,64}}")
        if len(labels) > 16:
            raise ValueError("at most 16 labels")
        return labels

    @model_validator(mode="after")
    def _unique_cameras(self) -> AgentConfig:
        names = [c.name for c in self.cameras]
        if len(names) != len(set(names)):
            raise ValueError(f"camera names must be unique, got {names}")
        return self


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_config(data: object, origin: str = "config") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{origin} is invalid:\n  " + "\n  ".join(lines)) from None


def load_config(path: Path) -> AgentConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    config = parse_config(data, str(path))
    base = path.parent  # relative paths in the file are relative to the file
    engine = config.engine.model_copy(
        update={
            "bundle": base / config.engine.bundle,
            "trusted_keys": [base / k for k in config.engine.trusted_keys],
            "inbox": config.engine.inbox and base / config.engine.inbox,
            "download_ca": config.engine.download_ca and base / config.engine.download_ca,
        }
    )
    mqtt = config.mqtt
    if mqtt and mqtt.signed_commands:
        auth = mqtt.signed_commands.model_copy(update={"keys": [base / k for k in mqtt.signed_commands.keys]})
        mqtt = mqtt.model_copy(update={"signed_commands": auth})
    jsonl = config.results.jsonl and base / config.results.jsonl
    cameras = [
        c.model_copy(update={"source": substitute_secrets(_resolve_source(c.source, base), f"cameras.{i}.source")})
        for i, c in enumerate(config.cameras)
    ]
    return config.model_copy(
        update={
            "engine": engine,
            "cameras": cameras,
            "results": config.results.model_copy(update={"jsonl": jsonl}),
            "state_dir": base / config.state_dir,
            "mqtt": mqtt,
        }
    )


def substitute_secrets(source: str | int, key: str) -> str | int:
    """``${NAME}`` in a camera source from the environment, ``${file:PATH}`` from a file (its first line).

    Credentials then need not sit in the YAML (``rtsp://admin:${DOOR_PASSWORD}@10.0.0.5/stream``, with the
    variable from a systemd ``EnvironmentFile=`` or a credentials file readable by the agent alone).
    """
    if not isinstance(source, str):
        return source

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("file:"):
            try:
                return Path(name[5:]).read_text().splitlines()[0].strip()
            except (OSError, IndexError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{key}: cannot read the secret file {name[5:]}: {exc}") from None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
            raise ConfigError(f"{key}: ${{{name[:40]}}} is not ${{NAME}} or ${{file:PATH}}")
        if name not in os.environ:
            raise ConfigError(f"{key}: the environment variable {name} is not set")
        return os.environ[name]

    return _REFERENCE.sub(value, source)


def _resolve_source(source: str | int, base: Path) -> str | int:
    """A relative file path is relative to the config file; URLs, devices and pipelines are left alone."""
    if isinstance(source, int) or "://" in source or "!" in source or Path(source).is_absolute():
        return source
    return str(base / source) if (base / source).exists() else source
