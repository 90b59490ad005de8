"""HTTP/2 and gRPC through Sluice: h2load speaks HTTP/2 in clear (prior knowledge) to an outbound
of an `http2` or `grpc` service, and Sluice carries it over TLS (HTTP/2 by ALPN) to the origin;
against h2load speaking HTTP/2 over TLS to the origin itself. Neither nginx nor HAProxy is in
this seat: their HTTP/2-to-HTTP/2 proxying is a different configuration from the peers'.

gRPC here is gRPC-shaped traffic: POSTs with `content-type: application/grpc`, a framed message
body and an answer that ends with the `grpc-status: 0` trailer (nginx's `add_trailer`), which is
what a proxy sees of a unary call.
"""

import os
import subprocess

import lib

STREAMS = 10


def h2load(url, clients, seconds, log_file, data=None, headers=()):
    """h2load at full speed for `seconds`; latencies from its per-request log."""
    if os.path.exists(log_file):
        os.remove(log_file)
    cmd = ["taskset", "-c", lib.LOAD_CPU, "h2load", f"-c{clients}", f"-m{STREAMS}", f"-D{seconds}",
           "--warm-up-time=1", f"--log-file={log_file}"]
    if data:
        cmd.append(f"--data={data}")
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise lib.BenchError(f"h2load {url}: exit {out.returncode}: {out.stdout[-800:]}{out.stderr[-800:]}")
    took, bad, first, last = [], 0, None, 0
    with open(log_file) as f:
        for line in f:
            start, status, t = (int(x) for x in line.split("\t")[:3])
            took.append(t)
            bad += not 200 <= status < 300
            first = start if first is None else min(first, start)
            last = max(last, start + t)
    if not took:
        raise lib.BenchError(f"h2load {url}: no request completed: {out.stdout[-800:]}")
    took.sort()
    pct = lambda q: took[min(len(took) - 1, int(q / 100 * len(took)))]
    span = (last - first) / 1e6
    return {"requests": len(took), "rps": len(took) / span if span else 0.0, "errors": bad,
            "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9)}


def run(ctx, origin):
    seconds = 2 if ctx.quick else 10
    h2_port, http_port, grpc_port = origin["h2"], lib.free_port(), lib.free_port()
    yaml = "---\n".join([
        lib.mes_yaml(ctx, "origin-h2", h2_port, protocol="http2"),
        lib.mes_yaml(ctx, "origin-grpc", h2_port, protocol="grpc"),
        lib.dataplane_yaml([(http_port, "origin-h2"), (grpc_port, "origin-grpc")]),
    ])
    sluice = lib.Sluice(ctx, "sluice-h2", yaml)
    body = ctx.path("grpc-request")
    with open(body, "wb") as f:
        f.write(b"\x00\x00\x00\x00\x05hello")
    grpc_headers = ("content-type: application/grpc", "te: trailers")
    direct = f"https://127.0.0.1:{h2_port}"
    cases = [
        ("HTTP/2, 1 KiB", "direct", direct + "/", None, ()),
        ("HTTP/2, 1 KiB", "sluice", f"http://127.0.0.1:{http_port}/", None, ()),
        ("gRPC unary", "direct", direct + "/grpc", body, grpc_headers),
        ("gRPC unary", "sluice", f"http://127.0.0.1:{grpc_port}/grpc", body, grpc_headers),
    ]
    rows = []
    for scenario, subject, url, data, headers in cases:
        for clients in (1, 16):
            before = lib.cpu_seconds(sluice.pids)
            r = h2load(url, clients, seconds, ctx.path("h2load.log"), data, headers)
            if subject == "sluice":
                cpu = lib.cpu_seconds(sluice.pids) - before
                r["cpu_s_per_10k"] = cpu / r["requests"] * 10_000
                r["peak_rss_kib"] = lib.memory_kib(sluice.pids, "VmHWM")
            rows.append({"scenario": scenario, "subject": subject, "connections": clients, **r})
            lib.log(f"{scenario} {subject} c={clients}: {r['rps']:.0f} req/s p99 {r['p99_us']} µs")
    sluice.stop()
    return {"name": "h2", "rows": rows, "streams_per_connection": STREAMS, "notes": [
        f"h2load keeps {STREAMS} streams open on each connection; `conns` is the number of connections.",
        "Direct is h2load speaking HTTP/2 over TLS to the origin; through Sluice it speaks HTTP/2 in "
        "clear to the outbound and Sluice originates TLS, so the two differ by the proxy hop and "
        "by who does the TLS.",
    ]}


def markdown(result):
    from origination import fmt_us

    by = {(r["scenario"], r["connections"], r["subject"]): r for r in result["rows"]}
    out = ["| scenario | conns | subject | requests/s | p50 | p90 | p99 | p99.9 | CPU s / 10k req | peak RSS | Sluice ÷ direct, req/s |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (scenario, conns, subject), r in by.items():
        ratio = ""
        if subject == "sluice" and (scenario, conns, "direct") in by:
            ratio = f"{r['rps'] / by[(scenario, conns, 'direct')]['rps']:.2f}×"
        cpu = f"{r['cpu_s_per_10k']:.3f}" if r.get("cpu_s_per_10k") is not None else ""
        rss = f"{r['peak_rss_kib'] / 1024:.1f} MiB" if r.get("peak_rss_kib") else ""
        errors = f" ({r['errors']} errors)" if r.get("errors") else ""
        out.append(f"| {scenario} | {conns} | {subject} | {r['rps']:.0f}{errors} | {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} | "
                   f"{fmt_us(r['p99_us'])} | {fmt_us(r['p999_us'])} | {cpu} | {rss} | {ratio} |")
    out.append("")
    out += [f"- {n}" for n in result["notes"]]
    return "\n".join(out)
