#!/usr/bin/env bash
# A guided demo of rnat, rootful then rootless, run entirely inside throwaway network namespaces
# (the machine's own network is never touched; the rootless part creates the system user
# rnat-demo and opens /dev/net/tun to everyone, as the test suite does):
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

# Rootless: the same host, rnat run by an ordinary user. It needs a user (created once, as the
# test suite does), /dev/net/tun open to everyone (as most distributions ship it), and, for
# ping, ping sockets allowed in the demo's host namespace.
id -u rnat-demo >/dev/null 2>&1 ||
  useradd --system --no-create-home --shell /usr/sbin/nologin rnat-demo
[ "$(stat -c %a /dev/net/tun)" = 666 ] || chmod 0666 /dev/net/tun
in_ns "$H" sysctl -qw net.ipv4.ping_group_range="0 2147483647"
cp "$RNAT" "$work/rnat"
chmod 755 "$work" "$work/rnat"
as_user() {
  ip netns exec "$H" setpriv --reuid rnat-demo --regid rnat-demo --clear-groups -- \
    env -u XDG_RUNTIME_DIR "$@"
}

step "Rootless: as the ordinary user rnat-demo, rnat run -p 8081:80 -- a server that says who called"
# Not through as_user: a shell function in the background is a subshell, and $! must be rnat's
# PID (ip netns exec, setpriv and env each exec the next).
# shellcheck disable=SC2016  # $SOCAT_PEERADDR is expanded by socat's shell, not this one
ip netns exec "$H" setpriv --reuid rnat-demo --regid rnat-demo --clear-groups -- \
  env -u XDG_RUNTIME_DIR "$work/rnat" run -p 8081:80 -- \
  socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo the container saw you as $SOCAT_PEERADDR' &
pids+=($!)
for _ in $(seq 50); do
  in_ns "$H" socat -t 1 - TCP:127.0.0.1:8081 </dev/null >/dev/null 2>&1 && break; sleep 0.1
done
as_user "$work/rnat" ps

step "The client (203.0.113.2) calls 203.0.113.1:8081: through rnat's user-space NAT, its own address kept"
in_ns "$C" socat -t 3 - TCP:203.0.113.1:8081 </dev/null

step "The host calls 127.0.0.1:8081: spliced kernel to kernel inside the container"
in_ns "$H" socat -t 3 - TCP:127.0.0.1:8081 </dev/null

step "From a rootless container: upstream sees the host's address, ping works, a closed port fails at once (TCP and UDP)"
# shellcheck disable=SC2016
ip netns exec "$U" socat TCP-LISTEN:7001,reuseaddr,fork SYSTEM:'echo upstream saw you as $SOCAT_PEERADDR' &
pids+=($!)
sleep 0.3
as_user "$work/rnat" run -- sh -c '
  socat -t 3 - TCP:198.51.100.2:7001 </dev/null
  busybox ping -c 1 -W 3 198.51.100.2 | grep "bytes from"
  socat -u TCP:198.51.100.2:9 - 2>&1 | sed "s/.*): /TCP to a closed port: /"
  echo x | socat -t 10 - UDP:198.51.100.2:9 2>&1 | sed "s/.*): /UDP to a closed port: /"'

step "Stopping the rootless instance"
kill -TERM "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
echo "rootless instances left: $(as_user "$work/rnat" ps --json | jq length)"
step "Done"
