from __future__ import annotations

from pathlib import Path

import pytest

from autosaved.config import PolicySettings, load_config, parse_duration, parse_size
from autosaved.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [(30, 30.0), (0.5, 0.5), ("30s", 30.0), ("10m", 600.0),
                                                ("1h30m", 5400.0), ("500ms", 0.5), ("2d", 172800.0), ("1.5", 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("bad", ["ten minutes", "-5s", "5 parsecs", True, [1]])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"policy\.idle"):
        parse_duration(bad, "policy.idle")


@pytest.mark.parametrize(("text", "size"), [(1024, 1024), ("4GiB", 4 * 1024**3), ("512MB", 512 * 10**6),
                                            ("64k", 64000), ("1.5MiB", 1572864)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "k") == size


def test_policy_off_and_unknown_keys() -> None:
    p = PolicySettings.parse({"idle": "off", "interval": "5m", "dirty_bytes": "1GiB"})
    assert p.idle is None and p.interval == 300.0 and p.dirty_bytes == 1024**3
    with pytest.raises(ConfigError, match=r"policy\.intervall: unknown key"):
        PolicySettings.parse({"intervall": "5m"})
    with pytest.raises(ConfigError, match=r"policy\.keep_last"):
        PolicySettings.parse({"keep_last": 0})


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/from-file"\naddress = "ipc:///tmp/file.sock"\n[policy]\nidle = "7s"\n')
    monkeypatch.setenv("AUTOSAVED_ADDRESS", "ipc:///tmp/env.sock")
    c = load_config(config_file=cfg)
    assert c.address == "ipc:///tmp/env.sock" and c.state_dir == tmp_path / "from-file" and c.policy.idle == 7.0
    c = load_config(config_file=cfg, address="tcp://127.0.0.1:5555", state_dir=tmp_path / "flag")
    assert c.address == "tcp://127.0.0.1:5555" and c.state_dir == tmp_path / "flag"


def test_bad_files_are_clear(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[policy\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(config_file=cfg)
    cfg.write_text('[policy]\nidle = "soon"\n')
    with pytest.raises(ConfigError, match=r"policy\.idle"):
        load_config(config_file=cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="107 bytes"):
        load_config(config_file=None, address="ipc:///" + "x" * 200)


def test_default_paths_follow_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autosaved import config

    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert config.default_state_dir() == tmp_path / "state" / "autosaved"
    assert config.default_socket_path() == tmp_path / "run" / "autosaved" / "autosaved.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert config.default_socket_path() == tmp_path / "state" / "autosaved" / "run" / "autosaved.sock"
    monkeypatch.setattr(config, "_is_root", lambda: True)
    assert config.default_state_dir() == Path("/var/lib/autosaved")


def test_throttle_and_preemption_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[throttle]\nmax_write_rate = "200MiB"\nmin_write_rate = "8MiB"\n'
                   '[preemption]\nprovider = "AWS"\nendpoint = "http://127.0.0.1:9/"\npoll_interval = "1s"\n')
    c = load_config(config_file=cfg)
    assert c.throttle.max_write_rate == 200 * 1024**2 and c.throttle.min_write_rate == 8 * 1024**2
    assert c.preemption.provider == "aws" and c.preemption.endpoint == "http://127.0.0.1:9"
    assert c.dirty_bytes_auto and not load_config(config_file=_write(tmp_path, '[policy]\ndirty_bytes = "1GiB"\n')) \
        .dirty_bytes_auto
    assert load_config(config_file=_write(tmp_path, '[policy]\ndirty_bytes = "auto"\n')).dirty_bytes_auto
    for text, key in [('[throttle]\nmax_write_rate = "fast"\n', r"throttle\.max_write_rate"),
                      ('[throttle]\nmax_write_rate = "1MiB"\n', r"throttle\.max_write_rate .* below"),
                      ('[throttle]\nmin_write_rate = 0\n', r"throttle\.min_write_rate"),
                      ('[throttle]\nenabled = "yes"\n', r"throttle\.enabled"),
                      ('[throttle]\nrate = 1\n', r"throttle\.rate: unknown key"),
                      ('[preemption]\nprovider = "ibm"\n', r"preemption\.provider"),
                      ('[preemption]\nendpoint = "169.254.169.254"\n', r"preemption\.endpoint"),
                      ('[preemption]\npoll_interval = "1ms"\n', r"preemption\.poll_interval"),
                      ('throttle = 5\n', r"throttle: expected a table")]:
        with pytest.raises(ConfigError, match=key):
            load_config(config_file=_write(tmp_path, text))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def test_readme_config_block_is_a_valid_config(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block is not None
    c = load_config(config_file=_write(tmp_path, block.group(1)))
    assert c.throttle.enabled and c.preemption.provider == "off" and c.dirty_bytes_auto


def test_write_speed_is_auto_or_a_positive_size(tmp_path: Path) -> None:
    assert load_config(config_file=_write(tmp_path, 'write_speed = "auto"\n')).write_speed is None
    assert load_config(config_file=_write(tmp_path, 'write_speed = "100MiB"\n')).write_speed == 100 * 1024**2
    with pytest.raises(ConfigError, match="write_speed"):
        load_config(config_file=_write(tmp_path, "write_speed = 0\n"))
    with pytest.raises(ConfigError, match="write_speed"):
        load_config(config_file=_write(tmp_path, 'write_speed = "fast"\n'))


def test_tables_are_read_on_top_of_their_base_by_one_declaration(tmp_path: Path) -> None:
    """Every table (quota and remote included) applies a partial table on top of the base it is given, and
    the bounds a field declares give one message wherever the field is."""
    from dataclasses import replace

    from autosaved.config import RESTART_KEYS, Config, QuotaSettings, RemoteSettings, parse_config_table

    base = replace(Config(address="ipc:///tmp/x.sock", state_dir=tmp_path),
                   quota=QuotaSettings(max_bytes=5), remote=RemoteSettings(url="s3://b/p", timeout=9.0))
    cfg = parse_config_table({"quota": {"max_jobs": 3}, "remote": {"region": "eu"}}, base)
    assert cfg.quota == QuotaSettings(max_bytes=5, max_jobs=3)
    assert (cfg.remote.url, cfg.remote.timeout, cfg.remote.region) == ("s3://b/p", 9.0, "eu")
    # [remote] keep_every: unset follows [policy] (None); "off" keeps no periodic versions (a zero period).
    assert RemoteSettings.parse({}).keep_every is None
    assert RemoteSettings.parse({"keep_every": "off"}).keep_every == 0.0
    assert RemoteSettings.parse({"keep_every": "1h"}).keep_every == 3600.0
    from autosaved.storage.retention import versions_to_delete

    hourly = [(i, i * 3600.0) for i in range(1, 6)]
    assert versions_to_delete(hourly, keep_last=1, keep_every=0.0, protect=frozenset()) == [1, 2, 3, 4]
    for table in ({"throttle": {"sample_interval": "10ms"}}, {"preemption": {"poll_interval": "2m"}}):
        with pytest.raises(ConfigError, match=r"\.(sample|poll)_interval: must be between 50ms and 60s, got"):
            parse_config_table(table, base)
    with pytest.raises(ConfigError, match="chunk_size: must be between 64KiB and 1GiB"):
        parse_config_table({"chunk_size": "1KiB"}, base)
    assert set(RESTART_KEYS) == {"address", "state_dir", "max_message_bytes", "socket_group", "metrics_address",
                                 "max_shm_bytes", "write_speed", "max_connections", "remote", "log_format",
                                 "storage_format"}
