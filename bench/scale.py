"""Scale: how loading, memory, routing and config pushes change as the registry grows.

For each registry size N (10, 1,000, 10,000 and 100,000 external services; 10,000 at most with
ctx.quick) it writes N MeshExternalServices in files of 900 documents: one `target` service
originating verified TLS to the TLS origin (lib.mes_yaml, serverName origin.test, CA inline) and
N - 1 others as users write public APIs (TLS origination, verified against the system's roots, a
DNS endpoint of its own that is never dialled). Then:

* `sluice validate -f DIR`, timed;
* `sluice run -f DIR`, timed from start to `/ready` 200. `sluice run` is a control plane and a
  proxy that runs the whole registry, so the proxy holds all N services and its forward proxy
  reaches every one of them (no Dataplane needed); its VmRSS right after ready, and VmHWM after
  the load below;
* routing: wrk (one thread, 16 connections, on the load CPU) through the forward proxy, each
  request `GET http://origin.test:443/` in absolute form: the proxy looks (host, port) up in its
  table of N services and sends the request as HTTPS on the target's pooled connections.
  Requests/s and the proxy's CPU per request, against N = 10;
* apply -> enforced with many proxies: bench/config-push.py as a subprocess (10,000 services,
  20 proxies, 20 rounds; quick: 1,000, 5, 5), its table parsed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import lib

SIZES = (10, 1_000, 10_000, 100_000)
QUICK_SIZES = (10, 1_000, 10_000)
PER_FILE = 900
CONNECTIONS = 16
# jemalloc hands back what loading freed within seconds; RSS is read again after this long.
SETTLE_S = 5


def filler(i):
    return (f"type: MeshExternalService\nname: svc-{i:06d}\nspec:\n"
            f"  match: {{port: 443, protocol: http}}\n"
            f"  endpoints: [{{address: svc-{i:06d}.example.com, port: 443}}]\n"
            f"  tls: {{enabled: true, verification: {{mode: Secured}}}}\n")


def write_registry(ctx, n, origin_port):
    d = ctx.path(f"scale-{n}")
    os.makedirs(d, exist_ok=True)
    docs = [lib.mes_yaml(ctx, "target", origin_port)] + [filler(i) for i in range(n - 1)]
    for k in range(0, len(docs), PER_FILE):
        with open(os.path.join(d, f"part{k // PER_FILE:04d}.yaml"), "w") as f:
            f.write("\n---\n".join(docs[k:k + PER_FILE]))
    return d


def validate(d, n):
    t0 = time.monotonic()
    try:
        out = subprocess.run([lib.SLUICE, "validate", "-f", d], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise lib.BenchError(f"sluice validate of {n} services took over 600 s")
    took = time.monotonic() - t0
    if out.returncode != 0 or f"valid: {n} MeshExternalService" not in out.stdout:
        raise lib.BenchError(f"sluice validate -f {d}: exit {out.returncode}:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    return took


def start(ctx, n, d):
    """`sluice run` on the proxy CPU as lib.Sluice starts it, with a forward proxy of its own and a
    /ready deadline that grows with N (lib.Sluice allows 30 s; 100,000 services take about 25)."""
    admin_port, proxy_port = lib.free_port(), lib.free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    cmd = [lib.SLUICE, "run", "-f", d, "--listen", "off", "--data-dir", ctx.path(f"scale-{n}-data"),
           "--admin", f"127.0.0.1:{admin_port}", "--http-proxy", f"127.0.0.1:{proxy_port}",
           "--access-log", ctx.path(f"scale-{n}-access.log"), "--drain-timeout", "2s"]
    t0 = time.monotonic()
    proc = ctx.procs.start(f"scale-{n}", cmd, cpus=lib.PROXY_CPU)
    lib.poll(f"sluice run with {n} services ready", lambda: (lib.http_get(admin + "/ready") or (0,))[0] == 200,
             timeout=60 + n / 500, proc=proc, procs=ctx.procs)
    ready_s = time.monotonic() - t0
    if not lib.listening(proxy_port):
        raise lib.BenchError(f"sluice run with {n} services is ready but its forward proxy does not listen")
    return proc, admin, proxy_port, ready_s


def check_route(proxy_port, host):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{proxy_port}"}))
    try:
        with opener.open(f"http://{host}/", timeout=10) as r:
            status, body = r.status, r.read()
    except OSError as e:
        raise lib.BenchError(f"GET http://{host}/ through the forward proxy failed: {e}")
    if status != 200 or body != b"x" * 1024:
        raise lib.BenchError(f"GET http://{host}/ through the forward proxy: {status}, {len(body)} bytes")


def wrk_via_proxy(ctx, proxy_port, host, seconds):
    """lib.wrk's run, with every request in absolute form to `host` (wrk.path), sent to the proxy."""
    script = ctx.path("scale-forward.lua")
    with open(script, "w") as f:
        f.write(f'dofile("{lib.WRK_REPORT}")\nwrk.path = "http://{host}/"\nwrk.headers["Host"] = "{host}"\n')
    cmd = ["taskset", "-c", lib.LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout=10s",
           "-s", script, f"http://127.0.0.1:{proxy_port}/"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 40,
                             env=dict(os.environ, WRK_PACE_MS="0"))
    except subprocess.TimeoutExpired:
        raise lib.BenchError(f"wrk through the forward proxy did not end within {seconds + 40} s")
    line = next((l for l in out.stdout.splitlines() if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise lib.BenchError(f"wrk via the forward proxy: exit {out.returncode}: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    r = json.loads(line)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    if r["status_errors"] or not r["requests"]:
        raise lib.BenchError(f"wrk via the forward proxy: {r['status_errors']} non-2xx answers of {r['requests']}")
    return r


def services_held(admin, timeout):
    got = lib.http_get(admin + "/config_dump", timeout=timeout)
    if not got or got[0] != 200:
        raise lib.BenchError(f"cannot read {admin}/config_dump")
    return len(json.loads(got[1])["services"])


def measure(ctx, n, origin):
    d = write_registry(ctx, n, origin["h1"])
    validate_s = validate(d, n)
    proc, admin, proxy_port, ready_s = start(ctx, n, d)
    try:
        rss = lib.memory_kib([proc.pid], "VmRSS")
        anon = lib.memory_kib([proc.pid], "RssAnon")
        host = f"{ctx.pki['name']}:443"
        check_route(proxy_port, host)
        cpu0 = lib.cpu_seconds([proc.pid])
        w = wrk_via_proxy(ctx, proxy_port, host, 1 if ctx.quick else 5)
        cpu = lib.cpu_seconds([proc.pid]) - cpu0
        peak = lib.memory_kib([proc.pid], "VmHWM")
        held = services_held(admin, timeout=30 + n / 1000)
        if held != n:
            raise lib.BenchError(f"sluice run with {n} services holds {held}")
        time.sleep(SETTLE_S)
        settled = lib.memory_kib([proc.pid], "VmRSS")
    finally:
        ctx.procs.stop(proc)
    # The registry, the store and the access log reach hundreds of MB at 100,000 services.
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(ctx.path(f"scale-{n}-data"), ignore_errors=True)
    os.remove(ctx.path(f"scale-{n}-access.log"))
    row = {"services": n, "validate_s": validate_s, "ready_s": ready_s, "rss_kib": rss, "rss_anon_kib": anon,
           "settled_rss_kib": settled, "peak_rss_kib": peak, "rps": w["rps"], "cpu_us_per_request": cpu * 1e6 / w["requests"], "p50_us": w["p50_us"],
           "wrk_errors": w["errors"]}
    lib.log(f"scale: {n} services: validate {validate_s:.2f} s, ready {ready_s:.2f} s, RSS {rss} KiB, "
            f"settled {settled} KiB, peak {peak} KiB, {w['rps']:.0f} req/s, {row['cpu_us_per_request']:.1f} µs CPU/request")
    return row


PUSH_ROW = re.compile(r"^\| (.+?) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$")


def push(ctx):
    services, proxies, rounds = (1_000, 5, 5) if ctx.quick else (10_000, 20, 20)
    cmd = [sys.executable, os.path.join(lib.BENCH, "config-push.py"), "--services", str(services),
           "--proxies", str(proxies), "--rounds", str(rounds), "--sluice", lib.SLUICE]
    proc = ctx.procs.start("scale-config-push", cmd)
    limit = 120 if ctx.quick else 600
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        raise lib.BenchError(f"bench/config-push.py did not finish within {limit} s:\n"
                             f"{ctx.procs.output('scale-config-push')}")
    finally:
        ctx.procs.stop(proc)
    with open(ctx.path("scale-config-push.log"), errors="replace") as f:
        text = f.read()
    if proc.returncode != 0:
        raise lib.BenchError(f"bench/config-push.py exited with {proc.returncode}:\n{text[-3000:]}")
    result = {"services": services, "proxies": proxies, "rounds": rounds, "changes": []}
    for line in text.splitlines():
        m = PUSH_ROW.match(line.strip())
        if m:
            result["changes"].append({"change": m[1], "rounds": int(m[2]), "p50_ms": float(m[3]),
                                      "p90_ms": float(m[4]), "p99_ms": float(m[5]), "max_ms": float(m[6])})
        elif line.startswith("setup:"):
            result["setup"] = line[len("setup: "):]
        elif line.startswith("- "):
            result.setdefault("figures", []).append(line[2:])
    if len(result["changes"]) != 2:
        raise lib.BenchError(f"bench/config-push.py printed no latency table:\n{text[-3000:]}")
    shared = result["changes"][0]
    result.update({k: shared[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")})
    lib.log(f"scale: config push to {proxies} proxies, {services} services: p50 {shared['p50_ms']} ms, "
            f"p99 {shared['p99_ms']} ms")
    return result


def run(ctx, origin):
    started = time.monotonic()
    lib.ensure_tools(["wrk", "taskset"])
    rows = [measure(ctx, n, origin) for n in (QUICK_SIZES if ctx.quick else SIZES)]
    result = {"name": "scale", "rows": rows, "push": push(ctx)}
    by_n = {r["services"]: r for r in rows}
    notes = [
        f"Services: `target` (TLS origination to the nginx origin, verified, CA inline) and N − 1 others "
        f"originating verified TLS with the system's roots to DNS endpoints that are never dialled; files of "
        f"{PER_FILE} documents. `sluice run` is control plane and proxy in one process and its proxy runs the "
        f"whole registry (no Dataplane), so RSS includes the control plane's catalog and SQLite store; "
        f"/config_dump was checked to hold all N services.",
        f"Routing: wrk (1 thread, {CONNECTIONS} connections, {1 if ctx.quick else 5} s, CPU {lib.LOAD_CPU}) "
        f"through the forward proxy, `GET http://origin.test:443/` in absolute form: looked up by (host, port) "
        f"in the table of N services and sent as HTTPS on the target's pool; sluice on CPU {lib.PROXY_CPU}. "
        f"Requests/s moves with whatever else runs on the machine; CPU per request is the steadier measure. "
        f"A plain-HTTP MeshExternalService is reached through the forward proxy only by its endpoint address, "
        f"on a fresh upstream connection per request, which would measure TCP connects rather than the lookup.",
        "RSS is VmRSS right after /ready, and RssAnon its anonymous part: the rest is mostly the binary's "
        "text, file-backed and clean (about 12 MiB of it here), which depends on the kernel and the page cache. "
        f"Settled is VmRSS again {SETTLE_S} s after the load run, once the allocator has returned what "
        "loading freed; peak is VmHWM then (it includes loading and compiling).",
        "Apply → enforced: bench/config-push.py as is (a control plane, one `sluice proxy` per Dataplane and "
        "one with the whole mesh, none of them pinned), the ACKs' times from the control plane's clock.",
    ]
    if 10 in by_n:
        r = by_n[10]
        notes.append(f"RSS with 10 services: {r['rss_kib'] / 1024:.1f} MiB, {r['rss_anon_kib'] / 1024:.1f} MiB of it "
                     f"anonymous (target for idle: ≤ 10 MB).")
    if 10_000 in by_n:
        r = by_n[10_000]
        verdict = "met" if r["settled_rss_kib"] * 1024 <= 64e6 else "missed"
        notes.append(f"RSS with 10,000 services: {r['rss_kib'] / 1024:.1f} MiB after ready, "
                     f"{r['settled_rss_kib'] / 1024:.1f} MiB settled (target ≤ 64 MB: {verdict}); "
                     f"{(r['rss_kib'] - by_n[10]['rss_kib']) / 9990:.1f} KiB per service beyond the first 10.")
    if 100_000 in by_n:
        r = by_n[100_000]
        notes.append(f"100,000 services: {r['validate_s']:.0f} s to validate, {r['ready_s']:.0f} s to ready, "
                     f"{r['rss_kib'] / 2**20:.1f} GiB RSS: the largest size is most of the scenario's time.")
    if any(r["wrk_errors"] for r in rows):
        notes.append("wrk socket errors: " + ", ".join(f"{r['wrk_errors']} at N={r['services']}" for r in rows))
    notes.append(f"The scenario took {time.monotonic() - started:.0f} s.")
    result["notes"] = notes
    return result


def markdown(result):
    rows = result["rows"]
    base = rows[0]
    out = ["| services | validate | start → ready | RSS | of it anonymous | settled RSS | peak RSS | KiB per added service "
           f"| requests/s | vs {base['services']} | proxy CPU per request | p50 |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        added = (f"{(r['rss_kib'] - base['rss_kib']) / (r['services'] - base['services']):.1f}"
                 if r is not base else "")
        out.append(f"| {r['services']:,} | {r['validate_s'] * 1000:.0f} ms | {r['ready_s'] * 1000:.0f} ms "
                   f"| {r['rss_kib'] / 1024:.1f} MiB | {r['rss_anon_kib'] / 1024:.1f} MiB "
                   f"| {r['settled_rss_kib'] / 1024:.1f} MiB | {r['peak_rss_kib'] / 1024:.1f} MiB | {added} "
                   f"| {r['rps']:.0f} | {r['rps'] / base['rps']:.2f}× | {r['cpu_us_per_request']:.1f} µs "
                   f"| {r['p50_us']} µs |")
    p = result["push"]
    out += ["", f"Apply → enforced, {p['services']:,} services, {p['proxies']} proxies, {p['rounds']} rounds "
            f"(bench/config-push.py):", "",
            "| change | rounds | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in p["changes"]:
        out.append(f"| {c['change']} | {c['rounds']} | {c['p50_ms']:.1f} ms | {c['p90_ms']:.1f} ms "
                   f"| {c['p99_ms']:.1f} ms | {c['max_ms']:.1f} ms |")
    out.append("")
    out += [f"- {line}" for line in ([f"config-push setup: {p['setup']}"] if "setup" in p else [])
            + [f"config-push: {f}" for f in p.get("figures", [])] + result["notes"]]
    return "\n".join(out) + "\n"


def plots(result, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["services"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["rss_kib"] / 1024 for r in result["rows"]], "o-", label="RSS after ready")
    ax.plot(n, [r["rss_anon_kib"] / 1024 for r in result["rows"]], "^:", label="of it anonymous (RssAnon)")
    ax.plot(n, [r["settled_rss_kib"] / 1024 for r in result["rows"]], "d-", label=f"settled ({SETTLE_S} s after load)")
    ax.plot(n, [r["peak_rss_kib"] / 1024 for r in result["rows"]], "s--", label="peak RSS (VmHWM)")
    ax.plot([10, 10_000], [10e6 / 2**20, 64e6 / 2**20], "rx", markersize=10, label="targets (10 MB idle, 64 MB at 10k)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("external services in the registry")
    ax.set_ylabel("MiB")
    ax.set_title("sluice run: memory against registry size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "scale-rss.png"), dpi=120)
    plt.close(fig)
    return ["scale-rss.png"]
