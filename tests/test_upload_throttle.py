"""The upload throttle's pure parts: the network load (measure_net) and the shared controller (step) with
the upload tuning on recorded traces, and the counter parsers on captured /proc text. No I/O."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from autosaved.daemon.netsampler import parse_net_dev, parse_tcp_snmp, route_interfaces
from autosaved.throttle import (
    MIN_SEGMENTS,
    Load,
    NetSample,
    ThrottleState,
    contention,
    initial_state,
    measure_net,
    step,
    upload_controller,
)

MiB = 1024 * 1024
DT = 0.5


@dataclass(frozen=True)
class Seg:
    """``seconds`` of steady network load, as the counters would record it."""

    seconds: float
    others_mbps: float = 0.0
    own_mbps: float = 0.0
    segs_per_s: int = 2000
    retrans_share: float = 0.0


def _trace(segs: list[Seg], link_bps: float | None) -> list[NetSample]:
    out = [NetSample(at=0.0, tx_bytes=0, own_bytes=0, link_bps=link_bps, out_segs=0, retrans_segs=0)]
    for seg in segs:
        for _ in range(round(seg.seconds / DT)):
            p = out[-1]
            own = p.own_bytes + int(seg.own_mbps * MiB * DT)
            sent = int((seg.own_mbps + seg.others_mbps) * MiB * DT)
            out.append(NetSample(at=p.at + DT, tx_bytes=(p.tx_bytes or 0) + sent, own_bytes=own, link_bps=link_bps,
                                 out_segs=(p.out_segs or 0) + int(seg.segs_per_s * DT),
                                 retrans_segs=(p.retrans_segs or 0) + int(seg.segs_per_s * DT * seg.retrans_share)))
    return out


def _run(segs: list[Seg], cap: float | None = None, link_bps: float | None = 125 * MiB) -> list[ThrottleState]:
    ctl = upload_controller(cap)
    state = initial_state(ctl)
    samples = _trace(segs, link_bps)
    states = []
    for prev, cur in itertools.pairwise(samples):
        state = step(ctl, state, measure_net(prev, cur), cur.at)
        states.append(state)
    return states


def test_measure_net_splits_own_and_others_bytes_and_reads_loss() -> None:
    a = NetSample(at=0.0, tx_bytes=0, own_bytes=0, link_bps=100 * MiB, out_segs=0, retrans_segs=0)
    b = NetSample(at=1.0, tx_bytes=60 * MiB, own_bytes=20 * MiB, link_bps=100 * MiB, out_segs=1000, retrans_segs=50)
    load = measure_net(a, b)
    assert load.others_bps == 40 * MiB and load.utilisation == 0.6 and load.loss == 0.05
    # Our bytes counted before the interface saw them: others' traffic is clamped at 0, never negative.
    c = NetSample(at=2.0, tx_bytes=61 * MiB, own_bytes=30 * MiB, link_bps=None, out_segs=1000 + MIN_SEGMENTS - 1,
                  retrans_segs=60)
    load = measure_net(b, c)
    assert load.others_bps == 0 and load.utilisation is None  # capacity unknown (virtual NIC)
    assert load.loss is None  # too few segments to tell
    # The disk's signals never appear in a network load.
    assert (load.psi_some, load.psi_full, load.dirty_bytes) == (None, None, None)


def test_others_on_a_busy_link_halve_the_upload_then_it_recovers_to_the_cap() -> None:
    cap = 64 * MiB
    states = _run([Seg(2, own_mbps=60), Seg(3, others_mbps=80, own_mbps=30), Seg(20, own_mbps=60)], cap=cap)
    alone, shared, after = states[:4], states[4:10], states[10:]
    assert all(s.rate == cap and not s.contended for s in alone)  # our own traffic alone is no contention
    assert shared[-1].rate < cap / 4 and all(s.contended for s in shared)
    # Halving at most once per decrease_every, never below the floor.
    assert min(s.rate for s in shared) >= 1 * MiB
    assert after[0].rate == shared[-1].rate + 4 * MiB * DT and after[-1].rate == cap


def test_retransmissions_back_off_even_with_no_link_capacity_known() -> None:
    states = _run([Seg(1, own_mbps=40), Seg(3, own_mbps=40, retrans_share=0.05)], cap=None, link_bps=None)
    assert math.isinf(states[1].rate)  # no signal: unlimited (no cap configured)
    assert states[-1].contended and states[-1].rate <= 32 * MiB


def test_with_no_signal_only_the_cap_holds() -> None:
    ctl = upload_controller(8 * MiB)
    assert not contention(ctl, Load())
    state = step(ctl, initial_state(ctl), Load(), 1.0)
    assert state.rate == 8 * MiB


def test_idle_others_below_the_noise_floor_are_no_contention() -> None:
    states = _run([Seg(3, others_mbps=0.1, own_mbps=100)], cap=None)
    assert all(math.isinf(s.rate) for s in states)


ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
ens5\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
"""


def test_route_interfaces_longest_prefix_and_loopback() -> None:
    assert route_interfaces("10.1.2.3", ROUTE) == ["ens5"]  # 10.0.0.0/8
    assert route_interfaces("192.0.2.9", ROUTE) == ["eth0"]  # 192.0.2.0/24
    assert route_interfaces("52.1.1.1", ROUTE) == ["eth0"]  # the default route
    assert route_interfaces("127.0.0.1", ROUTE) == ["lo"] and route_interfaces("::1", ROUTE) == ["lo"]
    assert route_interfaces("2001:db8::1", ROUTE) is None and route_interfaces(None, ROUTE) is None
    assert route_interfaces("s3.example.com", ROUTE) is None


def test_counter_parsers() -> None:
    dev = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier
    lo: 395803 8420    0    0    0     0          0         0 395804  8421    0    0    0     0       0          0
  eth0: 1000 10 0 0 0 0 0 0 2500 20 0 0 0 0 0 0
"""
    assert parse_net_dev(dev) == {"lo": 395804, "eth0": 2500}
    snmp = ("Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab "
            "InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n"
            "Tcp: 1 200 120000 -1 1838 1651 163 376 4 856022 847553 1836 0 555 0\n")
    assert parse_tcp_snmp(snmp) == (847553, 1836)
    assert parse_tcp_snmp("Udp: a b\nUdp: 1 2\n") is None


def test_a_reload_applies_the_upload_rate_and_keeps_the_store() -> None:
    from dataclasses import replace

    from autosaved.config import RemoteSettings
    from autosaved.daemon.replicator import Replicator

    settings = RemoteSettings(url="s3://bucket/a", endpoint="http://127.0.0.1:9", upload_rate=8 * MiB)
    rep = Replicator(settings, holder="h", local_store=lambda _o, _n: None,  # type: ignore[arg-type,return-value]
                     retention=lambda _k: (1, None), spawn=lambda *_a: None)
    assert rep.rate.status()["allowed_rate"] == 8 * MiB
    rep.reconfigure(replace(settings, upload_rate=2 * MiB, url="s3://other/b", keep_last=3, timeout=7.0),
                    adaptive=True)
    assert rep.rate.status()["cap"] == 2 * MiB and rep.rate.rate == 2 * MiB
    assert rep.settings.keep_last == 3 and rep.store.timeout == 7.0
    assert rep.settings.url == "s3://bucket/a" and rep.store.location.url == "s3://bucket/a"  # at restart only
    rep.reconfigure(replace(settings, upload_rate=None), adaptive=False)
    assert rep.rate.status()["allowed_rate"] is None and not rep.rate.adaptive
