"""Instructions per request, counted by valgrind's callgrind: a figure that does not move with the
machine's load or clock, so a regression shows even where timings are noisy.

Each proxy runs alone under callgrind (Sluice as one process; nginx with `master_process off`;
HAProxy without its master), serves a warm-up, has its counters zeroed (`callgrind_control -z`),
serves N keep-alive requests of the main scenario (plaintext in, verified TLS out, 1 KiB) from
h2load on one connection, and has its counters dumped. Every thread of the process counts: the
proxy's own work per request, kernel time excluded.
"""

import glob
import os
import subprocess

import lib


def h2load_n(url, n):
    cmd = ["taskset", "-c", lib.LOAD_CPU, "h2load", "--h1", "-c1", f"-n{n}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or f"{n} succeeded" not in out.stdout:
        raise lib.BenchError(f"h2load -n{n} {url}: {out.stdout[-800:]}{out.stderr[-800:]}")


def counted(ctx, name, proc, url, n):
    """Zeroes callgrind's counters, sends `n` requests and returns the instructions they took."""
    h2load_n(url, 200)
    control = lambda flag: subprocess.run(["callgrind_control", flag, str(proc.pid)], capture_output=True,
                                          text=True, timeout=120)
    if control("-z").returncode != 0:
        raise lib.BenchError(f"callgrind_control -z {name}: {control('-s').stdout[-500:]}")
    h2load_n(url, n)
    before = set(glob.glob(ctx.path(f"{name}.callgrind*")))
    out = control("-d")
    if out.returncode != 0:
        raise lib.BenchError(f"callgrind_control -d {name}: {out.stdout[-500:]}{out.stderr[-500:]}")
    dumps = lib.poll(f"{name}'s callgrind dump", lambda: set(glob.glob(ctx.path(f"{name}.callgrind*"))) - before,
                     timeout=60)
    total = 0
    for dump in dumps:
        with open(dump) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total, sorted(dumps)


def top_functions(dumps, limit=12):
    """The functions with the most instructions of their own, read from the dumps: a cost line
    belongs to the current `fn=` unless it follows `calls=` (then it is the callee's, inclusive)."""
    own = {}
    for dump in dumps:
        fn, after_call = None, False
        with open(dump, errors="replace") as f:
            for line in f:
                if line.startswith("fn="):
                    fn = line[3:].strip()
                elif line.startswith("calls="):
                    after_call = True
                elif line[:1].isdigit() or line[:1] in "+-*":
                    if after_call:
                        after_call = False
                    elif fn is not None:
                        parts = line.split()
                        if len(parts) >= 2 and parts[1].isdigit():
                            own[fn] = own.get(fn, 0) + int(parts[1])
    return sorted(((count, name[:110]) for name, count in own.items()), reverse=True)[:limit]


def run(ctx, origin):
    n = 2000 if ctx.quick else 10000
    valgrind = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--compress-strings=no"]
    results, profiles = {}, {}

    port = lib.free_port()
    yaml = lib.mes_yaml(ctx, "origin", origin["h1"]) + "---\n" + lib.dataplane_yaml([(port, "origin")])
    out = ctx.path("sluice-cg.callgrind")
    sluice = lib.Sluice(ctx, "sluice-cg", yaml, wrapper=[*valgrind, f"--callgrind-out-file={out}"])
    results["sluice"], dumps = counted(ctx, "sluice-cg", sluice.proc, f"http://127.0.0.1:{port}/", n)
    profiles["sluice"] = top_functions(dumps)
    sluice.stop()

    for peer in ("nginx", "haproxy"):
        listen = lib.free_port()
        conf = lib.peer_config(ctx, peer, listen, origin["h1"])
        out = ctx.path(f"{peer}-cg.callgrind")
        if peer == "nginx":
            d = ctx.path(peer)
            cmd = [lib.which("nginx"), "-c", conf, "-p", d + "/", "-g", "master_process off;"]
        else:
            cmd = [lib.which("haproxy"), "-db", "-f", conf]
        proc = ctx.procs.start(f"{peer}-cg", [*valgrind, f"--callgrind-out-file={out}", *cmd], cpus=lib.PROXY_CPU)
        lib.poll(f"{peer} under callgrind listening", lambda: lib.listening(listen), timeout=120, proc=proc,
                 procs=ctx.procs)
        results[peer], dumps = counted(ctx, f"{peer}-cg", proc, f"http://127.0.0.1:{listen}/", n)
        profiles[peer] = top_functions(dumps)
        ctx.procs.stop(proc)

    per_request = {k: v / n for k, v in results.items()}
    for k, v in per_request.items():
        lib.log(f"{k}: {v:.0f} instructions per request")
    return {"name": "instructions", "requests": n, "per_request": per_request, "top": profiles, "notes": []}


def markdown(result):
    s = result["per_request"]["sluice"]
    out = ["| proxy | instructions per request | ÷ Sluice |", "| --- | ---: | ---: |"]
    for k, v in result["per_request"].items():
        out.append(f"| {k} | {v:,.0f} | {v / s:.2f}× |")
    out += ["", f"Counted over {result['requests']} keep-alive requests (1 KiB, one connection) after a warm-up; "
            "user space only, every thread of the proxy's process. Sluice's own top functions (instructions of "
            "their own, all threads):", "", "| instructions per request | function |", "| ---: | --- |"]
    n = result["requests"]
    for count, name in result["top"].get("sluice", []):
        out.append(f"| {count / n:,.0f} | `{name}` |")
    return "\n".join(out)
