#!/usr/bin/env bash
# CONNECT tunnel benchmark: HTTPS through Sluice's forward proxy (the app's own TLS tunnelled,
# SNI checked) against the same HTTPS straight to the origin, on loopback.
#
#   bench/connect-tunnel.sh           # one large transfer (512 MiB, best of 3) and 300 small requests
#   bench/connect-tunnel.sh --quick   # 128 MiB and 100 small requests
#
# Sluice runs on CPU 0; the nginx origin (one worker) and curl share CPU 1; then the same again
# with Sluice moved to CPU 1 too. Prints Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."

BIG_MB=512 SMALL=300 RUNS=3
[ "${1:-}" = "--quick" ] && BIG_MB=128 SMALL=100
log() { echo "bench: $*" >&2; }

need=()
for tool in curl nginx openssl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "bench: missing ${need[*]}; install them first" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q -p sluice
SLUICE=$PWD/target/release/sluice
NGINX=$(command -v nginx)

TMP=$(mktemp -d /tmp/sluice-connect.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$TMP/nginx.pid" ] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
  sleep 0.2
  rm -rf "$TMP"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL SECONDS [curl options]
  local url=$1 deadline=$((SECONDS + $2)); shift 2
  until curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "bench: $url did not answer" >&2; exit 1; }
    sleep 0.1
  done
}

log "PKI, a ${BIG_MB} MiB file and a 1 KiB file"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$TMP/ca.key" -out "$TMP/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$TMP/o.key" -out "$TMP/o.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$TMP/ext"
openssl x509 -req -in "$TMP/o.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" -CAcreateserial -days 2 \
  -extfile "$TMP/ext" -out "$TMP/o.pem" 2>/dev/null
mkdir -p "$TMP/www"
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom >"$TMP/www/big"
head -c 1024 /dev/urandom >"$TMP/www/small"
chmod -R a+rX "$TMP"

ORIGIN=$(port) PROXY=$(port) ADMIN=$(port)
cat >"$TMP/nginx.conf" <<CONF
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP; proxy_temp_path $TMP; fastcgi_temp_path $TMP; uwsgi_temp_path $TMP; scgi_temp_path $TMP;
  server {
    listen 127.0.0.1:$ORIGIN ssl;
    ssl_certificate $TMP/o.pem; ssl_certificate_key $TMP/o.key; ssl_protocols TLSv1.3;
    keepalive_requests 100000;
    root $TMP/www;
  }
}
CONF
taskset -c 1 "$NGINX" -c "$TMP/nginx.conf" -p "$TMP/"
cat >"$TMP/sluice.yaml" <<YAML
type: MeshExternalService
name: origin
spec:
  match: {port: $ORIGIN, protocol: tcp}
  endpoints:
    - {address: localhost, port: $ORIGIN}
    - {address: 127.0.0.1, port: $ORIGIN}
YAML
taskset -c 0 "$SLUICE" run -f "$TMP/sluice.yaml" --listen off --data-dir "$TMP/data" --admin "127.0.0.1:$ADMIN" --http-proxy "127.0.0.1:$PROXY" \
  --outbound-traffic-policy restricted --access-log "$TMP/access.log" 2>"$TMP/sluice.err" &
PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/ready" 10
wait_http "https://localhost:$ORIGIN/small" 10 --cacert "$TMP/ca.pem"

CURL=(taskset -c 1 curl -sS --cacert "$TMP/ca.pem" --noproxy '')
via=(--proxy "http://127.0.0.1:$PROXY")

best_speed() { # label curl-args...: best of RUNS, in MB/s
  local best=0 s
  for _ in $(seq "$RUNS"); do
    s=$("${CURL[@]}" "$@" -o /dev/null -w '%{speed_download}' "https://localhost:$ORIGIN/big")
    best=$(awk -v a="$best" -v b="$s" 'BEGIN { print (b > a) ? b : a }')
  done
  awk -v b="$best" 'BEGIN { printf "%.0f", b / 1e6 }'
}
log "one ${BIG_MB} MiB transfer, best of $RUNS: direct, then through the tunnel"
DIRECT_MBS=$(best_speed)
TUNNEL_MBS=$(best_speed "${via[@]}")

# Many small requests on one connection (one tunnel): per-request time after the first.
small_p50() { # curl-args...: p50 and p99 of time_total in microseconds, first request left out
  local urls=() i
  for i in $(seq "$SMALL"); do urls+=(-o /dev/null "https://localhost:$ORIGIN/small"); done
  "${CURL[@]}" "$@" -w '%{time_total}\n' "${urls[@]}" |
    tail -n +2 | awk '{ print $1 * 1e6 }' | sort -n |
    awk '{ v[NR] = $1 } END { printf "%d %d\n", v[int(NR * 0.5)], v[int(NR * 0.99)] }'
}
log "$SMALL small requests on one kept-alive connection: direct, then through one tunnel"
read -r D50 D99 < <(small_p50)
read -r T50 T99 < <(small_p50 "${via[@]}")

# The same with sluice moved to CPU 1 beside nginx and curl: no request crosses between CPUs, so
# this shows Sluice's own cost per request (and, for the transfer, what sharing one CPU costs).
log "the same with sluice on CPU 1, beside nginx and curl"
taskset -a -p -c 1 "${PIDS[0]}" >/dev/null
UDIRECT_MBS=$(best_speed)
UTUNNEL_MBS=$(best_speed "${via[@]}")
read -r UD50 UD99 < <(small_p50)
read -r UT50 UT99 < <(small_p50 "${via[@]}")

cat <<REPORT

## CONNECT tunnel: sluice vs. direct HTTPS

- machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)
- sluice $(git rev-parse --short HEAD); $("$NGINX" -v 2>&1); $(curl --version | head -1 | cut -d' ' -f1-2)
- pinning: sluice on CPU 0; nginx (1 worker, TLS 1.3) and curl on CPU 1; restricted mode, SNI checked

| measure | direct | through the tunnel | ratio |
| --- | ---: | ---: | ---: |
| one ${BIG_MB} MiB transfer (best of $RUNS) | ${DIRECT_MBS} MB/s | ${TUNNEL_MBS} MB/s | $(awk -v a="$TUNNEL_MBS" -v b="$DIRECT_MBS" 'BEGIN { printf "%.2f×", a / b }') |
| small request p50 ($SMALL on one connection) | ${D50} µs | ${T50} µs | +$((T50 - D50)) µs |
| small request p99 | ${D99} µs | ${T99} µs | +$((T99 - D99)) µs |
| all on CPU 1: one ${BIG_MB} MiB transfer | ${UDIRECT_MBS} MB/s | ${UTUNNEL_MBS} MB/s | $(awk -v a="$UTUNNEL_MBS" -v b="$UDIRECT_MBS" 'BEGIN { printf "%.2f×", a / b }') |
| all on CPU 1: small request p50 | ${UD50} µs | ${UT50} µs | +$((UT50 - UD50)) µs |
| all on CPU 1: small request p99 | ${UD99} µs | ${UT99} µs | +$((UT99 - UD99)) µs |
REPORT
