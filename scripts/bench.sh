#!/usr/bin/env bash
# veer performance benchmark: veer against no proxy, HAProxy and nginx, side by side, in the
# captured-pod topology of a real sidecar. Run as root on a Debian machine with Rust:
#
#   sudo bash scripts/bench.sh                    # about 6-8 minutes on 2 cores
#   sudo bash scripts/bench.sh --quick            # about 2 minutes, short runs (smoke test)
#   sudo bash scripts/bench.sh --json out.json    # also write every figure as JSON
#
# What it builds (all inside network namespaces it creates; nothing touches the host's network):
#
#   node ns ── br0 (10.249.N.1/24, no route out)
#     ├── server       iperf3 -s | sockperf server | nginx (512-byte file) | veer echo,
#     │                one at a time, always on port 9000
#     └── client-SETUP one fresh pod per setup, its tools (iperf3, sockperf, wrk, an idle
#                      connection holder) running as root:
#           direct   no capture, dials the server pod IP
#           veer     veer-init -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
#                    -d 15090,15021,15020, `veer proxy` (release) as uid 1337; the server is a
#                    Service (ClusterIP 10.96.0.100:9000 + one Pod); the client dials the
#                    ClusterIP, which exists nowhere: only the capture makes it reachable
#           haproxy  the same capture; HAProxy (Debian package, mode tcp, splice-auto,
#                    nbthread 2) as uid 1337 on 15001 with the server pod as static upstream
#           nginx    the same capture; nginx stream (libnginx-mod-stream, 2 workers) likewise
#           veer-quiet  veer with RUST_LOG=warn: no access log (HAProxy and nginx log nothing)
#           veer-busypoll  veer with --busy-poll 50us (one worker that keeps polling for 50 µs
#                    after its last event instead of sleeping at once: latency for CPU)
#
# Figures, per setup: bulk throughput with 1 and 4 streams (iperf3); 64-byte round trip
# p50/p99/p99.9 in ping-pong (sockperf --full-rtt) and at a fixed rate with a histogram;
# new connections per second (wrk, `Connection: close`, 512-byte file); the proxy's CPU
# seconds per GB and per 1 000 connections (/proc/PID/stat utime+stime; per connection also
# the kernel's part, stime, alone), peak RSS (VmHWM under that load) and RSS per idle
# connection at 1 000 and 5 000 idle connections (fresh proxy, RSS delta / N). Then the routing core (benches/routing.rs, criterion): route lookup
# and reload (compile) for 10, 1 000 and 10 000 services, and the lookup's same-run baseline
# (one dependent load in as much memory as the compile made resident). The machine is shared by everything
# (client, proxy, server): figures are relative, compare them within one run.
#
# Missing tools are installed with apt-get (iperf3 sockperf haproxy nginx libnginx-mod-stream
# wrk python3); a tool that cannot be installed is reported and its figures are skipped.
# Names are unique per run (veer-bench-<pid>-…); everything is torn down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/pods.sh
source scripts/lib/pods.sh
REPO=$PWD

usage() {
  cat <<'EOF'
usage: sudo bash scripts/bench.sh [options]
  --quick              short runs (about 2 minutes in all): a smoke test, figures are rough
  --json FILE          also write the figures (and raw percentiles, histograms) as JSON
  --duration SEC       seconds per throughput / latency / connection-rate run (default 8,
                       quick 2)
  --rate MPS           message rate of the fixed-rate latency run (default 10000)
  --idle LIST          idle connection counts (default 1000,5000; at most 9000)
  --setups LIST        which of direct,veer,veer-quiet,veer-busypoll,haproxy,nginx to run
                       (default: all; veer-quiet is veer with RUST_LOG=warn, i.e. without its
                       per-connection access log, like the HAProxy and nginx configs, which
                       log nothing; veer-busypoll is veer with --busy-poll 50us)
  --no-routing         skip the criterion routing bench
  --no-install         do not apt-get anything; skip figures whose tool is missing
  --no-build           use the veer binaries already in the target dir (no cargo build)
  --keep DIR           keep raw outputs (iperf3 JSON, sockperf logs, proxy logs) in DIR
  -h, --help           this text
EOF
}

die() { echo "bench: $*" >&2; exit 1; }
note() { printf '%s\n' "$*" >&2; }
if [[ -t 2 ]]; then
  step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
else
  step() { printf '\n==> %s\n' "$*" >&2; }
fi

QUICK=0
JSON_OUT=""
DURATION=""
RATE=10000
IDLE_COUNTS="1000,5000"
SETUPS="direct,veer,veer-quiet,veer-busypoll,haproxy,nginx"
ROUTING=1
INSTALL=1
BUILD=1
KEEP=""
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --json) JSON_OUT=${2:?--json needs a file}; shift ;;
    --json=*) JSON_OUT=${1#*=} ;;
    --duration) DURATION=${2:?}; shift ;;
    --duration=*) DURATION=${1#*=} ;;
    --rate) RATE=${2:?}; shift ;;
    --rate=*) RATE=${1#*=} ;;
    --idle) IDLE_COUNTS=${2:?}; shift ;;
    --idle=*) IDLE_COUNTS=${1#*=} ;;
    --setups) SETUPS=${2:?}; shift ;;
    --setups=*) SETUPS=${1#*=} ;;
    --no-routing) ROUTING=0 ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=${2:?}; shift ;;
    --keep=*) KEEP=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
if [[ -z $DURATION ]]; then
  if ((QUICK)); then DURATION=2; else DURATION=8; fi
fi
if ! [[ $DURATION =~ ^[0-9]+$ ]] || ((DURATION < 1 || DURATION > 600)); then
  die "--duration: 1..600 seconds"
fi
if ! [[ $RATE =~ ^[0-9]+$ ]] || ((RATE < 100)); then
  die "--rate: a number of messages per second >= 100"
fi
IFS=, read -r -a IDLE_LIST <<<"$IDLE_COUNTS"
for n in "${IDLE_LIST[@]}"; do
  # each idle connection costs the proxy 2 fds; the per-process limit here is 20 000
  if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 9000)); then
    die "--idle: counts between 1 and 9000"
  fi
done
IFS=, read -r -a SETUP_LIST <<<"$SETUPS"
for s in "${SETUP_LIST[@]}"; do
  case $s in direct | veer | veer-quiet | veer-busypoll | haproxy | nginx) ;; *) die "--setups: unknown setup $s" ;; esac
done
if [[ -n $JSON_OUT && $JSON_OUT != /* ]]; then JSON_OUT=$PWD/$JSON_OUT; fi
if [[ -n $KEEP && $KEEP != /* ]]; then KEEP=$PWD/$KEEP; fi

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, iptables): sudo bash $0"
START_TIME=$(date +%s)

# ---------------------------------------------------------------------------------------------
# Tools. `apt-cache policy` first: a package with no candidate is reported, not fatal.
step "Dependencies"
bash scripts/install-deps.sh

declare -A PACKAGE_OF=(
  [iperf3]=iperf3 [sockperf]=sockperf [haproxy]=haproxy [nginx]=nginx [wrk]=wrk [python3]=python3
)
NGINX_MODULES=/usr/lib/nginx/modules
have() { command -v "$1" >/dev/null 2>&1; }
have_stream_module() { [[ -f $NGINX_MODULES/ngx_stream_module.so ]]; }

POLICY_RC_CREATED=""
install_packages() {
  local wanted=() pkg
  for tool in "${!PACKAGE_OF[@]}"; do
    have "$tool" || wanted+=("${PACKAGE_OF[$tool]}")
  done
  have_stream_module || wanted+=(libnginx-mod-stream)
  ((${#wanted[@]})) || return 0
  if ((!INSTALL)); then
    note "  not installing (--no-install): ${wanted[*]}"
    return 0
  fi
  if ! have apt-get; then
    note "  apt-get not available; missing: ${wanted[*]}"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || note "  apt-get update failed; trying the cached lists"
  local installable=()
  for pkg in $(printf '%s\n' "${wanted[@]}" | sort -u); do
    if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [^(]'; then
      installable+=("$pkg")
    else
      note "  $pkg: no installation candidate in apt; its figures will be skipped"
    fi
  done
  ((${#installable[@]})) || return 0
  note "  apt-get install ${installable[*]}"
  # Installing haproxy or nginx would start their system services (on port 80 …) on the host;
  # a policy-rc.d that says "no" keeps the host as it was. Removed right after.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# temporary, from veer scripts/bench.sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=/usr/sbin/policy-rc.d
  fi
  apt-get install -y -qq --no-install-recommends "${installable[@]}" >/dev/null 2>&1 ||
    note "  apt-get install failed for some of: ${installable[*]}"
  if [[ -n $POLICY_RC_CREATED ]]; then
    rm -f "$POLICY_RC_CREATED"
    POLICY_RC_CREATED=""
  fi
}
install_packages
have python3 || die "python3 is needed for the report (apt-get install python3)"
UNAVAILABLE=()
for tool in iperf3 sockperf wrk haproxy nginx; do
  have "$tool" || UNAVAILABLE+=("$tool")
done
if have nginx && ! have_stream_module; then UNAVAILABLE+=("nginx-stream-module"); fi
((${#UNAVAILABLE[@]} == 0)) || note "  unavailable: ${UNAVAILABLE[*]} (their figures are skipped)"
for tool in iperf3 sockperf wrk haproxy nginx; do
  have "$tool" && note "  $tool: $(dpkg-query -W -f '${Version}' "${PACKAGE_OF[$tool]}" 2>/dev/null || echo '?')"
done

if ((BUILD)); then
  step "Building veer (release)"
  cargo build --release --workspace --bins --quiet
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
VEER=$TARGET_DIR/release/veer
VEER_INIT=$TARGET_DIR/release/veer-init
[[ -x $VEER && -x $VEER_INIT ]] || die "build did not produce $VEER and $VEER_INIT"
if ((ROUTING && BUILD)); then
  # Built now, so no compiler competes with the network figures for the 2 cores.
  cargo bench --bench routing --no-run --quiet 2>/dev/null || cargo bench --bench routing --no-run
fi

# ---------------------------------------------------------------------------------------------
# Unique names and addresses; scratch space; teardown.
ID="veer-bench-$$"
NODE="$ID-node"
NET="10.249.$(($$ % 256))"
GATEWAY="$NET.1"
SERVER_IP="$NET.10"
CLUSTER_IP="10.96.0.100"
PORT=9000
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
chmod 755 "$WORK"
RAW=$WORK/raw
PROXY_DIR=$WORK/proxy # writable by the proxy's uid (nginx's pid file and error log)
mkdir -p "$RAW" "$WORK/www" "$WORK/nginx-tmp" "$PROXY_DIR"
head -c 512 /dev/zero | tr '\0' x >"$WORK/www/small"
chmod -R a+rX "$WORK"
chown 1337:1337 "$PROXY_DIR"
NAMESPACES=()
SERVER_PID=""
PROXY_PID=""
HOLD_PIDS=()
CLK_TCK=$(getconf CLK_TCK)

cleanup() {
  local rc=$?
  set +e
  [[ -n $POLICY_RC_CREATED ]] && rm -f "$POLICY_RC_CREATED"
  remove_pods "${HOLD_PIDS[@]}" "$SERVER_PID" "$PROXY_PID"
  if ((rc != 0)); then
    echo "bench failed (exit $rc); last lines of the logs:" >&2
    for f in "$WORK"/*.log "$WORK"/*.err "$PROXY_DIR"/*.err; do
      [[ -s $f ]] || continue
      echo "----- $f" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP" && cp -r "$RAW"/. "$KEEP"/ && cp "$WORK"/*.log "$WORK"/*.err "$PROXY_DIR"/*.err "$KEEP"/ 2>/dev/null
    echo "bench: raw outputs kept in $KEEP" >&2
  fi
  rm -rf "$WORK"
  echo "bench: cleaned up $ID" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Pods
step "Creating the node (bridge) and the server pod ($ID-*)"
make_node

pod() { # pod NAME: add_pod; short-connection runs reuse client ports quickly (TIME_WAIT)
  add_pod "$1"
  tune_for_short_connections "$POD_NS"
}
del_pod() {
  local ns=$1 pid keep=()
  for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$ns"
  for pid in "${NAMESPACES[@]}"; do [[ $pid == "$ns" ]] || keep+=("$pid"); done
  NAMESPACES=("${keep[@]}")
}
pod server
SERVER_NS=$POD_NS
[[ $POD_IP == "$SERVER_IP" ]] || die "server pod got $POD_IP"

in_pod() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

can_connect() { # can_connect NS IP PORT
  # shellcheck disable=SC2016 # expanded by the inner bash
  in_pod "$1" timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$2" "$3" 2>/dev/null
}

fill_template() { # fill_template IN OUT
  sed -e "s|@WORK@|$WORK|g" -e "s|@SERVER_IP@|$SERVER_IP|g" -e "s|@PORT@|$PORT|g" \
    -e "s|@CLUSTER_IP@|$CLUSTER_IP|g" -e "s|@NGINX_MODULES@|$NGINX_MODULES|g" \
    -e "s|@PROXY_DIR@|$PROXY_DIR|g" "$1" >"$2"
  chmod a+r "$2"
}

# ---------------------------------------------------------------------------------------------
# The server pod runs one server at a time on $PORT, so a proxy with a static upstream serves
# every figure with one config.
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
  # nginx workers, if the master went first
  for pid in $(ip netns pids "$SERVER_NS"); do kill -KILL "$pid" 2>/dev/null || true; done

  for _ in $(seq 1 50); do
    [[ -z $(ip netns exec "$SERVER_NS" ss -Hltn "( sport = :$PORT )") ]] && return 0
    sleep 0.1
  done
}
start_server() { # start_server iperf3|sockperf|http|echo
  stop_server
  local log=$WORK/server-$1.log
  case $1 in
    iperf3) ip netns exec "$SERVER_NS" iperf3 -s -B "$SERVER_IP" -p "$PORT" >>"$log" 2>&1 & ;;
    sockperf) ip netns exec "$SERVER_NS" sockperf server --tcp --uc-reuseaddr -i "$SERVER_IP" -p "$PORT" >>"$log" 2>&1 & ;;
    http)
      fill_template bench/nginx-http.conf.in "$WORK/nginx-http.conf"
      ip netns exec "$SERVER_NS" nginx -p "$WORK" -c "$WORK/nginx-http.conf" -e "$WORK/nginx-http.err" >>"$log" 2>&1 &
      ;;
    echo) ip netns exec "$SERVER_NS" "$VEER" echo --bind "$SERVER_IP" "$PORT" idle >>"$log" 2>&1 & ;;
  esac
  SERVER_PID=$!

  for _ in $(seq 1 100); do
    [[ -n $(ip netns exec "$SERVER_NS" ss -Hltn "( sport = :$PORT )") ]] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$log" >&2
  die "server $1 is not listening on $SERVER_IP:$PORT"
}

# ---------------------------------------------------------------------------------------------
# The proxy under test, in the client pod, as uid 1337. Started with `ip netns exec` directly,
# not through a shell function (a subshell): ip and setpriv exec, so $! is the proxy's pid.
AS_PROXY=(setpriv --reuid 1337 --regid 1337 --clear-groups)
proxy_pids() { # the proxy's processes: itself plus its children (nginx workers)
  [[ -n $PROXY_PID ]] || return 0
  echo "$PROXY_PID"
  ps -o pid= --ppid "$PROXY_PID" 2>/dev/null | tr -d ' ' || true
}
proxy_cpu_ticks() { # utime+stime of the proxy's processes, in clock ticks
  local total=0 t
  for t in $(proxy_cpu_split); do total=$((total + t)); done
  echo "$total"
}
proxy_cpu_split() { # "utime stime" of the proxy's processes, in clock ticks
  local user=0 sys=0 pid stat rest
  local -a f
  for pid in $(proxy_pids); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    user=$((user + f[11]))
    sys=$((sys + f[12]))
  done
  echo "$user $sys"
}
proxy_status_kib() { # proxy_status_kib VmRSS|VmHWM: summed over the proxy's processes
  local total=0 pid v
  for pid in $(proxy_pids); do
    v=$(awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

start_proxy() { # start_proxy SETUP CLIENT_NS
  local setup=$1 ns=$2 log=$WORK/proxy-$1.log
  case $setup in
    veer | veer-quiet | veer-busypoll)
      mkdir -p "$WORK/veer-config"
      fill_template bench/veer-config.yaml.in "$WORK/veer-config/server.yaml"
      chmod -R a+rX "$WORK/veer-config"
      local rust_log=info extra=()
      [[ $setup == veer-quiet ]] && rust_log=warn
      [[ $setup == veer-busypoll ]] && extra=(--busy-poll 50us)
      RUST_LOG=$rust_log ip netns exec "$ns" "${AS_PROXY[@]}" "$VEER" proxy --config "$WORK/veer-config" \
        --admin 127.0.0.1:15000 --pod-labels app=bench-client "${extra[@]}" >>"$log" 2>&1 &
      ;;
    haproxy)
      fill_template bench/haproxy.cfg.in "$WORK/haproxy.cfg"
      ip netns exec "$ns" "${AS_PROXY[@]}" haproxy -db -f "$WORK/haproxy.cfg" >>"$log" 2>&1 &
      ;;
    nginx)
      fill_template bench/nginx-stream.conf.in "$WORK/nginx-stream.conf"
      ip netns exec "$ns" "${AS_PROXY[@]}" nginx -p "$PROXY_DIR" -c "$WORK/nginx-stream.conf" -e "$PROXY_DIR/nginx-stream.err" >>"$log" 2>&1 &
      ;;
  esac
  PROXY_PID=$!
  for _ in $(seq 1 200); do
    kill -0 "$PROXY_PID" 2>/dev/null || { tail -n 20 "$log" >&2; die "$setup exited at start"; }
    # 127.0.0.1 is not captured: this reaches the proxy's listener itself
    if can_connect "$ns" 127.0.0.1 15001; then
      if [[ $setup == veer* ]]; then
        # shellcheck disable=SC2016
        in_pod "$ns" timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/15000 &&
          printf "GET /ready HTTP/1.0\r\n\r\n" >&3 && head -n 1 <&3' 2>/dev/null | grep -q ' 200' || { sleep 0.05; continue; }
      fi
      # nginx: its workers must be up as well
      if [[ $setup == nginx ]] && (($(proxy_pids | wc -l) < 3)); then sleep 0.05; continue; fi
      return 0
    fi
    sleep 0.05
  done
  die "$setup not ready after 10s"
}
stop_proxy() {
  [[ -n $PROXY_PID ]] || return 0
  local pids
  pids=$(proxy_pids)
  kill -TERM "$PROXY_PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  wait "$PROXY_PID" 2>/dev/null || true
  PROXY_PID=""
}

record() { printf '%s %s\n' "$2" "$3" >>"$RAW/$1/proc.txt"; } # record SETUP KEY VALUE

established_at_server() { # established TCP connections to the server port, seen by the server
  ip netns exec "$SERVER_NS" ss -Htn state established "( sport = :$PORT )" | wc -l
}

# ---------------------------------------------------------------------------------------------
# One setup: a fresh client pod, capture + proxy (unless direct), every figure.
SOCKPERF_T=$((DURATION + 1)) # sockperf drops its first ~0.45 s as warm-up
run_setup() {
  local setup=$1 client_ns target c0 c1
  step "Setup: $setup"
  mkdir -p "$RAW/$setup"
  pod "client-$setup"
  client_ns=$POD_NS
  if [[ $setup == direct ]]; then
    target=$SERVER_IP
  else
    in_pod "$client_ns" "$VEER_INIT" -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' \
      -d 15090,15021,15020 >"$WORK/veer-init-$setup.log" 2>&1 ||
      { cat "$WORK/veer-init-$setup.log" >&2; die "veer-init failed"; }
    target=$CLUSTER_IP
    start_proxy "$setup" "$client_ns"
    record "$setup" clk_tck "$CLK_TCK"
    record "$setup" start_rss_kib "$(proxy_status_kib VmRSS)"
    note "  $setup running as uid 1337 (pid $PROXY_PID); clients dial $CLUSTER_IP:$PORT (captured)"
  fi
  [[ $setup == direct ]] && note "  no capture; clients dial the server pod $SERVER_IP:$PORT"

  if have iperf3; then
    start_server iperf3
    c0=$(proxy_cpu_ticks)
    note "  bulk: iperf3, 1 stream, ${DURATION}s"
    in_pod "$client_ns" timeout $((DURATION + 30)) iperf3 -c "$target" -p "$PORT" -t "$DURATION" -O 1 -J \
      >"$RAW/$setup/iperf3-1.json" 2>"$WORK/iperf3-$setup.log" || note "  iperf3 (1 stream) failed"
    note "  bulk: iperf3, 4 streams, ${DURATION}s"
    in_pod "$client_ns" timeout $((DURATION + 30)) iperf3 -c "$target" -p "$PORT" -t "$DURATION" -O 1 -P 4 -J \
      >"$RAW/$setup/iperf3-4.json" 2>>"$WORK/iperf3-$setup.log" || note "  iperf3 (4 streams) failed"
    c1=$(proxy_cpu_ticks)
    record "$setup" bulk_cpu_ticks $((c1 - c0))
  fi

  if have sockperf; then
    start_server sockperf
    note "  latency: sockperf ping-pong, 64 bytes, --full-rtt, ${SOCKPERF_T}s"
    in_pod "$client_ns" timeout $((SOCKPERF_T + 30)) sockperf ping-pong --tcp -i "$target" -p "$PORT" -m 64 \
      -t "$SOCKPERF_T" --full-rtt >"$RAW/$setup/pingpong.txt" 2>&1 || note "  sockperf ping-pong failed"
    note "  latency: sockperf ping-pong at $RATE msg/s, 64 bytes, --full-rtt, ${SOCKPERF_T}s"
    c0=$(proxy_cpu_ticks)
    local t0
    t0=$(date +%s%N)
    in_pod "$client_ns" timeout $((SOCKPERF_T + 30)) sockperf ping-pong --tcp -i "$target" -p "$PORT" -m 64 \
      -t "$SOCKPERF_T" --full-rtt --mps "$RATE" --full-log "$RAW/$setup/rate.csv" \
      >"$RAW/$setup/rate.txt" 2>&1 || note "  sockperf at a fixed rate failed"
    c1=$(proxy_cpu_ticks)
    if [[ $setup != direct ]]; then
      record "$setup" rate_cpu_ticks $((c1 - c0))
      record "$setup" rate_cpu_ms $((($(date +%s%N) - t0) / 1000000))
    fi
  fi

  if have wrk && have nginx; then
    start_server http
    read -r u0 k0 <<<"$(proxy_cpu_split)"
    note "  new connections: wrk -t2 -c16, Connection: close, ${DURATION}s"
    in_pod "$client_ns" timeout $((DURATION + 30)) wrk -t2 -c16 -d "${DURATION}s" -H 'Connection: close' \
      "http://$target:$PORT/small" >"$RAW/$setup/wrk.txt" 2>&1 || note "  wrk failed"
    read -r u1 k1 <<<"$(proxy_cpu_split)"
    record "$setup" conn_cpu_ticks $((u1 + k1 - u0 - k0))
    # The kernel's part: TCP and netfilter work any proxy pays (accept, connect, handshakes,
    # conntrack), plus the syscalls and wake-ups of its own design. It bounds the rate.
    record "$setup" conn_sys_ticks $((k1 - k0))
  fi

  if [[ $setup != direct ]]; then
    record "$setup" peak_rss_kib "$(proxy_status_kib VmHWM)"
    # Idle connections: a fresh proxy, so what earlier load left in its allocator does not
    # hide the per-connection cost.
    stop_proxy
    start_server echo
    start_proxy "$setup" "$client_ns"
    sleep 0.5
    local base n held=0 k ready
    base=$(proxy_status_kib VmRSS)
    record "$setup" idle_base_rss_kib "$base"
    for n in "${IDLE_LIST[@]}"; do
      ((n > held)) || continue
      k=${#HOLD_PIDS[@]}
      ready=$WORK/hold-$setup-$k.ready
      note "  idle connections: $n held open through $setup"
      ip netns exec "$client_ns" python3 bench/hold_conns.py "$target" "$PORT" $((n - held)) "$ready" \
        >>"$WORK/hold.log" 2>&1 &
      HOLD_PIDS+=($!)
      for _ in $(seq 1 600); do
        [[ -s $ready ]] && (($(established_at_server) >= n)) && break
        kill -0 "${HOLD_PIDS[-1]}" 2>/dev/null || break
        sleep 0.1
      done
      if [[ ! -s $ready ]] || (($(established_at_server) < n)); then
        note "  could not hold $n connections through $setup (see hold.log); stopping here"
        break
      fi
      held=$n
      sleep 1 # let the proxy settle (lazy allocations, deferred frees)
      record "$setup" "idle_rss_kib_$n" "$(proxy_status_kib VmRSS)"
      record "$setup" "idle_established_$n" "$(established_at_server)"
    done
    record "$setup" idle_peak_rss_kib "$(proxy_status_kib VmHWM)"
    for pid in "${HOLD_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    HOLD_PIDS=()
    stop_proxy
  fi
  stop_server
  del_pod "$client_ns"
}

for setup in "${SETUP_LIST[@]}"; do
  case $setup in
    haproxy) have haproxy || { note "haproxy unavailable: setup skipped"; continue; } ;;
    nginx)
      if ! have nginx || ! have_stream_module; then
        note "nginx stream unavailable: setup skipped"
        continue
      fi
      ;;
  esac
  run_setup "$setup"
done

# ---------------------------------------------------------------------------------------------
ROUTING_LOG=""
if ((ROUTING)); then
  step "Routing core: cargo bench --bench routing"
  # VEER_BENCH_QUICK shortens criterion's warm-up and measurement, and the time a compile of
  # 10 000 services may take before the bench gives up on that size (benches/routing.rs).
  ROUTING_LOG=$WORK/routing.log
  if ! VEER_BENCH_QUICK=$QUICK cargo bench --bench routing -- --noplot >"$ROUTING_LOG" 2>&1; then
    tail -n 30 "$ROUTING_LOG" >&2
    note "routing bench failed: the figures it did not print are skipped"
  fi
  grep -E '^(route|route_hot|miss|compile|reload_yaml|reload_edit)/[0-9]+ +time:|^routing-bench' "$ROUTING_LOG" | sed 's/^/  /' >&2 || true
fi

step "Results"
report_args=(--raw "$RAW" --setups "$SETUPS" --duration "$DURATION" --rate "$RATE"
  --idle "$IDLE_COUNTS" --quick "$QUICK" --elapsed $(($(date +%s) - START_TIME)))
[[ -n $ROUTING_LOG ]] && report_args+=(--criterion "$TARGET_DIR/criterion" --routing-log "$ROUTING_LOG" --since "$START_TIME")
[[ -n $JSON_OUT ]] && report_args+=(--json "$JSON_OUT")
((${#UNAVAILABLE[@]} == 0)) || report_args+=(--unavailable "${UNAVAILABLE[*]}")
python3 bench/report.py "${report_args[@]}"
