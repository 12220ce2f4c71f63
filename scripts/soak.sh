#!/usr/bin/env bash
# veer soak test (opt-in, not part of CI): mixed short and long TCP connections through a
# sidecar for N minutes, every payload verified byte for byte, the proxy's memory and
# descriptors sampled every 10 s. Run as root on a Debian machine with Rust and python3:
#
#   sudo bash scripts/soak.sh [--minutes 10] [--long 16] [--short 8] [--max-growth-mb 20]
#                             [--warmup-seconds S] [--debug]
#
# Topology (network namespaces created here, torn down on exit, nothing touches the host's
# network): a client pod `sleep` with veer-init capture and `veer proxy` as uid 1337, and two
# backends `tcp-echo-v1` / `tcp-echo-v2` running `veer echo 9000 one|two`, routed 50/50.
#
# Load (a Python client inside the client pod, dialling the Service's ClusterIP):
#   --long N   connections that live 5-60 s each (then are replaced), sending batches of 1-4
#              lines of 1 B-64 KiB with short pauses; every reply must be exactly
#              "<prefix> <line>\n" with one prefix per connection;
#   --short N  workers opening connections that send 1-5 lines, half-close and read to EOF;
#              the whole reply must be exactly the expected bytes.
# The proxy's RSS is sampled every 10 s; after the warm-up (default: a fifth of the run, at
# least 30 s) it may not grow by more than --max-growth-mb. At the end every connection must
# be closed and the proxy's sockets back to where they were.
#
# Exit status: 0 when every payload verified, nothing failed and memory stayed flat.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/pods.sh
source scripts/lib/pods.sh
REPO=$PWD

MINUTES=10
LONG=16
SHORT=8
MAX_GROWTH_MB=20
WARMUP=""
PROFILE=release

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "soak: $*" >&2; exit 1; }
is_number() { [[ $1 =~ ^[0-9]+$ ]]; }

while (($# > 0)); do
  case $1 in
    --minutes) MINUTES=${2:?}; shift 2 ;;
    --long) LONG=${2:?}; shift 2 ;;
    --short) SHORT=${2:?}; shift 2 ;;
    --max-growth-mb) MAX_GROWTH_MB=${2:?}; shift 2 ;;
    --warmup-seconds) WARMUP=${2:?}; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for n in "$MINUTES" "$LONG" "$SHORT" "$MAX_GROWTH_MB" ${WARMUP:+"$WARMUP"}; do
  is_number "$n" || die "not a whole number: $n"
done
((MINUTES > 0)) || die "--minutes must be at least 1"
DURATION=$((MINUTES * 60))
if [[ -z $WARMUP ]]; then
  WARMUP=$((DURATION / 5))
  ((WARMUP >= 30)) || WARMUP=30
fi
((WARMUP < DURATION)) || die "the warm-up ($WARMUP s) must be shorter than the run ($DURATION s)"

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, iptables): sudo bash $0"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the load client"

echo "soak: installing dependencies and building veer ($PROFILE)"
bash scripts/install-deps.sh
if [[ $PROFILE == release ]]; then
  cargo build --release --workspace --bins --quiet
else
  cargo build --workspace --bins --quiet
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
VEER=$TARGET_DIR/$PROFILE/veer
VEER_INIT=$TARGET_DIR/$PROFILE/veer-init
[[ -x $VEER && -x $VEER_INIT ]] || die "build did not produce $VEER and $VEER_INIT"

# ---------------------------------------------------------------------------------------------
# Unique names (veer-soak-<pid>-…) so a soak can run beside the test suite or the demo.
ID="veer-soak-$$"
NODE="$ID-node"
NET="10.251.$(($$ % 256))"
GATEWAY="$NET.1"
CLUSTER_IP="10.96.0.100"
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
chmod 755 "$WORK"
CONFIG="$WORK/config"
NAMESPACES=()
PIDS=()
PROXY_PID=""
CLIENT_PID=""

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  remove_pods "${PIDS[@]}" "$PROXY_PID" "$CLIENT_PID"
  if ((rc != 0)) && [[ -d $WORK ]]; then
    echo "soak failed (exit $rc); log tails:" >&2
    for f in "$WORK"/*.log; do
      [[ -s $f ]] || continue
      echo "----- $f" >&2
      tail -n 20 "$f" >&2
    done
  fi
  rm -rf "$WORK"
  echo "soak: cleaned up $ID" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
make_node

pod() { # pod NAME: add_pod, tuned for many short connections
  add_pod "$1"
  tune_for_short_connections "$POD_NS"
}
pod sleep;       CLIENT_NS=$POD_NS
pod tcp-echo-v1; V1_NS=$POD_NS; V1_IP=$POD_IP
pod tcp-echo-v2; V2_NS=$POD_NS; V2_IP=$POD_IP
in_pod() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

ulimit -n "$(ulimit -Hn)" # the echo servers inherit it
ip netns exec "$V1_NS" "$VEER" echo 9000 one >"$WORK/tcp-echo-v1.log" 2>&1 &
PIDS+=($!)
ip netns exec "$V2_NS" "$VEER" echo 9000 two >"$WORK/tcp-echo-v2.log" 2>&1 &
PIDS+=($!)
wait_listening() { # wait_listening NS IP PORT
  for _ in $(seq 1 100); do
    # shellcheck disable=SC2016 # expanded by the inner bash
    if in_pod "$1" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$2" "$3" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "nothing listening on $2:$3 after 10s"
}
wait_listening "$V1_NS" "$V1_IP" 9000
wait_listening "$V2_NS" "$V2_IP" 9000

mkdir -p "$CONFIG"
cat >"$CONFIG/soak.yaml" <<YAML
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
spec:
  clusterIP: $CLUSTER_IP
  ports:
  - {name: tcp, port: 9000}
  selector: {app: tcp-echo}
---
apiVersion: v1
kind: Pod
metadata:
  name: tcp-echo-v1
  labels: {app: tcp-echo, version: v1}
status:
  podIP: $V1_IP
---
apiVersion: v1
kind: Pod
metadata:
  name: tcp-echo-v2
  labels: {app: tcp-echo, version: v2}
status:
  podIP: $V2_IP
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo
spec:
  host: tcp-echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts: [tcp-echo]
  tcp:
  - route:
    - destination: {host: tcp-echo, subset: v1}
      weight: 50
    - destination: {host: tcp-echo, subset: v2}
      weight: 50
YAML
chmod -R a+rX "$CONFIG"

admin_raw() { # admin_raw PATH -> the raw HTTP response from the client pod's admin port
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  in_pod "$CLIENT_NS" bash -c '
    exec 3<>/dev/tcp/127.0.0.1/15000 || exit 1
    printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$1" >&3
    timeout 5 cat <&3' admin_raw "$1"
}
admin_get() { admin_raw "$1" | sed '1,/^\r\{0,1\}$/d'; } # the body only
stat_of() { # stat_of KEY -> a number from /stats?format=json
  admin_get '/stats?format=json' | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

in_pod "$CLIENT_NS" "$VEER_INIT" -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' \
  -d 15090,15021,15020 >"$WORK/veer-init.log" 2>&1 || die "veer-init failed"
ip netns exec "$CLIENT_NS" setpriv --reuid 1337 --regid 1337 --clear-groups \
  "$VEER" proxy --config "$CONFIG" --admin 127.0.0.1:15000 --pod-labels app=sleep \
  >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
ready=""
for _ in $(seq 1 100); do
  kill -0 "$PROXY_PID" 2>/dev/null || die "veer proxy exited"
  if admin_raw /ready 2>/dev/null | head -n 1 | grep -q ' 200'; then ready=1; break; fi
  sleep 0.1
done
[[ -n $ready ]] || die "veer proxy not ready after 10s"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status"; }
sockets() { find "/proc/$PROXY_PID/fd" -mindepth 1 -lname 'socket:*' 2>/dev/null | wc -l; }
fds() { find "/proc/$PROXY_PID/fd" -mindepth 1 2>/dev/null | wc -l; }

# ---------------------------------------------------------------------------------------------
cat >"$WORK/client.py" <<'PY'
"""Soak load: long and short connections to tcp-echo, every reply checked byte for byte."""
import json
import random
import socket
import sys
import threading
import time

host, port = sys.argv[1], int(sys.argv[2])
duration, n_long, n_short = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
end = time.monotonic() + duration
lock = threading.Lock()
totals = {"short_connections": 0, "long_connections": 0, "lines": 0,
          "bytes_sent": 0, "bytes_received": 0, "one": 0, "two": 0}
errors = []


def count(**kw):
    with lock:
        for k, v in kw.items():
            totals[k] += v


def fail(what):
    with lock:
        if len(errors) < 50:
            errors.append(what)


def make_line(rng):
    r = rng.random()
    size = rng.randint(1, 100) if r < 0.7 else rng.randint(100, 4096) if r < 0.95 else rng.randint(4096, 65536)
    return rng.randbytes(size // 2 + 1).hex()[:size].encode()


def connect():
    s = socket.create_connection((host, port), timeout=15)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_line(s, buf):
    while b"\n" not in buf:
        chunk = s.recv(262144)
        if not chunk:
            raise EOFError("EOF before a complete reply (%d bytes pending)" % len(buf))
        buf += chunk
    i = buf.index(b"\n") + 1
    return bytes(buf[:i]), buf[i:]


def read_to_eof(s):
    out = bytearray()
    while True:
        chunk = s.recv(262144)
        if not chunk:
            return bytes(out)
        out += chunk


def short_worker(seed):
    rng = random.Random(seed)
    while time.monotonic() < end:
        lines = [make_line(rng) for _ in range(rng.randint(1, 5))]
        try:
            with connect() as s:
                payload = b"".join(l + b"\n" for l in lines)
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                reply = read_to_eof(s)
            prefix = reply.split(b" ", 1)[0]
            want = b"".join(prefix + b" " + l + b"\n" for l in lines)
            if prefix not in (b"one", b"two") or reply != want:
                fail("short connection: %d bytes back, expected %d (prefix %r)" % (len(reply), len(want), prefix[:10]))
            else:
                count(short_connections=1, lines=len(lines), bytes_sent=len(payload),
                      bytes_received=len(reply), **{prefix.decode(): 1})
        except Exception as e:  # noqa: BLE001 - every failure is reported
            fail("short connection: %r" % e)
        time.sleep(rng.uniform(0, 0.02))


def long_worker(seed):
    rng = random.Random(seed)
    while time.monotonic() < end:
        stop = min(end, time.monotonic() + rng.uniform(5, 60))
        prefix, buf, n = None, b"", 0
        try:
            with connect() as s:
                while time.monotonic() < stop:
                    batch = [make_line(rng) for _ in range(rng.randint(1, 4))]
                    payload = b"".join(l + b"\n" for l in batch)
                    s.sendall(payload)
                    got = 0
                    for l in batch:
                        reply, buf = read_line(s, buf)
                        got += len(reply)
                        p, _, rest = reply.partition(b" ")
                        prefix = prefix or p
                        if p != prefix or rest != l + b"\n" or p not in (b"one", b"two"):
                            raise ValueError("reply %d differs (%d bytes, prefix %r)" % (n, len(reply), p[:10]))
                        n += 1
                    count(lines=len(batch), bytes_sent=len(payload), bytes_received=got)
                    time.sleep(rng.uniform(0, 0.2))
                s.shutdown(socket.SHUT_WR)
                rest = buf + read_to_eof(s)
                if rest:
                    raise ValueError("%d unexpected bytes before EOF" % len(rest))
            count(long_connections=1, **{prefix.decode(): 1} if prefix else {})
        except Exception as e:  # noqa: BLE001
            fail("long connection after %d lines: %r" % (n, e))


threads = [threading.Thread(target=long_worker, args=(1000 + i,)) for i in range(n_long)]
threads += [threading.Thread(target=short_worker, args=(2000 + i,)) for i in range(n_short)]
for t in threads:
    t.start()
for t in threads:
    t.join()
totals["errors"] = errors
print(json.dumps(totals))
sys.exit(1 if errors else 0)
PY

echo "soak: $MINUTES min, $LONG long + $SHORT short workers, warm-up ${WARMUP}s, max RSS growth ${MAX_GROWTH_MB} MB"
echo "soak: proxy pid $PROXY_PID ($PROFILE build); logs in $WORK"
START_SOCKETS=$(sockets)
START_FDS=$(fds)
in_pod "$CLIENT_NS" python3 "$WORK/client.py" "$CLUSTER_IP" 9000 "$DURATION" "$LONG" "$SHORT" \
  >"$WORK/client.out" 2>"$WORK/client.log" &
CLIENT_PID=$!
STARTED=$SECONDS
BASELINE_KB=""
MAX_KB=0
SAMPLES=()
printf '%8s %10s %8s %8s %10s\n' elapsed rss_kb fds active opened
while kill -0 "$CLIENT_PID" 2>/dev/null; do
  sleep 10
  kill -0 "$PROXY_PID" 2>/dev/null || die "the proxy died during the soak"
  elapsed=$((SECONDS - STARTED))
  rss=$(rss_kb)
  printf '%8s %10s %8s %8s %10s\n' "${elapsed}s" "$rss" "$(fds)" "$(stat_of connections_active)" \
    "$(stat_of connections_opened)"
  SAMPLES+=("$rss")
  if ((elapsed >= WARMUP)); then
    [[ -n $BASELINE_KB ]] || BASELINE_KB=$rss
    ((rss > MAX_KB)) && MAX_KB=$rss
  fi
done
client_rc=0
wait "$CLIENT_PID" || client_rc=$?
CLIENT_PID=""

# Every connection closed, the proxy's sockets back to where they were.
active=""
for _ in $(seq 1 50); do
  active=$(stat_of connections_active)
  [[ $active == 0 ]] && break
  sleep 0.2
done
end_sockets=""
for _ in $(seq 1 50); do
  end_sockets=$(sockets)
  ((end_sockets <= START_SOCKETS)) && break
  sleep 0.2
done
END_RSS=$(rss_kb)
[[ -n $BASELINE_KB ]] || BASELINE_KB=${SAMPLES[0]:-$END_RSS}

echo
echo "soak summary"
python3 - "$WORK/client.out" <<'PY'
import json, sys
try:
    t = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:  # noqa: BLE001
    print("  client produced no summary: %r" % e)
    sys.exit(0)
print("  connections: %d short, %d long (v1 %d, v2 %d)" % (t["short_connections"], t["long_connections"], t["one"], t["two"]))
print("  lines verified: %d; bytes sent %d, received %d" % (t["lines"], t["bytes_sent"], t["bytes_received"]))
print("  client errors: %d" % len(t["errors"]))
for e in t["errors"][:10]:
    print("    " + e)
PY
growth_kb=$((END_RSS - BASELINE_KB))
max_growth_kb=$((MAX_KB - BASELINE_KB))
echo "  proxy RSS: baseline after warm-up ${BASELINE_KB} kB, max ${MAX_KB} kB, end ${END_RSS} kB (growth ${growth_kb} kB, max growth ${max_growth_kb} kB)"
echo "  proxy descriptors: sockets ${START_SOCKETS} → ${end_sockets}, all fds ${START_FDS} → $(fds)"
echo "  proxy /stats: opened $(stat_of connections_opened), closed $(stat_of connections_closed), active ${active}, connect failures $(stat_of connect_failures)"
reasons=$(admin_get /stats/prometheus | grep '^veer_connections_closed_by_reason_total' || true)
echo "  close reasons: $(printf '%s' "$reasons" | sed 's/veer_connections_closed_by_reason_total//' | tr '\n' ' ')"

status=0
((client_rc == 0)) || { echo "FAIL: the client reported errors (exit $client_rc)"; status=1; }
[[ $active == 0 ]] || { echo "FAIL: $active connections still open in the proxy"; status=1; }
((end_sockets <= START_SOCKETS)) || { echo "FAIL: the proxy holds $end_sockets sockets (started with $START_SOCKETS)"; status=1; }
if ((max_growth_kb > MAX_GROWTH_MB * 1024)); then
  echo "FAIL: the proxy's RSS grew by ${max_growth_kb} kB after the warm-up (limit ${MAX_GROWTH_MB} MB)"
  status=1
fi
if [[ $reasons =~ reason=\"(client_reset|upstream_reset|connect_[a-z]+|no_healthy_upstream|overflow)\"\}\ [1-9] ]]; then
  echo "FAIL: connections closed abnormally: ${BASH_REMATCH[0]}"
  status=1
fi
((status == 0)) && echo "PASS"
exit "$status"
