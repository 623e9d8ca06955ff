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
