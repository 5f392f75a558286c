"""Config hot reload: a running daemon follows its file (watchfiles, SIGHUP) and survives a bad one."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import autosaved
from autosaved.config import Config, PolicySettings, QuotaSettings, parse_config_table
from autosaved.daemon.reload import reread
from autosaved.errors import ConfigError
from autosaved.testing.private import PrivateDaemon

from .conftest import version_files, wait_for

SLOW = '[policy]\ninterval = "1h"\nidle = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
FAST = '[policy]\ninterval = "300ms"\nidle = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'


def _rewrite(path: Path, text: str) -> None:
    """Replace the file the way editors and config management do: write a new file, rename it over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_interval_change_applies_without_restart_and_a_bad_file_is_kept_out(
    make_daemon: Callable[..., PrivateDaemon],
) -> None:
    d = make_daemon(SLOW)
    assert d.proc is not None
    pid = d.proc.pid
    with autosaved.Client("r", address=d.address, policy={"keep_last": 5}) as c:
        c.update({"x": 1})
        # Nothing saved yet (no wait: this proves only that the update alone saved nothing; that the save
        # below comes from the reload is proven by its reason, "interval", with an interval of 1 h here).
        assert version_files(d.state_dir, "r") == []
        assert c.status()["policy"]["interval"] == 3600.0

        _rewrite(d.config_path, FAST)
        # the 300 ms interval fired (waited on the daemon's own record of the commit: the manifest file
        # appears a moment before the save is recorded as done)
        wait_for(lambda: c.status()["last_save_reason"] == "interval", timeout=60)
        assert version_files(d.state_dir, "r")
        status = c.status()
        assert status["policy"]["interval"] == 0.3
        assert status["policy"]["keep_last"] == 5  # the client's own override survived the reload
        assert "config reloaded trigger=file-change" in d.log()

        for broken, key in (('[policy]\ninterval = "soon"\n', "policy.interval"),
                            ("[policy\ninterval = 1", "config file"),
                            ("intervall = 5\n", "intervall: unknown key")):
            _rewrite(d.config_path, broken)
            wait_for(lambda key=key: f"config reload rejected trigger=file-change file={d.config_path} error={key}"
                     in d.log(), timeout=60)
            # the old config (300 ms interval) keeps running: a new update is saved as before
            before = len(version_files(d.state_dir, "r"))
            c.update({"x": f"after {key}"})  # a new value: an unchanged one makes no version (issue 22)
            wait_for(lambda before=before: len(version_files(d.state_dir, "r")) > before, timeout=60)
    assert d.proc.pid == pid and d.proc.poll() is None


def test_sighup_reloads(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(SLOW)
    # Written in place, then SIGHUP: the watcher may also see it; the log names each trigger.
    d.config_path.write_text(SLOW.replace('"1h"', '"2h"'))
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: "trigger=SIGHUP" in d.log(), timeout=60)
    with autosaved.Client("h", address=d.address) as c:
        assert c.status()["policy"]["interval"] == 7200.0


def test_reread_pins_restart_only_keys(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('address = "ipc:///tmp/other.sock"\n[policy]\nidle = "5s"\n[quota]\nmax_jobs = 3\n')
    current = Config(address="ipc:///tmp/now.sock", state_dir=tmp_path, config_file=path)
    new, ignored = reread(current)
    assert new.address == current.address and ignored == ["address"]
    assert new.policy == PolicySettings(idle=5.0) and new.quota.max_jobs == 3

    path.write_text("[quota]\nmax_bytes = \"lots\"\n")
    with pytest.raises(ConfigError, match=r"quota\.max_bytes"):
        reread(current)


@pytest.mark.parametrize(("table", "message"), [
    ({"metrics_address": "9464"}, "metrics_address: expected \"host:port\""),
    ({"metrics_address": "127.0.0.1:70000"}, "metrics_address"),
    ({"quota": {"max_jobs": 0}}, r"quota\.max_jobs: expected an integer ≥ 1"),
    ({"quota": {"max_byte": 1}}, r"quota\.max_byte: unknown key"),
    ({"quota": {"max_bytes": "big"}}, r"quota\.max_bytes: 'big' is not a size"),
    ({"socket_group": True}, "socket_group: expected a group name or gid"),
])
def test_new_keys_are_validated_by_name(table: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config_table(table, Config(address="ipc:///tmp/x.sock", state_dir=tmp_path))


def test_new_keys_parse(tmp_path: Path) -> None:
    cfg = parse_config_table({"metrics_address": "[::1]:9464", "socket_group": "autosaved",
                              "quota": {"max_bytes": "10GiB", "max_jobs": 20}},
                             Config(address="ipc:///tmp/x.sock", state_dir=tmp_path))
    assert cfg.metrics_address == ("::1", 9464) and cfg.socket_group == "autosaved"
    assert cfg.quota == QuotaSettings(max_bytes=10 * 1024**3, max_jobs=20)
    off = parse_config_table({"metrics_address": "off", "quota": {"max_jobs": "off"}}, cfg)
    assert off.metrics_address is None and off.quota.max_jobs is None


def test_readme_documents_every_config_key_with_a_valid_example(tmp_path: Path) -> None:
    import dataclasses
    import re
    import tomllib

    from autosaved.config import _TOP_KEYS, QuotaSettings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, flags=re.S)
    assert block is not None
    raw = tomllib.loads(block.group(1))
    assert set(raw) == _TOP_KEYS
    assert set(raw["policy"]) == set(PolicySettings().to_wire()) and set(raw["quota"]) == {
        f.name for f in dataclasses.fields(QuotaSettings)}
    parse_config_table(raw, Config(address="ipc:///tmp/x.sock", state_dir=tmp_path))


def test_a_file_that_is_not_utf8_is_rejected_and_the_watcher_keeps_watching(
    make_daemon: Callable[..., PrivateDaemon],
) -> None:
    """Issue 19, defect 10: a non-UTF-8 file ended the watcher for good (later edits were ignored)."""
    d = make_daemon(SLOW)
    tmp = d.config_path.with_name(d.config_path.name + ".new")
    tmp.write_bytes(SLOW.encode() + b'# caf\xe9 (latin-1)\n')
    os.replace(tmp, d.config_path)
    wait_for(lambda: f"config reload rejected trigger=file-change file={d.config_path} error=config file "
             f"{d.config_path}: not UTF-8" in d.log(), timeout=60)
    _rewrite(d.config_path, SLOW.replace('"1h"', '"3h"'))  # a valid edit afterwards is applied
    with autosaved.Client("u", address=d.address) as c:
        wait_for(lambda: c.status()["policy"]["interval"] == 10800.0, timeout=60)
    assert "trigger=file-change" in d.log() and d.proc is not None and d.proc.poll() is None
