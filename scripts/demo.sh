#!/usr/bin/env bash
# A guided demo of rootful rnat, run entirely inside throwaway network namespaces (the machine's own
# network is never touched):
#   "host"     where rnat runs, as it would on a server (its address 203.0.113.1)
#   "client"   another machine on the host's network (203.0.113.2)
#   "upstream" the internet (198.51.100.2), reached through the host's masquerade
# A web server runs in an rnat container with `-p 8080:80`; the client fetches the page.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root" >&2; exit 1; }
bash scripts/setup.sh
RNAT=$(pwd)/target/release/rnat

tag="rnatdemo$$"
H=${tag}h C=${tag}c U=${tag}u
work=$(mktemp -d "/tmp/${tag}.XXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for ns in "$H" "$C" "$U"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

step "Building a host, a client and an upstream server, each in its own network namespace"
for ns in "$H" "$C" "$U"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add "${tag}a" type veth peer name "${tag}b"
ip link set "${tag}a" netns "$H"; ip link set "${tag}b" netns "$C"
ip -n "$H" addr add 203.0.113.1/24 dev "${tag}a"; ip -n "$H" link set "${tag}a" up
ip -n "$C" addr add 203.0.113.2/24 dev "${tag}b"; ip -n "$C" link set "${tag}b" up
ip link add "${tag}c" type veth peer name "${tag}d"
ip link set "${tag}c" netns "$H"; ip link set "${tag}d" netns "$U"
ip -n "$H" addr add 198.51.100.1/24 dev "${tag}c"; ip -n "$H" link set "${tag}c" up
ip -n "$U" addr add 198.51.100.2/24 dev "${tag}d"; ip -n "$U" link set "${tag}d" up
ip -n "$H" route add default via 198.51.100.2

export RNAT_STATE_DIR="$work/state"
mkdir -p "$work/www"
echo "<h1>Hello from a container behind rnat</h1>" > "$work/www/index.html"

step "rnat network create demo --subnet 192.0.2.0/24"
in_ns "$H" "$RNAT" network create demo --subnet 192.0.2.0/24

step "rnat run --name web -p 8080:80 -- busybox httpd -f -p 80 -h $work/www"
# `ip netns exec` execs rnat itself, so $! is rnat's PID (a shell function would add a subshell).
ip netns exec "$H" "$RNAT" run --network demo --name web -p 8080:80 -- busybox httpd -f -p 80 -h "$work/www" &
pids+=($!)
for _ in $(seq 50); do
  in_ns "$H" "$RNAT" ps 2>/dev/null | grep -q ' web ' && break; sleep 0.1
done
in_ns "$H" "$RNAT" ps

step "The client (203.0.113.2) fetches http://203.0.113.1:8080/"
printf 'GET / HTTP/1.0\r\nHost: demo\r\n\r\n' | in_ns "$C" socat -t 3 - TCP:203.0.113.1:8080

step "The host itself fetches http://127.0.0.1:8080/"
printf 'GET / HTTP/1.0\r\n\r\n' | in_ns "$H" socat -t 3 - TCP:127.0.0.1:8080 | tail -n 1

step "The container reaches the upstream server; upstream sees the host's address"
# shellcheck disable=SC2016  # $SOCAT_PEERADDR is expanded by socat's shell, not this one
ip netns exec "$U" socat TCP-LISTEN:7000,reuseaddr SYSTEM:'echo upstream saw you as $SOCAT_PEERADDR' &
pids+=($!)
sleep 0.3
in_ns "$H" "$RNAT" run --network demo -- socat -t 3 - TCP:198.51.100.2:7000 </dev/null

step "rnat publish --name web 9090:80 adds one map element; the ruleset is not rewritten"
in_ns "$H" "$RNAT" publish --name web 9090:80
in_ns "$H" nft list map ip rnat pub_any
printf 'GET / HTTP/1.0\r\n\r\n' | in_ns "$C" socat -t 3 - TCP:203.0.113.1:9090 | tail -n 1

step "Stopping the container: rnat tears everything down"
kill -TERM "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
echo "links left on the host:  $(ip -n "$H" -br link | awk '{print $1}' | grep -c '^rv' || true) veths"
echo "map elements left:       $(in_ns "$H" nft -j list map ip rnat pub_any | jq '[.nftables[] | .map? | select(.) | (.elem // []) | length] | add')"
echo "containers:              $(in_ns "$H" "$RNAT" ps --json | tr -d '\n ')"
step "Done"
