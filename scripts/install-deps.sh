#!/usr/bin/env bash
# Installs what veer's end-to-end tests and demo need on a Debian/Ubuntu machine, as root:
#   ip (iproute2), iptables + iptables-save (iptables), setpriv (util-linux), kill/sysctl (procps).
# Rust (cargo) is assumed to be installed already, unless --with-rust is given.
# Idempotent and quiet: when every tool is present, apt is not touched at all.
#
#   bash scripts/install-deps.sh              # what scripts/test.sh (so CI) and demo.sh run
#   bash scripts/install-deps.sh --with-rust  # also a C linker and Rust (rustup, stable, with
#                                             # rustfmt and clippy) when cargo is missing: the
#                                             # Vagrant VM's provisioning (vagrant/Vagrantfile)
set -euo pipefail

with_rust=false
for arg in "$@"; do
  case $arg in
    --with-rust) with_rust=true ;;
    *) echo "install-deps: unknown argument $arg (usage: $0 [--with-rust])" >&2; exit 2 ;;
  esac
done

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

# rustup's default install location, for a cargo installed by an earlier --with-rust run.
if [[ -d $HOME/.cargo/bin ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

if $with_rust; then
  package_of[cc]=build-essential # the linker rustc calls
  if ! have cargo; then
    package_of[curl]=curl
    package_of[update-ca-certificates]=ca-certificates
  fi
fi

install_rust() {
  $with_rust || return 0
  if have cargo; then
    return 0
  fi
  echo "install-deps: installing Rust (rustup, stable, with rustfmt and clippy)" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --quiet --profile minimal --component rustfmt,clippy >/dev/null
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
  have cargo || { echo "install-deps: cargo still missing after rustup" >&2; exit 1; }
}

missing=()
for tool in "${!package_of[@]}"; do
  if ! have "$tool"; then
    missing+=("${package_of[$tool]}")
  fi
done

if ((${#missing[@]} == 0)); then
  install_rust
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

install_rust
