#!/usr/bin/env python3
"""Turns scripts/bench.sh's raw outputs into the results table (and JSON).

Reads, per setup, RAW/SETUP/{iperf3-1.json, iperf3-4.json, pingpong.txt, rate.txt, rate.csv,
wrk.txt, proc.txt} and criterion's estimates for benches/routing.rs; prints one table of
figures, one of ratios (to direct and to HAProxy) and the targets with PASS/FAIL for veer.
A figure whose tool was missing or failed is shown as "-" and listed, never made up.
"""
import argparse
import json
import math
import os
import platform
import re
import sys
import time

SETUP_ORDER = ["direct", "veer", "veer-quiet", "veer-busypoll", "haproxy", "nginx"]
HIST_EDGES_US = [10, 15, 20, 30, 50, 100, 200, 500, 1000]


def machine():
    """What the figures were measured on: CPU model, caches, memory, kernel, hypervisor."""
    info = {"kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu_model"] = m.group(1).strip() if m else None
        info["hypervisor"] = bool(re.search(r"^flags\s*:.*\bhypervisor\b", text, re.M))
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s*(\d+) kB", f.read(), re.M)
        info["mem_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        attr = {}
        for name in ("type", "level", "size"):
            try:
                with open(os.path.join(base, index, name)) as f:
                    attr[name] = f.read().strip()
            except OSError:
                break
        if len(attr) == 3 and attr["type"] in ("Data", "Unified"):
            caches[f"L{attr['level']}"] = attr["size"]
    info["caches_per_cpu0"] = caches
    return info


def describe_machine(info):
    caches = ", ".join(f"{k} {v}" for k, v in sorted(info.get("caches_per_cpu0", {}).items()))
    virt = ", virtual machine" if info.get("hypervisor") else ""
    return (f"{info.get('cpus')} CPUs ({info.get('cpu_model') or 'unknown CPU'}{virt}; {caches}), "
            f"{info.get('mem_gib')} GiB, kernel {info.get('kernel')}")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Parsers


def parse_iperf(path):
    text = read(path)
    if not text:
        return None, "no output"
    try:
        d = json.loads(text)
    except ValueError:
        return None, "unreadable JSON"
    if d.get("error"):
        return None, d["error"]
    end = d.get("end", {})
    recv = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    if not recv.get("bits_per_second"):
        return None, "no result"
    return {
        "gbit_per_s": recv["bits_per_second"] / 1e9,
        "bytes": sent.get("bytes", recv.get("bytes", 0)),
        "retransmits": sent.get("retransmits"),
    }, None


PCT_RE = re.compile(r"---> percentile\s+([\d.]+)\s*=\s*([\d.]+)")
MINMAX_RE = re.compile(r"---> <(MAX|MIN)> observation\s*=\s*([\d.]+)")
AVG_RE = re.compile(r"avg-(?:rtt|lat)=([\d.]+)")
OBS_RE = re.compile(r"Total (\d+) observations")


def parse_sockperf(path):
    text = read(path)
    if not text:
        return None, "no output"
    pct = {float(p): float(v) for p, v in PCT_RE.findall(text)}
    if 50.0 not in pct:
        last = [line for line in text.splitlines() if line.strip()][-3:]
        return None, "no percentiles: " + " / ".join(last)
    out = {
        "p50_us": pct.get(50.0),
        "p99_us": pct.get(99.0),
        "p99_9_us": pct.get(99.9),
        "p99_99_us": pct.get(99.99),
    }
    for k, v in MINMAX_RE.findall(text):
        out[k.lower() + "_us"] = float(v)
    m = AVG_RE.search(text)
    if m:
        out["avg_us"] = float(m.group(1))
    m = OBS_RE.search(text)
    if m:
        out["observations"] = int(m.group(1))
    return out, None


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def parse_full_log(path):
    """sockperf --full-log: `packet, txTime(sec), rxTime(sec), rtt(usec)` per message."""
    text = read(path)
    if not text:
        return None
    rtts = []
    seen_header = False
    for line in text.splitlines():
        if line.startswith("packet,"):
            seen_header = True
            continue
        if not seen_header:
            continue
        parts = line.split(",")
        if len(parts) >= 4:
            try:
                rtts.append(float(parts[3]))
            except ValueError:
                pass
    if not rtts:
        return None
    rtts.sort()
    buckets = []
    lo = 0.0
    for edge in HIST_EDGES_US + [math.inf]:
        n = sum(1 for r in rtts if lo <= r < edge)
        buckets.append({"from_us": lo, "to_us": None if edge == math.inf else edge, "count": n})
        lo = edge
    return {
        "messages": len(rtts),
        "p50_us": percentile(rtts, 50),
        "p99_us": percentile(rtts, 99),
        "p99_9_us": percentile(rtts, 99.9),
        "max_us": rtts[-1],
        "histogram": buckets,
    }


def parse_wrk(path):
    text = read(path)
    if not text:
        return None, "no output"
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not m:
        return None, "no Requests/sec: " + text.strip().splitlines()[-1] if text.strip() else "empty"
    out = {"conn_per_s": float(m.group(1))}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(["connect", "read", "write", "timeout"], map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    return out, None


def parse_proc(path):
    text = read(path) or ""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def criterion_ns(cdir, group, n, since):
    path = os.path.join(cdir, group, str(n), "new", "estimates.json")
    try:
        if os.path.getmtime(path) < since:
            return None  # left over from an earlier run
    except OSError:
        return None
    text = read(path)
    if not text:
        return None
    try:
        d = json.loads(text)
        return d["mean"]["point_estimate"]
    except (ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------
# Collect

ROUTING_SIZES = ("10", "1000", "10000")
SINGLE_RE = re.compile(r"^routing-bench-single (\w+) (\d+) ([\d.]+)", re.M)
TIMEOUT_RE = re.compile(r"^routing-bench-timeout (\d+) (\d+)", re.M)
RESIDENT_RE = re.compile(r"^routing-bench-resident (\d+) ([\d.]+)", re.M)


# A dependent load faster than this hit a cache (L2 here is ~5 ns, memory 100+ ns): at that
# size the lookup's data is cached and "trips to memory" mean nothing.
CACHE_HIT_NS = 20


def misses_added(r):
    """(random − hot) ÷ one dependent miss over the snapshot's memory: how many trips to
    memory the random order adds to a lookup, against a baseline from the same run."""
    random, hot, miss = r.get("lookup_ns"), r.get("lookup_hot_ns"), r.get("miss_ns")
    if random is None or hot is None or not miss:
        return None
    return max(random - hot, 0) / miss


def collect_routing(args, problems):
    """Criterion means (this run's only) plus the bench's single-run lines."""
    routing = {}
    log = read(args.routing_log) if args.routing_log else None
    if args.criterion:
        for group, key in (("route", "lookup_ns"), ("route_hot", "lookup_hot_ns"), ("miss", "miss_ns"),
                           ("compile", "compile_ms"), ("reload_yaml", "reload_yaml_ms"),
                           ("reload_edit", "reload_edit_ms")):
            for n in ROUTING_SIZES:
                ns = criterion_ns(args.criterion, group, n, args.since)
                if ns is not None:
                    routing.setdefault(n, {})[key] = ns if key.endswith("_ns") else ns / 1e6
    if log:
        for what, n, ms in SINGLE_RE.findall(log):
            r = routing.setdefault(n, {})
            r[f"{what}_ms_one_run"] = float(ms)
            # A size too slow to sample is reported from its one run.
            if what in ("compile", "reload_yaml", "reload_edit") and f"{what}_ms" not in r:
                r[f"{what}_ms"] = float(ms)
                r[f"{what}_from_one_run"] = True
        for n, mb in RESIDENT_RE.findall(log):
            routing.setdefault(n, {})["resident_mb"] = float(mb)
        for n, budget in TIMEOUT_RE.findall(log):
            routing.setdefault(n, {})["compile_timeout_s"] = int(budget)
            problems.append(f"routing: compiling {n} services took longer than {budget} s; "
                            f"nothing measured at {n} services")
    return routing



def collect(args):
    setups = [s for s in args.setups.split(",") if os.path.isdir(os.path.join(args.raw, s))]
    setups.sort(key=lambda s: SETUP_ORDER.index(s) if s in SETUP_ORDER else 99)
    idle = [int(x) for x in args.idle.split(",") if x]
    results = {}
    problems = []
    for s in setups:
        d = os.path.join(args.raw, s)
        r = {}
        for streams in (1, 4):
            v, err = parse_iperf(os.path.join(d, f"iperf3-{streams}.json"))
            if v:
                r[f"bulk_{streams}"] = v
            elif os.path.exists(os.path.join(d, f"iperf3-{streams}.json")):
                problems.append(f"{s}: iperf3 {streams} stream(s): {err}")
        v, err = parse_sockperf(os.path.join(d, "pingpong.txt"))
        if v:
            r["pingpong"] = v
        elif os.path.exists(os.path.join(d, "pingpong.txt")):
            problems.append(f"{s}: sockperf ping-pong: {err}")
        v, err = parse_sockperf(os.path.join(d, "rate.txt"))
        full = parse_full_log(os.path.join(d, "rate.csv"))
        if v or full:
            r["rate"] = {"sockperf": v, **(full or {})}
            if full is None:  # fall back on sockperf's own percentiles
                r["rate"].update({k: v[k] for k in ("p50_us", "p99_us", "p99_9_us")})
        elif os.path.exists(os.path.join(d, "rate.txt")):
            problems.append(f"{s}: sockperf at a fixed rate: {err}")
        v, err = parse_wrk(os.path.join(d, "wrk.txt"))
        if v:
            r["conn"] = v
            errs = sum(v.get("socket_errors", {}).values()) + v.get("non_2xx", 0)
            if errs:
                problems.append(f"{s}: wrk reported {errs} socket errors / non-2xx responses")
        elif os.path.exists(os.path.join(d, "wrk.txt")):
            problems.append(f"{s}: wrk: {err}")
        p = parse_proc(os.path.join(d, "proc.txt"))
        if s != "direct" and p:
            tck = p.get("clk_tck", 100)
            proc = {}
            bulk_bytes = sum(r[k]["bytes"] for k in ("bulk_1", "bulk_4") if k in r)
            if "bulk_cpu_ticks" in p and bulk_bytes:
                proc["cpu_s_per_gb"] = p["bulk_cpu_ticks"] / tck / (bulk_bytes / 1e9)
            if "conn_cpu_ticks" in p and r.get("conn", {}).get("requests"):
                proc["cpu_s_per_1000_conn"] = p["conn_cpu_ticks"] / tck / (r["conn"]["requests"] / 1000)
                if "conn_sys_ticks" in p:
                    proc["sys_s_per_1000_conn"] = p["conn_sys_ticks"] / tck / (r["conn"]["requests"] / 1000)
            if "rate_cpu_ticks" in p and p.get("rate_cpu_ms"):
                # share of one core the proxy used while relaying the fixed-rate stream
                proc["rate_cpu_pct"] = 100 * p["rate_cpu_ticks"] / tck / (p["rate_cpu_ms"] / 1000)
            if "peak_rss_kib" in p:
                proc["peak_rss_mib"] = p["peak_rss_kib"] / 1024
            if "start_rss_kib" in p:
                proc["start_rss_mib"] = p["start_rss_kib"] / 1024
            base = p.get("idle_base_rss_kib")
            if base is not None:
                proc["idle_base_rss_mib"] = base / 1024
                for n in idle:
                    if f"idle_rss_kib_{n}" in p:
                        proc[f"idle_kib_per_conn_{n}"] = (p[f"idle_rss_kib_{n}"] - base) / n
                        proc[f"idle_rss_mib_{n}"] = p[f"idle_rss_kib_{n}"] / 1024
            if "idle_peak_rss_kib" in p:
                proc["idle_peak_rss_mib"] = p["idle_peak_rss_kib"] / 1024
            r["proxy"] = proc
        results[s] = r
    routing = collect_routing(args, problems)
    return setups, results, routing, problems


# ---------------------------------------------------------------------------------------------
# Figures, ratios, targets

# (key, label, unit, getter, higher_is_better, latency (show +delta vs direct))
FIGURES = [
    ("bulk_1", "bulk, 1 stream", "Gbit/s", lambda r: r.get("bulk_1", {}).get("gbit_per_s"), True, False),
    ("bulk_4", "bulk, 4 streams", "Gbit/s", lambda r: r.get("bulk_4", {}).get("gbit_per_s"), True, False),
    ("rtt_p50", "RTT p50, ping-pong 64 B", "µs", lambda r: r.get("pingpong", {}).get("p50_us"), False, True),
    ("rtt_p99", "RTT p99, ping-pong 64 B", "µs", lambda r: r.get("pingpong", {}).get("p99_us"), False, True),
    ("rtt_p99_9", "RTT p99.9, ping-pong 64 B", "µs", lambda r: r.get("pingpong", {}).get("p99_9_us"), False, True),
    ("rate_p50", "RTT p50 at {rate} msg/s", "µs", lambda r: r.get("rate", {}).get("p50_us"), False, True),
    ("rate_p99", "RTT p99 at {rate} msg/s", "µs", lambda r: r.get("rate", {}).get("p99_us"), False, True),
    ("rate_p99_9", "RTT p99.9 at {rate} msg/s", "µs", lambda r: r.get("rate", {}).get("p99_9_us"), False, True),
    ("conn_per_s", "new connections", "conn/s", lambda r: r.get("conn", {}).get("conn_per_s"), True, False),
    ("cpu_per_gb", "proxy CPU per GB", "s/GB", lambda r: r.get("proxy", {}).get("cpu_s_per_gb"), False, False),
    ("cpu_per_kconn", "proxy CPU per 1000 conn", "s", lambda r: r.get("proxy", {}).get("cpu_s_per_1000_conn"), False, False),
    ("sys_per_kconn", "  of which in the kernel", "s", lambda r: r.get("proxy", {}).get("sys_s_per_1000_conn"), False, False),
    ("rate_cpu", "proxy CPU at {rate} msg/s", "% of a core", lambda r: r.get("proxy", {}).get("rate_cpu_pct"), False, False),
    ("peak_rss", "proxy peak RSS (load)", "MiB", lambda r: r.get("proxy", {}).get("peak_rss_mib"), False, False),
]


def idle_figures(idle):
    return [
        (f"idle_{n}", f"RSS per idle conn, {n}", "KiB",
         (lambda n: lambda r: r.get("proxy", {}).get(f"idle_kib_per_conn_{n}"))(n), False, False)
        for n in idle
    ]


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit in ("conn/s",):
        return f"{v:,.0f}"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def targets(values, routing):
    """veer's targets from the issue, as (figure, target text, veer's value text, PASS/FAIL/n/a)."""
    out = []

    def get(setup, key):
        return values.get(key, {}).get(setup)

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    for key, label in (("bulk_1", "bulk 1 stream"), ("bulk_4", "bulk 4 streams")):
        v, d, h = get("veer", key), get("direct", key), get("haproxy", key)
        ok = None if v is None or d is None or h is None else (v >= 1.5 * h and v >= 0.6 * d)
        shown = "-" if v is None else f"{fmt(v)} Gbit/s = {fmt(v / h) if h else '-'}× HAProxy, {100 * v / d:.0f}% of direct" if d else f"{fmt(v)} Gbit/s"
        out.append((label, "≥ 1.5× HAProxy and ≥ 60% of direct", shown, verdict(ok)))
    for key, label, slack in (("rtt_p50", "RTT p50 (ping-pong)", 5), ("rtt_p99", "RTT p99 (ping-pong)", 15),
                              ("rate_p50", "RTT p50 (fixed rate)", 5), ("rate_p99", "RTT p99 (fixed rate)", 15)):
        for setup, suffix in (("veer", ""), ("veer-busypoll", ", --busy-poll 50us")):
            v, d = get(setup, key), get("direct", key)
            if setup != "veer" and v is None:
                continue  # the opt-in variant was not run
            ok = None if v is None or d is None else v <= d + slack
            shown = "-" if v is None or d is None else f"{v - d:+.1f} µs over direct"
            out.append((label + suffix, f"≤ direct + {slack} µs", shown, verdict(ok)))
    v, h = get("veer", "conn_per_s"), get("haproxy", "conn_per_s")
    ok = None if v is None or h is None else v >= 1.2 * h
    shown = "-" if v is None or not h else f"{v / h:.2f}× HAProxy"
    # The verdict is the default's (access log on); HAProxy and nginx log nothing here, so
    # the same binary without the log is shown beside it.
    q = get("veer-quiet", "conn_per_s")
    if q is not None and h and v is not None:
        shown += f" (no access log: {q / h:.2f}×)"
    # The proxy's kernel time per connection (mostly TCP and netfilter work any proxy pays)
    # against HAProxy's whole CPU per connection: how much room user space leaves.
    ks, hc = get("veer", "sys_per_kconn"), get("haproxy", "cpu_per_kconn")
    if ks is not None and hc:
        shown += f"; veer's kernel time per connection alone is {100 * ks / hc:.0f}% of HAProxy's CPU"
    out.append(("new conn/s", "≥ 1.2× HAProxy", shown, verdict(ok)))
    v = get("veer", "peak_rss")
    out.append(("peak RSS", "≤ 8 MiB", "-" if v is None else f"{fmt(v)} MiB", verdict(None if v is None else v <= 8)))
    for key in sorted(k for k in values if k.startswith("idle_")):
        v = get("veer", key)
        n = key.split("_")[1]
        out.append((f"memory per idle conn ({n})", "≤ 4 KiB", "-" if v is None else f"{fmt(v)} KiB",
                    verdict(None if v is None else v <= 4)))
    for key, what in (("lookup_ns", "random services"), ("lookup_hot_ns", "same service")):
        small, big = routing.get("10", {}).get(key), routing.get("10000", {}).get(key)
        ok = None if small is None or big is None else big <= 2 * small
        if ok is not None:
            shown = f"{small:.0f} → {big:.0f} ns ({big / small:.2f}×)"
            trips = misses_added(routing.get("10000", {}))
            if key == "lookup_ns" and trips is not None:
                shown += (f"; random order adds {trips:.1f} trips to memory of "
                          f"{routing['10000']['miss_ns']:.0f} ns")
        elif "compile_timeout_s" in routing.get("10000", {}):
            shown = "not measured: compiling 10 000 services timed out"
        else:
            shown = "-"
        out.append((f"route lookup, {what}, 10 → 10 000", "flat within 2×", shown, verdict(ok)))
    r = routing.get("10000", {})
    c = r.get("compile_ms")
    if c is not None:
        shown = f"{c:.0f} ms" + (" (one run)" if r.get("compile_from_one_run") else "")
        ok = c < 200
    elif "compile_timeout_s" in r:
        shown, ok = f"> {r['compile_timeout_s']} s (gave up)", False
    else:
        shown, ok = "-", None
    out.append(("reload (compile), 10 000 services", "< 200 ms", shown, verdict(ok)))
    return out


def table(rows, header, left=1):
    """Columns before `left` are left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(widths[i]) if i < left else str(c).rjust(widths[i]) for i, c in enumerate(r))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--setups", default=",".join(SETUP_ORDER))
    ap.add_argument("--criterion")
    ap.add_argument("--routing-log")
    ap.add_argument("--since", type=float, default=0, help="ignore criterion results older than this")
    ap.add_argument("--json")
    ap.add_argument("--duration", type=int, default=0)
    ap.add_argument("--rate", type=int, default=10000)
    ap.add_argument("--idle", default="1000,5000")
    ap.add_argument("--quick", type=int, default=0)
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--unavailable", default="")
    args = ap.parse_args()

    setups, results, routing, problems = collect(args)
    figures = FIGURES + idle_figures([int(x) for x in args.idle.split(",") if x])
    values = {}
    for key, _label, _unit, get, _hib, _lat in figures:
        values[key] = {s: get(results[s]) for s in setups}

    # Table 1: the figures
    rows = []
    for key, label, unit, _get, _hib, lat in figures:
        cells = []
        d = values[key].get("direct")
        for s in setups:
            v = values[key][s]
            c = fmt(v, unit)
            if lat and v is not None and d is not None and s != "direct":
                c += f" ({v - d:+.1f})"
            cells.append(c)
        if all(c == "-" for c in cells):
            continue
        rows.append([label.format(rate=args.rate), unit] + cells)
    print()
    print("Figures (latency cells: value (µs over direct)); each setup ran in turn on the same machine")
    print(table(rows, ["figure", "unit"] + setups, left=2))

    # Table 2: ratios to direct and to HAProxy
    rrows = []
    proxies = [s for s in setups if s != "direct"]
    for key, label, unit, _get, hib, _lat in figures:
        cells = []
        for s in proxies:
            v = values[key][s]
            for ref in ("direct", "haproxy"):
                r = values[key].get(ref)
                if ref == s or ref not in setups:
                    continue
                cells.append("-" if v is None or not r else f"{v / r:.2f}")
        if all(c == "-" for c in cells) or not cells:
            continue
        rrows.append([label.format(rate=args.rate)] + cells)
    rheader = ["ratio"]
    for s in proxies:
        for ref in ("direct", "haproxy"):
            if ref == s or ref not in setups:
                continue
            rheader.append(f"{s}/{ref}")
    if rrows:
        print()
        print("Ratios (value ÷ reference; > 1 is more throughput, more latency, more CPU or memory)")
        print(table(rrows, rheader))

    # Histogram at the fixed rate
    hist_rows = []
    for s in setups:
        h = results[s].get("rate", {}).get("histogram")
        if not h:
            continue
        total = sum(b["count"] for b in h) or 1
        hist_rows.append([s] + [f"{100 * b['count'] / total:.1f}" for b in h])
    if hist_rows:
        edges = [0] + HIST_EDGES_US
        hh = [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f"≥{edges[-1]}"]
        print()
        print(f"RTT histogram at {args.rate} msg/s (64 B, full RTT): % of messages per bucket (µs)")
        print(table(hist_rows, ["setup"] + hh))

    # Routing core
    if routing:
        print()
        print("Routing core (benches/routing.rs; criterion means, * = one run, too slow to sample)")
        print("  lookup = Snapshot::route per connection (the packed table's decision, endpoint included); "
              "random = services in pseudo-random order, hot = always the same service")

        def cell(r, key):
            v = r.get(key)
            if v is None:
                timed_out = "compile_timeout_s" in r and key in ("compile_ms", "reload_yaml_ms")
                return f"> {r['compile_timeout_s']} s" if timed_out else "-"
            one_run = (key in ("compile_ms", "reload_yaml_ms", "reload_edit_ms")
                       and r.get(key.replace("_ms", "_from_one_run")))
            return fmt(v) + ("*" if one_run else "")

        def miss_cell(r):
            if r.get("miss_ns") is None or r.get("resident_mb") is None:
                return "-"
            return f"{fmt(r['miss_ns'])} ({fmt(r['resident_mb'])} MB)"

        def trips_cell(r):
            t = misses_added(r)
            if t is not None and r["miss_ns"] < CACHE_HIT_NS:
                return "- (cached)"  # the "miss" is a cache hit: nothing to count in
            return "-" if t is None else f"{t:.1f}"

        print("  one miss = a dependent load anywhere in the memory the compile made resident; "
              "trips = (random − hot) ÷ one miss")
        rr = [[n, cell(routing[n], "lookup_ns"), cell(routing[n], "lookup_hot_ns"),
               miss_cell(routing[n]), trips_cell(routing[n]),
               cell(routing[n], "compile_ms"), cell(routing[n], "validate_ms_one_run"),
               cell(routing[n], "reload_yaml_ms"), cell(routing[n], "reload_edit_ms")]
              for n in ROUTING_SIZES if n in routing]
        print(table(rr, ["services", "lookup ns (random)", "lookup ns (hot)", "one miss ns (memory)",
                         "trips to memory", "compile ms (reload)",
                         "validate alone ms (one run)", "parse YAML + compile ms",
                         "reload, 1 of 10 files edited ms"]))

    # Targets
    t = targets(values, routing)
    print()
    print("veer targets (reference only)")
    print(table([list(x) for x in t], ["figure", "target", "veer", "verdict"], left=4))

    notes = []
    if args.unavailable:
        notes.append(f"unavailable tools (figures skipped): {args.unavailable}")
    notes.extend(problems)
    if notes:
        print()
        print("Notes:")
        for n in notes:
            print(f"  - {n}")
    print()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    host = machine()
    print(f"Machine: {describe_machine(host)}")
    print(f"Run: {'quick, ' if args.quick else ''}{args.duration}s per run, {os.cpu_count()} CPUs, "
          f"load average at the end {load[0]:.2f}, {args.elapsed}s in all" if load else "")

    if args.json:
        doc = {
            "meta": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": platform.node(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "machine": host,
                "load_average": list(load) if load else None,
                "quick": bool(args.quick),
                "duration_s": args.duration,
                "rate_mps": args.rate,
                "idle_counts": [int(x) for x in args.idle.split(",") if x],
                "elapsed_s": args.elapsed,
                "unavailable": args.unavailable.split() if args.unavailable else [],
                "notes": problems,
            },
            "setups": results,
            "figures": {k: v for k, v in values.items()},
            "routing": routing,
            "targets": [dict(zip(["figure", "target", "veer", "verdict"], x)) for x in t],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=lambda o: None)
            f.write("\n")
        print(f"JSON written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
