#!/usr/bin/env python3
"""Apply -> enforced: how long from a write to the control plane's API until every connected
proxy runs it, with many proxies connected and many services stored.

Starts one `sluice control-plane` (SQLite in a temporary directory), stores SERVICES external
services and one Dataplane per proxy (each with OUTBOUNDS outbounds of its own plus one to a
service all of them share), starts PROXIES `sluice proxy` processes, and then, ROUNDS times:

* shared: changes the shared service (every proxy must apply it) and measures from just before
  the PUT until the last proxy's ACK arrives (`ackedAt` of GET /api/v1/proxies: the control
  plane's clock, the same machine's);
* one: changes a service only one proxy uses, and measures until that proxy's ACK.

A proxy ACKs a version after it has applied it: new connections route by it from then on.
It also reports the control plane's and the proxies' memory, and how large one proxy's config
is (its cache file) next to a proxy that takes the whole registry (no Dataplane).

Usage: bench/config-push.py [--proxies 100] [--services 10000] [--rounds 100] [--sluice PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


SETTLE_S = 3.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Api:
    def __init__(self, base, token):
        self.base = base
        self.token = token

    def call(self, method, path, body=None):
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=body.encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")


def service(name, port):
    return (
        f"type: MeshExternalService\nname: {name}\nspec:\n"
        f"  match: {{port: 443, protocol: http}}\n"
        f"  endpoints: [{{address: {name}.example.com, port: {port}}}]\n"
        f"  tls: {{enabled: true, verification: {{mode: Secured}}}}\n"
    )


def dataplane(name, outbounds):
    lines = [f"type: Dataplane\nname: {name}\nnetworking:\n  outbound:\n"]
    for port, svc in outbounds:
        lines.append(
            f"    - port: {port}\n      backendRef: {{kind: MeshExternalService, name: {svc}}}\n"
        )
    return "".join(lines)


def wait(cond, timeout, what, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    sys.exit(f"config-push: timed out waiting for {what}")


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", type=int, default=100)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--outbounds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sluice", default="target/release/sluice")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="sluice-config-push-")
    children = []

    def stop_all():
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGKILL)
        for c in children:
            c.wait()
        if not os.environ.get("KEEP"): shutil.rmtree(tmp, ignore_errors=True)

    try:
        port = free_port()
        cp = subprocess.Popen(
            [args.sluice, "control-plane", "--listen", f"127.0.0.1:{port}", "--data-dir", f"{tmp}/cp"],
            stdout=subprocess.DEVNULL,
            stderr=open(f"{tmp}/cp.log", "w"),
        )
        children.append(cp)

        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait(listening, 30, "the control plane")
        api = Api(f"http://127.0.0.1:{port}", open(f"{tmp}/cp/admin-token").read().strip())
        proxy_token = open(f"{tmp}/cp/proxy-token").read().strip()

        started = time.monotonic()
        docs = [service(f"svc-{i:05d}", 443) for i in range(args.services)]
        docs.append(service("shared", 443))
        for i in range(0, len(docs), 1000):
            api.call("POST", "/api/v1/apply", "---\n".join(docs[i : i + 1000]))
        base = 20000
        dps = []
        for p in range(args.proxies):
            outbounds = [(base + p * (args.outbounds + 1), "shared")]
            for j in range(args.outbounds):
                outbounds.append(
                    (base + p * (args.outbounds + 1) + 1 + j, f"svc-{(p * args.outbounds + j) % args.services:05d}")
                )
            dps.append(dataplane(f"proxy-{p:03d}", outbounds))
        api.call("POST", "/api/v1/apply", "---\n".join(dps))
        store_s = time.monotonic() - started

        started = time.monotonic()
        for p in range(args.proxies):
            children.append(
                subprocess.Popen(
                    [args.sluice, "proxy", "--control-plane", api.base, "--name", f"proxy-{p:03d}",
                     "--token", proxy_token, "--data-dir", f"{tmp}/proxies", "--admin", "off",
                     "--http-proxy", "off", "--access-log", "/dev/null"],
                    stdout=subprocess.DEVNULL,
                    stderr=open(f"{tmp}/proxy-{p:03d}.log", "w"),
                )
            )
        # One more with no Dataplane: it takes every service of the mesh.
        children.append(
            subprocess.Popen(
                [args.sluice, "proxy", "--control-plane", api.base, "--name", "everything",
                 "--token", proxy_token, "--data-dir", f"{tmp}/proxies", "--admin", "off",
                 "--http-proxy", "off", "--access-log", "/dev/null"],
                stdout=subprocess.DEVNULL,
                stderr=open(f"{tmp}/proxy-everything.log", "w"),
            )
        )

        def statuses():
            return {p["name"]: p for p in api.call("GET", "/api/v1/proxies")["items"]}

        wait(
            lambda: sum(1 for s in statuses().values() if s["ackedVersion"] > 0) == args.proxies + 1,
            120,
            "every proxy's first config",
        )
        connect_s = time.monotonic() - started
        # Before any change: what a proxy holds for the registry, against what it keeps after
        # the rounds below (the allocator keeps what each apply's peak took).
        everything_first_rss = rss_kib(children[-1].pid)
        names = [f"proxy-{p:03d}" for p in range(args.proxies)]

        def measure(svc, who):
            latencies = []
            for r in range(args.rounds):
                body = service(svc, 443 + 1 + (r % 2))
                t0 = time.time()
                revision = api.call("PUT", f"/api/v1/MeshExternalService/default/{svc}", body)["revision"]
                put_ms = (time.time() - t0) * 1000
                done = {}

                def all_acked():
                    s = statuses()
                    for n in who:
                        if s[n]["ackedVersion"] < revision:
                            return False
                    done.update(s)
                    return True

                # The latency comes from the control plane's ACK times; polling only finds the
                # end of a round, slowly, so as not to take CPU from what is measured.
                time.sleep(0.1)
                wait(all_acked, 30, f"round {r} of {svc}", interval=0.05)
                last = max(done[n]["ackedAt"] for n in who)
                latencies.append((last / 1000 - t0) * 1000)
                del put_ms
            return latencies

        shared = measure("shared", names + [])
        one = measure("svc-00000", ["proxy-000"])

        everything_rss = rss_kib(children[-1].pid)
        # What the allocator gives back once the applies are over (jemalloc returns freed pages
        # within about a second): the memory a proxy holds between changes.
        time.sleep(SETTLE_S)
        cp_rss = rss_kib(cp.pid)
        proxy_rss = [rss_kib(c.pid) for c in children[1:-1]]
        everything_settled_rss = rss_kib(children[-1].pid)
        cache = os.path.getsize(f"{tmp}/proxies/proxy-default-proxy-000.config")
        cache_all = os.path.getsize(f"{tmp}/proxies/proxy-default-everything.config")

        def line(name, values):
            return (
                f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
                f"{percentile(values, 90):.1f} | {percentile(values, 99):.1f} | {max(values):.1f} |"
            )

        print(f"setup: {args.services + 1} services and {args.proxies} Dataplanes stored in {store_s:.1f} s; "
              f"{args.proxies + 1} proxies connected and running their first config in {connect_s:.1f} s")
        print()
        print("| change | rounds | p50 ms | p90 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|---|")
        print(line(f"shared service, all {args.proxies} proxies", shared))
        print(line("a service one proxy uses", one))
        print()
        print(f"- control plane RSS ({SETTLE_S:.0f} s after the rounds): {cp_rss / 1024:.1f} MiB")
        print(f"- proxy RSS ({args.outbounds + 1} services): median {statistics.median(proxy_rss) / 1024:.1f} MiB, "
              f"max {max(proxy_rss) / 1024:.1f} MiB")
        print(f"- proxy with no Dataplane ({args.services + 1} services): RSS {everything_first_rss / 1024:.1f} MiB "
              f"after its first config, {everything_rss / 1024:.1f} MiB right after the rounds, "
              f"{everything_settled_rss / 1024:.1f} MiB {SETTLE_S:.0f} s later")
        print(f"- config of one proxy: {cache} bytes ({args.outbounds + 1} services); "
              f"of the proxy with every service: {cache_all} bytes")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
