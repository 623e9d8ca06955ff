#!/usr/bin/env bash
# Installs what the Podman real-client test (netns-tests/podman.rs) needs on Debian 12:
# rootful Podman 4.3 with its CNI backend, crun, and a busybox-static root filesystem for the
# container (no registry is needed). Idempotent: packages already present are left alone.
# Run as root; called from scripts/setup.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

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

install_missing podman-deps "${PACKAGES[@]}"
echo "podman-deps: $(podman --version), $(crun --version | head -n1)"
