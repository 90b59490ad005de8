"""Plaintext HTTP/1.1 in, verified TLS out: Sluice, nginx and HAProxy in the same seat (one
worker, the proxy CPU), and the client speaking TLS to the origin itself.

- keep-alive at fixed concurrency (1, 16, 128 connections), 1 KiB and 64 KiB responses (wrk);
- steady load at fixed rates (h2load --rps, per-request latencies from its log);
- a new client connection per request (wrk with `Connection: close`).
"""

import os
import subprocess

import lib

SUBJECTS = ("direct", "sluice", lib.NO_LOG, "nginx", "haproxy")
PATHS = {"1k": ("/", 1024), "64k": ("/64k", 65536)}
H2_SCENARIO = "keep-alive 1k, origin offers HTTP/2"


class Subjects:
    """The ways to reach the origin, each with the processes whose CPU and memory count: Sluice
    as it ships (its access log written to a file) and without the access log, as the peers'
    configurations run. With `peer_alpn`, HAProxy offers the origin that by ALPN."""

    def __init__(self, ctx, origin_port, peer_alpn="http/1.1"):
        self.ctx = ctx
        started = lib.start_subjects(ctx, origin_port, path="", peer_alpn=peer_alpn)
        self.sluice = started["sluice"][2]
        self.urls = {"direct": f"https://127.0.0.1:{origin_port}",
                     **{name: url for name, (url, _, _) in started.items()}}
        self.procs = {name: proc for name, (_, proc, _) in started.items()}
        self.idle_rss = {s: lib.memory_kib(self.pids(s)) for s in self.procs}
        for subject in SUBJECTS:
            for path, size in PATHS.values():
                self.check(subject, path, size)

    def pids(self, subject):
        proc = self.procs.get(subject)
        return lib.pids_of(proc) if proc else []

    def check(self, subject, path, size):
        """One request, its body checked, before any load."""
        cmd = ["curl", "-sS", "--max-time", "5", "--cacert", self.ctx.pki["ca"], "-o", "-"]
        if subject == "direct":
            cmd += ["--resolve", f"{self.ctx.pki['name']}:{self.urls['direct'].rsplit(':', 1)[1]}:127.0.0.1",
                    f"https://{self.ctx.pki['name']}:{self.urls['direct'].rsplit(':', 1)[1]}{path}"]
        else:
            cmd.append(self.urls[subject] + path)
        out = subprocess.run(cmd, capture_output=True, timeout=10)
        if out.returncode != 0 or len(out.stdout) != size:
            raise lib.BenchError(f"{subject} {path}: expected {size} bytes, got {len(out.stdout)}: {out.stderr.decode()[-300:]}")

    def measure(self, subject, load):
        """Runs `load()` (which returns wrk-style figures) and adds the proxy's CPU per 10k
        requests and its peak memory."""
        pids = self.pids(subject)
        before = lib.cpu_seconds(pids)
        r = load()
        if pids:
            cpu = lib.cpu_seconds(pids) - before
            r["cpu_s_per_10k"] = cpu / r["requests"] * 10_000 if r["requests"] else None
            r["peak_rss_kib"] = lib.memory_kib(pids, "VmHWM")
        return r

    def stop(self):
        for proc in self.procs.values():
            self.ctx.procs.stop(proc)


def h2load_rate(url, clients, rate_per_client, seconds, log_file):
    """h2load over HTTP/1.1 at a fixed request rate; latencies from its per-request log."""
    if os.path.exists(log_file):
        os.remove(log_file)
    cmd = ["taskset", "-c", lib.LOAD_CPU, "h2load", "--h1", f"-c{clients}", f"--rps={rate_per_client}",
           f"-D{seconds}", "--warm-up-time=1", f"--log-file={log_file}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise lib.BenchError(f"h2load {url}: exit {out.returncode}: {out.stdout[-800:]}{out.stderr[-800:]}")
    rows = []
    with open(log_file) as f:
        for line in f:
            start, status, took = line.split("\t")[:3]
            rows.append((int(start), int(status), int(took)))
    if not rows:
        raise lib.BenchError(f"h2load {url}: no request completed: {out.stdout[-800:]}")
    took = sorted(t for _, _, t in rows)
    span = (max(s + t for s, _, t in rows) - min(s for s, _, _ in rows)) / 1e6
    pct = lambda q: took[min(len(took) - 1, int(q / 100 * len(took)))]
    return {
        "requests": len(rows), "rps": len(rows) / span if span else 0.0,
        "errors": sum(1 for _, st, _ in rows if st < 200 or st >= 300),
        "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9), "max_us": took[-1],
    }


def run(ctx, origin):
    seconds, warm = (1, 1) if ctx.quick else (10, 3)
    subjects = Subjects(ctx, origin["h1"])
    rows = []

    def row(scenario, subject, connections, r, **extra):
        keep = ("requests", "rps", "errors", "p50_us", "p90_us", "p99_us", "p999_us", "cpu_s_per_10k", "peak_rss_kib")
        rows.append({"scenario": scenario, "subject": subject, "connections": connections,
                     **{k: r.get(k) for k in keep}, **extra})
        lib.log(f"{scenario} {subject} c={connections}: {r['rps']:.0f} req/s p50 {r['p50_us']} µs p99 {r['p99_us']} µs")

    for subject in SUBJECTS:
        lib.wrk(subjects.urls[subject] + "/", 128, warm)
    cells = [("1k", 1), ("1k", 16), ("1k", 128), ("64k", 16)] if ctx.quick else \
        [("1k", 1), ("1k", 16), ("1k", 128), ("64k", 1), ("64k", 16), ("64k", 128)]
    handshakes_before = subjects.sluice.metric("sluice_upstream_connections_total")
    for body, conns in cells:
        # Each cell measures every subject back to back, so drift hits them alike.
        for subject in SUBJECTS:
            url = subjects.urls[subject] + PATHS[body][0]
            r = subjects.measure(subject, lambda: lib.wrk(url, conns, seconds))
            row(f"keep-alive {body}", subject, conns, r)
    handshakes = subjects.sluice.metric("sluice_upstream_connections_total") - handshakes_before

    rates = [5000] if ctx.quick else [5000, 20000]
    for rate in rates:
        for subject in SUBJECTS:
            log_file = ctx.path(f"h2load-{subject}-{rate}.log")
            r = subjects.measure(subject, lambda: h2load_rate(subjects.urls[subject] + "/", 16, rate // 16,
                                                              2 if ctx.quick else seconds, log_file))
            row(f"fixed rate {rate}/s, 1k", subject, 16, r, target_rps=rate)

    for subject in SUBJECTS:
        url = subjects.urls[subject] + "/"
        r = subjects.measure(subject, lambda: lib.wrk(url, 16, seconds, headers=["Connection: close"]))
        row("new connection per request, 1k", subject, 16, r)

    subjects.stop()

    # The same keep-alive load against an origin that offers HTTP/2 by ALPN, as most public APIs
    # do: Sluice takes it and carries every app connection's requests over one upstream
    # connection; HAProxy is told to offer h2 as well; nginx cannot speak HTTP/2 upstream.
    h2_subjects = Subjects(ctx, origin["h2"], peer_alpn=lib.H2_ALPN)
    for subject in SUBJECTS:
        lib.wrk(h2_subjects.urls[subject] + "/", 128, warm)
    h2_opened_before = h2_subjects.sluice.metric("sluice_upstream_connections_total")
    for conns in ([16] if ctx.quick else [1, 16, 128]):
        for subject in SUBJECTS:
            if subject == "direct":
                continue
            url = h2_subjects.urls[subject] + "/"
            r = h2_subjects.measure(subject, lambda: lib.wrk(url, conns, seconds))
            row(H2_SCENARIO, subject, conns, r)
    h2_opened = h2_subjects.sluice.metric("sluice_upstream_connections_total") - h2_opened_before
    h2_subjects.stop()

    return {
        "name": "origination", "rows": rows,
        "idle_rss_kib": subjects.idle_rss,
        "sluice_handshakes_after_warmup": handshakes,
        "sluice_h2_origin_connections_after_warmup": h2_opened,
        "notes": [],
    }


def fmt_us(us):
    if us is None:
        return ""
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def markdown(result):
    rows = result["rows"]
    by = {(r["scenario"], r["connections"], r["subject"]): r for r in rows}
    out = []
    scenarios = list(dict.fromkeys((r["scenario"], r["connections"]) for r in rows))
    out.append("| scenario | conns | subject | requests/s | p50 | p90 | p99 | p99.9 | CPU s / 10k req | peak RSS "
               "| Sluice ÷ this, req/s | this ÷ Sluice, p99 | Sluice without access log ÷ this, req/s "
               "| this ÷ Sluice without access log, p99 |")
    out.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def against(s, r):
        """Sluice's requests/s over this subject's, and this subject's p99 over Sluice's."""
        if not s or s is r or not r["rps"]:
            return "", ""
        return f"{s['rps'] / r['rps']:.2f}×", (f"{r['p99_us'] / s['p99_us']:.2f}×" if s["p99_us"] else "")

    for scenario, conns in scenarios:
        s = by.get((scenario, conns, "sluice"))
        quiet = by.get((scenario, conns, lib.NO_LOG))
        for subject in SUBJECTS:
            r = by.get((scenario, conns, subject))
            if not r:
                continue
            ratio, p99 = against(s, r) if subject != lib.NO_LOG else ("", "")
            quiet_ratio, quiet_p99 = against(quiet, r) if subject != "sluice" else ("", "")
            cpu = f"{r['cpu_s_per_10k']:.3f}" if r.get("cpu_s_per_10k") is not None else ""
            rss = f"{r['peak_rss_kib'] / 1024:.1f} MiB" if r.get("peak_rss_kib") else ""
            errors = f" ({r['errors']} errors)" if r.get("errors") else ""
            out.append(f"| {scenario} | {conns} | {subject} | {r['rps']:.0f}{errors} | {fmt_us(r['p50_us'])} | "
                       f"{fmt_us(r['p90_us'])} | {fmt_us(r['p99_us'])} | {fmt_us(r['p999_us'])} | {cpu} | {rss} | {ratio} | {p99} "
                       f"| {quiet_ratio} | {quiet_p99} |")
    idle = ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in result["idle_rss_kib"].items())
    out.append("")
    out.append(f"- idle RSS after start (all processes of each proxy): {idle}")
    out.append(f"- Sluice's upstream TLS handshakes during the keep-alive runs (after warm-up): "
               f"{result['sluice_handshakes_after_warmup']:.0f}")
    if "sluice_h2_origin_connections_after_warmup" in result:
        out.append(f"- {H2_SCENARIO}: the origin's other port, which offers `h2` by ALPN. Sluice offers "
                   "`h2` and `http/1.1` to every TLS origin and carries all requests over one HTTP/2 "
                   "connection (new upstream connections during these runs, after warm-up: "
                   f"{result['sluice_h2_origin_connections_after_warmup']:.0f}); HAProxy offers "
                   f"`{lib.H2_ALPN}` (`alpn` on its `server` line) and takes HTTP/2 too; nginx cannot "
                   "speak HTTP/2 to an upstream and stays on HTTP/1.1.")
    for n in result.get("notes", []):
        out.append(f"- {n}")
    return "\n".join(out)


def plots(result, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["scenario"] == "keep-alive 1k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "p50_us", "p50"), (axes[1], "p99_us", "p99")):
        for subject in SUBJECTS:
            pts = sorted((r["connections"], r[key] / 1000) for r in rows if r["subject"] == subject)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=subject)
        ax.set_xscale("log")
        ax.set_xticks([1, 16, 128], ["1", "16", "128"])
        ax.set_xlabel("connections")
        ax.set_ylabel("ms")
        ax.set_title(f"keep-alive, 1 KiB: {title} latency")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    name = "latency-by-concurrency.png"
    fig.savefig(os.path.join(outdir, name), dpi=110)
    plt.close(fig)
    return [name]
