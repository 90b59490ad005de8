#!/usr/bin/python3
"""Latency under a steady load, repeated: Sluice (with and without its access log), nginx and
HAProxy at fixed request rates,
in alternating rounds, so that a difference in p99 can be told from the host's run-to-run spread.

    bench/fixed-rate.py                          # 6 rounds of 8 s at 5,000 and 20,000 requests/s
    bench/fixed-rate.py --rounds 10 --seconds 10 --rates 5000
    bench/fixed-rate.py --sluice OLD/sluice      # another build

The setup is bench/run's (the proxies on CPU 0; the origin and h2load on CPU 1; plaintext HTTP/1.1
in, verified TLS out, 1 KiB responses, 16 connections). The origin speaks HTTP/1.1 only: through
HAProxy, HTTP/2 responses come without a reason phrase, which h2load counts as failures, so an
origin that offers HTTP/2 is measured at saturation only (bench/throughput.py --origin-h2). One bench/run measures each proxy once
per rate, and on a 2-CPU VM one p99 moves by more than the proxies differ; this prints each
proxy's median and range over the rounds. Every round measures every proxy, in an order that
alternates between rounds.
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402
from origination import h2load_rate  # noqa: E402

CONNECTIONS = 16


def main():
    parser = lib.rounds_parser(__doc__)
    parser.add_argument("--rates", default="5000,20000", help="requests per second, comma-separated")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    if args.rounds < 1 or args.seconds < 1 or any(r < CONNECTIONS for r in rates):
        parser.error(f"--rounds and --seconds must be at least 1, and each rate at least {CONNECTIONS}")
    results = {}
    with lib.side_by_side(args, ["nginx", "haproxy", "h2load", "openssl", "taskset"], "fixed-rate") as (ctx, subjects):
        urls = {name: url for name, (url, _, _) in subjects.items()}
        for url in urls.values():
            # Warm: upstream connections open, code and caches touched.
            warm = ["taskset", "-c", lib.LOAD_CPU, "h2load", "--h1", f"-c{CONNECTIONS}", "-n5000", url]
            subprocess.run(warm, capture_output=True, timeout=120, check=True)
        for rate in rates:
            results[rate] = {name: [] for name in urls}
            for round_, name in lib.alternating(list(urls), args.rounds):
                r = h2load_rate(urls[name], CONNECTIONS, rate // CONNECTIONS, args.seconds, ctx.path("h2load.log"))
                if r["errors"]:
                    raise lib.BenchError(f"{name} at {rate}/s: {r['errors']} requests failed")
                results[rate][name].append(r)
                lib.log(f"{rate}/s round {round_ + 1} {name}: p50 {r['p50_us']} µs p99 {r['p99_us']} µs")

    print("| rate | proxy | p50 median (range) | p99 median (range) | p99 median ÷ Sluice's |")
    print("| ---: | --- | ---: | ---: | ---: |")
    micros = lambda v: f"{v:,.0f} µs"
    for rate, by_name in results.items():
        sluice_p99 = statistics.median(r["p99_us"] for r in by_name["sluice"])
        for name, runs in by_name.items():
            p99 = statistics.median(r["p99_us"] for r in runs)
            print(f"| {rate:,}/s | {name} | {lib.spread([r['p50_us'] for r in runs], micros)} | "
                  f"{lib.spread([r['p99_us'] for r in runs], micros)} | {p99 / sluice_p99:.2f}× |")
    print(f"\n{args.rounds} rounds of {args.seconds} s per proxy and rate, {CONNECTIONS} connections.")


if __name__ == "__main__":
    lib.script("fixed-rate", main)
