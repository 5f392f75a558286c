"""Configuration: TOML file + environment + flags → one frozen :class:`Config`.

Like uvicorn's, loading is split from the values: :func:`load_config` reads and validates every source
and returns an immutable object; an error names the key and what is wrong with it. Precedence, highest
first: command-line flags, ``AUTOSAVED_*`` environment variables, the TOML file, embedded defaults.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError
from .storage.compress import COMPRESSION_MODES

SYSTEM_CONFIG: Final = Path("/etc/autosaved/autosaved.toml")
SYSTEM_STATE_DIR: Final = Path("/var/lib/autosaved")
SYSTEM_SOCKET: Final = Path("/run/autosaved/autosaved.sock")
SOCKET_NAME: Final = "autosaved.sock"

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_UNITS_B = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_OFF = ("off", "none", "never", "")


def parse_duration(value: Any, key: str, *, allow_off: bool = False) -> float | None:
    """Seconds from a number or a string like ``"500ms"``, ``"30s"``, ``"10m"``, ``"1h30m"``."""
    if allow_off and (value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF)):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 30, \"30s\" or \"10m\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)", value.strip().lower())
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)|\s", "", value.strip().lower()):
            try:
                seconds = float(value)
            except ValueError:
                raise ConfigError(
                    f"{key}: {value!r} is not a duration (use seconds or units ms, s, m, h, d: \"10m\")"
                ) from None
        else:
            seconds = sum(float(n) * _UNITS_S[u] for n, u in parts)
    else:
        raise ConfigError(f"{key}: expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{key}: duration must be a non-negative finite number, got {value!r}")
    return seconds


def parse_size(value: Any, key: str, *, allow_off: bool = False) -> int | None:
    """Bytes from an int or a string like ``"4GiB"``, ``"512MB"``, ``"64k"``."""
    if allow_off and (value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF)):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 1048576 or \"4GiB\", got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS_B:
            raise ConfigError(f"{key}: {value!r} is not a size (use bytes or units like \"512MiB\", \"4GiB\", \"1GB\")")
        size = int(float(match.group(1)) * _UNITS_B[match.group(2).lower()])
    else:
        raise ConfigError(f"{key}: expected a size, got {type(value).__name__}")
    if size < 0:
        raise ConfigError(f"{key}: size must not be negative, got {value!r}")
    return size


def _parse_count(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer ≥ {minimum}, got {value!r}")
    return value


def reject_unknown_keys(raw: Mapping[str, Any], table: Any, where: str) -> None:
    """A typo in a config table is an error that names it, never a silently ignored key."""
    known = {f.name for f in fields(table)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class PolicySettings:
    """When to save a job. ``None`` turns a rule off. Durations in seconds, sizes in bytes."""

    interval: float | None = 600.0
    idle: float | None = 30.0
    dirty_bytes: int | None = 1024**3
    min_gap: float = 10.0
    keep_last: int = 3
    # Besides the newest keep_last: keep the newest version of every period this long (None: off).
    keep_every: float | None = None
    # How new chunks are stored: one of storage.compress.COMPRESSION_MODES ("auto": all but float data).
    compression: str = "auto"

    @classmethod
    def parse(
        cls, raw: Mapping[str, Any], *, base: PolicySettings | None = None, where: str = "policy"
    ) -> PolicySettings:
        """Validate a (partial) policy table on top of ``base``; unknown keys are an error."""
        settings = base or cls()
        reject_unknown_keys(raw, cls, where)
        changes: dict[str, Any] = {}
        for key, value in raw.items():
            name = f"{where}.{key}"
            if key in ("interval", "idle", "keep_every"):
                changes[key] = parse_duration(value, name, allow_off=True)
            elif key == "min_gap":
                changes[key] = parse_duration(value, name)
            elif key == "dirty_bytes":
                changes[key] = parse_size(value, name, allow_off=True)
            elif key == "keep_last":
                changes[key] = _parse_count(value, name, 1)
            elif key == "compression":
                if value not in COMPRESSION_MODES:
                    raise ConfigError(f"{name}: expected one of {', '.join(map(repr, COMPRESSION_MODES))}, "
                                      f"got {value!r}")
                changes[key] = value
        return replace(settings, **changes)

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class QuotaSettings:
    """Per-user limits (root is exempt). ``None`` means no limit."""

    max_bytes: int | None = None
    max_jobs: int | None = None
    # Shared-memory slots one user may have mapped at once (root included); None: only the global cap.
    max_shm_bytes: int | None = None
    # Requests one user may have in flight at once (root included): past it, an error reply "quota".
    max_requests: int = 256
    # Connections one user may have open on each listener (the ipc socket, the fd socket), root included:
    # past it, a new connection is refused (issue 19: idle connections must not use up the daemon's fds).
    max_connections: int = 32
    # Bytes of replies and restore buffers one user may leave unread in the daemon (root included); past
    # it a reply becomes a "quota" error. None: no limit.
    max_reply_bytes: int | None = 512 * 1024**2

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "quota") -> QuotaSettings:
        reject_unknown_keys(raw, cls, where)
        max_jobs = raw.get("max_jobs")
        if max_jobs is not None and not (isinstance(max_jobs, str) and max_jobs.strip().lower() in _OFF):
            max_jobs = _parse_count(max_jobs, f"{where}.max_jobs", 1)
        else:
            max_jobs = None
        max_requests = _parse_count(raw["max_requests"], f"{where}.max_requests", 1) if "max_requests" in raw \
            else cls.max_requests
        max_connections = _parse_count(raw["max_connections"], f"{where}.max_connections", 1) \
            if "max_connections" in raw else cls.max_connections
        return cls(max_bytes=parse_size(raw.get("max_bytes"), f"{where}.max_bytes", allow_off=True),
                   max_jobs=max_jobs,
                   max_shm_bytes=parse_size(raw.get("max_shm_bytes"), f"{where}.max_shm_bytes", allow_off=True),
                   max_requests=max_requests, max_connections=max_connections,
                   max_reply_bytes=parse_size(raw["max_reply_bytes"], f"{where}.max_reply_bytes", allow_off=True)
                   if "max_reply_bytes" in raw else cls.max_reply_bytes)


@dataclass(frozen=True)
class ThrottleSettings:
    """How fast background saves may write (see :mod:`autosaved.throttle`). Rates in bytes/s."""

    enabled: bool = True
    max_write_rate: int | None = None  # a hard cap, the shutdown flush included; None: no cap
    min_write_rate: int = 16 * 1024**2
    sample_interval: float = 0.5

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, base: ThrottleSettings | None = None,
              where: str = "throttle") -> ThrottleSettings:
        settings = base or cls()
        reject_unknown_keys(raw, cls, where)
        changes: dict[str, Any] = {}
        for key, value in raw.items():
            name = f"{where}.{key}"
            if key == "enabled":
                if not isinstance(value, bool):
                    raise ConfigError(f"{name}: expected true or false, got {value!r}")
                changes[key] = value
            elif key == "max_write_rate":
                changes[key] = _positive(parse_size(value, name, allow_off=True), name)
            elif key == "min_write_rate":
                changes[key] = _positive(parse_size(value, name), name)
            elif key == "sample_interval":
                seconds = parse_duration(value, name)
                if seconds is None or not 0.05 <= seconds <= 60:
                    raise ConfigError(f"{name}: must be between 50ms and 60s, got {value!r}")
                changes[key] = seconds
        out = replace(settings, **changes)
        if out.max_write_rate is not None and out.max_write_rate < out.min_write_rate:
            raise ConfigError(f"{where}.max_write_rate ({out.max_write_rate}) is below {where}.min_write_rate "
                              f"({out.min_write_rate})")
        return out


PREEMPTION_PROVIDERS: Final = ("off", "aws", "gcp", "azure")


@dataclass(frozen=True)
class PreemptionSettings:
    """Watch the cloud's instance metadata for a spot/preemption notice (see :mod:`autosaved.daemon.preempt`)."""

    provider: str = "off"
    endpoint: str | None = None  # base URL of the metadata service; None: the provider's well-known one
    poll_interval: float = 2.0

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, base: PreemptionSettings | None = None,
              where: str = "preemption") -> PreemptionSettings:
        settings = base or cls()
        reject_unknown_keys(raw, cls, where)
        changes: dict[str, Any] = {}
        for key, value in raw.items():
            name = f"{where}.{key}"
            if key == "provider":
                if not isinstance(value, str) or value.lower() not in PREEMPTION_PROVIDERS:
                    raise ConfigError(f"{name}: expected one of {', '.join(PREEMPTION_PROVIDERS)}, got {value!r}")
                changes[key] = value.lower()
            elif key == "endpoint" and value == "":
                changes[key] = None
            elif key == "endpoint":
                if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
                    raise ConfigError(f"{name}: expected an http:// URL like \"http://169.254.169.254\", "
                                      f"got {value!r}")
                changes[key] = value.rstrip("/")
            elif key == "poll_interval":
                seconds = parse_duration(value, name)
                if seconds is None or not 0.05 <= seconds <= 60:
                    raise ConfigError(f"{name}: must be between 50ms and 60s, got {value!r}")
                changes[key] = seconds
        return replace(settings, **changes)


@dataclass(frozen=True)
class RemoteSettings:
    """Replication to an S3-compatible object store (see :mod:`autosaved.daemon.replicator`); off while
    ``url`` is None. Credentials come from the standard AWS environment variables or ``credentials_file``
    (an AWS shared-credentials file), never from the TOML itself."""

    url: str | None = None
    endpoint: str | None = None  # for non-AWS stores; http:// is allowed (local servers)
    region: str | None = None
    credentials_file: Path | None = None
    upload_rate: int | None = None  # bytes/s cap on uploads; None: no cap
    keep_last: int | None = None  # None: as [policy] keep_last
    keep_every: float | None = None
    keep_every_set: bool = False  # False: keep_every is [policy]'s
    lease_ttl: float = 30.0
    gc_grace: float = 3600.0
    timeout: float = 30.0

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "remote") -> RemoteSettings:
        for key in raw:
            if "secret" in key or "access_key" in key or "token" in key:
                raise ConfigError(f"{where}.{key}: credentials never go in the config file; use the AWS "
                                  "environment variables or credentials_file")
        known = {f.name for f in fields(cls)} - {"keep_every_set"}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        changes: dict[str, Any] = {}
        url = raw.get("url")
        if url is not None and not (isinstance(url, str) and url.strip().lower() in _OFF):
            from .storage.remote import parse_url

            parse_url(url, f"{where}.url")
            changes["url"] = url.rstrip("/")
        for key in ("endpoint", "region"):
            value = raw.get(key)
            if value in (None, ""):
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
            if key == "endpoint" and not re.match(r"^https?://[^/\s]+", value):
                raise ConfigError(f"{where}.endpoint: expected an http(s):// URL like \"http://127.0.0.1:8333\", "
                                  f"got {value!r}")
            changes[key] = value.rstrip("/")
        if raw.get("credentials_file") not in (None, ""):
            if not isinstance(raw["credentials_file"], str):
                raise ConfigError(f"{where}.credentials_file: expected a path string")
            changes["credentials_file"] = Path(raw["credentials_file"]).expanduser()
        if "upload_rate" in raw:
            changes["upload_rate"] = _positive(parse_size(raw["upload_rate"], f"{where}.upload_rate", allow_off=True),
                                               f"{where}.upload_rate")
        if "keep_last" in raw:
            changes["keep_last"] = _parse_count(raw["keep_last"], f"{where}.keep_last", 1)
        if "keep_every" in raw:
            changes["keep_every"] = parse_duration(raw["keep_every"], f"{where}.keep_every", allow_off=True)
            changes["keep_every_set"] = True
        for key, low in (("lease_ttl", 0.5), ("gc_grace", 0.0), ("timeout", 0.5)):
            if key in raw:
                seconds = parse_duration(raw[key], f"{where}.{key}")
                if seconds is None or seconds < low:
                    raise ConfigError(f"{where}.{key}: must be at least {low:g}s, got {raw[key]!r}")
                changes[key] = seconds
        return cls(**changes)


def _positive(value: int | None, key: str) -> int | None:
    if value == 0:
        raise ConfigError(f"{key}: a rate must be above zero (use \"off\" for no cap)")
    return value


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    if _is_root():
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "autosaved"


def default_socket_path(state_dir: Path | None = None) -> Path:
    """Where this user's daemon listens: /run/autosaved for root, else $XDG_RUNTIME_DIR/autosaved, else a
    0700 ``run`` dir inside the state dir (created by the daemon)."""
    if _is_root():
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "autosaved" / SOCKET_NAME
    return (state_dir or default_state_dir()) / "run" / SOCKET_NAME


def discover_address() -> str:
    """The address a client uses when none is given: $AUTOSAVED_ADDRESS, else this user's own daemon,
    else the host's system daemon if its socket exists, else this user's default (to name in errors)."""
    env = os.environ.get("AUTOSAVED_ADDRESS")
    if env:
        return env
    own = default_socket_path()
    if own.exists() or not SYSTEM_SOCKET.exists():
        return f"ipc://{own}"
    return f"ipc://{SYSTEM_SOCKET}"


def discover_state_dir() -> Path:
    env = os.environ.get("AUTOSAVED_STATE_DIR")
    return Path(env) if env else default_state_dir()


@dataclass(frozen=True)
class Config:
    address: str
    state_dir: Path
    config_file: Path | None = None
    policy: PolicySettings = field(default_factory=PolicySettings)
    # False once the file sets policy.dirty_bytes; while True the daemon derives it from the measured
    # write speed and the shutdown deadline.
    dirty_bytes_auto: bool = True
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)
    preemption: PreemptionSettings = field(default_factory=PreemptionSettings)
    # The largest request the daemon receives (checked per frame by libzmq before it is received whole, and
    # over all frames). States bigger than this go through shared memory (the fd socket), not inline.
    max_message_bytes: int = 256 * 1024**2
    # Connections open at once on each listener (the ipc socket, the fd socket, the metrics port), all users
    # together; lowered at start where the fd limit is too small (see daemon/fdlimit.py).
    max_connections: int = 1024
    shutdown_deadline: float = 25.0
    # The disk's write speed in bytes/s for planning (derived dirty_bytes, the deadline flush); None ("auto"):
    # measured by a 32 MiB probe at start. A set value skips the probe (tests, or a known disk).
    write_speed: int | None = None
    chunk_size: int = 8 * 1024**2
    log_level: str = "info"
    # Group allowed into the socket directory besides the daemon's user (name or gid); None: the daemon's group.
    socket_group: str | int | None = None
    # host:port of the Prometheus text endpoint; None: off.
    metrics_address: tuple[str, int] | None = None
    quota: QuotaSettings = field(default_factory=lambda: QuotaSettings())
    # Shared-memory slots the daemon maps for all clients together; None: half of physical memory.
    max_shm_bytes: int | None = None
    remote: RemoteSettings = field(default_factory=lambda: RemoteSettings())

    def socket_path(self) -> Path | None:
        return Path(self.address.removeprefix("ipc://")) if self.address.startswith("ipc://") else None


_TOP_KEYS = {"address", "state_dir", "policy", "max_message_bytes", "shutdown_deadline", "chunk_size", "log_level",
             "socket_group", "metrics_address", "quota", "max_shm_bytes", "throttle", "preemption", "write_speed",
             "max_connections", "remote"}
# Keys a running daemon cannot change: they are bound to its socket, its files or its listeners (and
# write_speed is used once, at start, in place of the probe).
RESTART_KEYS: Final[tuple[str, ...]] = ("address", "state_dir", "max_message_bytes", "socket_group", "metrics_address",
                                        "max_shm_bytes", "write_speed", "max_connections", "remote")


def parse_config_table(raw: Mapping[str, Any], base: Config) -> Config:
    """Apply a TOML table to ``base``; every problem names its key."""
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    changes: dict[str, Any] = {}
    if "address" in raw:
        changes["address"] = _parse_address(raw["address"], "address")
    if "state_dir" in raw:
        if not isinstance(raw["state_dir"], str) or not raw["state_dir"]:
            raise ConfigError("state_dir: expected a path string")
        changes["state_dir"] = Path(raw["state_dir"]).expanduser()
    if "policy" in raw:
        if not isinstance(raw["policy"], Mapping):
            raise ConfigError("policy: expected a table ([policy])")
        policy = dict(raw["policy"])
        auto = policy.get("dirty_bytes")
        if isinstance(auto, str) and auto.strip().lower() == "auto":
            del policy["dirty_bytes"]  # the daemon derives it from the measured write speed
        elif "dirty_bytes" in policy:
            changes["dirty_bytes_auto"] = False
        changes["policy"] = PolicySettings.parse(policy, base=base.policy)
    for table, settings_cls in (("throttle", ThrottleSettings), ("preemption", PreemptionSettings)):
        if table in raw:
            if not isinstance(raw[table], Mapping):
                raise ConfigError(f"{table}: expected a table ([{table}])")
            changes[table] = settings_cls.parse(raw[table], base=getattr(base, table))
    if "max_message_bytes" in raw:
        changes["max_message_bytes"] = parse_size(raw["max_message_bytes"], "max_message_bytes")
    if "shutdown_deadline" in raw:
        changes["shutdown_deadline"] = parse_duration(raw["shutdown_deadline"], "shutdown_deadline")
    if "write_speed" in raw:
        auto = isinstance(raw["write_speed"], str) and raw["write_speed"].strip().lower() == "auto"
        changes["write_speed"] = None if auto else _positive(parse_size(raw["write_speed"], "write_speed"),
                                                             "write_speed")
    if "chunk_size" in raw:
        size = parse_size(raw["chunk_size"], "chunk_size")
        if size is None or not 64 * 1024 <= size <= 1024**3:
            raise ConfigError("chunk_size: must be between 64KiB and 1GiB")
        changes["chunk_size"] = size
    if "max_shm_bytes" in raw:
        changes["max_shm_bytes"] = parse_size(raw["max_shm_bytes"], "max_shm_bytes")
    if "max_connections" in raw:
        changes["max_connections"] = _parse_count(raw["max_connections"], "max_connections", 1)
    if "log_level" in raw:
        level = str(raw["log_level"]).lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: expected debug, info, warning or error, got {raw['log_level']!r}")
        changes["log_level"] = level
    if "socket_group" in raw:
        group = raw["socket_group"]
        if isinstance(group, bool) or not isinstance(group, str | int) or group == "" or (
                isinstance(group, int) and group < 0):
            raise ConfigError(f"socket_group: expected a group name or gid, got {group!r}")
        changes["socket_group"] = group
    if "metrics_address" in raw:
        changes["metrics_address"] = _parse_host_port(raw["metrics_address"], "metrics_address")
    if "quota" in raw:
        if not isinstance(raw["quota"], Mapping):
            raise ConfigError("quota: expected a table ([quota])")
        changes["quota"] = QuotaSettings.parse(raw["quota"])
    if "remote" in raw:
        if not isinstance(raw["remote"], Mapping):
            raise ConfigError("remote: expected a table ([remote])")
        changes["remote"] = RemoteSettings.parse(raw["remote"])
    return replace(base, **changes)


def _parse_host_port(value: Any, key: str) -> tuple[str, int] | None:
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{key}: expected \"host:port\" like \"127.0.0.1:9464\" or \"off\", got {value!r}")
    return match.group(1), int(match.group(2))


def _parse_address(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(ipc|tcp)://.+", value):
        raise ConfigError(f"{key}: expected an ipc:// or tcp:// address, got {value!r}")
    path = value.removeprefix("ipc://")
    if value.startswith("ipc://") and len(os.fsencode(path)) > 107:
        raise ConfigError(f"{key}: the socket path {path!r} is longer than the 107 bytes a Unix socket allows")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None


def load_config(
    *, config_file: str | Path | None = None, address: str | None = None, state_dir: str | Path | None = None
) -> Config:
    """Resolve the daemon's configuration from flags (the arguments), environment, file and defaults."""
    env = os.environ
    file_arg = config_file or env.get("AUTOSAVED_CONFIG")
    path = Path(file_arg) if file_arg else (SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None)
    raw = read_toml(path) if path else {}

    chosen_state = state_dir or env.get("AUTOSAVED_STATE_DIR")
    base_state = Path(chosen_state) if chosen_state else default_state_dir()
    cfg = Config(address=f"ipc://{default_socket_path(base_state)}", state_dir=base_state, config_file=path)
    cfg = parse_config_table(raw, cfg)
    if chosen_state:
        cfg = replace(cfg, state_dir=Path(chosen_state))
        if "address" not in raw:
            cfg = replace(cfg, address=f"ipc://{default_socket_path(cfg.state_dir)}")
    chosen_address = address or env.get("AUTOSAVED_ADDRESS")
    if chosen_address:
        cfg = replace(cfg, address=_parse_address(chosen_address, "--address" if address else "AUTOSAVED_ADDRESS"))
    return replace(cfg, state_dir=cfg.state_dir.expanduser().absolute())
