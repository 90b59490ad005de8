"""What every benchmark scenario shares: processes that are always stopped, free loopback ports,
waits with deadlines, a throwaway PKI, CPU pinning, the proxy's CPU and memory, and wrk.

Everything listens on 127.0.0.1. Nothing here sleeps to wait for readiness: waits poll with a
deadline and fail with what the process said.
"""

import argparse
import atexit
import contextlib
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SLUICE = os.path.join(ROOT, "target", "release", "sluice")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The proxy under test, and every peer in its seat, runs on this CPU; the origin and the load
# generator share the other one.
PROXY_CPU = "0"
LOAD_CPU = "1"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- what the benchmarks need ------------------------------------------------------------------

# Debian packages, by the command each provides.
PACKAGES = {
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "h2load": "nghttp2-client",
    "curl": "curl",
    "openssl": "openssl",
    "taskset": "util-linux",
    "valgrind": "valgrind",
    "callgrind_annotate": "valgrind",
}


def script(name, main):
    """Runs a benchmark script's `main`: a failure is one line on stderr and exit status 1."""
    try:
        main()
    except (BenchError, subprocess.SubprocessError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def which(cmd):
    return shutil.which(cmd) or next(
        (p for p in (f"/usr/sbin/{cmd}", f"/sbin/{cmd}") if os.access(p, os.X_OK)), None
    )


def ensure_tools(commands, python_modules=()):
    """Installs what is missing from Debian's packages (as root), or says what to install."""
    need = sorted({PACKAGES[c] for c in commands if not which(c)})
    for module, package in python_modules:
        try:
            __import__(module)
        except ImportError:
            need.append(package)
    if not need:
        return
    if os.geteuid() != 0:
        raise BenchError(f"missing {' '.join(need)}; run as root or: apt-get install -y {' '.join(need)}")
    log(f"installing {' '.join(need)} from Debian's packages")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *need], check=True, env=env, stdout=subprocess.DEVNULL)


def sluice_binary():
    """The binary under test: target/release/sluice, or what `bench/run --sluice` named."""
    return SLUICE


def build_sluice():
    log("building the release binary (cargo build --release -p sluice)")
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "sluice"], cwd=ROOT, check=True)
    if not os.access(SLUICE, os.X_OK):
        raise BenchError(f"{SLUICE} was not built")


def version(cmd):
    """One line naming a tool's version, as it prints it."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


# --- processes --------------------------------------------------------------------------------


class Processes:
    """Every process a benchmark starts; all stopped at exit, on error and on Ctrl-C too."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.running = []
        atexit.register(self.stop_all)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.stop_all()
        sys.exit(128 + signum)

    def start(self, name, cmd, cpus=None, env=None):
        """Starts `cmd` (pinned to `cpus`), its output in TMP/NAME.log."""
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        out = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=None if env is None else dict(os.environ, **env), start_new_session=True,
        )
        proc.bench_name = name
        self.running.append(proc)
        return proc

    def output(self, name):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self, proc, timeout=10):
        """SIGTERM to the process group, then SIGKILL after `timeout`."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.bench_name} did not stop within {timeout} s; killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        # Daemons (nginx's workers) may outlive their starter in the same group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self):
        for proc in list(reversed(self.running)):
            self.stop(proc)


_picked = set()


def free_port():
    """A loopback port nothing listens on, not handed out before in this run."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _picked:
            _picked.add(port)
            return port
    raise BenchError("no free port found")


def poll(what, check, timeout=30, proc=None, procs=None):
    """Calls `check` until it returns a true value, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            said = procs.output(proc.bench_name) if procs else ""
            raise BenchError(f"{what}: {proc.bench_name} exited with {proc.returncode}:\n{said}")
        if time.monotonic() > deadline:
            said = procs.output(proc.bench_name) if procs and proc else ""
            raise BenchError(f"{what}: not within {timeout} s\n{said}")
        time.sleep(0.02)


def listening(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url, timeout=2):
    """The status and body of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None


def pids_of(proc):
    """The process and its children (nginx's master and workers), by /proc."""
    pids = [proc.pid]
    for pid in list(pids):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def cpu_split(pids):
    """User and system time of `pids` (each process with all its threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids):
    """User plus system time of `pids`, in seconds."""
    return sum(cpu_split(pids))


def memory_kib(pids, field="VmRSS"):
    """The sum of `field` (VmRSS, VmHWM) over `pids`, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# --- PKI --------------------------------------------------------------------------------------


def make_pki(tmp, names=("origin.test",)):
    """A throwaway CA and one ECDSA P-256 server certificate for `names` and 127.0.0.1."""
    ca_key, ca = os.path.join(tmp, "ca.key"), os.path.join(tmp, "ca.pem")
    key, csr, cert = (os.path.join(tmp, f) for f in ("origin.key", "origin.csr", "origin.pem"))
    ext = os.path.join(tmp, "origin.ext")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
    run("req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "2", "-subj", "/CN=Sluice bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        "-out", ca)
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    run("req", "-new", "-key", key, "-subj", f"/CN={names[0]}", "-out", csr)
    sans = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1"])
    with open(ext, "w") as f:
        f.write(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
        "-sha256", "-extfile", ext, "-out", cert)
    return {"ca": ca, "cert": cert, "key": key, "name": names[0]}


# --- configuration files ----------------------------------------------------------------------


def render(template_path, out_path, **values):
    """Copies a configuration template, replacing each @KEY@ with its value."""
    with open(template_path) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    if "@" in "".join(line for line in text.splitlines() if not line.lstrip().startswith("#")):
        leftover = [w for w in text.split() if w.startswith("@") and w.endswith("@")]
        if leftover:
            raise BenchError(f"{template_path}: no value for {leftover}")
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def inline_pem(path, indent):
    with open(path) as f:
        return "".join(" " * indent + line for line in f.read().splitlines(True))


# --- wrk --------------------------------------------------------------------------------------

WRK_REPORT = os.path.join(BENCH, "wrk-report.lua")


def wrk(url, connections, seconds, pace_ms=0, headers=(), timeout_s=10):
    """Runs wrk (one thread, pinned to the load CPU) and returns its figures.

    `pace_ms` > 0: each connection waits that long after a response before its next request, so
    the load is steady below saturation (the achieved rate is reported).
    """
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
           f"--timeout={timeout_s}s", "-s", WRK_REPORT]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    env = dict(os.environ, WRK_PACE_MS=str(pace_ms))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + timeout_s + 30)
    line = next((l for l in out.stdout.splitlines() if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk {url}: exit {out.returncode}: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    r = json.loads(line)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    return r


# --- the servers every scenario starts ----------------------------------------------------------


class Context:
    """One benchmark run: its temporary directory, processes, PKI and how long each run lasts."""

    def __init__(self, tmp, quick):
        self.tmp = tmp
        self.quick = quick
        self.procs = Processes(tmp)
        self.pki = None

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)


NGINX_TOP = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
"""


def start_nginx(ctx, name, server_block, cpus):
    """nginx with one worker and every path under TMP/NAME, started without touching /etc."""
    d = ctx.path(name)
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_TOP.format(dir=d) + server_block + "\n}\n")
    nginx = which("nginx")
    return ctx.procs.start(name, [nginx, "-c", conf, "-p", d + "/", "-e", os.path.join(d, "error.log")], cpus=cpus)


def start_origin(ctx):
    """The TLS origin (nginx, one worker, on the load CPU), TLS 1.3: a 1 KiB body at `/`, 64 KiB
    at `/64k`, and a gRPC-shaped answer (trailer grpc-status 0) at `/grpc`. Returns two ports:
    HTTP/1.1 only (what the peers speak upstream), and HTTP/2 by ALPN."""
    port, h2_port = free_port(), free_port()
    www = ctx.path("www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "64k"), "wb") as f:
        f.write(b"y" * 65536)
    # nginx's workers drop to an unprivileged user when started as root.
    os.chmod(ctx.tmp, 0o711)
    os.chmod(www, 0o755)
    os.chmod(os.path.join(www, "64k"), 0o644)
    body = "x" * 1024
    block = "".join(f"""
    server {{
        listen 127.0.0.1:{p} ssl{h2};
        ssl_certificate {ctx.pki['cert']};
        ssl_certificate_key {ctx.pki['key']};
        ssl_protocols TLSv1.3;
        http2_max_requests 100000000;
        location / {{ return 200 "{body}"; }}
        location = /64k {{ root {www}; default_type application/octet-stream; }}
        location = /grpc {{
            default_type application/grpc;
            add_trailer grpc-status 0;
            add_trailer grpc-message "";
            return 200 "\\x00\\x00\\x00\\x00\\x05hello";
        }}
    }}
""" for p, h2 in ((port, ""), (h2_port, " http2")))
    proc = start_nginx(ctx, "origin", block, LOAD_CPU)
    poll("the nginx origin listening", lambda: listening(port) and listening(h2_port), proc=proc, procs=ctx.procs)
    return port, h2_port


def mes_yaml(ctx, name, origin_port, protocol="http"):
    """A MeshExternalService originating verified TLS to the origin."""
    return f"""type: MeshExternalService
name: {name}
mesh: default
spec:
  match:
    type: HostnameGenerator
    port: 443
    protocol: {protocol}
  endpoints:
    - address: 127.0.0.1
      port: {origin_port}
  tls:
    enabled: true
    verification:
      mode: Secured
      serverName: {ctx.pki['name']}
      caCert:
        inlineString: |
{inline_pem(ctx.pki['ca'], 10)}"""


def dataplane_yaml(outbounds):
    """A Dataplane with one outbound per (port, MeshExternalService name)."""
    y = "type: Dataplane\nmesh: default\nname: bench-client\nnetworking:\n  address: 127.0.0.1\n  outbound:\n"
    for port, service in outbounds:
        y += f"    - port: {port}\n      backendRef:\n        kind: MeshExternalService\n        name: {service}\n"
    return y


# Sluice with `--access-log off`, beside Sluice as it ships: the peers' configurations log nothing.
NO_LOG = "sluice-nolog"

# What HAProxy offers an origin that speaks HTTP/2: the same as Sluice offers every TLS origin.
H2_ALPN = "h2,http/1.1"


class Sluice:
    """A running `sluice run` pinned to the proxy CPU, with its admin endpoint."""

    def __init__(self, ctx, name, yaml_text, args=(), cpus=PROXY_CPU, wrapper=(), binary=None, access_log=True):
        self.ctx = ctx
        config = ctx.path(f"{name}.yaml")
        with open(config, "w") as f:
            f.write(yaml_text)
        self.admin_port = free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        cmd = [*wrapper, binary or sluice_binary(), "run", "-f", config, "--listen", "off", "--data-dir", ctx.path(f"{name}-data"),
               "--admin", f"127.0.0.1:{self.admin_port}",
               "--access-log", ctx.path(f"{name}-access.log") if access_log else "off",
               "--drain-timeout", "2s", *args]
        if "--http-proxy" not in args:
            # Never the default port: another proxy on this machine must not fail the run.
            cmd += ["--http-proxy", "off"]
        self.proc = ctx.procs.start(name, cmd, cpus=cpus)
        poll(f"{name} ready", lambda: (http_get(self.admin + "/ready") or (0,))[0] == 200,
             timeout=120 if wrapper else 30, proc=self.proc, procs=ctx.procs)

    @property
    def pids(self):
        # Under valgrind or taskset the process is the one exec'd; the pid is the same.
        return [self.proc.pid]

    def metric(self, name):
        """The sum of a metric's samples, from /metrics."""
        got = http_get(self.admin + "/metrics", timeout=5)
        if not got or got[0] != 200:
            raise BenchError(f"cannot read {self.admin}/metrics")
        total = 0.0
        for line in got[1].decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        self.ctx.procs.stop(self.proc)


def peer_config(ctx, name, listen_port, origin_port, alpn="http/1.1"):
    """nginx's or HAProxy's TLS-originating configuration from bench/peers, filled in. `alpn` is
    what HAProxy offers the origin (nginx offers nothing and speaks HTTP/1.1 upstream)."""
    d = ctx.path(name)
    os.makedirs(d, exist_ok=True)
    for sub in ("cb", "pt", "ft", "ut", "st"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    template = {"nginx": "nginx-tls-origination.conf", "haproxy": "haproxy-tls-origination.cfg"}[name]
    return render(os.path.join(BENCH, "peers", template), os.path.join(d, template), DIR=d,
                  LISTEN=f"127.0.0.1:{listen_port}", ORIGIN=f"127.0.0.1:{origin_port}",
                  NAME=ctx.pki["name"], CA=ctx.pki["ca"], ALPN=alpn)


def start_peer(ctx, name, origin_port, alpn="http/1.1"):
    """nginx or HAProxy in the proxy's seat (one worker, the proxy CPU), in the foreground.
    Returns the process and its listening port."""
    port = free_port()
    conf = peer_config(ctx, name, port, origin_port, alpn)
    if name == "nginx":
        d = ctx.path(name)
        cmd = [which("nginx"), "-c", conf, "-p", d + "/", "-e", os.path.join(d, "error.log")]
    else:
        cmd = [which("haproxy"), "-W", "-db", "-f", conf]
    proc = ctx.procs.start(f"peer-{name}", cmd, cpus=PROXY_CPU)
    poll(f"{name} listening", lambda: listening(port), proc=proc, procs=ctx.procs)
    return proc, port


def start_subjects(ctx, origin_port, path="/", baseline=None, peer_alpn="http/1.1"):
    """Sluice (a MeshExternalService to the origin and a Dataplane outbound) as it ships and
    without its access log, nginx and HAProxy in the proxy's seat: name -> (URL of `path` through
    it, its process, the Sluice or None for a peer). With `baseline`, the path of another Sluice
    binary, that one too (access log on), as "baseline". Sluice offers the origin `h2` and
    `http/1.1` by ALPN, as it always does; HAProxy offers `peer_alpn`."""
    builds = {"sluice": (None, True), NO_LOG: (None, False),
              **({"baseline": (baseline, True)} if baseline else {})}
    subjects = {}
    for name, (binary, access_log) in builds.items():
        port = free_port()
        yaml = mes_yaml(ctx, "origin", origin_port) + "---\n" + dataplane_yaml([(port, "origin")])
        sluice = Sluice(ctx, name, yaml, binary=binary, access_log=access_log)
        subjects[name] = (f"http://127.0.0.1:{port}{path}", sluice.proc, sluice)
    for peer in ("nginx", "haproxy"):
        proc, peer_port = start_peer(ctx, peer, origin_port, peer_alpn)
        subjects[peer] = (f"http://127.0.0.1:{peer_port}{path}", proc, None)
    return subjects


# --- repeated side-by-side runs (bench/fixed-rate.py, bench/throughput.py) -----------------------


def rounds_parser(doc, origin_h2=False):
    """The options every repeated side-by-side script takes: --rounds, --seconds, --sluice,
    --baseline; with `origin_h2`, --origin-h2 as well."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=8, help="length of one measurement")
    parser.add_argument("--sluice", metavar="PATH", help="measure this binary instead of building target/release/sluice")
    parser.add_argument("--baseline", metavar="PATH",
                        help="also measure this Sluice binary, as `baseline`: before and after in the same rounds")
    if origin_h2:
        parser.add_argument("--origin-h2", action="store_true",
                            help="the origin offers HTTP/2 by ALPN (Sluice takes it, HAProxy is told to offer it; "
                                 "nginx speaks HTTP/1.1 upstream whatever the origin offers)")
    return parser


@contextlib.contextmanager
def side_by_side(args, tools, name, path="/"):
    """The binary `args.sluice` names (else a fresh release build), a throwaway directory, the
    origin and the three subjects (see start_subjects); everything stopped and removed after."""
    global SLUICE
    ensure_tools(tools)
    if args.sluice:
        SLUICE = os.path.abspath(args.sluice)
    else:
        build_sluice()
    tmp = tempfile.mkdtemp(prefix=f"sluice-{name}.")
    ctx = Context(tmp, quick=False)
    try:
        ctx.pki = make_pki(tmp)
        h1_port, h2_port = start_origin(ctx)
        baseline = args.baseline and os.path.abspath(args.baseline)
        if getattr(args, "origin_h2", False):
            yield ctx, start_subjects(ctx, h2_port, path, baseline, peer_alpn=H2_ALPN)
        else:
            yield ctx, start_subjects(ctx, h1_port, path, baseline)
    finally:
        ctx.procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def alternating(names, rounds):
    """(round, name) for every subject in every round, the order reversed every other round, so
    that drift on the machine hits them alike."""
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else list(reversed(names))):
            yield round_, name


def spread(values, fmt):
    """The median of `values` and their range, as `median (lowest–highest)`."""
    v = sorted(values)
    return f"{fmt(statistics.median(v))} ({fmt(v[0])}–{fmt(v[-1])})"
