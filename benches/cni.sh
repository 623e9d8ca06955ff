#!/usr/bin/env bash
# rnat as a CNI plugin against the CNI reference chain (bridge + host-local + portmap), in one run.
#
#   benches/cni.sh                 # ROUNDS=20 COUNT=500 PORTS=1000
#   QUICK=1 benches/cni.sh         # ROUNDS=5 COUNT=50 PORTS=200
#   RNAT=target/release/rnat OUT=file.md benches/cni.sh
#
# Measures:
#   1. ADD + DEL of one attachment with one port mapping (median of ROUNDS): rnat vs the chain.
#   2. COUNT attachments added in sequence (each with its own port): median of the last 10 ADDs
#      over the first 10, for rnat (and the chain with PEERS=1: it is slow).
#   3. One ADD with PORTS port mappings: rnat (the chain's portmap takes ~45 s for 1,000 here, see
#      benches/rootful.sh; PEERS=1 runs it too).
# SETTLE=S [70; 0 with QUICK]: seconds of quiet (after a sync) before each tool's section 2.
# Everything runs inside namespaces this script creates (prefix rnb<pid>); nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "cni.sh: run as root" >&2; exit 1; }

RNAT=${RNAT:-target/release/rnat}
RNAT=$(realpath "$RNAT")
CNI_DIR=${CNI_DIR:-/usr/lib/cni}
if [[ -n ${QUICK:-} ]]; then : "${ROUNDS:=5}" "${COUNT:=50}" "${PORTS:=200}" "${SETTLE:=0}"; fi
SETTLE=${SETTLE:-70}
[[ $SETTLE =~ ^[0-9]+$ ]] || { echo "SETTLE must be a number of seconds" >&2; exit 1; }
ROUNDS=${ROUNDS:-20} COUNT=${COUNT:-500} PORTS=${PORTS:-1000} PEERS=${PEERS:-0}
OUT=${OUT:-benches/results/cni-$(date +%Y%m%d-%H%M).md}
((COUNT <= 500)) || { echo "COUNT at most 500 (two /24 networks)" >&2; exit 1; }

# The measurement runs inside the host namespace H, entered once: a runtime calls plugins from its
# own namespace, and an `ip netns exec` per call would copy the mount table each time (one more
# mount per container namespace), a cost that grows with the count for every tool measured.
if [[ -z ${RNB_INSIDE:-} ]]; then
	TAG=rnb$$
	ip netns add "${TAG}h"
	trap 'ip netns del "${TAG}h" 2>/dev/null || true' EXIT INT TERM
	rc=0
	ip netns exec "${TAG}h" env RNB_INSIDE=1 RNB_TAG="$TAG" RNAT="$RNAT" bash "$0" "$@" || rc=$?
	exit "$rc"
fi
TAG=$RNB_TAG
WORK=$(mktemp -d "/tmp/${TAG}.XXXX")
NSLIST=()
cleanup() {
	for ns in "${NSLIST[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
log() { printf '[cni %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now_us() { NOW=${EPOCHREALTIME/./}; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "-"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.3f", a / b; else print "-" }'; }
ms() { if [[ $1 == - ]]; then echo -; else awk -v x="$1" 'BEGIN{ printf "%.2f", x / 1000 }'; fi; }

ip link set lo up
inh() { "$@"; }

# plugin CMD ID CONF [extra env...]: runs one plugin in the host namespace.
plugin() {
	local bin=$1 cmd=$2 id=$3 conf=$4
	shift 4
	CNI_COMMAND=$cmd CNI_CONTAINERID="c$id" CNI_NETNS="/run/netns/${TAG}c$id" CNI_IFNAME=eth0 \
		CNI_PATH=$CNI_DIR "$@" "$bin" <<<"$conf"
}
newns() { ip netns add "${TAG}c$1"; NSLIST+=("${TAG}c$1"); }
delns() { ip netns del "${TAG}c$1" 2>/dev/null || true; }

maps() { # BASE COUNT -> JSON list, container port = host port
	local i out=""
	for ((i = 0; i < $2; i++)); do out+="${out:+,}{\"hostPort\":$(($1 + i)),\"containerPort\":$(($1 + i)),\"protocol\":\"tcp\"}"; done
	echo "[$out]"
}
# Attachments 1-250 go on network 0 (192.0.2.0/24), the rest on network 1 (198.51.100.0/24):
# more than one documentation /24 holds is needed for 500.
NETS=(192.0.2.0/24 198.51.100.0/24)
rnat_conf() { # NET(0|1) MAPS
	echo '{"cniVersion":"1.0.0","name":"rnbrnat'"$1"'","type":"rnat","bridge":"rnbrnat'"$1"'","subnet":"'"${NETS[$1]}"'","stateDir":"'"$WORK"'/rnat","runtimeConfig":{"portMappings":'"$2"'}}'
}
br_conf() { # NET(0|1)
	echo '{"cniVersion":"1.0.0","name":"rnbcni'"$1"'","type":"bridge","bridge":"rnbcni'"$1"'","isGateway":true,"ipMasq":true,"hairpinMode":true,"ipam":{"type":"host-local","dataDir":"'"$WORK"'/ipam","ranges":[[{"subnet":"'"${NETS[$1]}"'"}]],"routes":[{"dst":"0.0.0.0/0"}]}}'
}
net_of() { echo $(($1 > 250 ? 1 : 0)); }
pm_conf() { # NET PREVRESULT MAPS
	echo '{"cniVersion":"1.0.0","name":"rnbcni'"$1"'","type":"portmap","capabilities":{"portMappings":true},"snat":true,"runtimeConfig":{"portMappings":'"$3"'},"prevResult":'"$2"'}'
}
chain_add() { # ID NET MAPS -> RES
	local r
	r=$(plugin "$CNI_DIR/bridge" ADD "$1" "$(br_conf "$2")")
	plugin "$CNI_DIR/portmap" ADD "$1" "$(pm_conf "$2" "$r" "$3")" >/dev/null
	RES=$r
}
chain_del() { # ID NET MAPS PREV
	plugin "$CNI_DIR/portmap" DEL "$1" "$(pm_conf "$2" "$4" "$3")" >/dev/null
	plugin "$CNI_DIR/bridge" DEL "$1" "$(br_conf "$2")" >/dev/null
}

# ---- 1. ADD + DEL, one attachment, one port -------------------------------------------------
log "1: ADD + DEL x $ROUNDS (after one warm-up round each)"
M=$(maps 8080 1)
: >"$WORK/s1.rnat"; : >"$WORK/s1.cni"
for ((r = 0; r <= ROUNDS; r++)); do
	newns "$r"
	now_us; t0=$NOW
	plugin "$RNAT" ADD "$r" "$(rnat_conf 0 "$M")" >/dev/null
	plugin "$RNAT" DEL "$r" "$(rnat_conf 0 "$M")" >/dev/null
	now_us; t1=$NOW
	chain_add "$r" 0 "$M"
	chain_del "$r" 0 "$M" "$RES"
	now_us; t2=$NOW
	delns "$r"
	((r == 0)) && continue
	echo $((t1 - t0)) >>"$WORK/s1.rnat"
	echo $((t2 - t1)) >>"$WORK/s1.cni"
done
S1R=$(median <"$WORK/s1.rnat"); S1C=$(median <"$WORK/s1.cni")

# ---- 2. COUNT attachments in sequence -------------------------------------------------------
seq_adds() { # TOOL -> per-ADD times in $WORK/s2.TOOL
	local tool=$1 i t0 m
	: >"$WORK/s2.$tool"
	for ((i = 1; i <= COUNT; i++)); do
		newns "1$i"
		m=$(maps $((20000 + i)) 1)
		now_us; t0=$NOW
		if [[ $tool == rnat ]]; then
			plugin "$RNAT" ADD "1$i" "$(rnat_conf "$(net_of "$i")" "$m")" >/dev/null
		else
			chain_add "1$i" "$(net_of "$i")" "$m"
			echo "$RES" >"$WORK/res.$i"
		fi
		now_us
		echo $((NOW - t0)) >>"$WORK/s2.$tool"
	done
	for ((i = 1; i <= COUNT; i++)); do
		m=$(maps $((20000 + i)) 1)
		if [[ $tool == rnat ]]; then
			plugin "$RNAT" DEL "1$i" "$(rnat_conf "$(net_of "$i")" "$m")" >/dev/null
		else
			chain_del "1$i" "$(net_of "$i")" "$m" "$(cat "$WORK/res.$i")"
		fi
		delns "1$i"
	done
}
first_last() { # FILE -> "first10 last10 ratio"
	local f l
	f=$(head -n 10 "$1" | median); l=$(tail -n 10 "$1" | median)
	echo "$f $l $(ratio "$l" "$f")"
}
# Before each tool's sequence: write back and wait, so that neither inherits the deletions just
# made (an ext4 without a journal, as on this kind of VM, skips inodes freed in the last minute when
# it allocates one) or namespaces the kernel is still destroying.
settle() {
	((SETTLE > 0)) || return 0
	log "settling for ${SETTLE}s (SETTLE=0 skips)"
	sync
	sleep "$SETTLE"
}
settle
log "2: $COUNT attachments in sequence (rnat)"
seq_adds rnat
read -r S2RF S2RL S2RR < <(first_last "$WORK/s2.rnat")
S2CF=- S2CL=- S2CR=-
if ((PEERS)); then
	settle
	log "2: $COUNT attachments in sequence (CNI chain)"
	seq_adds cni
	read -r S2CF S2CL S2CR < <(first_last "$WORK/s2.cni")
fi

# ---- 3. one ADD with PORTS mappings ---------------------------------------------------------
log "3: one ADD with $PORTS port mappings"
M=$(maps 10000 "$PORTS")
newns 9999
now_us; t0=$NOW
plugin "$RNAT" ADD 9999 "$(rnat_conf 0 "$M")" >/dev/null
now_us; S3R=$((NOW - t0))
elems=$(inh nft -j list map ip rnat pub_any | jq '[.nftables[] | .map? | select(.) | (.elem // []) | length] | add')
plugin "$RNAT" DEL 9999 "$(rnat_conf 0 "$M")" >/dev/null
S3C=-
if ((PEERS)); then
	now_us; t0=$NOW
	chain_add 9999 0 "$M"
	now_us; S3C=$((NOW - t0))
	chain_del 9999 0 "$M" "$RES"
fi
delns 9999

{
	echo "# rnat as a CNI plugin vs the CNI reference chain"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) cores; ROUNDS=$ROUNDS COUNT=$COUNT PORTS=$PORTS PEERS=$PEERS."
	echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
	echo
	echo "| metric | CNI chain | rnat | rnat / chain |"
	echo "|---|---:|---:|---:|"
	echo "| 1. ADD + DEL, one attachment with one port mapping (ms, median) | $(ms "$S1C") | $(ms "$S1R") | $(ratio "$S1R" "$S1C") |"
	echo "| 2. median ADD, first 10 of $COUNT (ms) | $(ms "$S2CF") | $(ms "$S2RF") | |"
	echo "| 2. median ADD, last 10 of $COUNT (ms) | $(ms "$S2CL") | $(ms "$S2RL") | |"
	echo "| 2. last 10 / first 10 | $S2CR | $S2RR | |"
	echo "| 3. one ADD with $PORTS port mappings (ms) | $(ms "$S3C") | $(ms "$S3R") | |"
	echo
	echo "Notes: times exclude creating the container namespace. The chain is bridge + host-local +"
	echo "portmap 1.1.1 (iptables-nft), ADD then portmap ADD with prevResult, DEL in reverse. rnat is one"
	echo "plugin (type rnat, own IPAM, portMappings capability). Section 3 checked: after the ADD, map pub_any held $elems elements."
} | tee "$OUT"
log "written to $OUT"
