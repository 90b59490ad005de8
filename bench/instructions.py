"""Instructions per request, counted by valgrind's callgrind: a figure that does not move with the
machine's load or clock, so a regression shows even where timings are noisy.

Each proxy runs alone under callgrind (Sluice as one process; nginx with `master_process off`;
HAProxy without its master), serves a warm-up, has its counters zeroed (`callgrind_control -z`),
serves N keep-alive requests of the main scenario (plaintext in, verified TLS out, 1 KiB) from
h2load on one connection, and has its counters dumped. Every thread of the process counts: the
proxy's own work per request, kernel time excluded. Then the same with a new client connection
per request (`Connection: close`, one at a time), which adds what each connection costs: the
accept, the connection's setup and teardown.
"""

import glob
import os
import re
import socket
import subprocess

import lib

# App connections at once in the HTTP/2-origin count: enough for streams to share writes.
H2_CONNECTIONS = 16


def h2load_n(url, n):
    cmd = ["taskset", "-c", lib.LOAD_CPU, "h2load", "--h1", "-c1", f"-n{n}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or f"{n} succeeded" not in out.stdout:
        raise lib.BenchError(f"h2load -n{n} {url}: {out.stdout[-800:]}{out.stderr[-800:]}")


def close_n(url, n):
    """`n` requests one after another, each on a new connection that the request closes; each must
    be answered 200 and closed by the proxy."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(n):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(request)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise lib.BenchError(f"{url} with Connection: close answered {answer[:200]!r}")


def dump(ctx, name, proc):
    """Has callgrind write its counters now (and zero them); returns the files it wrote."""
    before = set(glob.glob(ctx.path(f"{name}.callgrind*")))
    out = subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise lib.BenchError(f"callgrind_control -d {name}: {out.stdout[-500:]}{out.stderr[-500:]}")
    return sorted(lib.poll(f"{name}'s callgrind dump",
                           lambda: set(glob.glob(ctx.path(f"{name}.callgrind*"))) - before, timeout=60))


def counted(ctx, name, proc, send, n, warm=200):
    """Has `send` warm the proxy up (`send(warm)`), zeroes callgrind's counters, has `send` send
    `n` requests and returns the instructions they took, the dumps, and how many requests were
    answered: what `send` returns, or else `n`."""
    send(warm)
    zeroed = subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, text=True, timeout=120)
    if zeroed.returncode != 0:
        raise lib.BenchError(f"callgrind_control -z {name}: {zeroed.stdout[-500:]}{zeroed.stderr[-500:]}")
    answered = send(n) or n
    dumps = dump(ctx, name, proc)
    total = 0
    for path in dumps:
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total, dumps, answered


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


def top_functions(dumps, requests, limit=12):
    """The functions with the most instructions of their own per request, read from the dumps."""
    own = {}
    for path in dumps:
        for fn, cost in own_instructions(path).items():
            own[fn] = own.get(fn, 0) + cost
    return sorted(((count / requests, name[:110]) for name, count in own.items()), reverse=True)[:limit]


def both(ctx, name, proc, url, n, n_close):
    """Instructions per request kept alive and per request on a new connection, with the top
    functions of each."""
    keep, keep_dumps, _ = counted(ctx, name, proc, lambda k: h2load_n(url, k), n)
    close, close_dumps, _ = counted(ctx, name, proc, lambda k: close_n(url, k), n_close)
    return {"keep_alive": keep / n, "close": close / n_close}, {
        "keep_alive": top_functions(keep_dumps, n), "close": top_functions(close_dumps, n_close)}


def run(ctx, origin):
    n, n_close = (2000, 500) if ctx.quick else (10000, 2000)
    valgrind = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--compress-strings=no"]
    results, profiles = {}, {}

    # As it ships (the access log on), and like the peers' configurations (no access log).
    for name, access_log in (("sluice", True), (lib.NO_LOG, False)):
        port = lib.free_port()
        yaml = lib.mes_yaml(ctx, "origin", origin["h1"]) + "---\n" + lib.dataplane_yaml([(port, "origin")])
        out = ctx.path(f"{name}-cg.callgrind")
        sluice = lib.Sluice(ctx, f"{name}-cg", yaml, wrapper=[*valgrind, f"--callgrind-out-file={out}"],
                            access_log=access_log)
        results[name], profiles[name] = both(ctx, f"{name}-cg", sluice.proc, f"http://127.0.0.1:{port}/", n,
                                             n_close)
        sluice.stop()

    def start_peer(peer, name, origin_port, alpn="http/1.1"):
        listen = lib.free_port()
        conf = lib.peer_config(ctx, peer, listen, origin_port, alpn)
        out = ctx.path(f"{name}-cg.callgrind")
        if peer == "nginx":
            d = ctx.path(peer)
            cmd = [lib.which("nginx"), "-c", conf, "-p", d + "/", "-g", "master_process off;"]
        else:
            cmd = [lib.which("haproxy"), "-db", "-f", conf]
        proc = ctx.procs.start(f"{name}-cg", [*valgrind, f"--callgrind-out-file={out}", *cmd], cpus=lib.PROXY_CPU)
        lib.poll(f"{name} under callgrind listening", lambda: lib.listening(listen), timeout=120, proc=proc,
                 procs=ctx.procs)
        return proc, f"http://127.0.0.1:{listen}/"

    for peer in ("nginx", "haproxy"):
        proc, url = start_peer(peer, peer, origin["h1"])
        results[peer], profiles[peer] = both(ctx, f"{peer}-cg", proc, url, n, n_close)
        ctx.procs.stop(proc)

    for k, v in results.items():
        lib.log(f"{k}: {v['keep_alive']:.0f} instructions per request kept alive, "
                f"{v['close']:.0f} on a new connection")

    # The origin's HTTP/2 port, H2_CONNECTIONS app connections at once: Sluice and HAProxy carry
    # their requests over one HTTP/2 connection; nginx, which cannot, over HTTP/1.1 ones. wrk
    # for a few seconds, not h2load: h2load counts HAProxy's answers as failures (their status
    # line has no reason phrase, which HTTP/2 does not carry); the few requests in flight when
    # wrk stops are left out of the count.
    seconds = 2 if ctx.quick else 5
    h2_origin, h2_top = {}, None

    def send(url):
        """wrk at H2_CONNECTIONS for the given seconds; returns the requests answered."""
        return lambda seconds: lib.wrk(url, H2_CONNECTIONS, seconds, timeout_s=30)["requests"]

    port = lib.free_port()
    yaml = lib.mes_yaml(ctx, "origin", origin["h2"]) + "---\n" + lib.dataplane_yaml([(port, "origin")])
    out = ctx.path("sluice-h2-cg.callgrind")
    sluice = lib.Sluice(ctx, "sluice-h2-cg", yaml, wrapper=[*valgrind, f"--callgrind-out-file={out}"],
                        access_log=False)
    count, dumps, answered = counted(ctx, "sluice-h2-cg", sluice.proc, send(f"http://127.0.0.1:{port}/"),
                                     seconds, warm=1)
    h2_origin[lib.NO_LOG], h2_top = count / answered, top_functions(dumps, answered)
    sluice.stop()
    for peer, alpn in (("nginx", "http/1.1"), ("haproxy", lib.H2_ALPN)):
        proc, url = start_peer(peer, f"{peer}-h2", origin["h2"], alpn)
        count, _, answered = counted(ctx, f"{peer}-h2-cg", proc, send(url), seconds, warm=1)
        h2_origin[peer] = count / answered
        ctx.procs.stop(proc)
    for k, v in h2_origin.items():
        lib.log(f"{k}, origin offers HTTP/2: {v:.0f} instructions per request")

    per_request = {k: v["keep_alive"] for k, v in results.items()}
    per_connection = {k: v["close"] for k, v in results.items()}
    return {"name": "instructions", "requests": n, "per_request": per_request,
            "close_requests": n_close, "per_request_close": per_connection, "top": profiles,
            "h2_origin_connections": H2_CONNECTIONS, "per_request_h2_origin": h2_origin, "top_h2_origin": h2_top,
            "notes": []}


def markdown(result):
    keep, close = result["per_request"], result["per_request_close"]
    out = ["| proxy | instructions per request, kept alive | ÷ Sluice | on a new connection each | ÷ Sluice |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for k, v in keep.items():
        out.append(f"| {k} | {v:,.0f} | {v / keep['sluice']:.2f}× | {close[k]:,.0f} | {close[k] / close['sluice']:.2f}× |")
    out += ["", f"Counted over {result['requests']} keep-alive requests (1 KiB, one connection) after a warm-up, "
            f"then {result['close_requests']} requests each on a new connection (`Connection: close`, one "
            "at a time); user space only, every thread of the proxy's process. Sluice's own top functions "
            "(instructions of their own per request, all threads):"]
    for kind, title in (("keep_alive", "kept alive"), ("close", "on a new connection each")):
        out += ["", f"| instructions per request, {title} | function |", "| ---: | --- |"]
        out += [f"| {count:,.0f} | `{name}` |" for count, name in result["top"]["sluice"][kind]]
    h2 = result.get("per_request_h2_origin")
    if h2:
        out += ["", f"With an origin that offers HTTP/2 (keep-alive, 1 KiB, {result['h2_origin_connections']} "
                "connections at once; Sluice without its access log and HAProxy with `alpn h2,http/1.1` carry "
                "them over one HTTP/2 connection, nginx over HTTP/1.1 ones):", "",
                "| proxy | instructions per request | ÷ Sluice |", "| --- | ---: | ---: |"]
        out += [f"| {k} | {v:,.0f} | {v / h2[lib.NO_LOG]:.2f}× |" for k, v in h2.items()]
        out += ["", "| instructions per request, origin offers HTTP/2 | function |", "| ---: | --- |"]
        out += [f"| {count:,.0f} | `{name}` |" for count, name in result["top_h2_origin"]]
    return "\n".join(out)
