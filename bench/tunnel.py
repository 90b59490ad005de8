"""CONNECT tunnel and TCP with TLS origination: Sluice against the same traffic sent direct.

1. CONNECT tunnel (the app's own TLS through the forward proxy, restricted mode, SNI checked):
   one large transfer with curl, and many small requests on one tunnel (curl, many URLs on one
   command line share one connection; the first request, with the handshakes, is left out).
   HAProxy in `mode tcp` carries the same bytes as a peer, without the CONNECT.
2. TCP with TLS origination: a `protocol: tcp` MeshExternalService with `tls.enabled` in front of a
   TLS echo origin (Python asyncio); a Python client does 1 KiB ping-pong on one connection and one
   bulk transfer echoed back, plaintext to Sluice's outbound or TLS straight to the echo origin.

Sluice runs on PROXY_CPU; origins and clients share LOAD_CPU.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

import lib
from lib import LOAD_CPU, BenchError, log

ECHO_SERVER = r'''
import asyncio, ssl, sys
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def handle(r, w):
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        w.close()

async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

ECHO_CLIENT = r'''
import asyncio, json, socket, ssl, sys, time
mode, port, ca, name, amount = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
tls = None
if ca != "-":
    tls = ssl.create_default_context(cafile=ca)

def ping_pong(seconds):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        s = tls.wrap_socket(s, server_hostname=name)
    msg, buf = b"p" * 1024, bytearray(1024)
    view, lat, clock = memoryview(buf), [], time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    for i in range(200 + 10**9):  # the first 200 round trips warm up and are not counted
        t0 = clock()
        s.sendall(msg)
        got = 0
        while got < 1024:
            n = s.recv_into(view[got:])
            if not n:
                sys.exit("the echo closed the connection")
            got += n
        t1 = clock()
        if buf != msg:
            sys.exit("the echo answered other bytes")
        if i >= 200:
            lat.append(t1 - t0)
            if t1 > end:
                break
    s.close()
    return {"latencies_ns": lat}

async def bulk(total):
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=name if tls else None)
    chunk = b"b" * 65536
    async def send():
        for _ in range(total // len(chunk)):
            w.write(chunk)
            await w.drain()
    t0 = time.perf_counter()
    sender = asyncio.create_task(send())
    got = 0
    while got < total:
        data = await r.read(1 << 20)
        if not data:
            sys.exit(f"the echo closed the connection after {got} bytes")
        got += len(data)
    await sender
    seconds = time.perf_counter() - t0
    w.close()
    return {"bytes": got, "seconds": seconds}

print(json.dumps(ping_pong(amount) if mode == "ping" else asyncio.run(bulk(int(amount)))))
'''


def percentiles(values_us):
    v = sorted(values_us)
    if not v:
        raise BenchError("no samples")
    pick = lambda q: float(v[min(len(v) - 1, int(len(v) * q))])
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99), "p999_us": pick(0.999)}


def row(scenario, subject, requests=None, rps=None, mb_per_s=None, pct=None, cpu=None, rss=None):
    r = {"scenario": scenario, "subject": subject, "connections": 1, "requests": requests, "rps": rps,
         "mb_per_s": mb_per_s, "p50_us": None, "p90_us": None, "p99_us": None, "p999_us": None,
         "cpu_s_per_10k": cpu, "peak_rss_kib": rss}
    r.update(pct or {})
    return r


def run_cmd(what, cmd, timeout):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: not done within {timeout} s")
    if out.returncode != 0:
        raise BenchError(f"{what}: exit {out.returncode}: {out.stderr[-1500:]}")
    return out.stdout


class Measured:
    """The CPU seconds of `pids` (a proxy's processes) over a block, and their peak RSS after it;
    None for both without a proxy."""

    def __init__(self, pids):
        self.pids, self.cpu, self.rss = pids, None, None

    def __enter__(self):
        self.start = lib.cpu_seconds(self.pids) if self.pids else 0
        return self

    def __exit__(self, *exc):
        if self.pids:
            self.cpu = lib.cpu_seconds(self.pids) - self.start
            self.rss = lib.memory_kib(self.pids, "VmHWM")

    def per_10k(self, requests):
        return None if self.cpu is None else self.cpu / requests * 1e4

    def peak(self):
        return self.rss


HAPROXY_TCP = """global
    nbthread 1
    pidfile {dir}/haproxy.pid

defaults
    mode tcp
{splice}    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend fe_tls
    bind 127.0.0.1:{tls_listen}
    default_backend be_tls

frontend fe_plain
    bind 127.0.0.1:{plain_listen}
    default_backend be_plain

backend be_tls
    server origin 127.0.0.1:{tls_origin}

backend be_plain
    server origin 127.0.0.1:{plain_origin}
"""


def start_haproxy_tcp(ctx, name, tls_origin, plain_origin, splice):
    """HAProxy as a plain TCP relay (one thread, the proxy CPU) in front of both origin ports:
    the same bytes as a CONNECT tunnel, without the CONNECT; splicing both ways, or copying
    through its buffers (its default). Returns the process and its two ports (TLS, plain)."""
    d = ctx.path(name)
    os.makedirs(d, exist_ok=True)
    tls_listen, plain_listen = lib.free_port(), lib.free_port()
    conf = os.path.join(d, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(HAPROXY_TCP.format(dir=d, tls_listen=tls_listen, plain_listen=plain_listen,
                                   tls_origin=tls_origin, plain_origin=plain_origin,
                                   splice="    option splice-request\n    option splice-response\n" if splice else ""))
    proc = ctx.procs.start(name, [lib.which("haproxy"), "-W", "-db", "-f", conf], cpus=lib.PROXY_CPU)
    lib.poll("haproxy (tcp) listening", lambda: lib.listening(tls_listen) and lib.listening(plain_listen),
             proc=proc, procs=ctx.procs)
    return proc, tls_listen, plain_listen


# --- 1. CONNECT tunnel ----------------------------------------------------------------------------


def connect_tunnel(ctx):
    big_mib, runs, small = (128, 1, 2000) if ctx.quick else (512, 3, 10000)
    # The origin's own PKI names `localhost`, so that the CONNECT host is a name and Sluice checks
    # the ClientHello's SNI against it (to an IP address it would check that there is none).
    d = ctx.path("tunnel")
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    pki = lib.make_pki(d, names=("localhost",))
    log(f"tunnel: writing a {big_mib} MiB file")
    block = os.urandom(1 << 20)
    with open(os.path.join(www, "big"), "wb") as f:
        for _ in range(big_mib):
            f.write(block)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(block[:1024])
    # nginx's workers drop to an unprivileged user when started as root.
    os.chmod(ctx.tmp, 0o711)
    for p in (d, www):
        os.chmod(p, 0o755)
    for name in ("big", "small"):
        os.chmod(os.path.join(www, name), 0o644)
    port, plain_port, proxy_port = lib.free_port(), lib.free_port(), lib.free_port()
    nginx = lib.start_nginx(ctx, "tunnel-origin", f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki['cert']};
        ssl_certificate_key {pki['key']};
        ssl_protocols TLSv1.3;
        root {www};
    }}
    server {{
        listen 127.0.0.1:{plain_port};
        sendfile on;
        root {www};
    }}""", LOAD_CPU)
    sluice, haproxies = None, {}
    try:
        lib.poll("the tunnel origin listening", lambda: lib.listening(port) and lib.listening(plain_port),
                 proc=nginx, procs=ctx.procs)
        mes = f"""type: MeshExternalService
name: tunnel-origin
spec:
  match: {{port: {port}, protocol: tcp}}
  endpoints:
    - {{address: localhost, port: {port}}}
    - {{address: 127.0.0.1, port: {port}}}
---
type: MeshExternalService
name: tunnel-plain
spec:
  match: {{port: {plain_port}, protocol: tcp}}
  endpoints:
    - {{address: 127.0.0.1, port: {plain_port}}}
"""
        sluice = lib.Sluice(ctx, "sluice-tunnel", mes, args=[
            "--http-proxy", f"127.0.0.1:{proxy_port}", "--outbound-traffic-policy", "restricted"])
        lib.poll("the forward proxy listening", lambda: lib.listening(proxy_port), proc=sluice.proc, procs=ctx.procs)
        # HAProxy both ways: which is faster depends on whether the ends spend their CPU on TLS.
        haproxies = {name: start_haproxy_tcp(ctx, name, port, plain_port, splice)
                     for name, splice in (("haproxy", True), ("haproxy-copy", False))}
        curl = ["taskset", "-c", LOAD_CPU, "curl", "-fsS", "--cacert", pki["ca"], "--noproxy", ""]
        # HAProxy relays TCP without CONNECT: curl sends the same bytes to its port instead
        # (--connect-to keeps the URL, so the SNI and the certificate check are the same).
        via = {"direct": [], "sluice": ["--proxy", f"http://127.0.0.1:{proxy_port}"],
               **{name: ["--connect-to", f"localhost:{port}:127.0.0.1:{tls_listen}"]
                  for name, (_, tls_listen, _) in haproxies.items()}}
        pids = {"direct": None, "sluice": sluice.pids,
                **{name: lib.pids_of(proc) for name, (proc, _, _) in haproxies.items()}}
        base = f"https://localhost:{port}"
        for subject, args in via.items():  # one request each way before measuring
            run_cmd(f"curl {base}/small ({subject})", [*curl, *args, "-o", "/dev/null", f"{base}/small"], 10)

        rows, notes = [], []

        def transfers(scenario, url, ways):
            """The best of `runs` downloads of `url` per subject, the subjects taking turns so
            that the host's drift falls on all of them; returns the CPU seconds and wall time of
            each proxy's transfers, and curl's CPU seconds (user, system) per subject."""
            best, cpu, wall, rss, client = {}, {}, {}, {}, {}
            for _ in range(runs):
                for subject, args in ways.items():
                    t0 = time.monotonic()
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    with Measured(pids[subject]) as m:
                        speed = float(run_cmd(f"curl {url} ({subject})", [
                            *curl, *args, "-o", "/dev/null", "-w", "%{speed_download}", url], 120))
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    user, system = client.get(subject, (0.0, 0.0))
                    client[subject] = (user + after.ru_utime - before.ru_utime,
                                       system + after.ru_stime - before.ru_stime)
                    best[subject] = max(best.get(subject, 0.0), speed)
                    cpu[subject] = cpu.get(subject, 0.0) + (m.cpu or 0.0)
                    wall[subject] = wall.get(subject, 0.0) + time.monotonic() - t0
                    rss[subject] = m.peak()
            for subject in ways:
                rows.append(row(f"{scenario}: one {big_mib} MiB transfer (best of {runs})", subject,
                                mb_per_s=best[subject] / 1e6, rss=rss[subject]))
            return cpu, wall, client

        def client_note(what, client, gib):
            """curl's CPU per GiB it received: what the relay's way of passing bytes on costs the
            app that reads them."""
            return f"{what}: curl's CPU per GiB received (user + system), " + ", ".join(
                f"{s} {u / gib:.2f} + {k / gib:.2f} s" for s, (u, k) in client.items()) + "."

        def cpu_note(cpu, wall):
            return "; ".join(f"{s} {cpu[s]:.2f} CPU s in {wall[s]:.2f} s ({cpu[s] / wall[s]:.0%} of its CPU)"
                             for s in ("sluice", *haproxies))

        log(f"tunnel: one {big_mib} MiB transfer, best of {runs}: direct, through the tunnel, through each haproxy")
        gib = runs * big_mib / 1024
        cpu, wall, client = transfers("CONNECT", f"{base}/big", via)
        notes.append(f"During the {big_mib} MiB transfers the proxies used: {cpu_note(cpu, wall)}.")
        notes.append(client_note(f"{big_mib} MiB with TLS end to end", client, gib))

        # Plain bytes in the tunnel (a `tcp` service takes them): neither end spends its CPU on
        # TLS, so the relay's own cost shows rather than the shared CPU's.
        log(f"tunnel: one {big_mib} MiB plain transfer, best of {runs}: direct, through the tunnel, through each haproxy")
        cpu, _, client = transfers("CONNECT, plain bytes", f"http://127.0.0.1:{plain_port}/big",
                                   {"direct": [], "sluice": ["--proxytunnel", *via["sluice"]],
                                    **{name: ["--connect-to", f"127.0.0.1:{plain_port}:127.0.0.1:{plain_listen}"]
                                       for name, (_, _, plain_listen) in haproxies.items()}})
        notes.append(f"Plain transfers: Sluice used {cpu['sluice'] / gib:.2f} CPU s per GiB carried, "
                     f"HAProxy {cpu['haproxy'] / gib:.2f} splicing and {cpu['haproxy-copy'] / gib:.2f} copying.")
        notes.append(client_note(f"{big_mib} MiB of plain bytes", client, gib))

        log(f"tunnel: {small} small requests on one connection, direct then through one tunnel")
        urls = [a for _ in range(small + 1) for a in ("-o", "/dev/null", f"{base}/small")]
        for subject in via:
            with Measured(pids[subject]) as m:
                out = run_cmd(f"curl {small + 1} x {base}/small ({subject})",
                              [*curl, *via[subject], "-w", "%{time_total}\\n", *urls], 60 + small * 0.01)
            times = [float(t) * 1e6 for t in out.split()]
            if len(times) != small + 1:
                raise BenchError(f"curl ({subject}) reported {len(times)} transfers, not {small + 1}")
            times = times[1:]
            rows.append(row("CONNECT: 1 KiB requests on one connection", subject, requests=small,
                            rps=small / (sum(times) / 1e6), pct=percentiles(times),
                            cpu=m.per_10k(small), rss=m.peak()))
        tunnels = 200 if ctx.quick else 2000
        log(f"tunnel: {tunnels} open tunnels, one request each, the proxy's memory before and after")
        per_tunnel = open_tunnels_memory(sluice, proxy_port, plain_port, tunnels)
        notes.append(f"{tunnels} CONNECT tunnels held open to the plain origin, one `HEAD` through each: the proxy's "
                     f"RSS grew by {per_tunnel:.1f} KiB per open tunnel.")
        return rows, notes
    finally:
        if sluice:
            sluice.stop()
        for proc, _, _ in haproxies.values():
            ctx.procs.stop(proc)
        ctx.procs.stop(nginx)


def open_tunnels_memory(sluice, proxy_port, origin_port, count):
    """KiB of proxy RSS per open CONNECT tunnel that has carried one request."""
    def read_head(s):
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                raise BenchError(f"tunnel closed before a response head: {got[:200]!r}")
            got += chunk
        return got

    before = lib.memory_kib(sluice.pids)
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
            socks.append(s)
            s.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
            if b" 200 " not in read_head(s).split(b"\r\n", 1)[0]:
                raise BenchError("CONNECT to the plain origin was refused")
            s.sendall(b"HEAD /small HTTP/1.1\r\nHost: origin\r\n\r\n")
            read_head(s)
        return (lib.memory_kib(sluice.pids) - before) / count
    finally:
        for s in socks:
            s.close()


# --- 2. TCP with TLS origination ------------------------------------------------------------------


def tcp_tls_origination(ctx):
    seconds, bulk_mib = (1, 16) if ctx.quick else (5, 64)
    server, client = ctx.path("echo_server.py"), ctx.path("echo_client.py")
    for path, text in ((server, ECHO_SERVER), (client, ECHO_CLIENT)):
        with open(path, "w") as f:
            f.write(text)
    echo_port, outbound = lib.free_port(), lib.free_port()
    echo = ctx.procs.start("echo-origin", [sys.executable, server, ctx.pki["cert"], ctx.pki["key"], str(echo_port)],
                           cpus=LOAD_CPU)
    sluice = None
    try:
        lib.poll("the TLS echo origin listening", lambda: lib.listening(echo_port), proc=echo, procs=ctx.procs)
        yaml_text = lib.mes_yaml(ctx, "echo", echo_port, protocol="tcp") + "\n---\n" + lib.dataplane_yaml([(outbound, "echo")])
        sluice = lib.Sluice(ctx, "sluice-tcp", yaml_text, args=["--http-proxy", "off"])
        lib.poll("the outbound listening", lambda: lib.listening(outbound), proc=sluice.proc, procs=ctx.procs)
        paths = {"direct": (echo_port, ctx.pki["ca"]), "sluice": (outbound, "-")}

        def client_run(mode, subject, amount, timeout):
            port, ca = paths[subject]
            out = run_cmd(f"echo client {mode} ({subject})", ["taskset", "-c", LOAD_CPU, sys.executable, client,
                          mode, str(port), ca, ctx.pki["name"], str(amount)], timeout)
            return json.loads(out)

        rows = []
        log(f"tcp: 1 KiB ping-pong for {seconds} s on one connection, direct then through sluice")
        for subject in ("direct", "sluice"):
            with Measured(sluice.pids if subject == "sluice" else None) as m:
                got = client_run("ping", subject, seconds, seconds + 30)
            lat = [ns / 1e3 for ns in got["latencies_ns"]]
            rows.append(row("TCP + TLS origination: 1 KiB ping-pong", subject, requests=len(lat),
                            rps=len(lat) / (sum(lat) / 1e6), pct=percentiles(lat),
                            cpu=m.per_10k(len(lat)), rss=m.peak()))

        log(f"tcp: one {bulk_mib} MiB transfer echoed back, direct then through sluice")
        for subject in ("direct", "sluice"):
            with Measured(sluice.pids if subject == "sluice" else None) as m:
                got = client_run("bulk", subject, bulk_mib << 20, 120)
            rows.append(row(f"TCP + TLS origination: {bulk_mib} MiB echoed", subject,
                            mb_per_s=got["bytes"] / got["seconds"] / 1e6, rss=m.peak()))
        return rows
    finally:
        if sluice:
            sluice.stop()
        ctx.procs.stop(echo)


# --- the module's interface -----------------------------------------------------------------------


def run(ctx, origin):
    """`origin` (the shared nginx) is not used: the tunnel needs a large file and a certificate for
    a name, so it starts its own nginx."""
    rows, measured_notes = connect_tunnel(ctx)
    rows += tcp_tls_origination(ctx)
    notes = measured_notes + [
        "Pinning: sluice on CPU 0; origins (nginx, 1 worker, TLS 1.3; the Python echo server) and "
        "clients (curl; the Python echo client) on CPU 1. The machine is noisy: compare the rows of one run.",
        "CONNECT: `sluice run --http-proxy ... --outbound-traffic-policy restricted`, the origin registered "
        "as a `protocol: tcp` MeshExternalService (endpoints `localhost` and `127.0.0.1`); curl CONNECTs to "
        "`localhost:PORT` and its SNI `localhost` is checked. TLS is end to end (curl to nginx).",
        "HAProxy: `mode tcp`, one thread, on CPU 0, with a frontend for each origin port; curl "
        "`--connect-to` sends it the same bytes it would send through the tunnel (same URL, SNI and "
        "certificate check), without the CONNECT. "
        "It runs twice: `haproxy` splices both ways (`option splice-request`, `option splice-response`), "
        "`haproxy-copy` copies through its buffers (its default). Sluice copies through buffers it borrows from a pool while bytes move "
        "(BENCHMARKS.md says why). "
        "The subjects take turns, run by run, so that the host's drift falls on all of them.",
        "CONNECT, plain bytes: the same file over plain HTTP from a second nginx server (sendfile on, as in "
        "nginx's packaged configuration), registered as another `protocol: tcp` service, which takes bytes "
        "that are not TLS; curl `--proxytunnel` CONNECTs to `127.0.0.1:PORT`. With no TLS at either end the "
        "shared CPU is less of a limit, so this row shows what the relay itself costs.",
        "Small requests: one curl command with N+1 URLs on one kept-alive connection (one tunnel); the first "
        "request (TCP and TLS handshakes, CONNECT) is left out; latency is curl's `time_total` per request, "
        "req/s is N over their sum. Proxy CPU is /proc user+system time (10 ms ticks) over the run.",
        "TCP + TLS origination: a `protocol: tcp` MeshExternalService with `tls.enabled` (verification "
        "Secured, serverName origin.test) behind a Dataplane outbound; the client speaks plaintext to the "
        "outbound and Sluice originates TLS, against the client speaking TLS to the echo origin itself. "
        "Ping-pong: 1 KiB written, 1 KiB read back, one connection, 200 warm-up round trips left out. "
        "Bulk: written and read back concurrently; MB/s is the bytes echoed (each way) per second.",
        "The Python echo client and server bound the TCP figures (both share CPU 1, and the direct client "
        "also does TLS, which through Sluice it does not): compare the two paths, not absolute numbers.",
        "One-connection latency through a proxy on the other CPU includes four cross-CPU wake-ups per "
        "round trip (client, proxy, origin, proxy, client), which any proxy in this seat pays; see "
        "BENCHMARKS.md's TLS-origination discussion.",
        "Peak RSS is the proxy's VmHWM after the row's run (one sluice process per scenario group).",
    ]
    return {"name": "tunnel", "rows": rows, "notes": notes}


def _fmt(v, digits=0):
    return "" if v is None else f"{v:,.{digits}f}"


def markdown(result):
    direct = {r["scenario"]: r for r in result["rows"] if r["subject"] == "direct"}
    lines = ["| scenario | subject | conns | requests | req/s | MB/s | p50 µs | p90 µs | p99 µs | p99.9 µs "
             "| proxy CPU s / 10k req | peak RSS KiB | proxy / direct |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio, d = "", direct.get(r["scenario"])
        if r["subject"] != "direct" and d:
            if r["mb_per_s"] is not None and d["mb_per_s"]:
                ratio = f"{r['mb_per_s'] / d['mb_per_s']:.2f}× MB/s"
            elif r["p50_us"] is not None and d["p50_us"]:
                ratio = f"{r['p50_us'] / d['p50_us']:.2f}× p50, {r['rps'] / d['rps']:.2f}× req/s"
        lines.append("| " + " | ".join([
            r["scenario"], r["subject"], str(r["connections"]), _fmt(r["requests"]), _fmt(r["rps"]),
            _fmt(r["mb_per_s"]), _fmt(r["p50_us"]), _fmt(r["p90_us"]), _fmt(r["p99_us"]), _fmt(r["p999_us"]),
            _fmt(r["cpu_s_per_10k"], 2), _fmt(r["peak_rss_kib"]), ratio]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in result["notes"]) + "\n"
