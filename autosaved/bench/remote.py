"""``autosaved bench remote [--size 1GiB] [--json] [--remote URL --endpoint E]``: replication speed.

Side by side in one run, against one S3 server (a throwaway SeaweedFS on 127.0.0.1 unless ``--remote``
names a bucket; credentials then come from the AWS environment variables):

- upload: a private daemon with ``[remote]`` commits a state of random float32 arrays; the time from the
  ``committed`` ack until ``status`` shows it replicated, vs. a plain obstore ``put_async`` loop of the
  same bytes in the same chunk size to the same server (one put at a time, as a plain loop does; the mean
  of one run before and one after the daemon's, on a server warmed up first);
- incremental: the bytes the daemon sends after 1% of the state changed in one place;
- restore: ``autosaved.restore(job, remote=...)`` (download, verify every chunk, rebuild writable arrays)
  vs. a plain ``get_async`` loop of the same bytes, taking turns round by round (medians of 5; of 3 above
  256 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from typing import Any

import anyio
import numpy as np

from ..client.sync import Client
from ..config import parse_size
from ..fmt import human_bytes
from ..testing.private import PrivateDaemon

CHUNK = 8 * 1024 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1GiB", help="state size (default 1GiB)")
    p.add_argument("--remote", metavar="URL", help="s3://bucket/prefix to use (default: a throwaway SeaweedFS)")
    p.add_argument("--endpoint", metavar="URL", help="the store's endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _config(url: str, endpoint: str | None) -> str:
    return ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\ncompression = "off"\n'
            f'[throttle]\nenabled = false\n[remote]\nurl = "{url}"\n'
            + (f'endpoint = "{endpoint}"\n' if endpoint else ""))


def _replica(c: Client) -> dict[str, Any]:
    status: dict[str, Any] = c.status()["remote"]
    return status


def _wait_replicated(c: Client, version: int, committed_at: float, timeout: float = 3600.0) -> float:
    """Seconds from ``committed_at`` (wall clock, when the ``committed`` ack came) until the daemon says the
    version reached the bucket (its own ``replicated_at``): polled slowly, so the polling costs the
    daemon nothing measurable and adds no poll-interval error."""
    while (st := _replica(c))["replicated_version"] is None or st["replicated_version"] < version:
        if time.time() - committed_at > timeout:
            raise TimeoutError(f"version {version} not replicated within {timeout}s: {st}")
        time.sleep(0.1)
    return float(st["replicated_at"]) - committed_at


class _PlainLoops:
    """A plain obstore put loop and get loop of ``pieces`` under a prefix of their own: one request at a
    time, no verification, no copy out of obstore's buffers (what an application with no checkpoint
    store would do)."""

    def __init__(self, url: str, endpoint: str | None, pieces: list[bytes]) -> None:
        from ..storage.remote import RemoteStore

        self.client = RemoteStore(url, endpoint=endpoint).client
        self.prefix = f"bench-plain-{secrets.token_hex(4)}"
        self.pieces = pieces

    def put(self) -> float:
        import obstore

        async def main() -> float:
            t = time.perf_counter()
            for i, piece in enumerate(self.pieces):
                await obstore.put_async(self.client, f"{self.prefix}/{i}", piece, use_multipart=False)
            return time.perf_counter() - t

        return anyio.run(main)

    def get(self) -> float:
        import obstore

        async def main() -> float:
            t = time.perf_counter()
            for i in range(len(self.pieces)):
                result = await obstore.get_async(self.client, f"{self.prefix}/{i}")
                await result.bytes_async()
            return time.perf_counter() - t

        return anyio.run(main)

    def delete(self) -> None:
        import obstore

        async def main() -> None:
            await obstore.delete_async(self.client, [f"{self.prefix}/{i}" for i in range(len(self.pieces))])

        anyio.run(main)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(size: int, url: str, endpoint: str | None, rounds: int | None = None) -> dict[str, Any]:
    import obstore  # noqa: F401 (imported before any timing: a module import is not what is measured)

    import autosaved

    rounds = rounds or (5 if size <= 256 << 20 else 3)
    rng = np.random.default_rng(0)
    layers = 8
    per = max(1, size // layers // 4)
    state = {f"layer{i}": rng.random(per, dtype=np.float32) for i in range(layers)}
    total = sum(a.nbytes for a in state.values())
    job = f"bench-{secrets.token_hex(3)}"
    pieces = []
    for arr in state.values():
        raw = arr.tobytes()
        pieces += [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
    plain = _PlainLoops(url, endpoint, pieces)
    # A fresh server allocates its volumes on the first writes: warm it up, then time the plain put loop
    # before and after the daemon's upload (the mean is the baseline), so neither pays for a cold server.
    _PlainLoops(url, endpoint, pieces[:4]).put()
    put_before = plain.put()
    with PrivateDaemon(config=_config(url, endpoint)) as daemon, \
            Client(job, address=daemon.address, save_timeout=3600) as c:
        ack = c.update(state, wait="committed")
        committed_at = time.time()
        assert ack.version is not None
        upload_s = _wait_replicated(c, ack.version, committed_at)
        sent_full = _replica(c)["bytes_uploaded"]
        one = state["layer3"].copy()
        one[17 : 17 + total // 100 // 4] += 1.0  # 1% of the state, in one place
        ack2 = c.update({"layer3": one}, wait="committed")
        committed_at = time.time()
        assert ack2.version is not None
        incr_s = _wait_replicated(c, ack2.version, committed_at)
        sent_1pct = _replica(c)["bytes_uploaded"] - sent_full
    del state
    put_after = plain.put()
    put_s = (put_before + put_after) / 2
    # Restore and the plain get loop take turns, round by round: a server still settling after the
    # uploads (or a neighbour's load) weighs on both alike, not on whichever ran first.
    restores, gets = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        got = autosaved.restore(job, remote=url, endpoint=endpoint)
        restores.append(time.perf_counter() - t)
        assert np.array_equal(got["layer3"], one)
        del got
        gets.append(plain.get())
    plain.delete()
    restore_s, get_s = _median(restores), _median(gets)
    return {
        "bytes": total,
        "upload_s": round(upload_s, 3), "plain_put_loop_s": round(put_s, 3),
        "plain_put_before_after_s": [round(put_before, 3), round(put_after, 3)],
        "upload_vs_plain": round(put_s / upload_s, 3),
        "uploaded_bytes_full": sent_full,
        "uploaded_bytes_after_1pct": sent_1pct, "uploaded_fraction_after_1pct": round(sent_1pct / total, 4),
        "upload_1pct_s": round(incr_s, 3),
        "restore_s": round(restore_s, 3), "plain_get_loop_s": round(get_s, 3),
        "restore_vs_plain": round(get_s / restore_s, 3),
        "restore_rounds_s": [round(x, 3) for x in restores], "plain_get_rounds_s": [round(x, 3) for x in gets],
    }


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    assert size is not None
    if args.remote:
        result = measure(size, args.remote, args.endpoint)
        where = args.remote
    else:
        from ..seaweed import SeaweedServer

        with SeaweedServer() as s3:
            saved = {k: os.environ.get(k) for k in s3.env}
            os.environ.update(s3.env)
            try:
                result = measure(size, s3.url("bench"), s3.endpoint)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        where = "a throwaway SeaweedFS on 127.0.0.1"
    if args.json:
        print(json.dumps(result))
        return 0
    r = result
    print(f"state {human_bytes(r['bytes'])} of float32, 8 MiB chunks, to {where}")
    print(f"  upload through the daemon: {r['upload_s']}s; plain obstore put loop: {r['plain_put_loop_s']}s "
          f"-> {r['upload_vs_plain']}x the plain loop's speed")
    print(f"  after 1% changed in place: sent {human_bytes(r['uploaded_bytes_after_1pct'])} "
          f"({100 * r['uploaded_fraction_after_1pct']:.2f}% of the state) in {r['upload_1pct_s']}s")
    print(f"  restore from the store (verified): {r['restore_s']}s; plain get loop: {r['plain_get_loop_s']}s "
          f"-> {r['restore_vs_plain']}x")
    return 0
