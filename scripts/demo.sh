#!/usr/bin/env bash
# veer demo: Istio's "TCP Traffic Shifting" task, with network-namespace pods instead of a
# Kubernetes cluster. Run as root on a Debian machine with Rust installed:
#
#   sudo bash scripts/demo.sh
#
# What it builds (all inside network namespaces it creates; nothing touches the host's network):
#
#   node ns ── br0 (10.250.N.1/24, no route out)
#     ├── sleep        client pod: veer-init (iptables capture) + veer proxy as uid 1337
#     ├── tcp-echo-v1  veer echo 9000,9001 one
#     └── tcp-echo-v2  veer echo 9000,9001 two
#
# The config is manifests/samples/tcp-echo/ as written, plus a generated file that plays the
# API server's part: the Service's ClusterIP and the Pods' IPs. The ClusterIP exists nowhere;
# only the sidecar's capture makes it reachable.
#
# Names are unique per run (veer-demo-<pid>-…), so the demo can run beside the test suite.
# Everything is torn down on exit, including on Ctrl-C or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/pods.sh
source scripts/lib/pods.sh
REPO=$PWD

if [[ -t 1 ]]; then
  bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
else
  bold() { printf '\n%s\n' "$*"; }
fi
die() { echo "demo: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, iptables): sudo bash $0"

bold "Installing dependencies and building veer (release)"
bash scripts/install-deps.sh
cargo build --release --workspace --bins --quiet
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
VEER=$TARGET_DIR/release/veer
VEER_INIT=$TARGET_DIR/release/veer-init
[[ -x $VEER && -x $VEER_INIT ]] || die "build did not produce $VEER and $VEER_INIT"

# ---------------------------------------------------------------------------------------------
# Unique names and addresses. The /24 only needs to be unique for readability: the demo's
# namespaces are linked to nothing else.
ID="veer-demo-$$"
NODE="$ID-node"
NET="10.250.$(($$ % 256))"
GATEWAY="$NET.1"
CLUSTER_IP="10.96.0.100"
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
chmod 755 "$WORK"
CONFIG="$WORK/config"
NAMESPACES=()
PIDS=()
PROXY_PID=""

cleanup() {
  local rc=$?
  set +e
  remove_pods "${PIDS[@]}" "$PROXY_PID"
  if ((rc != 0)) && [[ -d $WORK ]]; then
    echo "demo failed (exit $rc); logs:" >&2
    for f in "$WORK"/*.log; do
      [[ -s $f ]] || continue
      echo "----- $f" >&2
      tail -n 20 "$f" >&2
    done
  fi
  rm -rf "$WORK"
  echo "demo: cleaned up $ID" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
bold "Creating the node (bridge) and three pods in network namespaces ($ID-*)"
make_node

pod() { # pod NAME: add_pod, then print what was made
  add_pod "$1"
  printf '  %-12s %-15s netns %s\n' "$1" "$POD_IP" "$POD_NS"
}
pod sleep;       CLIENT_NS=$POD_NS
pod tcp-echo-v1; V1_NS=$POD_NS; V1_IP=$POD_IP
pod tcp-echo-v2; V2_NS=$POD_NS; V2_IP=$POD_IP

in_pod() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---------------------------------------------------------------------------------------------
bold "Starting the tcp-echo servers (the Deployments' containers)"
# Started with `ip netns exec` directly (not through a shell function, which would run in a
# subshell): ip and setpriv exec the program, so $! is the server's own pid.
ip netns exec "$V1_NS" "$VEER" echo 9000,9001 one >"$WORK/tcp-echo-v1.log" 2>&1 &
PIDS+=($!)
ip netns exec "$V2_NS" "$VEER" echo 9000,9001 two >"$WORK/tcp-echo-v2.log" 2>&1 &
PIDS+=($!)
wait_listening() { # wait_listening NS IP PORT: until a TCP connect from NS succeeds
  local i
  for i in $(seq 1 100); do
    # shellcheck disable=SC2016 # expanded by the inner bash
    if in_pod "$1" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$2" "$3" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "nothing listening on $2:$3 after 10s"
}
for port in 9000 9001; do
  wait_listening "$V1_NS" "$V1_IP" "$port"
  wait_listening "$V2_NS" "$V2_IP" "$port"
done
echo "  tcp-echo-v1 ($V1_IP) and tcp-echo-v2 ($V2_IP) listening on 9000 and 9001"

# ---------------------------------------------------------------------------------------------
bold "Writing the config: samples as written + generated endpoints"
mkdir -p "$CONFIG"
SAMPLES=$REPO/manifests/samples/tcp-echo
cp "$SAMPLES/tcp-echo-services.yaml" "$SAMPLES/destination-rule-all.yaml" "$CONFIG/"
cp "$SAMPLES/tcp-echo-all-v1.yaml" "$CONFIG/tcp-echo-vs.yaml"
# What the API server would know. Files load in name order, so this one comes first: its
# Service, with the ClusterIP Kubernetes would have allocated, is the first definition of
# tcp-echo, which veer uses (it warns about the sample's second, address-less definition).
cat >"$CONFIG/00-generated-endpoints.yaml" <<YAML
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
  labels: {app: tcp-echo, service: tcp-echo}
spec:
  clusterIP: $CLUSTER_IP
  ports:
  - {name: tcp, port: 9000}
  - {name: tcp-other, port: 9001}
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
YAML
chmod -R a+rX "$CONFIG"
for f in "$CONFIG"/*.yaml; do echo "  $f"; done
echo "  tcp-echo ClusterIP: $CLUSTER_IP (ports 9000 tcp, 9001 tcp-other)"

# ---------------------------------------------------------------------------------------------
admin_request() { # admin_request METHOD PATH -> raw HTTP response from the client pod's admin port
  # shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
  in_pod "$CLIENT_NS" bash -c '
    exec 3<>/dev/tcp/127.0.0.1/15000 || exit 1
    printf "%s %s HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n" "$1" "$2" >&3
    timeout 5 cat <&3' admin_request "$1" "$2"
}
admin_get() { admin_request GET "$1"; }
http_body() { sed '1,/^\r\{0,1\}$/d'; } # strip the status line and headers

start_proxy() {
  ip netns exec "$CLIENT_NS" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$VEER" proxy --config "$CONFIG" --admin 127.0.0.1:15000 --pod-labels app=sleep \
    >>"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  local i
  for i in $(seq 1 100); do
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
      tail -n 20 "$WORK/proxy.log" >&2
      die "veer proxy exited"
    fi
    if admin_get /ready 2>/dev/null | head -n 1 | grep -q ' 200'; then
      echo "  veer proxy ready (pid $PROXY_PID, uid 1337, admin 127.0.0.1:15000 in the pod)"
      return 0
    fi
    sleep 0.1
  done
  die "veer proxy not ready after 10s"
}

echo_once() { # one connection to tcp-echo:9000 from the client pod, like (date; sleep 1) | nc
  in_pod "$CLIENT_NS" "$VEER" client "$CLUSTER_IP:9000" --message "$(date)" --timeout-ms 5000
}

# ---------------------------------------------------------------------------------------------
bold "Sidecar: veer-init (istio-iptables flags) and veer proxy as uid 1337 in the sleep pod"
in_pod "$CLIENT_NS" "$VEER_INIT" -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' \
  -d 15090,15021,15020 >"$WORK/veer-init.log" 2>&1 || { cat "$WORK/veer-init.log" >&2; die "veer-init failed"; }
echo "  nat rules installed:"
in_pod "$CLIENT_NS" iptables-save -t nat | grep -E '^-A' | sed 's/^/    /'
start_proxy

bold "kubectl apply -f tcp-echo-all-v1.yaml  →  10 connections to tcp-echo:9000"
for _ in $(seq 1 10); do echo_once; done

# ---------------------------------------------------------------------------------------------
# Like `kubectl apply`: the VirtualService file is replaced (atomically: a dot-file, which the
# loader skips, renamed over it). veer watches its config files and reloads on change; the
# explicit POST /reload makes the switch synchronous for the demo (if the watcher got there
# first it answers "unchanged").
bold "kubectl apply -f tcp-echo-20-v2.yaml  →  veer reloads the VirtualService (no restart)"
cp "$SAMPLES/tcp-echo-20-v2.yaml" "$CONFIG/.tcp-echo-vs.yaml.tmp"
chmod a+r "$CONFIG/.tcp-echo-vs.yaml.tmp"
mv "$CONFIG/.tcp-echo-vs.yaml.tmp" "$CONFIG/tcp-echo-vs.yaml"
reload=$(admin_request POST /reload)
printf '%s\n' "$reload" | head -n 1 | grep -q ' 200' || die "reload failed: $reload"
printf '%s\n' "$reload" | http_body | sed 's/^/  POST \/reload: /'

bold "10 connections to tcp-echo:9000"
for _ in $(seq 1 10); do echo_once; done

bold "100 more connections, counted"
one=0 two=0 seq_line=""
for i in $(seq 1 100); do
  reply=$(in_pod "$CLIENT_NS" "$VEER" client "$CLUSTER_IP:9000" --message "conn $i" --timeout-ms 5000)
  case $reply in
    one*) one=$((one + 1)); seq_line+="1" ;;
    two*) two=$((two + 1)); seq_line+="2" ;;
    *) die "unexpected reply on connection $i: $reply" ;;
  esac
  if ((i % 10 == 0 && i < 100)); then seq_line+=" "; fi
done
echo "  sequence (1 = v1, 2 = v2, groups of 10): $seq_line"
echo "  v1 (one): $one   v2 (two): $two"

# ---------------------------------------------------------------------------------------------
bold "What the proxy reports: GET /routes (configured weight vs. connections each destination got)"
admin_get /routes | http_body > "$WORK/routes.json"
python3 - "$WORK/routes.json" <<'PY' || cat "$WORK/routes.json"
import json, sys
listeners = json.load(open(sys.argv[1]))["listeners"]
for addr, l in sorted(listeners.items()):
    print("  %s  (%s)" % (addr, l["host"]))
    for r in l["rules"]:
        print("    rule %s/%s[%d]" % (r["virtual_service"], r["kind"], r["index"]))
        for d in r["destinations"]:
            print("      weight %3d  connections %3d  %s" % (d["weight"], d["connections"], d["cluster"]))
    if not l["rules"]:
        print("    no rule: the whole service, %d connections" % l["unmatched_connections"])
PY

bold "Why: GET /explain?dst=$CLUSTER_IP:9000&format=text"
admin_get "/explain?dst=$CLUSTER_IP:9000&format=text" | http_body

bold "GET /config_dump (summary; the full JSON lists every resource with its file, and every compiled cluster)"
admin_get /config_dump | http_body > "$WORK/config_dump.json"
python3 - "$WORK/config_dump.json" <<'PY' || cat "$WORK/config_dump.json"
import json, sys
d = json.load(open(sys.argv[1]))
kinds = {}
for r in d["resources"]:
    k = r["resource"]["kind"]
    kinds[k] = kinds.get(k, 0) + 1
print("  config version %d; this pod: namespace %s, labels %s" % (d["version"], d["identity"]["namespace"], d["identity"]["labels"]))
print("  resources: " + ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items())))
print("  clusters: %d; warnings: %s; last reload error: %s" % (len(d["clusters"]), d["warnings"] or "none", d["last_reload_error"]))
PY

bold "Done: v1 $one / v2 $two of 100 connections. Tearing down."
