#!/usr/bin/env bash
# Runs every test: unit tests, then the kernel tests in throwaway network namespaces.
# Needs root (the kernel tests create namespaces). Set-up is done first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the netns tests create namespaces)" >&2; exit 1; }
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== unit tests"
cargo test --locked --lib --bins
echo "== kernel tests (netns-tests/)"
RNAT_NETNS_REQUIRE_ROOT=1 cargo test --locked --test netns -- --test-threads=2
echo "== fuzzing the rootless core for ${FUZZ_SECONDS:=60}s (scripts/fuzz.sh; longer runs: FUZZ_SECONDS=600)"
FUZZ_SECONDS=$FUZZ_SECONDS bash scripts/fuzz.sh
