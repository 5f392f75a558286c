"""The config file's tables, each field declared once: its name, parser, bounds, default and whether a
running daemon takes a new value on reload.

A field is a dataclass field made by :func:`setting`; :func:`parse_table` reads any such dataclass from a
TOML table on top of a base value, rejects unknown keys and names the key in every error. The parsers
(:func:`duration`, :func:`size`, :func:`count`, ...) carry the bounds, so a bound is written once and its
error message with it. A leaf module: it imports nothing of autosaved but the errors (a trainer's
``import autosaved`` reaches it through the client, and must not load the storage layer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import urlparse

from .errors import ConfigError

# A field's parser: (raw TOML value, the key's full name for errors) -> the value, or ConfigError.
Parser = Callable[[Any, str], Any]

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_UNITS_B = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_OFF = ("off", "none", "never", "")

COMPRESSION_MODES: Final = ("off", "zstd", "auto")
PREEMPTION_PROVIDERS: Final = ("off", "aws", "gcp", "azure")
_HTTP_URL = re.compile(r"^https?://[^/\s]+")


def is_off(value: Any) -> bool:
    """``"off"`` (or none, never, ""), false or absent: the value that turns an optional rule off."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF)


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def parse_duration(value: Any, key: str, *, allow_off: bool = False) -> float | None:
    """Seconds from a number or a string like ``"500ms"``, ``"30s"``, ``"10m"``, ``"1h30m"``."""
    if allow_off and is_off(value):
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
    if allow_off and is_off(value):
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


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if 0 < seconds < 0.1 else f"{seconds:g}s"


def _bytes_text(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


# --- parsers (each returns a Parser; bounds live here, once) ---

def duration(*, off: bool = False, off_value: float | None = None, low: float | None = None,
             high: float | None = None) -> Parser:
    """Seconds; with ``off``, an off value gives ``off_value``. ``low``/``high`` bound it (inclusive)."""
    def parse(value: Any, key: str) -> float | None:
        if off and is_off(value):
            return off_value
        seconds = parse_duration(value, key)
        assert seconds is not None
        if low is not None and high is not None and not low <= seconds <= high:
            raise ConfigError(f"{key}: must be between {_seconds_text(low)} and {_seconds_text(high)}, got {value!r}")
        if low is not None and seconds < low:
            raise ConfigError(f"{key}: must be at least {_seconds_text(low)}, got {value!r}")
        return seconds
    return parse


def size(*, off: bool = False, auto: bool = False, positive: bool = False, low: int | None = None,
         high: int | None = None) -> Parser:
    """Bytes; ``off``/``auto`` accept those words (both give None); ``positive`` refuses zero (a rate)."""
    def parse(value: Any, key: str) -> int | None:
        if (off and is_off(value)) or (auto and is_auto(value)):
            return None
        out = parse_size(value, key)
        assert out is not None
        if positive and out == 0:
            raise ConfigError(f"{key}: a rate must be above zero (use \"off\" for no cap)")
        if low is not None and high is not None and not low <= out <= high:
            raise ConfigError(f"{key}: must be between {_bytes_text(low)} and {_bytes_text(high)}, got {value!r}")
        return out
    return parse


def count(minimum: int, *, off: bool = False) -> Parser:
    """An integer ≥ ``minimum``; with ``off``, an off word gives None (no limit)."""
    def parse(value: Any, key: str) -> int | None:
        if off and is_off(value):
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: expected an integer ≥ {minimum}, got {value!r}")
        return value
    return parse


def fraction(*, off: bool = False) -> Parser:
    """A number of cores above 0 (``0.5``: half of one core); with ``off``, an off word gives None."""
    def parse(value: Any, key: str) -> float | None:
        if off and is_off(value):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1024:
            raise ConfigError(f"{key}: expected a number of cores above 0 like 0.5, got {value!r}")
        return float(value)
    return parse


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def choice(options: tuple[str, ...], *, fold_case: bool = False) -> Parser:
    def parse(value: Any, key: str) -> str:
        got = value.lower() if fold_case and isinstance(value, str) else value
        if got not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, options))}, got {value!r}")
        return str(got)
    return parse


def http_url(example: str) -> Parser:
    """An http(s) base URL (trailing slash dropped); "" gives None (the default)."""
    def parse(value: Any, key: str) -> str | None:
        if value == "":
            return None
        if not isinstance(value, str) or not _HTTP_URL.match(value):
            raise ConfigError(f"{key}: expected an http(s):// URL like \"{example}\", got {value!r}")
        return value.rstrip("/")
    return parse


def text(value: Any, key: str) -> str | None:
    """A string; "" gives None (the default)."""
    if value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value.rstrip("/")


def path(value: Any, key: str) -> Path | None:
    """A path (``~`` expanded); "" gives None (the default)."""
    if value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a path string")
    return Path(value).expanduser()


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str, key: str = "remote.url") -> Location:
    """``s3://bucket/optional/prefix`` → bucket and prefix; anything else is a clear error."""
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"{key}: expected an s3://bucket/prefix URL, got {url!r}")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"{key}: {url!r} has a query or fragment; use s3://bucket/prefix")
    prefix = parsed.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"{key}: {url!r} has an empty, '.' or '..' path segment")
    return Location(parsed.netloc, prefix)


def s3_url(value: Any, key: str) -> str | None:
    if is_off(value):
        return None
    parse_url(value, key)
    return str(value).rstrip("/")


# --- declaring fields and reading tables ---

def setting(default: Any = MISSING, parse: Parser | None = None, *, factory: Callable[[], Any] | None = None,
            restart: bool = False) -> Any:
    """A field of a settings table, read from the TOML key of its name: by ``parse``, or, for a field
    whose value is itself a :class:`Table` (``[policy]``), by that table's own fields. ``restart``: a
    running daemon keeps the value it started with (the key is bound to its socket, files or listeners)."""
    meta = {"toml": True, "parse": parse, "restart": restart}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def keys(table: Any) -> list[str]:
    """The TOML keys of a settings dataclass (its fields made by :func:`setting`)."""
    return [f.name for f in fields(table) if f.metadata.get("toml")]


def restart_keys(table: Any) -> tuple[str, ...]:
    """The keys a reload does not change (declared ``restart=True``)."""
    return tuple(f.name for f in fields(table) if f.metadata.get("restart"))


def reject_unknown_keys(raw: Mapping[str, Any], table: Any, where: str) -> None:
    """A typo in a config table is an error that names it, never a silently ignored key."""
    known = keys(table)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{_name(where, key)}: unknown key (known: {', '.join(sorted(known))})")


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class Table:
    """A settings table (a frozen dataclass whose fields are made by :func:`setting`)."""

    TABLE: ClassVar[str] = ""

    @classmethod
    def parse(cls: type[T], raw: Mapping[str, Any], *, base: T | None = None, where: str | None = None) -> T:
        """Validate a (partial) table on top of ``base`` (default: the defaults); unknown keys are an error."""
        return parse_table(raw, base if base is not None else cls(), cls.TABLE if where is None else where)

    @classmethod
    def check_raw(cls, raw: Mapping[str, Any], where: str) -> None:
        """Refuse a table before its keys are read (e.g. one holding secrets)."""

    def check(self, where: str) -> None:
        """Refuse a combination of values each valid on its own."""


T = TypeVar("T", bound=Table)


def parse_table(raw: Mapping[str, Any], base: T, where: str) -> T:
    """``raw`` applied on top of ``base``: each key through its field's parser (a nested table on top of
    ``base``'s value of it), then the table's cross-field check. Keys absent from ``raw`` keep ``base``'s
    values. Every error names the key (``where.key``)."""
    type(base).check_raw(raw, where)
    reject_unknown_keys(raw, base, where)
    declared: dict[str, Parser | None] = {f.name: f.metadata.get("parse") for f in fields(base)}  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = _name(where, key)
        current = getattr(base, key)
        if isinstance(current, Table):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a table ([{name}])")
            changes[key] = parse_table(value, current, name)
        else:
            parse = declared[key]
            assert parse is not None, f"{name}: a setting that is not a table needs a parser"
            changes[key] = parse(value, name)
    out = replace(base, **changes)  # type: ignore[type-var]
    out.check(where)
    return out


KEEP_BEST_MODES = ("min", "max")


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``count`` versions whose ``meta[metric]`` is lowest (``mode="min"``) or highest."""

    metric: str
    mode: str = "min"
    count: int = 1

    @classmethod
    def parse(cls, raw: Any, where: str) -> KeepBest | None:
        """``{metric = "val_loss", mode = "min", count = 1}`` or ``"off"``; errors name the key."""
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "off"):
            return None
        if not isinstance(raw, Mapping):
            raise ConfigError(f'{where}: expected a table like {{ metric = "val_loss", mode = "min", count = 1 }} '
                              f"or \"off\", got {raw!r}")
        unknown = set(raw) - {"metric", "mode", "count"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: count, metric, mode)")
        metric, mode, count = raw.get("metric"), raw.get("mode", "min"), raw.get("count", 1)
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{where}.metric: expected the name of a number in the versions' meta, got {metric!r}")
        if mode not in KEEP_BEST_MODES:
            raise ConfigError(f"{where}.mode: expected \"min\" or \"max\", got {mode!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"{where}.count: expected an integer of at least 1, got {count!r}")
        return cls(metric, mode, count)

    def to_wire(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "count": self.count}


@dataclass(frozen=True)
class PolicySettings(Table):
    """When to save a job. ``None`` turns a rule off. Durations in seconds, sizes in bytes."""

    TABLE: ClassVar[str] = "policy"
    interval: float | None = setting(600.0, duration(off=True))
    idle: float | None = setting(30.0, duration(off=True))
    dirty_bytes: int | None = setting(1024**3, size(off=True))
    min_gap: float = setting(10.0, duration())
    keep_last: int = setting(3, count(1))
    # Besides the newest keep_last: keep the newest version of every period this long (None: off).
    keep_every: float | None = setting(None, duration(off=True))
    # How new chunks are stored: one of COMPRESSION_MODES ("auto": all but float data).
    compression: str = setting("auto", choice(COMPRESSION_MODES))
    # The write-ahead log past the newest version is saved into a version once it holds this many bytes,
    # or would take this long to replay at the measured replay speed: a bound on restart time that holds
    # whatever dirty_bytes is (policy.py, reason log_bytes).
    log_bytes: int | None = setting(256 * 1024**2, size(off=True))
    replay_time: float | None = setting(1.5, duration(off=True))
    # Besides the above: keep the `count` versions with the best meta[metric] (None: off; storage/retention.py).
    keep_best: KeepBest | None = setting(None, KeepBest.parse)

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        wire["keep_best"] = self.keep_best.to_wire() if self.keep_best is not None else None
        return wire


@dataclass(frozen=True)
class QuotaSettings(Table):
    """Per-user limits (root is exempt). ``None`` means no limit."""

    TABLE: ClassVar[str] = "quota"
    max_bytes: int | None = setting(None, size(off=True))
    max_jobs: int | None = setting(None, count(1, off=True))
    # Shared-memory slots one user may have mapped at once (root included); None: only the global cap.
    max_shm_bytes: int | None = setting(None, size(off=True))
    # Requests one user may have in flight at once (root included): past it, an error reply "quota".
    max_requests: int = setting(256, count(1))
    # Connections one user may have open on each listener (the ipc socket, the fd socket), root included:
    # past it, a new connection is refused (issue 19: idle connections must not use up the daemon's fds).
    max_connections: int = setting(32, count(1))
    # Bytes of replies and restore buffers one user may leave unread in the daemon (root included); past
    # it a reply becomes a "quota" error. None: no limit.
    max_reply_bytes: int | None = setting(512 * 1024**2, size(off=True))
    # Cores one user's big requests may take to decode while another user is being served (root exempt);
    # past it that user's decodes wait (daemon/cpushare.py). None: no limit.
    cpu_share: float | None = setting(0.5, fraction(off=True))


@dataclass(frozen=True)
class ThrottleSettings(Table):
    """How fast background saves may write (see :mod:`autosaved.throttle`). Rates in bytes/s."""

    TABLE: ClassVar[str] = "throttle"
    enabled: bool = setting(True, boolean)
    max_write_rate: int | None = setting(None, size(off=True, positive=True))  # a hard cap, the shutdown flush included
    min_write_rate: int = setting(16 * 1024**2, size(positive=True))
    sample_interval: float = setting(0.5, duration(low=0.05, high=60))

    def check(self, where: str) -> None:
        if self.max_write_rate is not None and self.max_write_rate < self.min_write_rate:
            raise ConfigError(f"{where}.max_write_rate ({self.max_write_rate}) is below {where}.min_write_rate "
                              f"({self.min_write_rate})")


@dataclass(frozen=True)
class PreemptionSettings(Table):
    """Watch the cloud's instance metadata for a spot/preemption notice (see :mod:`autosaved.daemon.preempt`)."""

    TABLE: ClassVar[str] = "preemption"
    provider: str = setting("off", choice(PREEMPTION_PROVIDERS, fold_case=True))
    # Base URL of the metadata service; None: the provider's well-known one.
    endpoint: str | None = setting(None, http_url("http://169.254.169.254"))
    poll_interval: float = setting(2.0, duration(low=0.05, high=60))


@dataclass(frozen=True)
class RemoteSettings(Table):
    """Replication to an S3-compatible object store (see :mod:`autosaved.daemon.replicator`); off while
    ``url`` is None. Credentials come from the standard AWS environment variables or ``credentials_file``
    (an AWS shared-credentials file), never from the TOML itself."""

    TABLE: ClassVar[str] = "remote"
    url: str | None = setting(None, s3_url)
    endpoint: str | None = setting(None, http_url("http://127.0.0.1:8333"))  # for non-AWS stores
    region: str | None = setting(None, text)
    credentials_file: Path | None = setting(None, path)
    upload_rate: int | None = setting(None, size(off=True, positive=True))  # bytes/s cap on uploads
    keep_last: int | None = setting(None, count(1))  # None: as [policy] keep_last
    # None: as [policy] keep_every; "off" is 0 (retention keeps no periodic versions for a zero period).
    keep_every: float | None = setting(None, duration(off=True, off_value=0.0))
    lease_ttl: float = setting(30.0, duration(low=0.5))
    gc_grace: float = setting(3600.0, duration(low=0.0))
    timeout: float = setting(30.0, duration(low=0.5))

    @classmethod
    def check_raw(cls, raw: Mapping[str, Any], where: str) -> None:
        for key in raw:
            if "secret" in key or "access_key" in key or "token" in key:
                raise ConfigError(f"{where}.{key}: credentials never go in the config file; use the AWS "
                                  "environment variables or credentials_file")
