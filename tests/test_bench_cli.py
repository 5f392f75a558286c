"""``autosaved bench``'s command line (issue 22): options work before or after the mode or are refused
with exit 2, bad input exits 2, framework progress bars stay out of the output, and a row that needs a
missing package says which."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autosaved.bench.data import KEYS, render


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autosaved", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_options_before_the_mode_apply() -> None:
    for args in (["--size", "8MiB", "hash", "--json"], ["--json", "hash", "--size", "8MiB"],
                 ["--json", "--size", "8MiB", "hash"]):
        proc = bench(*args)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["bytes"] == 8 << 20, (args, proc.stdout)
    # After the mode wins over before it.
    assert json.loads(bench("--size", "64MiB", "hash", "--size", "8MiB", "--json").stdout)["bytes"] == 8 << 20


def test_an_option_the_mode_does_not_take_is_refused() -> None:
    proc = bench("--size", "1MiB", "small")
    assert proc.returncode == 2 and "--size does not apply to `autosaved bench small`" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_bad_input_exits_2() -> None:
    for args, message in ((["hf", "--steps", "4"], "--steps must be at least 5"),
                          (["langgraph", "--puts", "3"], "--puts must be at least 20"),
                          (["throttle", "--rounds", "0"], "--rounds at least 1")):
        proc = bench(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr)


def test_hf_bench_prints_only_its_table() -> None:
    proc = bench("hf", "--steps", "5", "--n-layer", "1", "--n-embd", "64", "--seq", "16", "--batch", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Writing model shards" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
    assert "train_runtime" not in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[0].startswith("GPT-2-shaped model"), proc.stdout


def test_a_row_that_needs_a_missing_package_says_which() -> None:
    result = {"bytes": 1 << 20, "host": "h", **dict.fromkeys(KEYS, 0.5), "torch_save_s": None,
              "dcp_async_blocking_s": None}
    text = render(result)
    torch_row = next(line for line in text.splitlines() if line.startswith("torch_save_s"))
    assert "needs torch" in torch_row and "autosaved[torch]" in torch_row, text
    dcp_row = next(line for line in text.splitlines() if line.startswith("dcp_async_blocking_s"))
    assert "not measured" in dcp_row, text


@pytest.mark.parametrize("when", ["starting", "measuring"])
def test_a_bench_stopped_with_sigterm_stops_its_private_daemon_and_removes_its_files(when: str) -> None:
    """SIGTERM (a CI timeout, ``kill``) unwinds the benchmark as Ctrl-C does, while its daemon starts or
    while it measures: before, its private daemon (and the echo server of a floor) kept running, with its
    temp dir, after the benchmark was gone."""
    import signal
    import time
    from pathlib import Path

    import psutil

    from autosaved.client.admin import Admin
    from autosaved.errors import DaemonUnavailable

    proc = subprocess.Popen([sys.executable, "-m", "autosaved", "bench", "small", "--count", "1000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        daemon = None
        while daemon is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the benchmark started no daemon"
            daemon = next((c for c in psutil.Process(proc.pid).children(recursive=True)
                           if "serve" in c.cmdline()), None)
            time.sleep(0.05)
        state_dir = Path(daemon.cmdline()[daemon.cmdline().index("--state-dir") + 1])
        while not state_dir.exists():
            assert time.monotonic() < deadline, "the daemon made no state dir"
            time.sleep(0.05)
        if when == "measuring":
            address = daemon.cmdline()[daemon.cmdline().index("--address") + 1]
            while True:
                assert time.monotonic() < deadline, "the daemon never answered"
                try:
                    with Admin(address=address, timeout=1) as admin:
                        admin.ping()
                    break
                except DaemonUnavailable:
                    time.sleep(0.05)
            time.sleep(0.5)  # the floors' echo servers run in the first seconds
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, f"processes outlived their benchmark: {[p.cmdline() for p in alive]}"
        assert not state_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
