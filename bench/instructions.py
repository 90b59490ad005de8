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
import re
import subprocess

import lib


def h2load_n(url, n):
    cmd = ["taskset", "-c", lib.LOAD_CPU, "h2load", "--h1", "-c1", f"-n{n}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or f"{n} succeeded" not in out.stdout:
        raise lib.BenchError(f"h2load -n{n} {url}: {out.stdout[-800:]}{out.stderr[-800:]}")


def dump(ctx, name, proc):
    """Has callgrind write its counters now (and zero them); returns the files it wrote."""
    before = set(glob.glob(ctx.path(f"{name}.callgrind*")))
    out = subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise lib.BenchError(f"callgrind_control -d {name}: {out.stdout[-500:]}{out.stderr[-500:]}")
    return sorted(lib.poll(f"{name}'s callgrind dump",
                           lambda: set(glob.glob(ctx.path(f"{name}.callgrind*"))) - before, timeout=60))


def counted(ctx, name, proc, url, n):
    """Zeroes callgrind's counters, sends `n` requests and returns the instructions they took."""
    h2load_n(url, 200)
    zeroed = subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, text=True, timeout=120)
    if zeroed.returncode != 0:
        raise lib.BenchError(f"callgrind_control -z {name}: {zeroed.stdout[-500:]}{zeroed.stderr[-500:]}")
    h2load_n(url, n)
    dumps = dump(ctx, name, proc)
    total = 0
    for path in dumps:
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total, dumps


def own_instructions(path, objects=None):
    """Instructions of their own per function, from one dump written with uncompressed names; only
    functions of `objects` (paths of binaries) when given. A cost line belongs to the current
    `fn=` unless it follows `calls=` (then it is the callee's, inclusive)."""
    own = {}
    ob, fn, counted_here, after_call = None, None, False, False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                ob = line[3:].strip()
            elif line.startswith("fn="):
                # A recursive call's level is marked with a quote: f'2.
                fn = re.sub(r"'\d+$", "", line[3:].strip())
                counted_here = objects is None or (ob is not None and os.path.realpath(ob) in objects)
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                elif counted_here and fn:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        own[fn] = own.get(fn, 0) + int(parts[1])
    return own


def top_functions(dumps, limit=12):
    """The functions with the most instructions of their own, read from the dumps."""
    own = {}
    for path in dumps:
        for fn, cost in own_instructions(path).items():
            own[fn] = own.get(fn, 0) + cost
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
