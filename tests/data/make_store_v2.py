#!/usr/bin/env python3
"""Write tests/data/store_v2: a small format-2 store (a root record over pages, storage/paged.py) made by
the daemon of this release, that every later build must restore exactly (tests/test_format_store_v2.py).
Never regenerate it; a later format gets a new fixture of its own.

    python tests/data/make_store_v2.py tests/data/store_v2

Jobs (owner folder ``jobs/0``; the test moves it to the caller's uid):
- ``model``: the updates of store_v1's ``model`` (zstd and raw chunks, bfloat16, int keys, tuples, bytes,
  big ints, NaN, log records past the last version), now written as format 2.
- ``agent``: a growing history of small values over several saves: inline binary leaves, several leaf
  pages under an interior page, pages shared between versions, a mapping whose insertion order is not
  its key order, keys with NUL and keys that are prefixes of other keys.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("make_store_v1", Path(__file__).parent / "make_store_v1.py")
assert _spec is not None and _spec.loader is not None
v1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v1)

CONFIG = "storage_format = 2\n" + v1.CONFIG


def model_updates() -> list[tuple[dict[Any, Any], str]]:
    out: list[tuple[dict[Any, Any], str]] = v1.model_updates()
    return out


def agent_updates() -> list[tuple[dict[Any, Any], str]]:
    out: list[tuple[dict[Any, Any], str]] = [
        ({"order": {"z": 1, "a": 2, 10: 3, "10": 4}, "a": {"x": 1}, "a\x00": 2, "a\x00b": (3, [4]), "": {"": ""}},
         "logged"),
    ]
    for part in range(3):
        cps = {f"{i:06d}": {"msg": f"step {i}: " + "lorem ipsum " * 8, "blob": f"value {i}".encode(), "n": i}
               for i in range(part * 400, (part + 1) * 400)}
        out.append(({"cp": cps, "step": (part + 1) * 400}, "logged"))
        out.append(({}, "save"))
    out.append(({"cp": {"000007": {"n": -7}}, "order": {"b": 5}}, "committed"))
    out.append(({"step": 1201, "after": "the last version"}, "logged"))
    return out


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/store_v2")
    if out.exists():
        raise SystemExit(f"{out} exists: a fixture is never regenerated, only added")
    from autosaved.client.sync import Client
    from autosaved.testing.private import PrivateDaemon

    d = PrivateDaemon(config=CONFIG)
    try:
        d.start()
        for job, updates in (("model", model_updates()), ("agent", agent_updates())):
            c = Client(job, address=d.address, timeout=30, save_timeout=120)
            for delta, wait in updates:
                if wait == "save":
                    c.save()
                else:
                    c.update(delta, wait=wait)
            c.close()
        d.send_signal(signal.SIGKILL)  # keep the log records past the last version
        assert d.proc is not None
        d.proc.wait()
        src = d.state_dir / "jobs" / str(os.geteuid())
        shutil.copytree(src, out / "jobs" / "0", ignore=shutil.ignore_patterns("tmp"))
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
