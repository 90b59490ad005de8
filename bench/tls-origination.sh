#!/usr/bin/env bash
# TLS origination benchmark: plaintext HTTP/1.1 through Sluice to a local nginx TLS origin,
# compared with wrk speaking TLS straight to the same origin. Everything stays on loopback.
#
#   bench/tls-origination.sh            # 10 s per measured run (about 2.5 minutes after the build)
#   bench/tls-origination.sh --quick    # 3 s per measured run (under a minute)
#   bench/tls-origination.sh --keep     # keep the temporary directory (configs, logs, wrk output)
#
# Sluice runs on CPU 0; the nginx origin (one worker) and wrk (one thread) share CPU 1.
# A second nginx, configured as a TLS-originating reverse proxy and also pinned to CPU 0, is
# measured afterwards as a reference for what any proxy costs in this layout, and one run with
# nothing pinned shows the latency Sluice adds when no request must wake an idle CPU. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=10
WARMUP=3
KEEP=0
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) DURATION=3; WARMUP=2 ;;
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "tls-origination.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

# --- what the benchmark needs --------------------------------------------------------------------
if [ "$(nproc)" -lt 2 ]; then
  die "needs at least 2 CPUs (sluice on CPU 0, nginx and wrk on CPU 1); this machine has $(nproc)"
fi
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need[*]} from Debian packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    die "missing ${need[*]}; run as root or: apt-get install -y ${need[*]}"
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

log "building the release binary"
cargo build --release -p sluice
SLUICE=$ROOT/target/release/sluice
[ -x "$SLUICE" ] || die "$SLUICE was not built"

# --- processes and cleanup -------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
SLUICE_PID=""
ORIGIN_PID=""
REF_PID=""
WRK_PID=""

stop_pid() { # PID SIGNAL SECONDS: signal, wait up to SECONDS, then SIGKILL
  local pid=$1 sig=$2 secs=$3 deadline
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + secs))
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "process $pid did not stop after SIG$sig; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

stop_nginx() { # MASTER_PID: fast shutdown of the master, then make sure its workers are gone
  local master=$1 workers w
  [ -n "$master" ] || return 0
  workers=$(cat "/proc/$master/task/$master/children" 2>/dev/null || true)
  stop_pid "$master" TERM 10
  for w in $workers; do stop_pid "$w" KILL 5; done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$WRK_PID" TERM 5
  stop_pid "$SLUICE_PID" TERM 10
  stop_nginx "$REF_PID"
  stop_nginx "$ORIGIN_PID"
  if [ "$KEEP" = 1 ]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback TCP port below the ephemeral range, not in use by any socket and not picked before.
PICKED=" "
free_port() {
  local port hex tries=0
  while [ $tries -lt 200 ]; do
    tries=$((tries + 1))
    port=$((20000 + RANDOM % 12000))
    case "$PICKED" in *" $port "*) continue ;; esac
    hex=$(printf '%04X' "$port")
    if ! grep -qE "^ *[0-9]+: [0-9A-F]+:$hex " /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
      PICKED="$PICKED$port "
      echo "$port"
      return 0
    fi
  done
  die "no free port found"
}

wait_http() { # URL SECONDS PID [curl options...]: until URL answers 2xx, the deadline, or PID dies
  local url=$1 secs=$2 pid=$3 deadline
  shift 3
  deadline=$((SECONDS + secs))
  until curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.05
  done
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system time, in clock ticks
CLK_TCK=$(getconf CLK_TCK)

# --- throwaway PKI ---------------------------------------------------------------------------------
log "making a throwaway CA and an origin certificate for origin.test in $TMP"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$TMP/ca.key" -out "$TMP/ca.pem" -days 2 -subj "/CN=sluice bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$TMP/origin.key" -out "$TMP/origin.csr" -subj "/CN=origin.test" 2>/dev/null
cat >"$TMP/origin.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:origin.test, IP:127.0.0.1
EOF
openssl x509 -req -in "$TMP/origin.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" -CAcreateserial \
  -out "$TMP/origin.pem" -days 2 -extfile "$TMP/origin.ext" 2>/dev/null
openssl verify -CAfile "$TMP/ca.pem" "$TMP/origin.pem" >/dev/null || die "origin certificate does not verify"

# --- nginx: the TLS origin on CPU 1, and the reference proxy on CPU 0 ------------------------------
ORIGIN_PORT=$(free_port)
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
REF_PORT=$(free_port)
mkdir -p "$TMP/www" "$TMP/origin" "$TMP/ref"
BODY_1K=$(printf 'x%.0s' $(seq 1024))
head -c 65536 /dev/zero | tr '\0' 'y' >"$TMP/www/64k"
# nginx workers run as an unprivileged user when started as root: let them reach the static file.
chmod 711 "$TMP"
chmod 755 "$TMP/www"
chmod 644 "$TMP/www/64k"

nginx_common() { # DIR: the top of an nginx configuration whose every path is under DIR
  cat <<EOF
daemon off;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
EOF
}
{
  nginx_common "$TMP/origin"
  cat <<EOF
    server {
        listen 127.0.0.1:$ORIGIN_PORT ssl;
        ssl_certificate $TMP/origin.pem;
        ssl_certificate_key $TMP/origin.key;
        ssl_protocols TLSv1.3;
        location / { return 200 "$BODY_1K"; }
        location = /64k { root $TMP/www; default_type application/octet-stream; }
    }
}
EOF
} >"$TMP/origin/nginx.conf"
{
  nginx_common "$TMP/ref"
  cat <<EOF
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$REF_PORT;
        location / {
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host origin.test;
            proxy_ssl_server_name on;
            proxy_ssl_name origin.test;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $TMP/ca.pem;
            proxy_ssl_protocols TLSv1.3;
        }
    }
}
EOF
} >"$TMP/ref/nginx.conf"

log "starting the nginx origin on 127.0.0.1:$ORIGIN_PORT (CPU 1)"
taskset -c 1 "$NGINX" -c "$TMP/origin/nginx.conf" -p "$TMP/origin/" -e "$TMP/origin/error.log" \
  >"$TMP/origin/stdout.log" 2>&1 &
ORIGIN_PID=$!
wait_http "https://origin.test:$ORIGIN_PORT/" 10 "$ORIGIN_PID" \
  --cacert "$TMP/ca.pem" --resolve "origin.test:$ORIGIN_PORT:127.0.0.1" ||
  die "the nginx origin did not serve within 10 s: $(cat "$TMP/origin/error.log" "$TMP/origin/stdout.log" 2>/dev/null)"

log "starting the reference nginx proxy on 127.0.0.1:$REF_PORT (CPU 0)"
taskset -c 0 "$NGINX" -c "$TMP/ref/nginx.conf" -p "$TMP/ref/" -e "$TMP/ref/error.log" \
  >"$TMP/ref/stdout.log" 2>&1 &
REF_PID=$!
wait_http "http://127.0.0.1:$REF_PORT/" 10 "$REF_PID" ||
  die "the reference nginx proxy did not serve within 10 s: $(cat "$TMP/ref/error.log" "$TMP/ref/stdout.log" 2>/dev/null)"
REF_WORKER=$(cat "/proc/$REF_PID/task/$REF_PID/children" 2>/dev/null | awk '{print $1}')
[ -n "$REF_WORKER" ] || die "cannot find the reference nginx worker"

# --- sluice on CPU 0 -------------------------------------------------------------------------------
{
  cat <<EOF
type: MeshExternalService
name: origin
mesh: default
spec:
  match:
    type: HostnameGenerator
    port: 443
    protocol: http
  endpoints:
    - address: 127.0.0.1
      port: $ORIGIN_PORT
  tls:
    enabled: true
    verification:
      mode: Secured
      serverName: origin.test
      caCert:
        inlineString: |
EOF
  sed 's/^/          /' "$TMP/ca.pem"
  cat <<EOF
---
type: Dataplane
mesh: default
name: bench-client
networking:
  address: 127.0.0.1
  outbound:
    - port: $PROXY_PORT
      backendRef:
        kind: MeshExternalService
        name: origin
EOF
} >"$TMP/sluice.yaml"
log "starting sluice: outbound 127.0.0.1:$PROXY_PORT, admin 127.0.0.1:$ADMIN_PORT (CPU 0)"
taskset -c 0 "$SLUICE" run -f "$TMP/sluice.yaml" --listen off --data-dir "$TMP/data" --admin "127.0.0.1:$ADMIN_PORT" \
  --access-log "$TMP/access.log" --drain-timeout 2s 2>"$TMP/sluice.stderr" &
SLUICE_PID=$!
ADMIN=http://127.0.0.1:$ADMIN_PORT
wait_http "$ADMIN/ready" 15 "$SLUICE_PID" ||
  die "sluice was not ready within 15 s: $(cat "$TMP/sluice.stderr")"
IDLE_RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$SLUICE_PID/status")
IDLE_THREADS=$(awk '/^Threads:/ {print $2}' "/proc/$SLUICE_PID/status")

upstream_connections() { # prints the counter, or "missing"
  curl -fsS --max-time 5 "$ADMIN/metrics" 2>/dev/null |
    awk '/^sluice_upstream_connections_total\{/ {s += $NF; n++} END {if (n) print s; else print "missing"}'
}
read_hs() { # VAR: reads the handshake counter into VAR, or stops the benchmark
  local v
  v=$(upstream_connections)
  case "$v" in "" | *[!0-9]*) die "cannot read sluice_upstream_connections_total from $ADMIN/metrics" ;; esac
  printf -v "$1" '%s' "$v"
}
read_hs HS_START

# One request each way through each proxy, checked, before any load.
for base in "http://127.0.0.1:$PROXY_PORT" "http://127.0.0.1:$REF_PORT"; do
  size=$(curl -fsS --max-time 5 "$base/" | wc -c) || die "request to $base/ failed"
  [ "$size" = 1024 ] || die "$base/: expected a 1024-byte body, got $size bytes"
  size=$(curl -fsS --max-time 5 "$base/64k" | wc -c) || die "request to $base/64k failed"
  [ "$size" = 65536 ] || die "$base/64k: expected a 65536-byte body, got $size bytes"
done
SLUICE_REQUESTS=2

# --- measurements ----------------------------------------------------------------------------------
# wrk on CPU 1, output in $TMP/NAME.wrk. With SAMPLE=1, the handshake counter is read one second
# into the run (HS_EARLY), so that handshakes that refill the pool at the start of a run can be told
# from handshakes at steady concurrency.
WRK_CPUS=1
run_wrk() { # NAME URL CONNECTIONS SECONDS [SAMPLE]
  local name=$1 url=$2 conns=$3 secs=$4 sample=${5:-0} rc=0
  timeout --kill-after=5 $((secs + 30)) taskset -c "$WRK_CPUS" wrk -t1 -c"$conns" -d"${secs}s" --latency "$url" \
    >"$TMP/$name.wrk" 2>&1 &
  WRK_PID=$!
  if [ "$sample" = 1 ]; then
    sleep 1
    read_hs HS_EARLY
  fi
  wait "$WRK_PID" || rc=$?
  WRK_PID=""
  [ "$rc" = 0 ] || die "wrk $name exited with $rc: $(cat "$TMP/$name.wrk")"
}

to_us() { # wrk duration (85.12us, 1.23ms, 1.02s) -> microseconds
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); m = 1 } else if (v ~ /ms$/) { sub(/ms$/, "", v); m = 1000 }
    else if (v ~ /m$/) { sub(/m$/, "", v); m = 60000000 } else if (v ~ /s$/) { sub(/s$/, "", v); m = 1000000 }
    else { print "nan"; exit }
    printf "%.0f", v * m }'
}

# Sets RPS P50 P99 REQS ERRS from $TMP/NAME.wrk.
parse_wrk() {
  local f=$TMP/$1.wrk
  RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$f")
  P50=$(to_us "$(awk '$1 == "50%" {print $2}' "$f")")
  P99=$(to_us "$(awk '$1 == "99%" {print $2}' "$f")")
  REQS=$(awk '/requests in/ {print $1}' "$f")
  ERRS=$(awk '/Non-2xx or 3xx responses:/ {n += $NF}
              /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10}
              END {print n + 0}' "$f")
  case "$RPS$P50$P99$REQS" in
    "" | *[!0-9]*) die "cannot parse wrk output $f: $(cat "$f")" ;;
  esac
}

fmt_us() { # microseconds -> "85 µs" or "1.23 ms"
  awk -v u="$1" 'BEGIN { if (u < 1000) printf "%d µs", u; else printf "%.2f ms", u / 1000 }'
}
fmt_signed_us() { awk -v u="$1" 'BEGIN { printf "%+d µs", u }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "n/a" }'; }
cpu_per_req() { # TICKS REQUESTS -> "24 µs"
  awk -v t="$1" -v r="$2" -v hz="$CLK_TCK" 'BEGIN { if (r > 0) printf "%.1f µs", t * 1000000 / hz / r; else print "n/a" }'
}

DIRECT=https://127.0.0.1:$ORIGIN_PORT
PROXIED=http://127.0.0.1:$PROXY_PORT
REFERENCE=http://127.0.0.1:$REF_PORT

log "warm-up: ${WARMUP} s at 64 connections each: direct, through sluice, through the reference proxy"
run_wrk warmup-direct "$DIRECT/" 64 "$WARMUP"
run_wrk warmup-sluice "$PROXIED/" 64 "$WARMUP"
parse_wrk warmup-sluice
SLUICE_REQUESTS=$((SLUICE_REQUESTS + REQS))
run_wrk warmup-reference "$REFERENCE/" 64 "$WARMUP"
read_hs HS_AFTER_WARMUP

declare -A D_RPS D_P50
ROWS=()
TOTAL_ERRS=0
measure() { # LABEL PATH CONNECTIONS
  local label=$1 path=$2 conns=$3 key tag hs0 hs1 t0 t1 d_rps d_p50
  key="$path $conns"
  tag=$(echo "$label-$conns" | tr -c 'a-zA-Z0-9\n' '-')
  log "$label, $conns connection(s): direct TLS, then through sluice (${DURATION} s each)"
  run_wrk "direct-$tag" "$DIRECT$path" "$conns" "$DURATION"
  parse_wrk "direct-$tag"
  D_RPS[$key]=$RPS
  D_P50[$key]=$P50
  d_rps=$RPS
  d_p50=$P50
  TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
  ROWS+=("| direct TLS, $label | $conns | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | | | | | |")
  read_hs hs0
  t0=$(cpu_ticks "$SLUICE_PID")
  run_wrk "sluice-$tag" "$PROXIED$path" "$conns" "$DURATION" 1
  t1=$(cpu_ticks "$SLUICE_PID")
  read_hs hs1
  parse_wrk "sluice-$tag"
  SLUICE_REQUESTS=$((SLUICE_REQUESTS + REQS))
  TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
  ROWS+=("| via sluice, $label | $conns | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | $(fmt_signed_us $((P50 - d_p50))) | $(ratio "$RPS" "$d_rps") | $(ratio "$P50" "$d_p50") | $(cpu_per_req $((t1 - t0)) "$REQS") | $((HS_EARLY - hs0)) / $((hs1 - HS_EARLY)) |")
}

measure "1 KiB" / 1
measure "1 KiB" / 16
measure "1 KiB" / 64
measure "64 KiB" /64k 16
read_hs HS_AFTER_RUNS
kill -0 "$SLUICE_PID" 2>/dev/null || die "sluice exited during the runs: $(cat "$TMP/sluice.stderr")"

# Context: the same proxy job done by nginx on CPU 0, and sluice without the cross-CPU hops.
CONTEXT=()
reference() { # LABEL PATH CONNECTIONS
  local label=$1 path=$2 conns=$3 key tag t0 t1 d_rps d_p50
  key="$path $conns"
  d_rps=${D_RPS[$key]}
  d_p50=${D_P50[$key]}
  tag=$(echo "$label-$conns" | tr -c 'a-zA-Z0-9\n' '-')
  log "$label, $conns connection(s): through the reference nginx proxy on CPU 0 (${DURATION} s)"
  t0=$(cpu_ticks "$REF_WORKER")
  run_wrk "reference-$tag" "$REFERENCE$path" "$conns" "$DURATION"
  t1=$(cpu_ticks "$REF_WORKER")
  parse_wrk "reference-$tag"
  TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
  CONTEXT+=("| nginx proxy on CPU 0, $label | $conns | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | $(fmt_signed_us $((P50 - d_p50))) | $(ratio "$RPS" "$d_rps") | $(ratio "$P50" "$d_p50") | $(cpu_per_req $((t1 - t0)) "$REQS") |")
}
reference "1 KiB" / 1
reference "1 KiB" / 16
reference "1 KiB" / 64

log "1 KiB, 1 connection: sluice moved to CPU 1, beside nginx and wrk (${DURATION} s)"
taskset -a -p -c 1 "$SLUICE_PID" >/dev/null
read_hs hs0
run_wrk sluice-same-cpu "$PROXIED/" 1 "$DURATION"
read_hs hs1
taskset -a -p -c 0 "$SLUICE_PID" >/dev/null
parse_wrk sluice-same-cpu
SLUICE_REQUESTS=$((SLUICE_REQUESTS + REQS))
TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
d_rps=${D_RPS["/ 1"]}
d_p50=${D_P50["/ 1"]}
CONTEXT+=("| sluice on CPU 1 with nginx and wrk, 1 KiB | 1 | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | $(fmt_signed_us $((P50 - d_p50))) | $(ratio "$RPS" "$d_rps") | $(ratio "$P50" "$d_p50") | |")
SAME_CPU_HS=$((hs1 - hs0))

# Without pinning, as a sidecar usually runs: every process may use both CPUs and the scheduler
# places them. At one connection this shows the latency Sluice adds when no request has to wake an
# idle CPU that a pinned layout forces it to.
log "1 KiB, 1 connection, nothing pinned: direct TLS, then through sluice (${DURATION} s each)"
ORIGIN_WORKER=$(cat "/proc/$ORIGIN_PID/task/$ORIGIN_PID/children" 2>/dev/null | awk '{print $1}')
for pid in "$SLUICE_PID" "$ORIGIN_PID" $ORIGIN_WORKER; do taskset -a -p -c 0,1 "$pid" >/dev/null; done
WRK_CPUS=0,1
run_wrk direct-unpinned "$DIRECT/" 1 "$DURATION"
parse_wrk direct-unpinned
u_rps=$RPS
u_p50=$P50
TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
CONTEXT+=("| direct TLS, nothing pinned, 1 KiB | 1 | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | | | | |")
run_wrk sluice-unpinned "$PROXIED/" 1 "$DURATION"
parse_wrk sluice-unpinned
SLUICE_REQUESTS=$((SLUICE_REQUESTS + REQS))
TOTAL_ERRS=$((TOTAL_ERRS + ERRS))
CONTEXT+=("| sluice, nothing pinned, 1 KiB | 1 | $RPS | $(fmt_us "$P50") | $(fmt_us "$P99") | $(fmt_signed_us $((P50 - u_p50))) | $(ratio "$RPS" "$u_rps") | $(ratio "$P50" "$u_p50") | |")
WRK_CPUS=1
taskset -a -p -c 0 "$SLUICE_PID" >/dev/null
for pid in "$ORIGIN_PID" $ORIGIN_WORKER; do taskset -a -p -c 1 "$pid" >/dev/null; done

PEAK_RSS_KB=$(awk '/^VmHWM:/ {print $2}' "/proc/$SLUICE_PID/status")
NOW_RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$SLUICE_PID/status")

# Let the access-log writer catch up before counting its lines.
deadline=$((SECONDS + 10))
prev=-1
lines=$(wc -l <"$TMP/access.log")
while [ "$lines" != "$prev" ] && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 0.5
  prev=$lines
  lines=$(wc -l <"$TMP/access.log")
done
LOG_LINES=$lines
LOG_ERRORS=$(grep -vc '"error":null' "$TMP/access.log" || true)
TLS_SEEN=$(tail -n 1 "$TMP/access.log" | grep -o '"tls_version":"[^"]*"' | cut -d'"' -f4 || true)
WARNINGS=$(grep -cE 'WARN|ERROR' "$TMP/sluice.stderr" || true)

# --- report ----------------------------------------------------------------------------------------
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MiB (%d KiB)", k / 1024, k }'; }
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
# Only what goes into the binary counts; GIT_OPTIONAL_LOCKS=0 keeps git status from writing the index.
if [ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  commit="$commit (with uncommitted changes to the sources)"
fi

cat <<EOF

## TLS origination: sluice vs. direct TLS

- machine: $(nproc) CPUs, $cpu, Linux $(uname -r)
- sluice $commit; $("$NGINX" -v 2>&1); $(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')
- pinning: sluice on CPU 0 (\`taskset -c 0\`); the nginx origin (1 worker) and wrk (\`-t1\`) on CPU 1
  (\`taskset -c 1\`); the reference nginx proxy (1 worker) on CPU 0, idle while sluice is measured
- ${DURATION} s per run after a ${WARMUP} s warm-up at 64 connections; HTTP/1.1 keep-alive on both sides;
  origin TLS 1.3 only (ECDSA P-256 certificate); TLS that sluice negotiated upstream: ${TLS_SEEN:-unknown}

| scenario | connections | requests/s | p50 | p99 | added p50 (sluice − direct) | req/s ratio (sluice/direct) | p50 ratio (sluice/direct) | sluice CPU per request | upstream handshakes in run (first 1 s / rest) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
EOF
printf '%s\n' "${ROWS[@]}"
cat <<EOF

Context, after the runs above (added p50 and ratios against the direct TLS run at the same load; the unpinned sluice row against the unpinned direct row):

| scenario | connections | requests/s | p50 | p99 | added p50 (− direct) | req/s ratio | p50 ratio | proxy CPU per request |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
EOF
printf '%s\n' "${CONTEXT[@]}"
cat <<EOF

- sluice RSS: idle (VmRSS right after ready) $(mb "$IDLE_RSS_KB"); peak (VmHWM after all runs) $(mb "$PEAK_RSS_KB"); at the end $(mb "$NOW_RSS_KB"); $IDLE_THREADS threads when idle
- upstream handshakes (\`sluice_upstream_connections_total\`): $HS_AFTER_WARMUP after the warm-up, $HS_AFTER_RUNS after the measured sluice runs: **$((HS_AFTER_RUNS - HS_AFTER_WARMUP)) after warm-up** ($SAME_CPU_HS more in the same-CPU run)
- errors seen by wrk (non-2xx responses and socket errors, all runs): $TOTAL_ERRS
- access log: $LOG_LINES lines ($LOG_ERRORS with an error) for $SLUICE_REQUESTS requests that wrk and curl saw completed through sluice; sluice WARN/ERROR lines on stderr: $WARNINGS
EOF
