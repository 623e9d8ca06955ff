#!/usr/bin/env bash
# Rootful benchmark: rnat vs the CNI reference chain (bridge + host-local +
# portmap) vs netavark.
#
#   sudo benches/rootful.sh               # full run (COUNT=200, ROUNDS=3)
#   sudo QUICK=1 benches/rootful.sh       # smoke run, under 2 minutes
#
# Sections (SECTIONS="1 2 3 4" by default):
#   1. set-up + tear-down of one container with one published port (8080->80)
#   2. COUNT containers in sequence, one published port each: median of the
#      last 10 set-ups / median of the first 10
#   3. publishing many ports on one container, then the new-connection rate
#      (wrk, Connection: close) to the first and to the last published port
#   4. idle memory (VmRSS) of the `rnat run` process holding one container
#
# Environment knobs (defaults in brackets; QUICK=1 changes the starred ones):
#   RNAT [target/release/rnat]   rnat binary; rnat rows are skipped if missing
#   ROUNDS* [3 | 1]              rounds per measurement (medians are reported)
#   COUNT* [200 | 20]            containers in section 2 (at most 250)
#   PEER_PORTS* [1000 | 100]     ports published on one container by the peers
#   RNAT_PORTS [10000]           ports published by `rnat publish` (from 10000)
#   WRK_SECS* [5 | 2]            duration of each wrk run
#   SLOW_ROUNDS [1]              rounds for peer publishes of >= 500 ports
#   SETTLE* [70 | 0]             seconds of quiet before each tool's section 2
#   PEER_TIMEOUT [240]           seconds before a peer publish is abandoned
#   TOOLS ["cni netavark rnat"]  SECTIONS ["1 2 3 4"]
#   OUT [benches/results/rootful-YYYYmmdd-HHMM.md]   KEEP_WORK=1 keeps the logs
#
# Safety: every change to network state happens inside network namespaces
# this script creates (names "rnb<PID>_..."). Plugins, netavark and rnat run
# inside a per-case "host" namespace, in a private mount namespace whose
# /run/netns is a private tmpfs, so container namespaces they create are
# invisible outside and disappear with it. Addresses: 192.0.2.0/24 (container
# bridge), 203.0.113.0/24 (client link). The EXIT/INT/TERM trap kills the
# processes this run started (by PID) and deletes its namespaces and temp dir.

set -euo pipefail
export LC_ALL=C

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)

CNI_DIR=${CNI_DIR:-/usr/lib/cni}
NETAVARK=${NETAVARK:-/usr/lib/podman/netavark}
BUSYBOX=${BUSYBOX:-/usr/bin/busybox}
SUBNET=192.0.2.0/24
GATEWAY=192.0.2.1
HOST_IP=203.0.113.1
CLIENT_IP=203.0.113.2

now_us() { NOW=${EPOCHREALTIME/./}; }   # sets NOW, no fork

log() { printf '[rootful %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- processes --
# shellcheck source=benches/procs.sh
. "$(dirname "${BASH_SOURCE[0]}")/procs.sh"

# sleep without a fork (inner mode: read -t on a private fifo)
snooze() {
	if [[ -n ${SLEEPFD:-} ]]; then
		read -rt "$1" -u "$SLEEPFD" _ || true
	else
		sleep "$1"
	fi
}

STOP_GRACE=10   # stop_tree (procs.sh): servers here may take a while

# ============================================================ INNER MODE =====
# Runs as: ip netns exec HOST unshare -m --propagation private bash SELF --inner FN ARGS
# i.e. inside the case's host namespace, with a private /run/netns.

INNER_PIDS=()
inner_cleanup() {
	local i n
	# newest first: helpers (httpd) before the containers they run in
	for ((i = ${#INNER_PIDS[@]} - 1; i >= 0; i--)); do stop_tree "${INNER_PIDS[i]}" 3; done
	# Only this private tmpfs is visible here: everything in it is ours.
	for n in $(ip netns list 2>/dev/null | awk '{print $1}'); do
		ip netns del "$n" 2>/dev/null || true
	done
}

inner_setup() {
	trap inner_cleanup EXIT
	trap 'exit 143' TERM INT
	# keep a handle on the client namespace before hiding /run/netns
	exec {CLFD}<"/run/netns/$CLNS"
	CLNET=/proc/$$/fd/$CLFD
	mount -t tmpfs -o size=4m,mode=755 rnbnetns /run/netns
	CASEDIR=$WORK/case.$CASE
	mkdir -p "$CASEDIR"
	mkfifo "$CASEDIR/snooze"
	exec {SLEEPFD}<>"$CASEDIR/snooze"
	export CNI_PATH=$CNI_DIR CNI_IFNAME=eth0
}

track() { INNER_PIDS+=("$1"); echo "$1" >>"$WORK/pids"; }

# ---- CNI reference chain ----------------------------------------------------
declare -A PMCONF=()
cni_init() {
	BR_CONF='{"cniVersion":"1.0.0","name":"rnbcni","type":"bridge","bridge":"rnbcni0","isGateway":true,"ipMasq":true,"hairpinMode":true,"ipam":{"type":"host-local","dataDir":"'"$CASEDIR"'/ipam","ranges":[[{"subnet":"'"$SUBNET"'"}]],"routes":[{"dst":"0.0.0.0/0"}]}}'
}
# JSON array of mappings: BASE COUNT CONTAINER_PORT(0 = same as host port)
cni_maps() {
	local i out="" cp
	for ((i = 0; i < $2; i++)); do
		cp=$3
		((cp != 0)) || cp=$(($1 + i))
		out+="${out:+,}{\"hostPort\":$(($1 + i)),\"containerPort\":$cp,\"protocol\":\"tcp\"}"
	done
	MAPS="[$out]"
}
cni_bridge_add() { # ID -> BRIDGE_RES
	ip netns add "${RUN}_c$1"
	BRIDGE_RES=$(CNI_COMMAND=ADD CNI_CONTAINERID="rnb$1" CNI_NETNS="/run/netns/${RUN}_c$1" \
		"$CNI_DIR/bridge" <<<"$BR_CONF")
}
cni_portmap_add() { # ID MAPS [timeout]
	local pm='{"cniVersion":"1.0.0","name":"rnbcni","type":"portmap","capabilities":{"portMappings":true},"snat":true,"runtimeConfig":{"portMappings":'"$2"'},"prevResult":'"$BRIDGE_RES"'}'
	PMCONF[$1]=$pm
	if [[ -n ${3:-} ]]; then
		CNI_COMMAND=ADD CNI_CONTAINERID="rnb$1" CNI_NETNS="/run/netns/${RUN}_c$1" \
			timeout "$3" "$CNI_DIR/portmap" <<<"$pm" >/dev/null
	else
		CNI_COMMAND=ADD CNI_CONTAINERID="rnb$1" CNI_NETNS="/run/netns/${RUN}_c$1" \
			"$CNI_DIR/portmap" <<<"$pm" >/dev/null
	fi
}
cni_up() { cni_bridge_add "$1" && cni_portmap_add "$1" "$2"; }
cni_down() { # ID: DEL in reverse order, then the netns
	CNI_COMMAND=DEL CNI_CONTAINERID="rnb$1" CNI_NETNS="/run/netns/${RUN}_c$1" \
		"$CNI_DIR/portmap" <<<"${PMCONF[$1]}" >/dev/null
	CNI_COMMAND=DEL CNI_CONTAINERID="rnb$1" CNI_NETNS="/run/netns/${RUN}_c$1" \
		"$CNI_DIR/bridge" <<<"$BR_CONF" >/dev/null
	ip netns del "${RUN}_c$1"
}

# ---- netavark -----------------------------------------------------------------
declare -A NAJSON=()
na_init() {
	NA_CONF=$CASEDIR/netavark
	mkdir -p "$NA_CONF"
	NA_NETID=$(printf 'b%.0s' {1..64})
}
# netavark port_mappings: BASE COUNT CONTAINER_PORT(0 = same) [RANGE]
na_maps() {
	local i out="" cp
	if [[ -n ${4:-} ]]; then
		MAPS="[{\"host_ip\":\"\",\"container_port\":$1,\"host_port\":$1,\"range\":$2,\"protocol\":\"tcp\"}]"
		return
	fi
	for ((i = 0; i < $2; i++)); do
		cp=$3
		((cp != 0)) || cp=$(($1 + i))
		out+="${out:+,}{\"host_ip\":\"\",\"container_port\":$cp,\"host_port\":$(($1 + i)),\"range\":1,\"protocol\":\"tcp\"}"
	done
	MAPS="[$out]"
}
# ID IP MAPS -> NAJSON[ID]. netavark has no IPAM: the runtime (podman) picks
# the address; here the caller does.
na_json() {
	local cid
	printf -v cid '%064x' "$1"
	NAJSON[$1]='{"container_id":"'$cid'","container_name":"rnbc'$1'","port_mappings":'$3',"networks":{"rnbna":{"static_ips":["'$2'"],"interface_name":"eth0"}},"network_info":{"rnbna":{"dns_enabled":false,"driver":"bridge","id":"'$NA_NETID'","internal":false,"ipv6_enabled":false,"name":"rnbna","network_interface":"rnbna0","subnets":[{"gateway":"'$GATEWAY'","subnet":"'$SUBNET'"}],"ipam_options":{"driver":"host-local"}}}}'
}
na_up() { # ID [timeout]
	ip netns add "${RUN}_c$1"
	if [[ -n ${2:-} ]]; then
		NETAVARK_FW=$NA_FW timeout "$2" "$NETAVARK" --config "$NA_CONF" setup "/run/netns/${RUN}_c$1" \
			<<<"${NAJSON[$1]}" >/dev/null
	else
		NETAVARK_FW=$NA_FW "$NETAVARK" --config "$NA_CONF" setup "/run/netns/${RUN}_c$1" \
			<<<"${NAJSON[$1]}" >/dev/null
	fi
}
na_down() {
	NETAVARK_FW=$NA_FW "$NETAVARK" --config "$NA_CONF" teardown "/run/netns/${RUN}_c$1" \
		<<<"${NAJSON[$1]}" >/dev/null
	ip netns del "${RUN}_c$1"
}
na_probe() { # which firewall driver works: nftables first, then iptables
	local fw
	na_init
	na_maps 8080 1 80
	na_json 1 192.0.2.2 "$MAPS"
	for fw in nftables iptables; do
		NA_FW=$fw
		ip netns add "${RUN}_c1"
		# netavark reports errors as JSON on stdout
		if NETAVARK_FW=$fw "$NETAVARK" --config "$NA_CONF" setup "/run/netns/${RUN}_c1" \
			<<<"${NAJSON[1]}" >"$CASEDIR/probe.$fw" 2>&1; then
			na_down 1
			echo "FW $fw"
			return 0
		fi
		echo "netavark with NETAVARK_FW=$fw: $(head -c 300 "$CASEDIR/probe.$fw")" >&2
		ip netns del "${RUN}_c1" 2>/dev/null || true
	done
	echo "FW none"
}

# ---- rnat ---------------------------------------------------------------------
rnat_init() {
	export RNAT_STATE_DIR=$CASEDIR/rnat-state
	mkdir -p "$RNAT_STATE_DIR"
	"$RNAT" network create bench --subnet "$SUBNET" >/dev/null
}
# NAME READYFILE [rnat-run args...]: start a long-lived container -> RPID
rnat_start() {
	local name=$1 ready=$2
	shift 2
	"$RNAT" run --network bench --name "$name" "$@" -- \
		sh -c "date +%s%N > $ready.tmp && mv $ready.tmp $ready; exec sleep 600" \
		</dev/null >>"$CASEDIR/rnat-$name.log" 2>&1 &
	RPID=$!
	track "$RPID"
}
# READYFILE PID [timeout s]: wait for the container to be up
wait_ready() {
	local i lim=$((${3:-30} * 500))
	for ((i = 0; i < lim; i++)); do
		[[ -s $1 ]] && return 0
		if ! alive "$2"; then
			echo "rnat run (pid $2) exited before the container was ready: $(tail -n 3 "$CASEDIR"/rnat-*.log 2>/dev/null | tr '\n' ' ')" >&2
			return 1
		fi
		snooze 0.002
	done
	echo "timeout waiting for $1" >&2
	return 1
}
# NAME PID -> the container's network namespace path in NETNS
rnat_netns() {
	local json mine d
	NETNS=""
	if json=$("$RNAT" ps --json 2>/dev/null); then
		NETNS=$(jq -r --arg n "$1" '[.. | objects | select(.name? == $n) | .netns? // empty][0] // empty' \
			<<<"$json" 2>/dev/null || true)
		if [[ -n $NETNS && $NETNS != /* ]]; then NETNS=/run/netns/$NETNS; fi
		if [[ -n $NETNS && -e $NETNS ]]; then
			echo "NOTE rnat container netns from 'rnat ps --json': $NETNS"
			return 0
		fi
	fi
	# fallback: first descendant of `rnat run` living in another netns
	mine=$(readlink /proc/self/ns/net)
	for d in $(descendants "$2"); do
		if [[ $(readlink "/proc/$d/ns/net" 2>/dev/null) != "$mine" ]]; then
			NETNS=/proc/$d/ns/net
			echo "NOTE 'rnat ps --json' gave no usable netns for $1; used /proc/<container pid>/ns/net"
			return 0
		fi
	done
	echo "cannot find the netns of rnat container $1" >&2
	return 1
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# ---- wrk through the client namespace -------------------------------------------
# NETNS-PATH PORT...: busybox httpd on each port inside the container
start_httpd() {
	local ns=$1 p
	shift
	mkdir -p "$WORK/www"
	[[ -e $WORK/www/index.html ]] || echo "rnb ok" >"$WORK/www/index.html"
	for p in "$@"; do
		nsenter --net="$ns" "$BUSYBOX" httpd -f -p "0.0.0.0:$p" -h "$WORK/www" </dev/null &
		track "$!"
	done
}
probe_http() { # PORT: from the client netns through the published port
	local i out
	for ((i = 0; i < 50; i++)); do
		out=$(printf 'GET / HTTP/1.0\r\n\r\n' |
			nsenter --net="$CLNET" timeout 2 "$BUSYBOX" nc "$HOST_IP" "$1" 2>/dev/null) || true
		[[ $out != *"200 OK"* ]] || return 0
		sleep 0.1
	done
	echo "port $1 not reachable from the client namespace" >&2
	return 1
}
wrk_rate() { # PORT -> prints "requests/s errors"
	local out rps errs
	out=$(nsenter --net="$CLNET" timeout $((WRK_SECS + 30)) wrk -t1 -c8 -d"${WRK_SECS}s" \
		-H 'Connection: close' "http://$HOST_IP:$1/" 2>&1) || true
	echo "$out" >>"$CASEDIR/wrk.log"
	rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
	errs=$(awk '/Socket errors:/{gsub(",", ""); print $4+$6+$8+$10} /Non-2xx/{print $NF}' <<<"$out" |
		awk '{s+=$1} END{print s+0}')
	echo "${rps:-0} $errs"
}
# FIRST LAST NETNS: httpd on both, probe, wrk ROUNDS times -> W3 lines
wrk_first_last() {
	local first=$1 last=$2 ns=$3 r p
	start_httpd "$ns" "$first" "$last"
	probe_http "$first"
	probe_http "$last"
	for ((r = 1; r <= ROUNDS; r++)); do
		# alternate the order so neither port always runs first
		if ((r % 2)); then set -- first "$first" last "$last"; else set -- last "$last" first "$first"; fi
		while (($#)); do
			p=$(wrk_rate "$2")
			echo "W3 $1 $p"
			shift 2
		done
	done
}

# ---- sections ---------------------------------------------------------------------
s1() { # TOOL ROUNDS: round 0 is an untimed warm-up
	local tool=$1 r t0 t1 t2
	case $tool in
	cni) cni_init; cni_maps 8080 1 80 ;;
	netavark) na_init; na_maps 8080 1 80 ;;
	rnat) rnat_init ;;
	esac
	for ((r = 0; r <= $2; r++)); do
		case $tool in
		cni)
			now_us; t0=$NOW
			cni_up "$r" "$MAPS"
			now_us; t1=$NOW
			cni_down "$r"
			now_us; t2=$NOW
			;;
		netavark)
			na_json "$r" 192.0.2.2 "$MAPS"
			now_us; t0=$NOW
			na_up "$r"
			now_us; t1=$NOW
			na_down "$r"
			now_us; t2=$NOW
			;;
		rnat)
			now_us; t0=$NOW
			"$RNAT" run --network bench -p 8080:80 -- true </dev/null >>"$CASEDIR/rnat.log" 2>&1
			now_us; t2=$NOW
			t1=""
			;;
		esac
		((r == 0)) || echo "S1 $((t2 - t0)) ${t1:+$((t1 - t0)) $((t2 - t1))}"
	done
}

s2() { # TOOL COUNT
	local tool=$1 n=$2 i t0 t1 port
	local -a rp=()
	case $tool in
	cni) cni_init ;;
	netavark) na_init ;;
	rnat) rnat_init ;;
	esac
	for ((i = 1; i <= n; i++)); do
		port=$((20000 + i))
		case $tool in
		cni)
			cni_maps "$port" 1 80
			now_us; t0=$NOW
			cni_up "$i" "$MAPS"
			now_us; t1=$NOW
			;;
		netavark)
			na_maps "$port" 1 80
			na_json "$i" "192.0.2.$((i + 1))" "$MAPS"
			now_us; t0=$NOW
			na_up "$i"
			now_us; t1=$NOW
			;;
		rnat)
			now_us; t0=$NOW
			rnat_start "b$i" "$CASEDIR/ready.$i" -p "$port:80"
			rp+=("$RPID")
			wait_ready "$CASEDIR/ready.$i" "$RPID" 60
			read -r t1 <"$CASEDIR/ready.$i"
			t1=$((t1 / 1000))
			;;
		esac
		echo "S2 $i $((t1 - t0))"
	done
	now_us; t0=$NOW
	for ((i = n; i >= 1; i--)); do
		case $tool in
		cni) cni_down "$i" ;;
		netavark) na_down "$i" ;;
		rnat) stop_tree "${rp[i - 1]}" 20 ;;
		esac
	done
	now_us; t1=$NOW
	echo "T2 $((t1 - t0))"
}

s3() { # TOOL DO_WRK(0|1)
	local tool=$1 dowrk=$2 t0 t1 rc=0 first last ports
	case $tool in
	cni)
		ports=$PEER_PORTS first=10000 last=$((10000 + PEER_PORTS - 1))
		cni_init
		cni_bridge_add 1
		cni_maps 10000 "$ports" 0
		now_us; t0=$NOW
		cni_portmap_add 1 "$MAPS" "$PEER_TIMEOUT" || rc=$?
		now_us; t1=$NOW
		NETNS=/run/netns/${RUN}_c1
		;;
	netavark | netavark-range)
		ports=$PEER_PORTS first=10000 last=$((10000 + PEER_PORTS - 1))
		na_init
		if [[ $tool == netavark-range ]]; then
			na_maps 10000 "$ports" 0 range
		else
			na_maps 10000 "$ports" 0
		fi
		na_json 1 192.0.2.2 "$MAPS"
		now_us; t0=$NOW
		na_up 1 "$PEER_TIMEOUT" || rc=$?
		now_us; t1=$NOW
		NETNS=/run/netns/${RUN}_c1
		;;
	rnat)
		ports=$RNAT_PORTS first=10000 last=$((10000 + RNAT_PORTS - 1))
		rnat_init
		rnat_start big "$CASEDIR/ready.big"
		local bigpid=$RPID
		wait_ready "$CASEDIR/ready.big" "$bigpid" 60
		echo "M3 before $(rss_kb "$bigpid")"
		now_us; t0=$NOW
		timeout "$PEER_TIMEOUT" "$RNAT" publish --name big "$first-$last:$first-$last" \
			</dev/null >>"$CASEDIR/rnat.log" 2>&1 || rc=$?
		now_us; t1=$NOW
		sleep 0.2
		echo "M3 after $(rss_kb "$bigpid")"
		if ((rc == 0 && dowrk)); then rnat_netns big "$bigpid"; fi
		;;
	esac
	if ((rc == 124)); then
		echo "P3SKIP $ports timeout ${PEER_TIMEOUT}s"
		return 0
	elif ((rc != 0)); then
		echo "publish of $ports ports failed (exit $rc)" >&2
		return 1
	fi
	echo "P3 $((t1 - t0)) $ports"
	if ((dowrk)); then wrk_first_last "$first" "$last" "$NETNS"; fi
}

s4() { # rnat only: VmRSS of the rnat run process holding one container
	rnat_init
	rnat_start idle "$CASEDIR/ready.idle" -p 8080:80
	wait_ready "$CASEDIR/ready.idle" "$RPID" 60
	sleep 1
	echo "M4 $(rss_kb "$RPID") $(tr -d '\n' <"/proc/$RPID/comm")"
}

if [[ ${1:-} == --inner ]]; then
	shift
	[[ ${RNB_XTRACE:-0} != 1 ]] || set -x
	inner_setup
	"$@"
	exit 0
fi

# ============================================================= MAIN MODE =====
if [[ ${QUICK:-0} == 1 ]]; then
	: "${COUNT:=20}" "${ROUNDS:=1}" "${PEER_PORTS:=100}" "${WRK_SECS:=2}" "${SETTLE:=0}"
fi
: "${SETTLE:=70}"
[[ $SETTLE =~ ^[0-9]+$ ]] || { echo "SETTLE must be a number of seconds" >&2; exit 2; }
: "${COUNT:=200}" "${ROUNDS:=3}" "${PEER_PORTS:=1000}" "${WRK_SECS:=5}"
: "${RNAT_PORTS:=10000}" "${PEER_TIMEOUT:=240}" "${SLOW_ROUNDS:=1}" "${CASE_TIMEOUT:=900}"
: "${TOOLS:=cni netavark rnat}" "${SECTIONS:=1 2 3 4}"
RNAT=$(realpath -m "${RNAT:-$ROOT/target/release/rnat}")
OUT=$(realpath -m "${OUT:-$ROOT/benches/results/rootful-$(date +%Y%m%d-%H%M).md}")

for v in COUNT ROUNDS PEER_PORTS WRK_SECS RNAT_PORTS PEER_TIMEOUT SLOW_ROUNDS CASE_TIMEOUT; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done
((COUNT <= 250)) || { echo "COUNT must be <= 250 (one /24)" >&2; exit 2; }
((PEER_PORTS <= 10000 && RNAT_PORTS <= 10000)) || { echo "PEER_PORTS/RNAT_PORTS <= 10000" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "must run as root" >&2; exit 2; }
for c in ip nsenter unshare jq wrk timeout; do
	command -v "$c" >/dev/null || { echo "missing: $c" >&2; exit 2; }
done
[[ -x $BUSYBOX ]] || { echo "missing: $BUSYBOX" >&2; exit 2; }

RUN=rnb$$
WORK=$(mktemp -d /tmp/rnb-bench.XXXXXX)
RNB_TAG="$RUN-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
export RUN WORK RNAT CNI_DIR NETAVARK BUSYBOX ROUNDS WRK_SECS PEER_PORTS RNAT_PORTS PEER_TIMEOUT RNB_TAG
: >"$WORK/pids"
CUR_PID=""
CASE=""

cleanup() {
	local rc=$? p n
	trap - EXIT INT TERM
	# keep cleaning even if stdout/stderr went away (e.g. `| tee` killed by ^C)
	trap '' PIPE INT HUP
	[[ -z $CUR_PID ]] || kill_tree "$CUR_PID" KILL
	# anything the inner helpers started and recorded (they may be orphans now)
	while read -r p; do
		[[ -n $p ]] || continue
		if grep -qz "^RNB_TAG=$RNB_TAG\$" "/proc/$p/environ" 2>/dev/null; then kill_tree "$p" KILL; fi
	done <"$WORK/pids"
	# last resort: processes carrying this run's unique tag
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[[ $p != "$$" && $p != "$BASHPID" ]] || continue
		if grep -qz "^RNB_TAG=$RNB_TAG\$" "/proc/$p/environ" 2>/dev/null; then kill -s KILL "$p" 2>/dev/null || true; fi
	done
	for n in $(ip netns list 2>/dev/null | awk '{print $1}'); do
		[[ $n == "${RUN}"_* ]] && ip netns del "$n" 2>/dev/null
	done
	if [[ ${KEEP_WORK:-0} == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# host namespace "<RUN>_<tag>h" with a client namespace "<RUN>_<tag>k" on a
# 203.0.113.0/24 veth link; the host's default route points at the client
# (which does not forward), so nothing can leave the script's namespaces.
case_ns() {
	local h="${RUN}_$1h" k="${RUN}_$1k"
	ip netns add "$h"
	ip netns add "$k"
	ip -n "$h" link set lo up
	ip -n "$k" link set lo up
	ip -n "$h" link add rnbcl0 type veth peer name rnbk0 netns "$k"
	ip -n "$h" addr add "$HOST_IP/24" dev rnbcl0
	ip -n "$k" addr add "$CLIENT_IP/24" dev rnbk0
	ip -n "$h" link set rnbcl0 up
	ip -n "$k" link set rnbk0 up
	ip -n "$h" route add default via "$CLIENT_IP"
	ip netns exec "$k" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
}
case_del() {
	ip netns del "${RUN}_$1h" 2>/dev/null || true
	ip netns del "${RUN}_$1k" 2>/dev/null || true
}

# run_case TAG FN ARGS...: fresh namespaces, the inner helper inside them;
# its stdout goes to $WORK/TAG.out, stderr to $WORK/TAG.err
CASE_N=0
run_case() {
	local tag=$1 rc=0
	shift
	CASE_N=$((CASE_N + 1))
	CASE="$CASE_N$tag"
	CLNS="${RUN}_${CASE}k"
	export CASE CLNS
	case_ns "$CASE"
	NA_FW=${NA_FW:-iptables} timeout -k 10 "$CASE_TIMEOUT" ip netns exec "${RUN}_${CASE}h" \
		unshare --mount --propagation private bash "$SELF" --inner "$@" \
		>"$WORK/$tag.out" 2>"$WORK/$tag.err" &
	CUR_PID=$!
	wait "$CUR_PID" || rc=$?
	CUR_PID=""
	case_del "$CASE"
	return "$rc"
}

declare -A RES=()
NOTES=()
note() { NOTES+=("$*"); log "note: $*"; }
fail_note() { # TAG WHAT
	note "$2 failed: $(grep -v '^\s*$' "$WORK/$1.err" 2>/dev/null | tail -n 3 | tr '\n' ' ')"
}
field() { awk -v k="$2" '$1 == k' "$WORK/$1.out"; }
have() { [[ " $TOOLS " == *" $1 "* ]]; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
ms() { awk -v x="$1" 'BEGIN{ printf "%.1f", x / 1000 }'; }

RNAT_OK=0
if have rnat; then
	if [[ -x $RNAT ]]; then
		RNAT_OK=1
	else
		note "rnat binary not found at $RNAT: rnat rows skipped (build it with 'cargo build --release' or set RNAT=)"
	fi
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "run $RUN, work dir $WORK; COUNT=$COUNT ROUNDS=$ROUNDS PEER_PORTS=$PEER_PORTS WRK_SECS=${WRK_SECS}s"
NA_FW=""
if have netavark; then
	if run_case naprobe na_probe; then
		NA_FW=$(field naprobe FW | awk '{print $2}')
	fi
	case $NA_FW in
	nftables) ;;
	iptables) note "netavark $("$NETAVARK" --version | awk '{print $2}'): NETAVARK_FW=nftables failed ($(sed -n 's/.*"error":"\([^"]*\)".*/\1/p' "$WORK/naprobe.err" | head -n 1)); using NETAVARK_FW=iptables ($(iptables --version 2>/dev/null))" ;;
	*) note "netavark: no working firewall driver: $(tail -n 2 "$WORK/naprobe.err" | tr '\n' ' '); netavark rows skipped"; TOOLS=${TOOLS/netavark/} ;;
	esac
fi
export NA_FW
tool_ok() { have "$1" && { [[ $1 != rnat ]] || ((RNAT_OK)); }; }

# ---- 1 --------------------------------------------------------------------
if want 1; then
	for t in cni netavark rnat; do
		tool_ok "$t" || continue
		log "1: $t set-up + tear-down x $ROUNDS"
		if run_case "s1$t" s1 "$t" "$ROUNDS"; then
			RES[s1.$t]=$(field "s1$t" S1 | awk '{print $2}' | median)
			RES[s1add.$t]=$(field "s1$t" S1 | awk 'NF>2{print $3}' | median)
			RES[s1del.$t]=$(field "s1$t" S1 | awk 'NF>2{print $4}' | median)
		else fail_note "s1$t" "1 ($t)"; fi
	done
fi

# ---- 2 --------------------------------------------------------------------
# Before each tool's 200 set-ups: write back and wait, so that no tool inherits the previous one's
# deletions (an ext4 without a journal, as on this kind of VM, skips inodes freed in the last minute
# when it allocates one, which slows whoever creates files next) or its namespaces still being
# destroyed by the kernel.
settle() {
	((SETTLE > 0)) || return 0
	log "settling for ${SETTLE}s (SETTLE=0 skips)"
	sync
	sleep "$SETTLE"
}
if want 2; then
	for t in cni netavark rnat; do
		tool_ok "$t" || continue
		settle
		log "2: $t, $COUNT containers in sequence"
		if run_case "s2$t" s2 "$t" "$COUNT"; then
			f=$(field "s2$t" S2 | sort -k2n | head -n 10 | awk '{print $3}' | median)
			l=$(field "s2$t" S2 | sort -k2n | tail -n 10 | awk '{print $3}' | median)
			RES[s2first.$t]=$f
			RES[s2last.$t]=$l
			RES[s2.$t]=$(awk -v f="$f" -v l="$l" 'BEGIN{ if (f > 0) printf "%.3f", l / f }')
			RES[s2down.$t]=$(field "s2$t" T2 | awk '{print $2}')
		else fail_note "s2$t" "2 ($t)"; fi
	done
fi

# ---- 3 --------------------------------------------------------------------
if want 3; then
	for t in cni netavark netavark-range rnat; do
		tool_ok "${t%-range}" || continue
		if [[ $t == rnat ]]; then n=$RNAT_PORTS; else n=$PEER_PORTS; fi
		rounds=$ROUNDS
		if [[ $t == cni || $t == netavark ]] && ((n >= 500 && SLOW_ROUNDS < ROUNDS)); then
			rounds=$SLOW_ROUNDS
		fi
		pubs=() skipped=""
		for ((r = 1; r <= rounds; r++)); do
			dowrk=$((r == rounds ? 1 : 0))
			log "3: $t publish $n ports (round $r/$rounds)"
			if ! run_case "s3$t$r" s3 "$t" "$dowrk"; then
				fail_note "s3$t$r" "3 ($t)"
				break
			fi
			while read -r line; do log "$line"; done < <(sed -n 's/^NOTE //p' "$WORK/s3$t$r.out")
			if [[ -n $(field "s3$t$r" P3SKIP) ]]; then
				skipped="skipped: $n ports took longer than ${PEER_TIMEOUT}s"
				note "3 ($t): publishing $n ports exceeded the ${PEER_TIMEOUT}s timeout (PEER_TIMEOUT); skipped"
				break
			fi
			pubs+=("$(field "s3$t$r" P3 | awk '{print $2}')")
			if ((dowrk)); then
				RES[s3first.$t]=$(field "s3$t$r" W3 | awk '$2=="first"{print $3}' | median)
				RES[s3last.$t]=$(field "s3$t$r" W3 | awk '$2=="last"{print $3}' | median)
				RES[s3err.$t]=$(field "s3$t$r" W3 | awk '{s+=$4} END{print s+0}')
				[[ $t != rnat ]] || RES[m3.$t]=$(field "s3$t$r" M3 | awk '$2=="after"{print $3}')
			fi
		done
		RES[s3rounds.$t]=${#pubs[@]}
		if ((${#pubs[@]})); then
			RES[s3n.$t]=$n
			RES[s3.$t]=$(printf '%s\n' "${pubs[@]}" | median)
		elif [[ -n $skipped ]]; then
			RES[s3.$t]=$skipped
		fi
	done
fi

# ---- 4 --------------------------------------------------------------------
if want 4 && tool_ok rnat; then
	log "4: rnat idle memory"
	if run_case s4rnat s4; then
		RES[s4.rnat]=$(field s4rnat M4 | awk '{print $2}')
		comm=$(field s4rnat M4 | awk '{print $3}')
		exe=$(basename "$RNAT")
		[[ $comm == "${exe:0:15}" ]] || note "4: the measured process is '$comm', not $exe: does 'rnat run' exec or fork?"
	else fail_note s4rnat "4 (rnat)"; fi
fi

# ================================================================ REPORT =====
isnum() { [[ ${1:-} =~ ^[0-9]+([.][0-9]+)?$ ]]; }
ratio() { # a b: a/b or "-"
	if isnum "${1:-}" && isnum "${2:-}" && awk -v b="$2" 'BEGIN{exit !(b > 0)}'; then
		awk -v a="$1" -v b="$2" 'BEGIN{ r = a / b; if (r < 0.095) printf "%.2g", r; else printf "%.2f", r }'
	else echo "-"; fi
}
fmt() { # value kind
	local v=${1:-}
	if [[ -z $v ]]; then echo "-"; return; fi
	isnum "$v" || { echo "$v"; return; }
	case $2 in
	ms) ms "$v" ;;
	s) awk -v x="$v" 'BEGIN{ printf "%.2f", x / 1e6 }' ;;
	int) printf '%.0f' "$v" ;;
	mb) awk -v x="$v" 'BEGIN{ printf "%.1f", x / 1024 }' ;;
	*) echo "$v" ;;
	esac
}
row() { # label kind key [cni-key netavark-key] -> | label | cni | netavark | rnat | rnat/cni | rnat/netavark |
	local label=$1 kind=$2 k=$3 kc=${4:-$3.cni} kn=${5:-$3.netavark}
	local c=${RES[$kc]:-} n=${RES[$kn]:-} r=${RES[$k.rnat]:-} rc rn
	rc=$(ratio "$r" "$c") rn=$(ratio "$r" "$n")
	[[ $kind != count ]] || rc=- rn=-
	printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$(fmt "$c" "$kind")" "$(fmt "$n" "$kind")" \
		"$(fmt "$r" "$kind")" "$rc" "$rn"
}
# last/first connection-rate ratios
for t in cni netavark netavark-range rnat; do
	RES[s3lf.$t]=$(ratio "${RES[s3last.$t]:-}" "${RES[s3first.$t]:-}")
	[[ ${RES[s3lf.$t]} != - ]] || unset "RES[s3lf.$t]"
done
# publish time per 1000 ports
for t in cni netavark netavark-range rnat; do
	if isnum "${RES[s3.$t]:-}"; then
		RES[s3k.$t]=$(awk -v x="${RES[s3.$t]}" -v n="${RES[s3n.$t]}" 'BEGIN{ printf "%.0f", x * 1000 / n }')
	fi
done

report() {
	local rn="rnat"
	((RNAT_OK)) || rn="rnat (skipped)"
	echo "# rnat rootful benchmark"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) cores;" \
		"COUNT=$COUNT ROUNDS=$ROUNDS PEER_PORTS=$PEER_PORTS RNAT_PORTS=$RNAT_PORTS WRK_SECS=$WRK_SECS${QUICK:+ QUICK=$QUICK}."
	echo "CNI plugins $(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null || echo '?')" \
		"(bridge + host-local + portmap, iptables-nft), netavark $("$NETAVARK" --version 2>/dev/null | awk '{print $2}')" \
		"(firewall driver: ${NA_FW:-n/a}), rnat: $RNAT."
	echo "Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the connection rates most)."
	echo
	echo "Times are medians over the rounds; ratios are rnat / peer (below 1 = rnat takes less time;" \
		"for connection rates above 1 = rnat is faster)."
	echo
	echo "| metric | CNI chain | netavark | $rn | rnat/CNI | rnat/netavark |"
	echo "|---|---:|---:|---:|---:|---:|"
	row "1. set-up + tear-down, 1 container, 1 port (ms)" ms s1
	row "1. &nbsp; of which set-up (ms)" ms s1add
	row "1. &nbsp; of which tear-down (ms)" ms s1del
	row "2. set-up time, last 10 / first 10 of $COUNT" x s2
	row "2. &nbsp; median set-up, first 10 (ms)" ms s2first
	row "2. &nbsp; median set-up, last 10 (ms)" ms s2last
	row "2. &nbsp; tear-down of all $COUNT (s)" s s2down
	row "3. publish ports on one container (s)" s s3
	row "3. &nbsp; ports published" count s3n
	row "3. &nbsp; publish time per 1,000 ports (ms)" ms s3k
	row "3. new connections/s, first port" int s3first
	row "3. new connections/s, last port" int s3last
	row "3. connections/s last / first" x s3lf
	row "3b. netavark with one \`range\` mapping: publish (s)" s s3 s3.none s3.netavark-range
	row "3b. &nbsp; connections/s first port" int s3first s3first.none s3first.netavark-range
	row "3b. &nbsp; connections/s last port" int s3last s3last.none s3last.netavark-range
	row "3b. &nbsp; connections/s last / first" x s3lf s3lf.none s3lf.netavark-range
	row "4. idle VmRSS of \`rnat run\` with 1 container (MB)" mb s4
	echo
	echo "Notes:"
	echo
	want 1 && echo "- 1: one untimed warm-up round first. The peers' times include \`ip netns add\`/\`del\` of the" \
		"container netns; CNI = ADD bridge, ADD portmap (prevResult + runtimeConfig.portMappings), DEL portmap, DEL bridge;" \
		"netavark = \`setup\` + \`teardown\` (the caller picks the IP: netavark has no IPAM);" \
		"rnat = \`rnat run --network bench -p 8080:80 -- true\` (also starts and reaps \`true\`)." \
		"The CNI bridge stays after DEL, netavark deletes its bridge with the last container."
	want 2 && echo "- 2: rnat set-up = launch of \`rnat run\` to the \`date\` stamp written by the container command;" \
		"peers = netns add + plugin ADDs / netavark setup. Host ports 20000+i."
	want 3 && echo "- 3: peers publish host ports 10000.. as individual mappings (CNI: one portmap ADD with" \
		"${PEER_PORTS} mappings on a running container; netavark: \`setup\` of a container with ${PEER_PORTS}" \
		"port_mappings, so it includes the container set-up; 3b: one mapping with \`range\`). rnat:" \
		"\`rnat publish --name big 10000-$((10000 + RNAT_PORTS - 1)):10000-$((10000 + RNAT_PORTS - 1))\`" \
		"($RNAT_PORTS ports) on a running container. Peer publishes of >= 500 ports run $SLOW_ROUNDS round(s)." \
		"wrk -t1 -c8 -d${WRK_SECS}s with 'Connection: close' from a client netns (203.0.113.2) to" \
		"203.0.113.1:PORT, busybox httpd in the container on the first and last port, median of $ROUNDS run(s) each." \
		"wrk socket errors + non-2xx: CNI ${RES[s3err.cni]:-n/a}, netavark ${RES[s3err.netavark]:-n/a}," \
		"netavark-range ${RES[s3err.netavark-range]:-n/a}, rnat ${RES[s3err.rnat]:-n/a}."
	if [[ -n ${RES[m3.rnat]:-} ]]; then
		echo "- 3: VmRSS of the \`rnat run\` process of 'big' after publishing: $(fmt "${RES[m3.rnat]}" mb) MB."
	fi
	want 4 && echo "- 4: the peers keep no process per container (conmon/containerd-shim are not part of them)."
	local n
	for n in "${NOTES[@]}"; do echo "- $n"; done
}

if awk -v n="$(nproc)" '{ exit !($1 > n / 2) }' <<<"$LOAD_START"; then
	note "the machine was busy at start (load $LOAD_START on $(nproc) cores): timings, the section-2 ratios and connection rates are noisy; rerun on an idle machine"
fi
mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "written to $OUT"
