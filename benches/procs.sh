# shellcheck shell=bash
# Process helpers shared by the benchmark scripts (sourced). They act by PID only: a tree is
# collected from /proc/PID/task/*/children first, then signalled.

# descendants PID: every descendant's PID, one per line (no $(<file): in bash an unreadable file
# there aborts a `set -e` shell)
descendants() {
	local c f kids
	for f in /proc/"$1"/task/*/children; do
		kids=()
		{ read -r -a kids <"$f"; } 2>/dev/null || true
		for c in "${kids[@]}"; do
			echo "$c"
			descendants "$c"
		done
	done
}

# kill_tree PID [SIG]: signals PID and all its descendants (collected first), by PID only
kill_tree() {
	local sig=${2:-TERM} pids
	[[ -d /proc/$1 ]] || return 0
	pids="$1 $(descendants "$1" | tr '\n' ' ')"
	# shellcheck disable=SC2086
	kill -s "$sig" $pids 2>/dev/null || true
}

# alive PID: exists and is not a zombie (no fork)
alive() {
	local st
	{ read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
	st=${st##*) }
	[[ ${st:0:1} != Z ]]
}

# stop_tree PID [GRACE]: TERM the process, wait up to GRACE seconds (default $STOP_GRACE or 5),
# then KILL it and what it left. Polls with the caller's fork-free `snooze` when it has one.
stop_tree() {
	local pid=$1 grace=${2:-${STOP_GRACE:-5}} kids i
	[[ -n $pid ]] || return 0
	alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
	kids=$(descendants "$pid" | tr '\n' ' ')
	kill -s TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < grace * 100; i++)); do
		alive "$pid" || break
		if declare -F snooze >/dev/null; then snooze 0.01; else sleep 0.01; fi
	done
	kill_tree "$pid" KILL
	# shellcheck disable=SC2086
	[[ -z ${kids// /} ]] || kill -s KILL $kids 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# median: of the numbers on stdin, one per line
median() {
	sort -g | awk '{a[NR]=$1} END{ if (NR == 0) exit; if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}
