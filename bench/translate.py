#!/usr/bin/env python3
"""Translation: how long reading, checking and translating a registry takes in each dialect, for
the same number of external services. The control plane does this work on every write (each
document is parsed once, the whole registry is resolved again), so it bounds how fast writes go.

For SERVICES services it writes, in a temporary directory, three registries:

* kuma: one MeshExternalService per service (the baseline);
* istio: per service a ServiceEntry with ports 80 (HTTP) and 443 (HTTPS), a VirtualService that
  routes 80 to 443, and a DestinationRule that originates TLS on 443 (the Istio blog's setup);
* gloo: per service an ExternalService with two ports selecting two ExternalEndpoints.

and times `sluice validate -f DIR` on each, RUNS times, reporting the median wall time, the time
per 1,000 services and the ratio to the Kuma baseline.

Usage: bench/translate.py [--services 5000] [--runs 5] [--sluice PATH]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Files hold at most this many documents (Sluice's limit per file is 1024).
PER_FILE = 900


def kuma(i):
    return [f"""type: MeshExternalService
name: svc{i}
spec:
  match: {{port: 443, protocol: http}}
  endpoints: [{{address: api{i}.example.com, port: 443}}]
  tls: {{enabled: true, verification: {{serverName: api{i}.example.com}}}}
"""]


def istio(i):
    return [
        f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}}}
spec:
  hosts: [api{i}.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 443, name: https, protocol: HTTPS}}]
  resolution: DNS
""",
        f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs{i}}}
spec:
  hosts: [api{i}.example.com]
  http:
  - match: [{{port: 80}}]
    route: [{{destination: {{host: api{i}.example.com, port: {{number: 443}}}}}}]
""",
        f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr{i}}}
spec:
  host: api{i}.example.com
  trafficPolicy:
    portLevelSettings: [{{port: {{number: 443}}, tls: {{mode: SIMPLE}}}}]
""",
    ]


def gloo(i):
    docs = [
        f"""apiVersion: networking.gloo.solo.io/v2
kind: ExternalService
metadata: {{name: svc{i}, namespace: ns{i % 50}}}
spec:
  hosts: [api{i}.internal]
  ports:
  - {{name: http, number: 80, protocol: HTTP}}
  - {{name: pg, number: 5432, protocol: TCP}}
  selector: {{app: svc{i}}}
"""
    ]
    for zone in ("a", "b"):
        docs.append(
            f"""apiVersion: networking.gloo.solo.io/v2
kind: ExternalEndpoint
metadata: {{name: svc{i}-{zone}, namespace: ns{i % 50}, labels: {{app: svc{i}}}}}
spec:
  address: {zone}.api{i}.example.net
  ports: [{{name: http, number: 80}}, {{name: pg, number: 5432}}]
"""
        )
    return docs


def write(directory, make, services):
    os.makedirs(directory)
    docs = [d for i in range(services) for d in make(i)]
    for k in range(0, len(docs), PER_FILE):
        with open(os.path.join(directory, f"part{k // PER_FILE:04d}.yaml"), "w") as f:
            f.write("---\n".join(docs[k : k + PER_FILE]))
    return len(docs)


def timed(sluice, directory, runs):
    times = []
    for _ in range(runs):
        start = time.monotonic()
        out = subprocess.run(
            [sluice, "validate", "-f", directory],
            capture_output=True,
            text=True,
            timeout=600,
        )
        times.append(time.monotonic() - start)
        if out.returncode != 0:
            sys.exit(f"sluice validate failed on {directory}:\n{out.stderr[-2000:]}")
    return statistics.median(times), out.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sluice", default=None)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sluice = args.sluice or os.path.join(root, "target/release/sluice")
    if args.sluice is None:
        print("building target/release/sluice ...", file=sys.stderr)
        subprocess.run(
            ["cargo", "build", "--release", "-p", "sluice"], cwd=root, check=True, timeout=1800
        )
    tmp = tempfile.mkdtemp(prefix="sluice-translate-")
    try:
        rows = []
        base = None
        for name, make in (("kuma", kuma), ("istio", istio), ("gloo", gloo)):
            directory = os.path.join(tmp, name)
            docs = write(directory, make, args.services)
            size = sum(
                os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
            )
            median, summary = timed(sluice, directory, args.runs)
            base = base or median
            rows.append((name, docs, size, median, summary))
            print(f"{name}: {median:.3f} s ({summary})", file=sys.stderr)
        print(f"## Translation, {args.services} services, median of {args.runs} runs\n")
        print("| dialect | documents | bytes | validate | per 1,000 services | vs kuma |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, docs, size, median, _ in rows:
            print(
                f"| {name} | {docs} | {size} | {median * 1000:.0f} ms | "
                f"{median * 1000 * 1000 / args.services:.0f} ms | {median / base:.2f}x |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
