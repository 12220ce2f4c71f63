#!/usr/bin/env bash
# Installs what veer's end-to-end tests and demo need on a Debian/Ubuntu machine, as root:
#   ip (iproute2), iptables + iptables-save (iptables), setpriv (util-linux), kill/sysctl (procps).
# Rust (cargo) is assumed to be installed already.
# Idempotent and quiet: when every tool is present, apt is not touched at all.
set -euo pipefail

declare -A package_of=(
  [ip]=iproute2
  [iptables]=iptables
  [iptables-save]=iptables
  [setpriv]=util-linux
  [kill]=procps
  [sysctl]=procps
)

have() {
  command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/sbin/$1" ]]
}

missing=()
for tool in "${!package_of[@]}"; do
  if ! have "$tool"; then
    missing+=("${package_of[$tool]}")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

# De-duplicate package names.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing packages: ${packages[*]}; run as root (sudo bash $0)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing packages: ${packages[*]}, and apt-get is not available" >&2
  exit 1
fi

echo "install-deps: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

for tool in "${!package_of[@]}"; do
  if ! have "$tool"; then
    echo "install-deps: $tool still missing after installing ${packages[*]}" >&2
    exit 1
  fi
done
