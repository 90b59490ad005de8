#!/usr/bin/python3
"""Requests/s at saturation, repeated: Sluice (as it ships, and as sluice-nolog with
`--access-log off`, like the peers' configurations), nginx and HAProxy in alternating rounds of the
TLS-origination scenario (keep-alive, or a new connection per request), with where each
proxy's CPU goes.

    bench/throughput.py                         # 6 rounds of 8 s at 16 and 128 connections, 1 KiB
    bench/throughput.py --rounds 10 --conns 16 --path /64k
    bench/throughput.py --conns 1 --rounds 4     # latency-bound: the p99 column is the one to read
    bench/throughput.py --syscalls              # and one round under strace: syscalls per request
    bench/throughput.py --sluice OLD/sluice     # another build
    bench/throughput.py --baseline OLD/sluice   # and the build under test beside it
    bench/throughput.py --close --conns 16      # a new client connection per request
    bench/throughput.py --origin-h2             # an origin that offers HTTP/2 by ALPN: Sluice and
                                                # HAProxy speak it upstream, nginx cannot

The setup is bench/run's (the proxies on CPU 0; the origin and wrk on CPU 1; plaintext HTTP/1.1
in, verified TLS out). One bench/run measures each proxy once per cell, and on a 2-CPU VM one
run's requests/s moves by more than the proxies differ; this prints each proxy's median and
range over the rounds, and beside it what decides the figure: the proxy's user and system CPU
time per request (from /proc, every process and thread), how busy each CPU was, and the TCP
segments sent per request on the machine (from /proc/net/snmp).
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402


def cpu_times():
    """Per CPU: (all ticks, idle and iowait ticks), from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                ticks = [int(t) for t in ticks]
                out[name] = (sum(ticks), ticks[3] + ticks[4])
    return out


def tcp_segments_sent():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(dict(zip(rows[0][1:], rows[1][1:]))["OutSegs"])


UPSTREAM_CONNECTIONS = "sluice_upstream_connections_total"


def measure(url, pids, sluice, conns, seconds, headers):
    """One wrk run; `sluice`, when the subject is one, also says how many upstream connections
    it opened meanwhile (each a TLS handshake)."""
    opened0 = sluice.metric(UPSTREAM_CONNECTIONS) if sluice else 0
    cpu0, cpus0, segs0 = lib.cpu_split(pids), cpu_times(), tcp_segments_sent()
    r = lib.wrk(url, conns, seconds, headers=headers)
    cpu1, cpus1, segs1 = lib.cpu_split(pids), cpu_times(), tcp_segments_sent()
    opened = sluice.metric(UPSTREAM_CONNECTIONS) - opened0 if sluice else None
    n = r["requests"]
    if not n or r["errors"]:
        raise lib.BenchError(f"wrk {url}: {n} requests, {r['errors']} errors")
    busy = {}
    for name, (total, idle) in cpus1.items():
        elapsed = total - cpus0[name][0]
        busy[name] = 100.0 * (1 - (idle - cpus0[name][1]) / elapsed) if elapsed else 0.0
    return {
        "rps": r["rps"],
        "user_us": 1e6 * (cpu1[0] - cpu0[0]) / n,
        "system_us": 1e6 * (cpu1[1] - cpu0[1]) / n,
        "busy": busy,
        "segments": (segs1 - segs0) / n,
        "p99_us": r["p99_us"],
        "upstream_opened": opened,
    }


def syscalls_per_request(ctx, name, url, pids, conns, seconds, headers):
    """One run under `strace -c -f`: slower, but the count per request is what it is."""
    out, said = ctx.path(f"{name}.strace"), ctx.path(f"{name}.strace-stderr")
    cmd = ["strace", "-c", "-f", "-o", out] + [a for pid in pids for a in ("-p", str(pid))]
    with open(said, "w") as err:
        tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # strace says "Process N attached [with M threads]" once it traces every thread of N.
        lib.poll(f"strace attached to {name}",
                 lambda: open(said).read().count(" attached") >= len(pids), timeout=30)
        r = lib.wrk(url, conns, seconds, headers=headers)
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3])
    n = max(r["requests"], 1)
    return {k: v / n for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v / n >= 0.01}


def main():
    parser = lib.rounds_parser(__doc__, origin_h2=True)
    parser.add_argument("--conns", default="16,128", help="client connections, comma-separated")
    parser.add_argument("--path", default="/", help="/ for 1 KiB responses, /64k for 64 KiB")
    parser.add_argument("--syscalls", action="store_true", help="add one round under strace")
    parser.add_argument("--close", action="store_true",
                        help="a new client connection per request (Connection: close) instead of keep-alive")
    args = parser.parse_args()
    headers = ["Connection: close"] if args.close else []
    conns = [int(c) for c in args.conns.split(",")]
    if args.rounds < 1 or args.seconds < 1 or any(c < 1 for c in conns) or args.path not in ("/", "/64k"):
        parser.error("--rounds, --seconds and each of --conns must be at least 1; --path is / or /64k")
    tools = ["nginx", "haproxy", "wrk", "openssl", "taskset"] + (["strace"] if args.syscalls else [])
    results, syscalls = {}, {}
    with lib.side_by_side(args, tools, "throughput", args.path) as (ctx, started):
        subjects = {}
        for name, (url, proc, sluice) in started.items():
            # Warm: upstream connections open (as many as the most connections measured); the
            # peers' workers are forked by now.
            lib.wrk(url, max(conns), 2)
            subjects[name] = (url, lib.pids_of(proc), sluice)
        for c in conns:
            results[c] = {name: [] for name in subjects}
            for round_, name in lib.alternating(list(subjects), args.rounds):
                url, pids, sluice = subjects[name]
                m = measure(url, pids, sluice, c, args.seconds, headers)
                results[c][name].append(m)
                opened = "" if m["upstream_opened"] is None else f", {m['upstream_opened']:.0f} upstream connections opened"
                lib.log(f"{c} connections, round {round_ + 1}, {name}: {m['rps']:,.0f} requests/s, "
                        f"user {m['user_us']:.1f} µs, system {m['system_us']:.1f} µs per request{opened}")
            if args.syscalls:
                syscalls[c] = {name: syscalls_per_request(ctx, f"{name}-{c}", url, pids, c, args.seconds, headers)
                               for name, (url, pids, _) in subjects.items()}

    size = ("1 KiB" if args.path == "/" else "64 KiB") + " responses" + (
        ", a new connection per request" if args.close else "")
    print(f"| conns | proxy | requests/s median (range) | Sluice ÷ this | {lib.NO_LOG} ÷ this | user µs / req "
          "| system µs / req | CPU 0 busy | CPU 1 busy | TCP segments / req | p99 µs median (range) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, by_name in results.items():
        sluice_rps = statistics.median(m["rps"] for m in by_name["sluice"])
        quiet_rps = statistics.median(m["rps"] for m in by_name[lib.NO_LOG])
        for name, runs in by_name.items():
            rps = statistics.median(m["rps"] for m in runs)
            print(f"| {c} | {name} | {lib.spread([m['rps'] for m in runs], lambda v: f'{v:,.0f}')} | "
                  f"{sluice_rps / rps:.2f}× | {quiet_rps / rps:.2f}× | "
                  f"{lib.spread([m['user_us'] for m in runs], lambda v: f'{v:.1f}')} | "
                  f"{lib.spread([m['system_us'] for m in runs], lambda v: f'{v:.1f}')} | "
                  f"{statistics.median(m['busy'].get('cpu0', 0) for m in runs):.0f}% | "
                  f"{statistics.median(m['busy'].get('cpu1', 0) for m in runs):.0f}% | "
                  f"{statistics.median(m['segments'] for m in runs):.2f} | "
                  f"{lib.spread([m['p99_us'] for m in runs], lambda v: f'{v:,.0f}')} |")
    print(f"\n{args.rounds} rounds of {args.seconds} s per proxy and connection count, {size}; "
          "CPU busy and TCP segments are the machine's, medians over the rounds.")
    for c, by_name in syscalls.items():
        print(f"\nSyscalls per request under strace, {c} connections:")
        for name, counts in by_name.items():
            total = sum(counts.values())
            listed = ", ".join(f"{k} {v:.2f}" for k, v in counts.items())
            print(f"- {name}: {total:.2f} ({listed})")


if __name__ == "__main__":
    lib.script("throughput", main)
