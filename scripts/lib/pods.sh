# shellcheck shell=bash
# Network-namespace "pods" for the demo, the benchmark and the soak (the Rust tests have the
# same topology in tests/common/mod.rs). Sourced; uses and sets these globals:
#   ID          unique prefix for namespace names (e.g. veer-demo-$$)
#   NODE        the node namespace holding the bridge
#   NET         the /24 prefix, e.g. 10.250.7   GATEWAY  the bridge's address ($NET.1)
#   NAMESPACES  every namespace created, for the caller's cleanup trap
#   HOST        next pod's host number (starts at 10)
#   POD_NS, POD_IP  set by add_pod for the pod just made
#
# The node namespace has no route out ("unreachable default"): a packet that capture fails to
# catch dies inside our namespaces instead of reaching a real network.

make_node() {
  ip netns add "$NODE"
  NAMESPACES+=("$NODE")
  ip -n "$NODE" link set lo up
  ip -n "$NODE" link add br0 type bridge
  ip -n "$NODE" addr add "$GATEWAY/24" dev br0
  ip -n "$NODE" link set br0 up
  ip -n "$NODE" route add unreachable default
  ip netns exec "$NODE" sysctl -q -w net.ipv4.ip_forward=1
  HOST=10
}

# add_pod NAME: a namespace with eth0 on the node's bridge and a default route via it.
add_pod() {
  POD_NS="$ID-$1"
  POD_IP="$NET.$HOST"
  ip netns add "$POD_NS"
  NAMESPACES=("$POD_NS" "${NAMESPACES[@]}")
  ip -n "$POD_NS" link set lo up
  ip link add eth0 netns "$POD_NS" type veth peer name "v$HOST" netns "$NODE"
  ip -n "$NODE" link set "v$HOST" master br0 up
  ip -n "$POD_NS" addr add "$POD_IP/24" dev eth0
  ip -n "$POD_NS" link set eth0 up
  ip -n "$POD_NS" route add default via "$GATEWAY"
  HOST=$((HOST + 1))
}

# Many short connections: a wide port range and TIME_WAIT ports reused for new connects.
tune_for_short_connections() {
  ip netns exec "$1" sysctl -q -w net.ipv4.ip_local_port_range="1024 65000" \
    net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=4096
}

# remove_pods [PID...]: for the caller's cleanup trap. Kills PID... (empty ones are skipped,
# so unset PID variables can be passed) and whatever else still runs in the namespaces,
# waits for them, then deletes every namespace made. Quiet: bash reports each killed
# background job on stderr, which is not interesting here.
remove_pods() {
  local pid ns
  exec 3>&2 2>/dev/null
  for pid in "$@"; do
    [[ -z $pid ]] || kill -KILL "$pid"
  done
  for ns in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$ns"); do
      kill -KILL "$pid"
    done
  done
  wait
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns"
  done
  jobs >/dev/null # flush pending job notifications while stderr still goes nowhere
  exec 2>&3 3>&-
}
