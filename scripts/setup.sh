#!/usr/bin/env bash
# Installs what rnat needs to build, test and benchmark on Debian 12, then builds it.
# Idempotent: packages already present are left alone. Run as root.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

PACKAGES=(
  # build: libnftnl through nftnl-sys, found with pkg-config
  build-essential pkg-config libnftnl-dev libmnl-dev
  # run and test: nft reads the ruleset back, ip builds test topologies, socat and busybox are the
  # test servers and clients, setpriv drops privileges for the privilege test
  nftables iproute2 socat busybox-static util-linux procps
  # rootless tests: python3 drives 2,000 concurrent connections
  python3
  # benchmarks: the peers rnat is measured against, and the load tools
  containernetworking-plugins netavark slirp4netns passt iperf3 wrk jq nginx-light
)

install_missing setup "${PACKAGES[@]}"

# The real-client test drives Podman 4.3 with rnat as its CNI plugin.
bash "$(dirname "$0")/podman-deps.sh"

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: no Rust toolchain; installing rustup (needs network access to rustup.rs)"
    apt-get install -y -qq curl ca-certificates >/dev/null
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

cargo build --release --locked --quiet
echo "setup: built $(pwd)/target/release/rnat"
