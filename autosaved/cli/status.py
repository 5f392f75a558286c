"""``autosaved status``: is the daemon up, and what do its jobs look like. Exit 0 when it answers."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_client_options, add_owner_option, admin, human_bytes, print_json, table


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="show the daemon and its jobs, or one job")
    p.add_argument("job", nargs="?", help="show only this job (exit 3 if there is no such job)")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.job is not None:
        return _one_job(args)
    with admin(args) as client:
        result = client.status()
    payload = {"daemon": result["daemon"], "jobs": result["jobs"]}
    if args.json:
        print_json(payload)
        return 0
    d = payload["daemon"]
    print(f"autosaved {d['version']} pid {d['pid']} up {d['uptime_s']:.0f}s at {d['address']}")
    print(f"state dir {d['state_dir']}; saves {d['saves']} ({human_bytes(d['bytes_written'])} written), "
          f"failures {d['save_failures']}, holding {human_bytes(d['held_bytes'])} in memory")
    shm = d.get("shm")
    if shm:
        print(f"shared memory: {shm['clients']} clients, {shm['slots']} slots, {human_bytes(shm['mapped_bytes'])} "
              f"mapped (limit {human_bytes(shm['max_bytes'])}); daemon RSS {human_bytes(d.get('rss_bytes'))}")
    cache = d.get("cache")
    if cache:
        print(f"state cache: {human_bytes(cache['bytes'])} of {human_bytes(cache['limit'])} (memory_limit), "
              f"{cache['resident_jobs']} jobs resident, {cache['evicted_jobs']} evicted; hits {cache['hits']}, "
              f"loads {cache['loads']}, evictions {cache['evictions']}")
    if "throttle" in d:
        print(_throttle_line(d["throttle"]))
    rows = [[j["job"], str(j["owner"]), "yes" if j["dirty"] else "no", human_bytes(j["dirty_bytes"]),
             str(j["latest_version"] or "-"), str(j["step"] if j["step"] is not None else "-"),
             f"{j.get('flush_estimate_s', 0):.1f}s", j["last_save_time"] or "-", j["last_save_reason"] or "-",
             j["last_error"] or ""]
            for j in payload["jobs"]]
    remote = d.get("remote")
    if remote:
        print(f"object store {remote['url']}" + (f" at {remote['endpoint']}" if remote.get("endpoint") else "")
              + (f": REFUSED ({remote['refused']})" if remote.get("refused") else
                 "" if remote.get("reachable") else ": not reachable yet")
              + (f"; {remote['pending_deletes']} deleted jobs still to delete there" if remote.get("pending_deletes")
                 else ""))
        for j in payload["jobs"]:
            r = j.get("remote") or {}
            print(f"  {j['job']}: replicated version {r.get('replicated_version') or '-'}, backlog "
                  f"{r.get('backlog_versions', 0)} versions ({human_bytes(r.get('backlog_bytes', 0))})"
                  + (f", FENCED: {r['fenced']}" if r.get("fenced") else
                     f", last error: {r['last_error']}" if r.get("last_error") else ""))
    if rows:
        print()
        print(table(rows, ["JOB", "OWNER", "DIRTY", "UNSAVED", "VERSION", "STEP", "FLUSH", "LAST SAVE", "REASON",
                           "ERROR"]))
    else:
        print("no jobs yet")
    return 0


def _throttle_line(t: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}%"

    rate = "unlimited" if t["allowed_rate"] is None else f"{human_bytes(t['allowed_rate'])}/s"
    util = None if t["utilisation"] is None else t["utilisation"] * 100
    return (f"throttle {'on' if t['enabled'] else 'off'}: allowed rate {rate}, disk {','.join(t['disks']) or '?'} "
            f"busy {pct(util)}, io pressure some {pct(t['psi_some'])} full {pct(t['psi_full'])}, "
            f"throttled {t['throttled_s']:.1f}s")


def _one_job(args: argparse.Namespace) -> int:
    with admin(args) as client:
        j = client.status(args.job)
    if args.json:
        print_json(j)
        return 0
    step = j["step"] if j["step"] is not None else "-"
    print(f"job {j['job']} (owner {j['owner']}): version {j['latest_version'] or '-'}, step {step}, "
          f"{'saving, ' if j.get('saving') else ''}"
          f"{'dirty: ' + human_bytes(j['dirty_bytes']) + ' unsaved' if j['dirty'] else 'clean'}")
    print(f"last save {j['last_save_time'] or '-'} ({j['last_save_reason'] or '-'}); {j['saves']} saves, "
          f"{human_bytes(j['bytes_written'])} written since the daemon started; "
          f"{human_bytes(j['held_bytes'])} held in memory; log position {j.get('wal_lsn', 0)}")
    r = j.get("remote")
    if r:
        print(f"replicated version {r.get('replicated_version') or '-'}, backlog {r.get('backlog_versions', 0)} "
              f"versions ({human_bytes(r.get('backlog_bytes', 0))})")
    for key in ("last_error", "wal_error"):
        if j.get(key):
            print(f"{key.replace('_', ' ')}: {j[key]}")
    return 0
