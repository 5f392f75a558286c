"""Configuration: TOML file + environment + flags → one frozen :class:`Config`.

Like uvicorn's, loading is split from the values: :func:`load_config` reads and validates every source
and returns an immutable object; an error names the key and what is wrong with it. Precedence, highest
first: command-line flags, ``AUTOSAVED_*`` environment variables, the TOML file, embedded defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError

# The tables and the parsers live in the leaf settings module; re-exported here, where callers look.
from .settings import (
    COMPRESSION_MODES,
    PREEMPTION_PROVIDERS,
    PolicySettings,
    PreemptionSettings,
    QuotaSettings,
    RemoteSettings,
    Table,
    ThrottleSettings,
    choice,
    count,
    duration,
    is_auto,
    is_off,
    keys,
    parse_duration,
    parse_size,
    parse_table,
    reject_unknown_keys,
    restart_keys,
    setting,
    size,
)

__all__ = [
    "COMPRESSION_MODES", "PREEMPTION_PROVIDERS", "RESTART_KEYS", "Config", "PolicySettings", "PreemptionSettings",
    "QuotaSettings", "RemoteSettings", "ThrottleSettings", "default_socket_path", "default_state_dir",
    "discover_address", "discover_state_dir", "load_config", "parse_config_table", "parse_duration", "parse_size",
    "read_toml", "reject_unknown_keys",
]

SYSTEM_CONFIG: Final = Path("/etc/autosaved/autosaved.toml")
SYSTEM_STATE_DIR: Final = Path("/var/lib/autosaved")
SYSTEM_SOCKET: Final = Path("/run/autosaved/autosaved.sock")
SOCKET_NAME: Final = "autosaved.sock"


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


def _address(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(ipc|tcp)://.+", value):
        raise ConfigError(f"{key}: expected an ipc:// or tcp:// address, got {value!r}")
    path = value.removeprefix("ipc://")
    if value.startswith("ipc://") and len(os.fsencode(path)) > 107:
        raise ConfigError(f"{key}: the socket path {path!r} is longer than the 107 bytes a Unix socket allows")
    return value


def _state_dir(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a path string")
    return Path(value).expanduser()


def _log_level(value: Any, key: str) -> str:
    level = str(value).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{key}: expected debug, info, warning or error, got {value!r}")
    return level


def _group(value: Any, key: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "" or (
            isinstance(value, int) and value < 0):
        raise ConfigError(f"{key}: expected a group name or gid, got {value!r}")
    return value


def _host_port(value: Any, key: str) -> tuple[str, int] | None:
    if is_off(value):
        return None
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{key}: expected \"host:port\" like \"127.0.0.1:9464\" or \"off\", got {value!r}")
    return match.group(1), int(match.group(2))


def _storage_format(value: Any, key: str) -> int | None:
    if is_auto(value):
        return None
    if value not in (1, 2) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected 1, 2 or \"auto\", got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Config(Table):
    """The daemon's whole configuration: the TOML's top level. A field made by ``setting`` is a TOML key;
    ``restart=True`` marks the keys a running daemon cannot change (bound to its socket, its files or its
    listeners; write_speed is used once, at start, in place of the probe)."""

    address: str = field(metadata={"toml": True, "parse": _address, "restart": True})
    state_dir: Path = field(metadata={"toml": True, "parse": _state_dir, "restart": True})
    config_file: Path | None = None
    policy: PolicySettings = setting(factory=PolicySettings)
    # False once the file sets policy.dirty_bytes; while True the daemon derives it from the measured
    # write speed and the shutdown deadline.
    dirty_bytes_auto: bool = True
    throttle: ThrottleSettings = setting(factory=ThrottleSettings)
    preemption: PreemptionSettings = setting(factory=PreemptionSettings)
    # The largest request the daemon receives (checked per frame by libzmq before it is received whole, and
    # over all frames). States bigger than this go through shared memory (the fd socket), not inline.
    max_message_bytes: int = setting(256 * 1024**2, size(), restart=True)
    # Connections open at once on each listener (the ipc socket, the fd socket, the metrics port), all users
    # together; lowered at start where the fd limit is too small (see daemon/fdlimit.py).
    max_connections: int = setting(1024, count(1), restart=True)
    shutdown_deadline: float = setting(25.0, duration())
    # The disk's write speed in bytes/s for planning (derived dirty_bytes, the deadline flush); None ("auto"):
    # probed at a disk's first start and remembered (daemon/speedmemo.py). A set value skips both.
    write_speed: int | None = setting(None, size(auto=True, positive=True), restart=True)
    chunk_size: int = setting(8 * 1024**2, size(low=64 * 1024, high=1024**3))
    log_level: str = setting("info", _log_level)
    # "text" (key=value lines) or "json" (one object per line, logfmt.py); chosen at start.
    log_format: str = setting("text", choice(("text", "json")), restart=True)
    # Group allowed into the socket directory besides the daemon's user (name or gid); None: nobody else
    # (a socket directory the daemon creates is 0700).
    socket_group: str | int | None = setting(None, _group, restart=True)
    # host:port of the Prometheus text endpoint; None: off.
    metrics_address: tuple[str, int] | None = setting(None, _host_port, restart=True)
    quota: QuotaSettings = setting(factory=QuotaSettings)
    # Shared-memory slots the daemon maps for all clients together; None: half of physical memory.
    max_shm_bytes: int | None = setting(None, size(), restart=True)
    remote: RemoteSettings = setting(factory=RemoteSettings, restart=True)
    # Memory for the jobs' state trees, all jobs together (daemon/statecache.py); None ("auto"): an eighth
    # of the host's memory, at least 64 MiB.
    memory_limit: int | None = setting(None, size(auto=True, low=1024**2, high=1 << 50))
    # The store format new versions are written in (storage/paged.py); None ("auto"): the newest, 2.
    storage_format: int | None = setting(None, _storage_format, restart=True)

    def write_format(self) -> int:
        return self.storage_format if self.storage_format is not None else 2

    def socket_path(self) -> Path | None:
        return Path(self.address.removeprefix("ipc://")) if self.address.startswith("ipc://") else None


_TOP_KEYS: Final = set(keys(Config))
RESTART_KEYS: Final[tuple[str, ...]] = restart_keys(Config)


def parse_config_table(raw: Mapping[str, Any], base: Config) -> Config:
    """Apply a TOML table to ``base``; every problem names its key."""
    dirty_bytes_auto = base.dirty_bytes_auto
    if isinstance(raw.get("policy"), Mapping):
        policy = dict(raw["policy"])
        if is_auto(policy.get("dirty_bytes")):
            del policy["dirty_bytes"]  # the daemon derives it from the measured write speed
        elif "dirty_bytes" in policy:
            dirty_bytes_auto = False
        raw = {**raw, "policy": policy}
    return replace(parse_table(raw, base, ""), dirty_bytes_auto=dirty_bytes_auto)


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
        cfg = replace(cfg, address=_address(chosen_address, "--address" if address else "AUTOSAVED_ADDRESS"))
    return replace(cfg, state_dir=cfg.state_dir.expanduser().absolute())
