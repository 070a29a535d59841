"""``--plot FILE.png`` for the benchmarks: latency distributions and
throughput against the comparison set, one PNG per run.

Needs matplotlib (``pip install vmsgamp[plot]``); nothing else in the
package imports this module.  Latency panels are empirical CDFs of the
recorded round trips (log time axis); where only percentiles were kept the
points p50/p99/p99.9 are drawn as markers.  Throughput panels are bars on a
log axis, vmsgamp's first and highlighted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vmsgamp._bench.harness import BenchError

Result = dict[str, Any]

_VMSGAMP = "#c0392b"
_OTHER = "#7f8c8d"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'vmsgamp[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, label: str, samples_us: Sequence[float], color: str | None = None) -> None:
    xs = sorted(samples_us)
    if not xs:
        return
    n = len(xs)
    ax.step(xs, [(i + 1) / n for i in range(n)], where="post", label=label, color=color)


def _points(ax: Any, label: str, p50: float | None, p99: float | None, p999: float | None = None,
            color: str | None = None) -> None:
    pts = [(v, q) for v, q in ((p50, 0.5), (p99, 0.99), (p999, 0.999)) if v]
    if pts:
        ax.plot([v for v, _ in pts], [q for _, q in pts], "o--", label=label + " (p50/p99)", color=color)


def _latency_axes(ax: Any, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us, log scale)")
    ax.set_ylabel("fraction of round trips <=")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _bars(ax: Any, rows: Sequence[tuple[str, float | None, bool]], unit: str, title: str) -> None:
    rows = [r for r in rows if r[1]]
    labels = [r[0] for r in rows]
    ax.barh(range(len(rows)), [r[1] for r in rows], color=[_VMSGAMP if r[2] else _OTHER for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(unit + " (log scale)")
    ax.set_title(title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    for i, (_, v, _) in enumerate(rows):
        ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=7)


def _save(fig: Any, path: str, caption: str) -> None:
    fig.text(0.01, 0.005, caption, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)


def fifo(r: Result, path: str, samples: Mapping[str, Sequence[float]] | None = None) -> None:
    """``vmsgamp bench fifo``: round-trip CDFs per waiting mode, throughput."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    if samples:
        for name, xs in samples.items():
            _cdf(lat, name, xs)
    else:
        for mode in ("busy", "spin", "block"):
            _points(lat, mode, r.get(f"rtt_{mode}_p50_us"), r.get(f"rtt_{mode}_p99_us"),
                    r.get(f"rtt_{mode}_p999_us"))
    _latency_axes(lat, "MsgFifo round trip, 64-byte messages")
    rows = [("vmsgamp per message", r.get("send_msgs_per_s"), True),
            (f"vmsgamp bursts of {r.get('burst', 32)}", r.get("burst_msgs_per_s"), True)]
    if r.get("c_send_msgs_per_s"):
        rows.append(("C reference per message", r["c_send_msgs_per_s"], False))
    _bars(thr, rows, "messages/s", "one-way throughput")
    _save(fig, path, "vmsgamp bench fifo: two processes pinned to two CPUs; "
                     "sequence number written and checked in every message")
    plt.close(fig)


def comparison(report: Result, path: str) -> None:
    """``bench/compare_fifo.py``: every mechanism's RTT and throughput."""
    plt = _pyplot()
    med = report["medians"]
    v, c = med.get("vmsgamp", {}), med.get("c_ref", {})
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.8))
    _points(lat, "vmsgamp busy-poll", v.get("rtt_busy_p50_us"), v.get("rtt_busy_p99_us"),
            v.get("rtt_busy_p999_us"), color=_VMSGAMP)
    _points(lat, "vmsgamp blocking", v.get("rtt_block_p50_us"), v.get("rtt_block_p99_us"), color="#e67e22")
    _points(lat, "C ring busy-poll", c.get("rtt_busy_p50_us"), c.get("rtt_busy_p99_us"),
            c.get("rtt_busy_p999_us"), color="#2c3e50")
    _points(lat, "C eventfd ping-pong", c.get("eventfd_p50_us"), c.get("eventfd_p99_us"),
            c.get("eventfd_p999_us"), color="#16a085")
    labels = report.get("labels", {})
    for key, m in med.items():
        if key in ("vmsgamp", "c_ref"):
            continue
        _points(lat, labels.get(key, key), m.get("rtt_p50_us"), m.get("rtt_p99_us"), m.get("rtt_p999_us"))
    _latency_axes(lat, "round trip, 64-byte messages (medians)")
    rows = [("vmsgamp per message", v.get("send_msgs_per_s"), True),
            ("vmsgamp burst 32", v.get("burst_msgs_per_s"), True),
            ("C ring per message", c.get("send_msgs_per_s"), False),
            ("C ring burst 32", c.get("burst_msgs_per_s"), False)]
    rows += [(labels.get(k, k), m.get("msgs_per_s"), False) for k, m in med.items()
             if k not in ("vmsgamp", "c_ref")]
    _bars(thr, rows, "messages/s", "one-way throughput (medians)")
    _save(fig, path, f"bench/compare_fifo.py: medians of {report['runs']} interleaved runs; "
                     "sequence number written and checked in every message by every mechanism")
    plt.close(fig)


def devices(r: Result, samples: Mapping[str, Sequence[float]], path: str) -> None:
    """``vmsgamp bench devices``: bus round trips and device throughput."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, xs in samples.items():
        _cdf(lat, name, xs)
    _points(lat, "bus PING", r.get("ping_rtt_p50_us"), r.get("ping_rtt_p99_us"), color=_VMSGAMP)
    _points(lat, "console echo (split)", r.get("console_split_rtt_p50_us"), r.get("console_split_rtt_p99_us"))
    _points(lat, "MsgFifo busy-poll (floor)", r.get("fifo_busy_rtt_p50_us"), r.get("fifo_busy_rtt_p99_us"),
            color="#2c3e50")
    for x, label in ((5.0, "PING target"), (8.0, "rng target"), (20.0, "console target")):
        lat.axvline(x, color="#999999", lw=0.8, ls=":")
        lat.text(x, 0.02, " " + label, rotation=90, fontsize=6, color="#777777")
    _latency_axes(lat, f"AMP bus round trips ({r.get('doorbell', 'eventfd')} doorbells)")
    rows = [("blk 64 KiB seq. (split)", r.get("blk_seq_split_mb_per_s"), True),
            ("blk 64 KiB seq. (packed)", r.get("blk_seq_packed_mb_per_s"), True),
            ("memcpy, same bytes", r.get("memcpy_mb_per_s"), False),
            (f"rng {r.get('request_bytes', 4096)} B (split)", r.get("rng_split_mb_per_s"), True),
            (f"rng {r.get('request_bytes', 4096)} B (packed)", r.get("rng_packed_mb_per_s"), True)]
    _bars(thr, rows, "MB/s", f"throughput; blk 4 KiB random: {r.get('blk_rand_iops', 0):,.0f} IOPS")
    _save(fig, path, "vmsgamp bench devices: device models in a second process; 32 requests in flight")
    plt.close(fig)
