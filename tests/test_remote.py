"""The remote store against a real SeaweedFS S3 server: conditional writes, the lease and its fences,
manifests last, verified reads, and garbage collection's grace."""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any

import anyio
import pytest

from autosaved.errors import CorruptVersion
from autosaved.storage import hashing
from autosaved.storage.manifest import FORMAT_VERSION, HASH_NAME, seal
from autosaved.storage.remote import Fenced, LeaseHeld, RemoteJob, RemoteStore
from autosaved.tree import Chunk


def _store(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RemoteStore:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return RemoteStore(s3.url(f"t-{secrets.token_hex(4)}"))


def _manifest(job: str, version: int, epoch: int, chunks: list[Chunk], algo: str = HASH_NAME) -> bytes:
    size = sum(c.size for c in chunks)
    body = {"format": FORMAT_VERSION, "hash": algo, "job": job, "version": version, "step": version,
            "time": "2026-01-01T00:00:00.000Z", "reason": "test", "meta": {}, "bytes": size, "sessions": {},
            "wal_lsn": 0, "tree": {"m": [["x", {"b": 0}]]},
            "blobs": [{"kind": "bytes", "dtype": "bytes", "shape": [size], "nbytes": size,
                       "chunks": [[c.digest, c.size] for c in chunks]}],
            "remote": {"epoch": epoch, "holder": "test", "packed": []}}
    return seal(body)


async def _publish(job: RemoteJob, version: int, epoch: int, payload: bytes, algo: str = HASH_NAME) -> Chunk:
    # Named the way the local store names it (BLAKE3 for new saves; SHA-256 in older stores).
    chunk = Chunk(hashing.HASHERS[algo](memoryview(payload)), len(payload), algo)
    await job.put_chunk(chunk.digest, payload, packed=False)
    await job.put_manifest(version, epoch, _manifest(job.job, version, epoch, [chunk], algo))
    return chunk


def test_downloads_are_verified_with_each_manifests_hash(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BLAKE3-named version and an older SHA-256-named one both load (each chunk checked with the
    algorithm that named it), and a damaged BLAKE3 chunk is caught."""
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        lease = await job.acquire("h", ttl=60)
        await _publish(job, 1, lease.epoch, b"old sha256 state", algo=hashing.SHA256)
        c2 = await _publish(job, 2, lease.epoch, b"new blake3 state", algo=hashing.BLAKE3)
        assert c2.digest != hashlib.sha256(b"new blake3 state").hexdigest()
        for vid, payload in ((1, b"old sha256 state"), (2, b"new blake3 state")):
            loaded = await job.load_version(vid)
            assert loaded is not None and bytes(loaded.tree["x"].data) == payload
        await store.put(job.chunk_key(c2.digest), b"new blake3 statE")
        with pytest.raises(CorruptVersion):
            await job.load_version(2)

    anyio.run(main)


def test_probe_and_create_only_chunks(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        await store.probe()  # SeaweedFS 4.48 honours If-None-Match: * (a second create is a 412)
        job = store.job(os.geteuid(), "j")
        assert await job.put_chunk("ab" * 32, b"one", packed=False) is True
        assert await job.put_chunk("ab" * 32, b"two", packed=False) is False  # 412: already there
        data, _ = await store.get(job.chunk_key("ab" * 32))
        assert data == b"one"  # the first write stays: chunks are immutable

    anyio.run(main)


def test_lease_fences_a_replaced_holder(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        a = await job.acquire("host-a", ttl=60)
        await _publish(job, 1, a.epoch, b"v1 by a")
        with pytest.raises(LeaseHeld):
            await job.acquire("host-b", ttl=60)
        b = await job.acquire("host-b", ttl=60, take_over=True)
        assert b.epoch == a.epoch + 1 and b.fences == {str(a.epoch): 1}
        # The old holder finds out at its next renewal, which it does before every manifest.
        with pytest.raises(Fenced):
            await job.renew(a, ttl=60)
        # Even a manifest it slips in without renewing is never read: it is past its epoch's fence.
        await _publish(job, 2, a.epoch, b"v2 by a after losing the lease")
        assert [v.id for v in await job.visible_versions()] == [1]
        await _publish(job, 2, b.epoch, b"v2 by b")
        visible = await job.visible_versions()
        assert [(v.id, v.epoch) for v in visible] == [(1, a.epoch), (2, b.epoch)]
        loaded = await job.load_version(None)
        assert loaded is not None and bytes(loaded.tree["x"].data) == b"v2 by b"
        await job.renew(b, ttl=60)

    anyio.run(main)


def test_expired_lease_is_taken_without_take_over(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        a = await job.acquire("host-a", ttl=0.2)
        await anyio.sleep(0.4)
        b = await job.acquire("host-b", ttl=60)
        assert b.epoch == a.epoch + 1

    anyio.run(main)


def test_missing_and_corrupt_objects_fall_back(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        lease = await job.acquire("h", ttl=60)
        await _publish(job, 1, lease.epoch, b"one")
        c2 = await _publish(job, 2, lease.epoch, b"two")
        c3 = await _publish(job, 3, lease.epoch, b"three")
        await store.put(job.chunk_key(c3.digest), b"thrEe")  # corrupt v3's only chunk
        await store.delete([job.chunk_key(c2.digest)])  # and lose v2's
        skipped: list[CorruptVersion] = []
        loaded = await job.load_version(None, skipped.append)
        assert loaded is not None and loaded.info.id == 1
        assert "does not match its hash" in str(skipped[0]) and job.chunk_key(c3.digest) in str(skipped[0])
        assert "is missing" in str(skipped[1]) and job.chunk_key(c2.digest) in str(skipped[1])
        with pytest.raises(CorruptVersion):
            await job.load_version(3)

    anyio.run(main)


def test_gc_keeps_what_uploads_and_restores_need(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3server, monkeypatch)

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        lease = await job.acquire("h", ttl=60)
        old = [await _publish(job, v, lease.epoch, f"state {v}".encode()) for v in (1, 2, 3)]
        # An upload in flight: its chunk is in the bucket, its manifest not yet.
        inflight = Chunk(hashlib.sha256(b"in flight").hexdigest(), 9)
        await job.put_chunk(inflight.digest, b"in flight", packed=False)
        # A restore of v1 read its manifest before retention deletes it.
        v1 = next(v for v in await job.visible_versions() if v.id == 1)
        doc = await job.read_manifest(v1)
        first = await job.collect(keep_last=1, keep_every=None, grace=3600)
        assert first.deleted_versions == [1, 2] and first.removed_chunks == 0
        # Within the grace period nothing unreferenced goes: the restore can still fetch v1's chunk.
        data, _ = await store.get(job.chunk_key(str(doc["blobs"][0]["chunks"][0][0])))
        assert data == b"state 1"
        index = await job.chunk_index()
        assert inflight.digest in index and old[0].digest in index
        # With no grace left (a later collection), the unreferenced chunks go; v3's stays.
        later = await job.collect(keep_last=1, keep_every=None, grace=0.0)
        assert later.removed_chunks == 3
        index = await job.chunk_index()
        assert set(index) == {old[2].digest}
        assert (await job.load_version(None)) is not None

    anyio.run(main)


class _IgnoringGateway:
    """A reverse proxy in front of the real server that behaves like an S3 gateway ignoring
    ``If-None-Match``: where the server refuses a create with 412, it answers 200 (as if it overwrote)."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import threading
        from urllib.parse import urlparse

        up = urlparse(upstream)
        host, port = up.hostname or "127.0.0.1", up.port or 80

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(host, port, timeout=30)
                # Forward every header as signed (Host included), byte for byte.
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                headers = resp.getheaders()
                if status == 412 and self.command == "PUT":
                    status, data, headers = 200, b"", [("ETag", '"ignored"')]
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_probe_refuses_a_store_that_ignores_if_none_match(s3server: Any, monkeypatch: pytest.MonkeyPatch,
                                                          make_daemon: Any) -> None:
    from autosaved.errors import AutosavedError
    from autosaved.storage.remote import ConditionalWritesIgnored

    for k, v in s3server.env.items():
        monkeypatch.setenv(k, v)
    gateway = _IgnoringGateway(s3server.endpoint)
    try:
        with pytest.raises(ConditionalWritesIgnored, match="ignored If-None-Match"):
            anyio.run(RemoteStore(s3server.url("probe"), endpoint=gateway.endpoint).probe)
        config = f'[remote]\nurl = "{s3server.url("probe")}"\nendpoint = "{gateway.endpoint}"\n'
        with pytest.raises(AutosavedError, match="ignored If-None-Match"):
            make_daemon(config)  # the daemon refuses to start, saying why
    finally:
        gateway.close()


@pytest.mark.parametrize(("table", "message"), [
    ({"url": "http://bucket/x"}, "expected an s3://bucket/prefix URL"),
    ({"url": "s3://bucket/a//b"}, "empty, '.' or '..'"),
    ({"url": "s3://b", "secret_access_key": "x"}, "credentials never go in the config file"),
    ({"url": "s3://b", "endpoint": "127.0.0.1:8333"}, "expected an http"),
    ({"url": "s3://b", "lease_ttl": "10ms"}, "lease_ttl: must be at least"),
    ({"url": "s3://b", "bogus": 1}, "remote.bogus: unknown key"),
])
def test_remote_config_errors_name_the_key(table: dict[str, Any], message: str, tmp_path: Any) -> None:
    from autosaved.config import Config, parse_config_table
    from autosaved.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config_table({"remote": table}, Config(address="ipc:///tmp/x.sock", state_dir=tmp_path))


def test_credentials_file_is_read_and_checked(tmp_path: Any) -> None:
    from autosaved.errors import ConfigError
    from autosaved.storage.remote import read_credentials_file

    good = tmp_path / "creds"
    good.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    assert read_credentials_file(good) == {"access_key_id": "AK", "secret_access_key": "SK"}
    bad = tmp_path / "bad"
    bad.write_text("[default]\naws_access_key_id = AK\n")
    with pytest.raises(ConfigError, match="needs aws_access_key_id and aws_secret_access_key"):
        read_credentials_file(bad)


def test_credentials_file_against_the_server(s3server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from autosaved.seaweed import ACCESS_KEY, SECRET_KEY
    from autosaved.storage.remote import RemoteError, open_remote

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    good = tmp_path / "good"
    good.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    anyio.run(open_remote(s3server.url("creds"), endpoint=s3server.endpoint, credentials_file=good).probe)
    wrong = tmp_path / "wrong"
    wrong.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = not-it\n")
    with pytest.raises(RemoteError):
        anyio.run(open_remote(s3server.url("creds"), endpoint=s3server.endpoint, credentials_file=wrong).probe)


def test_incarnations_and_the_delete_tombstone(s3server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted job's tombstone hides every version and fences its publisher; a new incarnation starts
    with no fences (nothing of the old one is read again), and the operator's take-over keeps the current
    incarnation and its versions."""
    store = _store(s3server, monkeypatch)

    async def ids(job: RemoteJob) -> list[int]:
        return [vk.id for vk in await job.visible_versions()]

    async def main() -> None:
        job = store.job(os.geteuid(), "j")
        a = await job.acquire("h", ttl=60, incarnation="aaa")
        await _publish(job, 1, a.epoch, b"one")
        await _publish(job, 2, a.epoch, b"two")
        again = await job.acquire("h", ttl=60, incarnation="aaa")  # a restart: the same incarnation
        assert await ids(job) == [1, 2] and again.replaced is None and again.incarnation == "aaa"
        objects, nbytes = await job.delete_job("h")
        assert objects == 4 and nbytes > len(b"onetwo")  # two chunks and two manifests
        assert await ids(job) == [] and await job.load_version(None) is None
        with pytest.raises(Fenced, match="deleted"):
            await job.renew(again, 60)
        assert await job.delete_job("h") == (0, 0)  # deleting again finds nothing
        b = await job.acquire("h", ttl=60, incarnation="bbb")
        assert b.epoch == again.epoch + 2 and b.fences == {} and b.replaced is None
        await _publish(job, 1, b.epoch, b"new one")
        loaded = await job.load_version(None)
        assert await ids(job) == [1] and loaded is not None and bytes(loaded.tree["x"].data) == b"new one"
        c = await job.acquire("h", ttl=60, incarnation="ccc")  # started anew over a live incarnation
        assert c.replaced == "bbb" and c.fences == {} and await ids(job) == []
        await _publish(job, 5, c.epoch, b"c")
        t = await job.acquire("operator", 0.0, take_over=True)
        assert t.incarnation == "ccc" and await ids(job) == [5]

    anyio.run(main)


def test_object_store_errors_are_one_actionable_line() -> None:
    from autosaved.storage.remote_errors import explain

    where = "s3://b/p at http://127.0.0.1:1"
    xml = ('Server returned non-2xx status code: 403 Forbidden: <?xml version="1.0" encoding="UTF-8"?>\n<Error>'
           '<Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match'
           '</Message></Error>\n\nDebug source:\nGeneric { store: "S3" }')
    line = explain(xml, "PUT k", where)
    assert line == (f"object store {where}: PUT k failed: the secret access key is wrong (SignatureDoesNotMatch); "
                    "fix aws_secret_access_key in [remote] credentials_file or AWS_SECRET_ACCESS_KEY")
    meta = "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token in 250ms - HTTP error"
    assert "no credentials" in explain(meta, "PUT k", where) and "credentials_file" in explain(meta, "PUT k", where)
    down = "Generic S3 error: Error performing GET http://127.0.0.1:1/b/k - HTTP error: error sending request"
    assert "cannot reach the store; check [remote] endpoint" in explain(down, "GET k", where)
    other = "Server returned non-2xx status code: 409 Conflict: <Error><Code>Odd</Code><Message>odd\nthing</Message>"
    assert explain(other, "PUT k", where) == f"object store {where}: PUT k failed: Odd: odd thing"
    for raw in (xml, meta, down, other, "multi\nline\ntext"):
        line = explain(raw, "PUT k", where)
        assert "\n" not in line and "<" not in line
