#!/usr/bin/env bash
# Installs what the Podman real-client test (netns-tests/podman.rs) needs on Debian 12:
# rootful Podman 4.3 with its CNI backend, crun, and a busybox-static root filesystem for the
# container (no registry is needed). Idempotent: packages already present are left alone.
# Run as root; called from scripts/setup.sh.
set -euo pipefail

PACKAGES=(
  # the client under test and its OCI runtime (the test configures runtime = "crun")
  podman crun conmon
  # podman's dependencies for user namespaces (pulled in anyway; listed for rootless use)
  uidmap
  # podman's CNI backend looks up plugins here; rnat is installed next to them in a private dir
  containernetworking-plugins
  # the container's root filesystem (busybox --install -s), httpd server and nc client
  busybox-static
  # nsenter/unshare (private mount namespace per test), nft/ip for read-back, socat clients
  util-linux nftables iproute2 socat
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "podman-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "podman-deps: $(podman --version), $(crun --version | head -n1)"
