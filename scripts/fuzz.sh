#!/usr/bin/env bash
# Fuzzes the rootless NAT's protocol core (fuzz/fuzz_targets/frames.rs) for FUZZ_SECONDS
# (default 120). cargo-fuzz passes rustc flags that only nightly takes; RUSTC_BOOTSTRAP=1 lets
# the stable toolchain take them. Exits non-zero if a crash was found: the input is saved in
# fuzz/artifacts/frames/, and `RNAT_FUZZ_TRACE=1 scripts/fuzz.sh <file>` replays it event by event.
# Extra arguments go to libFuzzer (e.g. -jobs=2, -seed=1); a file or folder runs just those inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
target=${FUZZ_TARGET:-frames}
seconds=${FUZZ_SECONDS:-120}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

# --no-cfg-fuzzing: smoltcp skips checksum checks under cfg(fuzzing); the harness makes its own
# checksums right, so the core is fuzzed as it runs. No sanitizer: the core is safe Rust, and
# overflow checks (on by default in cargo fuzz builds) find what ASan would not; twice the speed.
build_flags="--no-cfg-fuzzing --sanitizer none"
if [ $# -gt 0 ] && [ -e "$1" ]; then
    # Replay (no fuzzing): the given inputs, once each.
    inputs=()
    for f in "$@"; do inputs+=("$(realpath "$f")"); done
    cd fuzz
    exec cargo fuzz run $build_flags "$target" "${inputs[@]}"
fi
cd fuzz
# New inputs go to corpus/ (not in git); seeds/ holds a few handwritten ones (a TCP handshake
# with data both ways, duplicate ACKs, UDP, ICMP, tight limits, a failing host, IPv6 discovery,
# echo, TCP and UDP).
mkdir -p "corpus/$target" "artifacts/$target"
status=0
cargo fuzz run $build_flags "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=20 -print_final_stats=1 "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "fuzz.sh: the fuzzer found a crash (exit $status); see fuzz/artifacts/$target/" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${seconds}s"
