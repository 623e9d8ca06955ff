#!/usr/bin/env bash
# Rootless benchmark: rnat's user-space NAT (`rnat run` as an ordinary user)
# vs slirp4netns vs pasta, with the kernel's veth + masquerade path as the
# ceiling, all measured in the same run.
#
#   sudo benches/rootless.sh              # full run (ROUNDS=3, SECS=5; ~25 minutes)
#   sudo QUICK=1 benches/rootless.sh      # smoke run (1 round, 2-second runs; ~5 minutes)
#   sudo QUICK=1 SECTIONS=pub benches/rootless.sh   # one section only
#
# Sections (SECTIONS="tcp http udp mem pub" by default):
#   tcp   TCP bulk (iperf3), container -> server and server -> container (-R),
#         at MTU 65520 and at MTU 1500 (the container's interface)
#   http  new connections/s container -> server: wrk with 'Connection: close'
#         against nginx (one worker) serving a small file
#   udp   iperf3 -u container -> server at -b 100M (loss %) and unlimited
#         (-b 0, received Mbit/s)
#   mem   VmRSS of the forwarding process idle, then holding CONNS concurrent
#         idle TCP connections from the container to a server
#   pub   published ports (host port -> container port), servers inside the
#         container: iperf3 from the host namespace's loopback (127.0.0.1) and
#         from upstream (198.51.100.2 -> 198.51.100.1), whether the container
#         saw the upstream client's address, wrk with 'Connection: close' and
#         with PUB_KA_CONNS keep-alive connections against nginx in the
#         container, and VmRSS holding CONNS connections from upstream
#
# Environment knobs (defaults in brackets; QUICK=1 changes the starred ones):
#   RNAT [target/release/rnat]       copied before the run (the tree may be rebuilt meanwhile)
#   ROUNDS* [3 | 1]                  rounds; every figure is the median over them
#   SECS* [5 | 2]  OMIT* [1 | 0]     iperf3/wrk duration; iperf3 seconds omitted first (slow start)
#   CONNS [10000]  CONN_SECS [60]    concurrent connections in `mem`; time allowed to open them
#   WRK_CONNS [8]                    wrk concurrency (each request on a new connection)
#   PUB_KA_CONNS [1000]              keep-alive connections of the `pub` section's second wrk
#   UDP_LEN [1400]                   UDP payload per datagram
#   UPLINK_MTU [1500]                MTU of the host <-> upstream link
#   FWD_NOFILE [524288:524288]       RLIMIT_NOFILE soft:hard the forwarders start with. Podman
#                                    raises its soft limit to the hard one before it starts
#                                    slirp4netns or pasta; 1024:524288 is a login shell's default,
#                                    with which slirp4netns holds ~1,000 connections and resets
#                                    new ones under the HTTP load (rnat raises its own limit)
#   TOOLS ["rnat slirp4netns pasta kernel"]   SECTIONS ["tcp http udp mem pub"]
#   OUT [benches/results/rootless-YYYYmmdd-HHMM[-quick].md] (a .csv of the medians goes next to it)
#   SVG [docs/rootless-throughput.svg; with QUICK: next to OUT]  (benches/plot_rootless.py)
#   PYTHON [/usr/bin/python3]  KEEP_WORK=1 keeps the logs
#   RNAT_LOG [unset]                 passed to rnat (RNAT_LOG=debug logs its counters at each stop)
#
# Topology (all namespaces created here, names rnbr-*-<PID>):
#
#   container ns --(tap0 10.0.2.100, tool)--> host ns rnbr-host-PID --veth--> upstream rnbr-up-PID
#                                             198.51.100.1                    198.51.100.2: iperf3,
#                                                                             httpd, hold server
#
# `pub` turns it around: the servers (iperf3, nginx, the hold server) run in
# the container, the tool publishes host ports 9201, 9080, 9700 of the host
# namespace to container ports 5201, 80, 7000, and the clients run in the host
# namespace (to 127.0.0.1) and in upstream (to 198.51.100.1).
#
# The rootless tools run inside the host namespace as the unprivileged user
# rnat-test (setpriv), so their host sockets leave from 198.51.100.1. The
# kernel case is a root-made namespace joined to the host namespace by a veth
# (10.0.2.2 <-> 10.0.2.100) with nftables masquerade. Clients run inside each
# container's network namespace through nsenter (as root: only the network
# namespace is shared, and the path the packets take is the tool's).
#
# Safety: nothing in the root network namespace is changed; every link,
# route, sysctl and nftables table lives in the namespaces above. The only
# host-wide changes are creating the rnat-test system user if it is missing
# and making /dev/net/tun 0666 if it is not (as most distributions ship it).
# The EXIT/INT/TERM trap kills the processes this run started (by PID, and by
# a unique tag in their environment) and deletes its namespaces.

set -euo pipefail
export LC_ALL=C

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)

BUSYBOX=${BUSYBOX:-/usr/bin/busybox}
SLIRP4NETNS=${SLIRP4NETNS:-/usr/bin/slirp4netns}
PASTA=${PASTA:-/usr/bin/pasta}
PYTHON=${PYTHON:-/usr/bin/python3}
USER_NAME=rnat-test
UP_IP=198.51.100.2
HOST_IP=198.51.100.1
GUEST_IP=10.0.2.100
GW_IP=10.0.2.2
DNS_IP=10.0.2.3
IPERF_PORT=5201
HTTP_PORT=8080
HOLD_PORT=7000
# pub: host port (in the host namespace) -> container port
PUB_IPERF=9201 CT_IPERF=5201
PUB_HTTP=9080 CT_HTTP=80
PUB_HOLD=9700 CT_HOLD=7000
CLEAN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[rootless %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- processes --
# shellcheck source=benches/procs.sh
. "$(dirname "${BASH_SOURCE[0]}")/procs.sh"


# ================================================================ SETTINGS ===
QSUFFIX=""
if [[ ${QUICK:-0} == 1 ]]; then
	: "${ROUNDS:=1}" "${SECS:=2}" "${OMIT:=0}"
	QSUFFIX=-quick
fi
: "${ROUNDS:=3}" "${SECS:=5}" "${OMIT:=1}" "${CONNS:=10000}" "${CONN_SECS:=60}" "${WRK_CONNS:=8}"
: "${UDP_LEN:=1400}" "${UPLINK_MTU:=1500}" "${FWD_NOFILE:=524288:524288}"
: "${PUB_KA_CONNS:=1000}"
: "${TOOLS:=rnat slirp4netns pasta kernel}" "${SECTIONS:=tcp http udp mem pub}"
STAMP=$(date +%Y%m%d-%H%M)
# a smoke run must not pass for a real one in results/
OUT=$(realpath -m "${OUT:-$ROOT/benches/results/rootless-$STAMP$QSUFFIX.md}")
CSV=${OUT%.md}.csv
if [[ -n $QSUFFIX ]]; then
	SVG=$(realpath -m "${SVG:-${OUT%.md}.svg}")
else
	SVG=$(realpath -m "${SVG:-$ROOT/docs/rootless-throughput.svg}")
fi
RNAT_SRC=$(realpath -m "${RNAT:-$ROOT/target/release/rnat}")

for v in ROUNDS SECS CONNS CONN_SECS WRK_CONNS UDP_LEN UPLINK_MTU PUB_KA_CONNS; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer" >&2; exit 2; }
done
[[ $OMIT =~ ^[0-9]+$ ]] || { echo "OMIT must be a non-negative integer" >&2; exit 2; }
[[ $FWD_NOFILE =~ ^[0-9]+:[0-9]+$ ]] || { echo "FWD_NOFILE must be SOFT:HARD" >&2; exit 2; }
((CONNS <= 60000)) || { echo "CONNS must be <= 60000 (one source address)" >&2; exit 2; }
for t in $TOOLS; do
	[[ $t =~ ^(rnat|slirp4netns|pasta|kernel)$ ]] || { echo "unknown tool in TOOLS: $t" >&2; exit 2; }
done
for s in $SECTIONS; do
	[[ $s =~ ^(tcp|http|udp|mem|pub)$ ]] || { echo "unknown section in SECTIONS: $s" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "must run as root (it builds namespaces; the tools run as $USER_NAME)" >&2; exit 2; }
# shellcheck source=../scripts/lib.sh
source "$(dirname "$0")/../scripts/lib.sh"
install_missing rootless.sh iperf3 wrk jq nginx-light slirp4netns passt nftables
for c in ip nsenter unshare setpriv prlimit nft iperf3 wrk jq timeout ss nginx sysctl; do
	command -v "$c" >/dev/null || { echo "missing: $c" >&2; exit 2; }
done
for f in "$BUSYBOX" "$PYTHON"; do [[ -x $f ]] || { echo "missing: $f" >&2; exit 2; }; done

have() { [[ " $TOOLS " == *" $1 "* ]]; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# ================================================================ STATE ======
RUN=$$
HOSTNS=rnbr-host-$RUN
UPNS=rnbr-up-$RUN
KNS=rnbr-k-$RUN
WORK=$(mktemp -d /tmp/rnbr-bench.XXXXXX)
# the tools run as rnat-test and read the rnat copy from here
chmod 755 "$WORK"
RNB_TAG="rnbr$RUN-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
export RNB_TAG
PIDS=()          # long-lived helpers (servers), stopped at exit
IPERF_PID="" HTTPD_PID=""
FWD_PID="" SLEEPER_PID="" CT_NS="" CT_ERR=""
CLIENT_PID="" HOLD_PID=""   # the mem section's client and server
PUBLISH=0        # 1: start_ct publishes the pub section's ports and starts servers in the container
CT_IPERF_PID="" CT_HTTPD_PID=""   # those servers, stopped with their container
PUB_KERNEL=0     # 1 while the kernel row's DNAT table and route_localnet are in place
NOTES=()
# a tool that fails at start fails the same way in every case and round: once is enough
note() {
	local n
	for n in "${NOTES[@]}"; do [[ $n != "$*" ]] || return 0; done
	NOTES+=("$*")
	log "note: $*"
}

cleanup() {
	local rc=$? p i
	trap - EXIT INT TERM HUP
	# keep cleaning even if stdout went away (e.g. `| tee` killed by ^C)
	trap '' PIPE INT HUP
	stop_tree "$CLIENT_PID" 1
	stop_tree "$HOLD_PID" 1
	stop_tree "$CT_IPERF_PID" 1
	stop_tree "$CT_HTTPD_PID" 1
	stop_tree "$FWD_PID" 2
	stop_tree "$SLEEPER_PID" 1
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_tree "${PIDS[i]}" 2; done
	# last resort: anything carrying this run's tag (e.g. orphans of a killed tool)
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[[ $p != "$$" && $p != "$BASHPID" ]] || continue
		if grep -qz "^RNB_TAG=$RNB_TAG\$" "/proc/$p/environ" 2>/dev/null; then kill -s KILL "$p" 2>/dev/null || true; fi
	done
	for n in "$KNS" "$HOSTNS" "$UPNS"; do ip netns del "$n" 2>/dev/null || true; done
	if [[ ${KEEP_WORK:-0} == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ================================================================ PREFLIGHT ==
if ! id "$USER_NAME" >/dev/null 2>&1; then
	log "creating system user $USER_NAME"
	useradd --system --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
# rootless tools open /dev/net/tun inside their user namespace: that needs the
# distributions' usual mode, not root-only
if [[ $(stat -c %a /dev/net/tun) != 666 ]]; then
	note "/dev/net/tun was mode $(stat -c %a /dev/net/tun); set to 0666 (left so)"
	chmod 0666 /dev/net/tun
fi

# host_user CMD...: CMD in the host namespace as the unprivileged user, with a
# clean environment (as a login would give), the forwarders' file limit, and /
# as cwd (rnat keeps the caller's). It execs, so `host_user ... &` leaves $! =
# CMD's PID; call it only in a subshell (`&` or $(...)).
host_user() {
	cd / && exec ip netns exec "$HOSTNS" prlimit --nofile="$FWD_NOFILE" -- \
		setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --clear-groups \
		env -i PATH="$CLEAN_PATH" HOME=/ LC_ALL=C RNB_TAG="$RNB_TAG" RNAT_LOG="${RNAT_LOG:-}" "$@"
}

# Raising a hard limit needs CAP_SYS_RESOURCE, which some containers drop:
# then keep the forwarders within our own hard limit, and say so.
if ! prlimit --nofile="$FWD_NOFILE" -- true 2>/dev/null; then
	soft=${FWD_NOFILE%:*} hard=${FWD_NOFILE#*:} cur=$(ulimit -Hn)
	if [[ $cur =~ ^[0-9]+$ ]] && ((hard > cur)); then hard=$cur; fi
	((soft <= hard)) || soft=$hard
	note "cannot set RLIMIT_NOFILE $FWD_NOFILE here (no CAP_SYS_RESOURCE?): the forwarders start with $soft:$hard"
	FWD_NOFILE=$soft:$hard
fi

# a private copy: the developer may rebuild target/release while this runs
RNAT="" RNAT_DESC="not run"
if have rnat; then
	if [[ -x $RNAT_SRC ]]; then
		RNAT=$WORK/rnat
		install -m 755 "$RNAT_SRC" "$RNAT"
		# the binary's own digest tells apart two builds of one tree (an A/B with RNAT=)
		RNAT_DESC="$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), binary $RNAT_SRC built $(date -r "$RNAT_SRC" '+%Y-%m-%d %H:%M'), sha256 $(sha256sum "$RNAT_SRC" | cut -c1-12)"
	else
		note "rnat binary not found at $RNAT_SRC: rnat skipped (cargo build --release, or set RNAT=)"
		TOOLS=${TOOLS/rnat/}
	fi
fi
for t in slirp4netns pasta; do
	bin=$SLIRP4NETNS
	[[ $t == slirp4netns ]] || bin=$PASTA
	if have "$t" && [[ ! -x $bin ]]; then
		note "$t not found at $bin: skipped"
		TOOLS=${TOOLS/$t/}
	fi
done


# ================================================================ TOPOLOGY ===
topology() {
	ip netns add "$HOSTNS"
	ip netns add "$UPNS"
	ip -n "$HOSTNS" link set lo up
	ip -n "$UPNS" link set lo up
	ip -n "$HOSTNS" link add rnbr-up0 mtu "$UPLINK_MTU" type veth peer name rnbr-host0 netns "$UPNS"
	ip -n "$UPNS" link set rnbr-host0 mtu "$UPLINK_MTU"
	ip -n "$HOSTNS" addr add "$HOST_IP/24" dev rnbr-up0
	ip -n "$UPNS" addr add "$UP_IP/24" dev rnbr-host0
	ip -n "$HOSTNS" link set rnbr-up0 up
	ip -n "$UPNS" link set rnbr-host0 up
	# pasta wants an interface with a default route; upstream does not
	# forward, so nothing leaves these namespaces
	ip -n "$HOSTNS" route add default via "$UP_IP"
	# ping sockets for the user-space tools' ICMP; the wider port range and
	# TIME_WAIT reuse because the HTTP test opens tens of thousands of
	# connections, from the host namespace in the user-space cases.
	# That range holds the published ports: a tool's outgoing connection (mem
	# opens CONNS of them) that drew one as its source port leaves a TIME_WAIT
	# socket for 60 s, and the next pub case's listener on that port fails
	# with "Address already in use" (the tools' outgoing sockets have no
	# SO_REUSEADDR). Reserved ports are never picked as source ports.
	ip netns exec "$HOSTNS" sysctl -qw net.ipv4.ping_group_range="0 2147483647" \
		net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1 \
		net.ipv4.ip_local_reserved_ports="$PUB_IPERF,$PUB_HTTP,$PUB_HOLD"
	# in pub the clients are upstream: the same client-side settings there,
	# keeping the ports of upstream's servers (restarted between cases) out
	# of the range for the same reason
	! want pub || ip netns exec "$UPNS" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1 \
		net.ipv4.ip_local_reserved_ports="$IPERF_PORT,$HTTP_PORT,$HOLD_PORT"
	if have kernel; then
		ip netns exec "$HOSTNS" sysctl -qw net.ipv4.ip_forward=1
		ip netns exec "$HOSTNS" nft -f - <<-EOF
			table ip rnbr {
				chain post {
					type nat hook postrouting priority srcnat; policy accept;
					ip saddr 10.0.2.0/24 oifname "rnbr-up0" masquerade
				}
			}
		EOF
	fi
	HOST_INO=$(stat -L -c %i "/run/netns/$HOSTNS")
}

# wait_listen PORT PROTO(t|u) PID: until the server in upstream listens
wait_listen() { wait_listen_in up "$@"; }
# wait_listen_in WHERE(up|ct) PORT PROTO PID: the same in upstream or in the container
wait_listen_in() {
	local i
	for ((i = 0; i < 100; i++)); do
		alive "$4" || return 1
		[[ -z $("in_$1" ss -Hl"$3"n "sport = :$2") ]] || return 0
		sleep 0.05
	done
	return 1
}
# where clients and servers run: the container's network namespace (as root,
# through nsenter), upstream, the host namespace (the pub section's loopback client)
in_ct() { nsenter --net="$CT_NS" "$@"; }
in_up() { ip netns exec "$UPNS" "$@"; }
in_host() { ip netns exec "$HOSTNS" "$@"; }

start_iperf() {
	ip netns exec "$UPNS" iperf3 -s -p "$IPERF_PORT" </dev/null >>"$WORK/iperf3-server.log" 2>&1 &
	IPERF_PID=$!
	PIDS+=("$IPERF_PID")
	wait_listen "$IPERF_PORT" t "$IPERF_PID" || { echo "iperf3 server did not start" >&2; return 1; }
}
# an iperf3 server stays busy after a client was killed mid-test
restart_iperf() {
	stop_tree "$IPERF_PID" 2
	start_iperf
}

# nginx_conf NAME LISTEN [NOFILE]: $WORK/NAME.conf (pid NAME.pid, errors in NAME.err).
# nginx, one worker: a server that does not fork per connection, so the
# forwarder (not the server) limits the connection rate. busybox httpd
# capped every path, the kernel's included, near 3,000 req/s.
nginx_conf() {
	cat >"$WORK/$1.conf" <<-CONF
		daemon off;
		user root;
		worker_processes 1;${3:+
		worker_rlimit_nofile $3;}
		pid $WORK/$1.pid;
		error_log $WORK/$1.err;
		events { worker_connections 16384; }
		http {
			access_log off;
			client_body_temp_path $WORK/nginx-tmp;
			proxy_temp_path $WORK/nginx-tmp;
			fastcgi_temp_path $WORK/nginx-tmp;
			uwsgi_temp_path $WORK/nginx-tmp;
			scgi_temp_path $WORK/nginx-tmp;
			server { listen $2 backlog=4096; root $WORK/www; }
		}
	CONF
}

start_servers() {
	start_iperf
	mkdir -p "$WORK/www"
	# a small page: the test is about connections, not bytes
	head -c 600 /dev/zero | tr '\0' 'x' >"$WORK/www/index.html"
	nginx_conf nginx "$UP_IP:$HTTP_PORT"
	# pub: the same server inside the container, on all its addresses (rnat's
	# and pasta's loopback clients arrive on the container's 127.0.0.1)
	# (and room for PUB_KA_CONNS connections)
	! want pub || nginx_conf nginx-ct "$CT_HTTP" $((PUB_KA_CONNS + 1024))
	mkdir -p "$WORK/nginx-tmp"
	ip netns exec "$UPNS" nginx -c "$WORK/nginx.conf" </dev/null >>"$WORK/httpd.log" 2>&1 &
	HTTPD_PID=$!
	PIDS+=("$HTTPD_PID")
	wait_listen "$HTTP_PORT" t "$HTTPD_PID" || { echo "nginx did not start" >&2; cat "$WORK/nginx.err" >&2; return 1; }
}

# ------------------------------------------------------- the hold client/server
# One small python program: `serve` accepts and holds connections, writing
# "OPEN ACCEPTED" to a status file; `client` opens N connections (at most
# WINDOW connects in flight, each given up after 10 s; it stops early when
# none has succeeded for 20 s), writes "HELD n failed started seconds" and
# keeps them open for HOLD seconds; with a last argument "send" it sends one
# byte on each connection once established (pasta forwards an inbound
# connection only once the client has sent something). Both stop at their
# deadlines whatever happens.
write_hold_py() {
	cat >"$WORK/hold.py" <<-'PY'
		import errno, os, resource, selectors, socket, sys, time

		WINDOW = 256
		CONNECT_TIMEOUT = 10.0
		STALL = 20.0

		def nofile(n):
		    want = n + 256
		    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
		    if soft < want:
		        try:
		            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
		        except (ValueError, OSError):  # no CAP_SYS_RESOURCE: as far as allowed
		            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

		def put(path, text):
		    with open(path + ".tmp", "w") as f:
		        f.write(text + "\n")
		    os.replace(path + ".tmp", path)

		def serve(port, n, status, secs):
		    nofile(n)
		    sel = selectors.DefaultSelector()
		    ls = socket.socket()
		    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
		    ls.bind(("0.0.0.0", port))
		    ls.listen(65535)
		    ls.setblocking(False)
		    sel.register(ls, selectors.EVENT_READ)
		    nopen = accepted = 0
		    end = time.monotonic() + secs
		    last = 0.0
		    while time.monotonic() < end:
		        for key, _ in sel.select(0.2):
		            if key.fileobj is ls:
		                for _ in range(1024):
		                    try:
		                        c, _ = ls.accept()
		                    except OSError:
		                        break
		                    c.setblocking(False)
		                    sel.register(c, selectors.EVENT_READ)
		                    nopen += 1
		                    accepted += 1
		            else:
		                c = key.fileobj
		                try:
		                    d = c.recv(4096)
		                except BlockingIOError:
		                    continue
		                except OSError:
		                    d = b""
		                if not d:
		                    sel.unregister(c)
		                    c.close()
		                    nopen -= 1
		        now = time.monotonic()
		        if now - last > 0.2:
		            put(status, f"{nopen} {accepted}")
		            last = now

		def bump(errs, err):
		    k = err if isinstance(err, str) else errno.errorcode.get(err, str(err))
		    errs[k] = errs.get(k, 0) + 1

		def client(host, port, n, secs, hold, status, send):
		    nofile(n)
		    sel = selectors.DefaultSelector()
		    est, pending = [], {}
		    errs = {}  # errno name -> count, for the status line
		    failed = started = last_est = 0
		    t0 = last_progress = time.monotonic()
		    end = t0 + secs
		    while time.monotonic() < end and (started < n or pending):
		        while started < n and len(pending) < WINDOW:
		            s = socket.socket()
		            s.setblocking(False)
		            started += 1
		            err = s.connect_ex((host, port))
		            if err not in (0, errno.EINPROGRESS):
		                failed += 1
		                bump(errs, err)
		                s.close()
		                continue
		            pending[s] = time.monotonic()
		            sel.register(s, selectors.EVENT_WRITE)
		        for key, _ in sel.select(0.2):
		            s = key.fileobj
		            sel.unregister(s)
		            del pending[s]
		            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
		            if err == 0:
		                est.append(s)
		                if send:
		                    try:
		                        s.send(b"x")
		                    except OSError:
		                        pass
		            else:
		                failed += 1
		                bump(errs, err)
		                s.close()
		        now = time.monotonic()
		        if len(est) > last_est:
		            last_est, last_progress = len(est), now
		        for s, t in list(pending.items()):
		            if now - t > CONNECT_TIMEOUT:
		                sel.unregister(s)
		                del pending[s]
		                s.close()
		                failed += 1
		                bump(errs, "timeout")
		        # a path that stopped taking connections (e.g. out of fds) would
		        # only burn the time budget on timeouts
		        if failed and now - last_progress > STALL:
		            break
		    why = ",".join(f"{k}:{v}" for k, v in sorted(errs.items()))
		    put(status, f"HELD {len(est)} {failed} {started} {time.monotonic() - t0:.1f} {why}".rstrip())
		    time.sleep(hold)

		if sys.argv[1] == "serve":
		    serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
		else:
		    client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
		           float(sys.argv[6]), sys.argv[7], sys.argv[8:] == ["send"])
	PY
}

# ================================================================ INSTANCES ==
# start_ct TOOL MTU: a container served by TOOL -> CT_NS (its netns path),
# FWD_PID (the forwarding process; empty for the kernel), SLEEPER_PID.
# On failure returns 1 with the reason in CT_ERR.
LIFE=3600    # upper bound on a container's life, whatever happens to this script
CASE_N=0
start_ct() {
	local tool=$1 mtu=$2 i d log
	CASE_N=$((CASE_N + 1))
	# one log per case: the tool's output and every client's
	CT_LOG=$WORK/case$CASE_N-$tool-$mtu.log
	log=$CT_LOG
	CT_NS="" FWD_PID="" SLEEPER_PID="" CT_ERR=""
	: >"$log"
	if ((PUBLISH)) && have kernel; then
		local e
		e=$(ct_flush 2>&1) || note "pub: could not flush the host netns's conntrack table ($e): a reused client port may meet a stale entry"
	fi
	case $tool in
	rnat)
		local pub=()
		((PUBLISH == 0)) || pub=(-p "$PUB_IPERF:$CT_IPERF" -p "$PUB_HTTP:$CT_HTTP" -p "$PUB_HOLD:$CT_HOLD")
		host_user "$RNAT" run --mtu "$mtu" "${pub[@]}" -- sleep "$LIFE" </dev/null >>"$log" 2>&1 &
		FWD_PID=$!
		;;
	slirp4netns | pasta)
		# the workload's namespaces first, as Podman does, then the tool joins them
		host_user unshare --user --map-root-user --net -- sleep "$LIFE" </dev/null >>"$log" 2>&1 &
		SLEEPER_PID=$!
		for ((i = 0; i < 200; i++)); do
			[[ $(stat -L -c %i "/proc/$SLEEPER_PID/ns/net" 2>/dev/null) == "$HOST_INO" ||
				$(cat "/proc/$SLEEPER_PID/comm" 2>/dev/null) != sleep ]] || break
			alive "$SLEEPER_PID" || break
			sleep 0.02
		done
		CT_NS=/proc/$SLEEPER_PID/ns/net
		if [[ $tool == slirp4netns ]]; then
			local api=()
			if ((PUBLISH)); then
				# slirp4netns publishes through its API socket (pub_setup); the
				# directory is the unprivileged user's, the socket its
				SLIRP_API=$WORK/slirp-api-$CASE_N
				install -d -m 700 -o "$USER_NAME" -g "$USER_NAME" "$SLIRP_API"
				SLIRP_API+=/api.sock
				api=(--api-socket "$SLIRP_API")
			fi
			set -- "$SLIRP4NETNS" --configure --mtu="$mtu" --disable-host-loopback "${api[@]}" "$SLEEPER_PID" tap0
		else
			# our addresses instead of the host's (-a/-n/-g), no gateway-to-host
			# mapping (the counterpart of --disable-host-loopback), no port
			# forwarding either way (pub: the section's ports host -> container),
			# IPv4 only like the others
			local tcp=(-t none)
			((PUBLISH == 0)) || tcp=(-t "$PUB_IPERF:$CT_IPERF" -t "$PUB_HTTP:$CT_HTTP" -t "$PUB_HOLD:$CT_HOLD")
			set -- "$PASTA" -f -q --config-net -4 -I tap0 -a "$GUEST_IP" -n 24 -g "$GW_IP" \
				--no-map-gw --dns-forward "$DNS_IP" -m "$mtu" "${tcp[@]}" -u none -T none -U none "$SLEEPER_PID"
		fi
		host_user "$@" </dev/null >>"$log" 2>&1 &
		FWD_PID=$!
		;;
	kernel)
		# (start_ct runs under `if !`, so set -e does not stop at a failed
		# step here: check them, or the case waits 30 s on a broken path)
		local e
		if ! e=$({
			ip netns add "$KNS" &&
				ip -n "$KNS" link set lo up &&
				ip -n "$HOSTNS" link add rnbr-k0 mtu "$mtu" type veth peer name tap0 netns "$KNS" &&
				ip -n "$KNS" link set tap0 mtu "$mtu" &&
				ip -n "$HOSTNS" addr add "$GW_IP/24" dev rnbr-k0 &&
				ip -n "$KNS" addr add "$GUEST_IP/24" dev tap0 &&
				ip -n "$HOSTNS" link set rnbr-k0 up &&
				ip -n "$KNS" link set tap0 up &&
				ip -n "$KNS" route add default via "$GW_IP"
		} 2>&1); then
			CT_ERR="kernel: setting up the container's namespace failed: $(tr '\n' ' ' <<<"$e")"
			return 1
		fi
		CT_NS=/run/netns/$KNS
		;;
	esac
	# ready = the server answers through the container's path
	for ((i = 0; i < 300; i++)); do
		if [[ -n $FWD_PID ]] && ! alive "$FWD_PID"; then
			CT_ERR="$tool exited at start: $(grep -v 'Failed to send' "$log" | tail -n 3 | tr '\n' ' ')"
			return 1
		fi
		if [[ $tool == rnat && -z $CT_NS ]]; then
			# the container is rnat's child in another network namespace
			for d in $(descendants "$FWD_PID"); do
				if [[ $(stat -L -c %i "/proc/$d/ns/net" 2>/dev/null) != "$HOST_INO" ]]; then
					CT_NS=/proc/$d/ns/net SLEEPER_PID=$d
					break
				fi
			done
		fi
		if [[ -n $CT_NS ]] && nsenter --net="$CT_NS" timeout 1 bash -c \
			"exec 3<>/dev/tcp/$UP_IP/$HTTP_PORT" 2>/dev/null; then
			# same client-side settings in every container: see topology()
			nsenter --net="$CT_NS" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
			local got
			# (ip, not /sys: nsenter --net keeps the root namespace's sysfs)
			got=$(nsenter --net="$CT_NS" ip -o link show tap0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
			[[ $got == "$mtu" ]] || note "$tool: tap0 MTU is $got, asked for $mtu"
			((PUBLISH == 0)) || pub_setup "$tool" || return 1
			return 0
		fi
		sleep 0.1
	done
	CT_ERR="$tool: no connection to $UP_IP:$HTTP_PORT from the container within 30 s: $(grep -v 'Failed to send' "$log" | tail -n 3 | tr '\n' ' ')"
	return 1
}

stop_ct() {
	stop_tree "$CT_IPERF_PID" 2
	stop_tree "$CT_HTTPD_PID" 2
	CT_IPERF_PID="" CT_HTTPD_PID=""
	if ((PUB_KERNEL)); then
		ip netns exec "$HOSTNS" nft delete table ip rnbr_pub 2>/dev/null || true
		ip netns exec "$HOSTNS" sysctl -qw net.ipv4.conf.all.route_localnet=0 || true
		PUB_KERNEL=0
	fi
	# TERM the forwarder first: rnat forwards it to its container
	stop_tree "$FWD_PID" 5
	stop_tree "$SLEEPER_PID" 2
	# kernel: delete the veth before the namespace. `ip netns del` only drops
	# the name; the namespace, and with it the veth whose host end is
	# rnbr-k0, lives on until its last socket is gone, and sockets still
	# closing (the CONNS held connections of m_mem and m_pubmem) can keep it
	# for minutes (e.g. when the next pub case's conntrack flush drops the NAT
	# state their FIN exchange needs). The next kernel case's rnbr-k0 then
	# exists already ("File exists"). Deleting one end removes the pair at once.
	ip -n "$HOSTNS" link del rnbr-k0 2>/dev/null || true
	ip netns del "$KNS" 2>/dev/null || true
	FWD_PID="" SLEEPER_PID="" CT_NS=""
}

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null; }

# ================================================================ MEASURES ===
# Each prints its figure(s) or nothing, and appends to the tool's log.
RAW=$WORK/raw
rec() { echo "$1 $2 $3" >>"$RAW"; }   # METRIC TOOL VALUE

# iperf_client LOG HEADER WHERE ADDR PORT ARGS...: one iperf3 client run in namespace WHERE
# (ct, host, up) against ADDR:PORT -> its JSON in $J (appended to LOG under HEADER), or return 1
# with the reason in IPERF_ERR
iperf_client() {
	local log=$1 header=$2 where=$3 addr=$4 port=$5 rc=0
	shift 5
	"in_$where" timeout $((SECS + OMIT + 20)) iperf3 -c "$addr" -p "$port" -t "$SECS" -O "$OMIT" -J "$@" \
		>"$WORK/iperf.json" 2>&1 || rc=$?
	J=$(<"$WORK/iperf.json")
	printf '%s\n' "$header" "$J" >>"$log"
	if ((rc != 0)) || ! jq -e '.end.sum_received' <<<"$J" >/dev/null 2>&1; then
		IPERF_ERR=$(jq -r '.error // empty' <<<"$J" 2>/dev/null | head -n 1 || true)
		[[ -n $IPERF_ERR ]] || IPERF_ERR="exit $rc: $(tail -n 2 <<<"$J" | tr '\n' ' ')"
		return 1
	fi
}

# iperf_json LOG ARGS...: one iperf3 client run from the container to the upstream server -> its
# JSON in $J, or return 1 with the reason in IPERF_ERR (not in a subshell: restart_iperf updates
# state)
iperf_json() {
	local log=$1
	shift
	iperf_client "$log" "== iperf3 $*" ct "$UP_IP" "$IPERF_PORT" "$@" && return 0
	restart_iperf
	return 1
}

m_tcp() { # TOOL MTU
	local tool=$1 mtu=$2 dir
	for dir in up down; do
		local args=()
		[[ $dir == up ]] || args=(-R)
		if iperf_json "$CT_LOG" "${args[@]}"; then
			rec "tcp_${dir}_$mtu" "$tool" "$(jq '.end.sum_received.bits_per_second / 1e9' <<<"$J")"
		else
			note "tcp $dir MTU $mtu ($tool) failed: $IPERF_ERR"
		fi
	done
}

m_http() { # TOOL
	local tool=$1 out rps errs
	out=$(in_ct timeout $((SECS + 30)) wrk -t1 -c"$WRK_CONNS" -d"${SECS}s" -H 'Connection: close' \
		"http://$UP_IP:$HTTP_PORT/" 2>&1) || true
	printf '%s\n' "== wrk" "$out" >>"$CT_LOG"
	rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
	errs=$(awk '/Socket errors:/{gsub(",", ""); print $4+$6+$8+$10} /Non-2xx/{print $NF}' <<<"$out" |
		awk '{s+=$1} END{print s+0}')
	if [[ -n $rps ]]; then
		rec http_rps "$tool" "$rps"
		rec http_err "$tool" "$errs"
	else
		note "http ($tool) failed: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
	fi
}

# udp_counters: "InDatagrams RcvbufErrors" of the upstream netns's UDP, whose
# only UDP receiver is the iperf3 server (/proc/net follows the reader's netns)
udp_counters() {
	# shellcheck disable=SC2016 # awk's $, not the shell's
	in_up awk '$1 == "Udp:" { if (!n) { for (i = 2; i <= NF; i++) { if ($i == "InDatagrams") a = i; if ($i == "RcvbufErrors") b = i }; n = 1 } else print $a + 0, $b + 0 }' \
		/proc/net/snmp 2>/dev/null || echo "0 0"
}

m_udp() { # TOOL
	local tool=$1 rate c0 c1 i0 e0 i1 e1
	for rate in 100M 0; do
		c0=$(udp_counters)
		if iperf_json "$CT_LOG" -u -b "$rate" -l "$UDP_LEN"; then
			c1=$(udp_counters)
			rec "udp_loss_$rate" "$tool" "$(jq '.end.sum_received.lost_percent' <<<"$J")"
			rec "udp_mbps_$rate" "$tool" "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$J")"
			# Where the loss happens: datagrams that reached the server's socket, whether
			# it took them or dropped them for a full buffer (RcvbufErrors), as a rate:
			# the received rate scaled by (taken + dropped) / taken over the whole run.
			read -r i0 e0 <<<"$c0"
			read -r i1 e1 <<<"$c1"
			if ((i1 > i0)); then
				rec "udp_sock_mbps_$rate" "$tool" "$(jq -n --argjson r "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$J")" \
					--argjson i $((i1 - i0)) --argjson e $((e1 - e0)) '$r * ($i + $e) / $i')"
				rec "udp_sock_drop_$rate" "$tool" "$(jq -n --argjson i $((i1 - i0)) --argjson e $((e1 - e0)) '100 * $e / ($i + $e)')"
			fi
		else
			note "udp -b $rate ($tool) failed: $IPERF_ERR"
		fi
	done
}

m_mem() { # TOOL: a fresh container; idle RSS, then CONNS held connections
	hold_measure "$1" mem "" up "$HOLD_PORT" ct "$UP_IP" "$HOLD_PORT"
}

# hold_measure TOOL SECTION PREFIX SRV_WHERE SRV_PORT CL_WHERE DST_IP DST_PORT [send]:
# idle RSS of the forwarder, then the hold server in SRV_WHERE (up|ct) and the
# hold client in CL_WHERE connecting CONNS times to DST_IP:DST_PORT (sending a
# byte on each with "send"); records PREFIXrss_idle, PREFIXrss_conns, PREFIXconns_held
hold_measure() {
	local tool=$1 sec=$2 pfx=$3 sw=$4 sport=$5 cw=$6 dip=$7 dport=$8 send=${9:-} i held srv line st
	st=$WORK/hold-$sec-$tool
	if [[ -n $FWD_PID ]]; then
		sleep 1
		rec "${pfx}rss_idle" "$tool" "$(rss_kb "$FWD_PID")"
	fi
	rm -f "$st.srv" "$st.cl"
	"in_$sw" "$PYTHON" "$WORK/hold.py" serve "$sport" "$CONNS" "$st.srv" $((CONN_SECS + 60)) \
		</dev/null >>"$WORK/hold-server.log" 2>&1 &
	HOLD_PID=$!
	if ! wait_listen_in "$sw" "$sport" t "$HOLD_PID"; then
		note "$sec ($tool): the hold server did not start: $(tail -n 2 "$WORK/hold-server.log" | tr '\n' ' ')"
		stop_tree "$HOLD_PID" 1
		HOLD_PID=""
		return 0
	fi
	"in_$cw" timeout -k 5 $((CONN_SECS + 30)) "$PYTHON" "$WORK/hold.py" client "$dip" "$dport" "$CONNS" \
		"$CONN_SECS" 20 "$st.cl" ${send:+"$send"} </dev/null >>"$WORK/hold-client.log" 2>&1 &
	CLIENT_PID=$!
	for ((i = 0; i < (CONN_SECS + 15) * 10; i++)); do
		[[ ! -s $st.cl ]] || break
		alive "$CLIENT_PID" || break
		sleep 0.1
	done
	line=$(cat "$st.cl" 2>/dev/null || true)
	if [[ $line == HELD* ]]; then
		# let the forwarder finish its side of the last handshakes
		sleep 1
		[[ -z $FWD_PID ]] || rec "${pfx}rss_conns" "$tool" "$(rss_kb "$FWD_PID")"
		srv=$(awk '{print $1}' "$st.srv" 2>/dev/null || true)
		srv=${srv:-0}
		held=$(awk '{print $2}' <<<"$line")
		# what reached the server and is still open is what the path holds
		rec "${pfx}conns_held" "$tool" "$srv"
		echo "$sec $tool $line server_open=$srv" >>"$WORK/hold-client.log"
		((srv == held)) || note "$sec ($tool): the client saw $held connections established, the server $srv open"
		if ((srv < CONNS)); then
			local why lim=""
			why=$(grep -v 'Failed to send' "$CT_LOG" 2>/dev/null | grep -i -m1 -E 'too many|emfile|error|fail' || true)
			# whether the tool raised its own fd limit explains most shortfalls
			[[ -z $FWD_PID ]] || lim=$(awk '/^Max open files/{print $4":"$5}' "/proc/$FWD_PID/limits" 2>/dev/null || true)
			note "$sec ($tool): held $srv of $CONNS connections (client: $(awk '{print $3" failed of "$4" started in "$5" s"($6 ? " ("$6")" : "")}' <<<"$line"))${lim:+; its RLIMIT_NOFILE soft:hard was $lim}${why:+; its log: $why}"
		fi
	else
		note "$sec ($tool): the client did not report: $(tail -n 2 "$WORK/hold-client.log" | tr '\n' ' ')"
	fi
	stop_tree "$CLIENT_PID" 2
	CLIENT_PID=""
	stop_tree "$HOLD_PID" 2
	HOLD_PID=""
}

# ------------------------------------------------------------------ pub -----
# pub_setup TOOL (from start_ct, PUBLISH=1): publish host ports PUB_* to the
# container's CT_* (slirp4netns: through its API socket; kernel: DNAT in the
# host namespace; rnat and pasta were given them on their command line), start
# iperf3 and nginx in the container, and wait until nginx answers through the
# published port from upstream. On failure returns 1 with the reason in CT_ERR.
pub_setup() {
	local tool=$1 i pair reply got
	local pairs=("$PUB_IPERF:$CT_IPERF" "$PUB_HTTP:$CT_HTTP" "$PUB_HOLD:$CT_HOLD")
	case $tool in
	slirp4netns)
		for pair in "${pairs[@]}"; do
			reply=$(timeout 10 "$PYTHON" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
s.shutdown(socket.SHUT_WR)
print(s.recv(65536).decode().strip())' "$SLIRP_API" \
				"{\"execute\":\"add_hostfwd\",\"arguments\":{\"proto\":\"tcp\",\"host_addr\":\"0.0.0.0\",\"host_port\":${pair%:*},\"guest_port\":${pair#*:}}}" \
				2>&1) || true
			echo "== add_hostfwd $pair: $reply" >>"$CT_LOG"
			if ! jq -e '.return' <<<"$reply" >/dev/null 2>&1; then
				CT_ERR="slirp4netns add_hostfwd $pair failed: $(tail -n 1 <<<"${reply:-no reply}")"
				return 1
			fi
		done
		;;
	kernel)
		# upstream clients: DNAT on the uplink. Loopback clients: DNAT in
		# output, and a 127.0.0.1 source may leave lo only with route_localnet
		# (then masqueraded to the veth's address)
		PUB_KERNEL=1
		if ! reply=$({
			echo "table ip rnbr_pub {"
			echo "  chain pre { type nat hook prerouting priority dstnat; policy accept;"
			for pair in "${pairs[@]}"; do
				echo "    iifname \"rnbr-up0\" ip daddr $HOST_IP tcp dport ${pair%:*} dnat to $GUEST_IP:${pair#*:}"
			done
			echo "  }"
			echo "  chain out { type nat hook output priority -100; policy accept;"
			for pair in "${pairs[@]}"; do
				echo "    ip daddr 127.0.0.1 tcp dport ${pair%:*} dnat to $GUEST_IP:${pair#*:}"
			done
			echo "  }"
			echo "  chain post { type nat hook postrouting priority srcnat; policy accept;"
			echo "    ip saddr 127.0.0.0/8 oifname \"rnbr-k0\" masquerade"
			echo "  }"
			echo "}"
		} | ip netns exec "$HOSTNS" nft -f - 2>&1); then
			CT_ERR="kernel: the DNAT table failed: $reply"
			return 1
		fi
		ip netns exec "$HOSTNS" sysctl -qw net.ipv4.conf.all.route_localnet=1
		;;
	esac
	CT_IPERF_LOG=$WORK/case$CASE_N-$tool-ct-iperf3.log
	start_ct_iperf || { CT_ERR="$tool: iperf3 -s in the container did not start: $(tail -n 2 "$CT_IPERF_LOG" | tr '\n' ' ')"; return 1; }
	nsenter --net="$CT_NS" nginx -c "$WORK/nginx-ct.conf" </dev/null >>"$CT_LOG" 2>&1 &
	CT_HTTPD_PID=$!
	if ! wait_listen_in ct "$CT_HTTP" t "$CT_HTTPD_PID"; then
		CT_ERR="$tool: nginx in the container did not start: $(tail -n 2 "$WORK/nginx-ct.err" | tr '\n' ' ')"
		return 1
	fi
	for ((i = 0; i < 50; i++)); do
		got=$(in_up timeout 2 bash -c "exec 3<>/dev/tcp/$HOST_IP/$PUB_HTTP && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && head -c 12 <&3" 2>/dev/null) || true
		[[ $got != "HTTP/1.1 200" ]] || return 0
		sleep 0.1
	done
	CT_ERR="$tool: nginx in the container did not answer through $HOST_IP:$PUB_HTTP from upstream: $(grep -v 'Failed to send' "$CT_LOG" | tail -n 3 | tr '\n' ' ')"
	return 1
}

# ct_flush: empty the host namespace's conntrack table (ctnetlink; no
# conntrack(8) needed). pub cases use the same host ports for every tool: an
# entry a user-space tool's connection left (ESTABLISHED for days when the tool
# was killed with the connection open) has no NAT binding, and a kernel-row SYN
# that reuses its tuple would skip the DNAT and be refused; the kernel row's
# entries would DNAT a later tool's connections to the deleted container.
ct_flush() {
	ip netns exec "$HOSTNS" "$PYTHON" -c '
import os, socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
s.settimeout(5)
# IPCTNL_MSG_CT_DELETE (2) of NFNL_SUBSYS_CTNETLINK (1), no attributes: flush
body = struct.pack("=BBH", socket.AF_INET, 0, 0)
s.send(struct.pack("=LHHLL", 16 + len(body), (1 << 8) | 2, 0x1 | 0x4, 1, 0) + body)
r = s.recv(65536)
if struct.unpack("=H", r[4:6])[0] == 2:  # NLMSG_ERROR; error 0 is the ACK
    err = struct.unpack("=i", r[16:20])[0]
    if err:
        sys.exit("conntrack flush: " + os.strerror(-err))
'
}

start_ct_iperf() {
	nsenter --net="$CT_NS" iperf3 -s -p "$CT_IPERF" --forceflush --logfile "$CT_IPERF_LOG" </dev/null >>"$CT_LOG" 2>&1 &
	CT_IPERF_PID=$!
	wait_listen_in ct "$CT_IPERF" t "$CT_IPERF_PID"
}

# pub_iperf TOOL WHERE(host|up) ADDR METRIC: iperf3 from WHERE to
# ADDR:PUB_IPERF, the client sending; records METRIC (Gbit/s) and sets PEER to
# the address the container's iperf3 saw the client come from ("" on failure)
pub_iperf() {
	local tool=$1 where=$2 addr=$3 m=$4 n0
	PEER=""
	n0=$(wc -l <"$CT_IPERF_LOG" 2>/dev/null || echo 0)
	if ! iperf_client "$CT_LOG" "== iperf3 from $where to $addr:$PUB_IPERF" "$where" "$addr" "$PUB_IPERF"; then
		note "pub: iperf3 from $where to $addr:$PUB_IPERF ($tool) failed: $IPERF_ERR"
		# a server whose client vanished mid-test stays busy
		stop_tree "$CT_IPERF_PID" 2
		start_ct_iperf || note "pub ($tool): iperf3 -s in the container did not restart"
		return 0
	fi
	rec "$m" "$tool" "$(jq '.end.sum_received.bits_per_second / 1e9' <<<"$J")"
	PEER=$(tail -n +"$((n0 + 1))" "$CT_IPERF_LOG" 2>/dev/null |
		sed -n 's/.*Accepted connection from \([0-9.]*\),.*/\1/p' | tail -n 1)
}

# listen_overflows WHERE: TcpExt ListenOverflows of that namespace (/proc/net
# follows the reader's netns; nstat's history file would not)
listen_overflows() {
	# shellcheck disable=SC2016 # awk's $, not the shell's
	"in_$1" awk '$1 == "TcpExt:" { if (!n) { for (i = 2; i <= NF; i++) if ($i == "ListenOverflows") c = i; n = 1 } else print $c + 0 }' \
		/proc/net/netstat 2>/dev/null || echo 0
}

# pub_wrk TOOL NAME WRK-ARGS...: wrk from upstream against nginx in the
# container through HOST_IP:PUB_HTTP; records pub_NAME_rps, _p99 (ms), _err
pub_wrk() {
	local tool=$1 name=$2 out rps p99 errs oh oc
	shift 2
	oh=$(listen_overflows host) oc=$(listen_overflows ct)
	out=$(in_up timeout $((SECS + 30)) prlimit --nofile=$((PUB_KA_CONNS + 1024)) -- \
		wrk "$@" -d"${SECS}s" --latency "http://$HOST_IP:$PUB_HTTP/" 2>&1) || true
	printf '%s\n' "== wrk $*" "$out" >>"$CT_LOG"
	# full listen queues make clients retransmit SYNs (1 s), which wrk's p99 shows
	oh=$(($(listen_overflows host) - oh)) oc=$(($(listen_overflows ct) - oc))
	echo "== listen-queue overflows during this run: host netns $oh, container $oc" >>"$CT_LOG"
	rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
	# wrk prints the percentiles with their own unit: us, ms, s or m
	p99=$(awk '$1 == "99%" { v = $2
		if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
		else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
		else if (v ~ /m$/) { sub(/m$/, "", v); print v * 60000 }
		else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 } }' <<<"$out")
	errs=$(awk '/Socket errors:/{gsub(",", ""); print $4+$6+$8+$10} /Non-2xx/{print $NF}' <<<"$out" |
		awk '{s+=$1} END{print s+0}')
	if [[ -n $rps ]]; then
		rec "pub_${name}_rps" "$tool" "$rps"
		[[ -z $p99 ]] || rec "pub_${name}_p99" "$tool" "$p99"
		rec "pub_${name}_err" "$tool" "$errs"
		rec "pub_${name}_lqo" "$tool" $((oh + oc))
		((errs == 0)) || note "pub: wrk $name ($tool): $(grep -E 'Socket errors|Non-2xx' <<<"$out" | tr -s ' ' | tr '\n' ';' | sed 's/;$//')"
	else
		note "pub: wrk $name ($tool) failed: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
	fi
}

m_pub() { # TOOL: the container's servers through the published ports
	local tool=$1 backlog
	# the forwarder's own listen backlog bounds bursts of new connections
	if [[ $tool != kernel ]]; then
		backlog=$(in_host ss -Hltn "sport = :$PUB_HTTP" | awk 'NR == 1 {print $3}')
		[[ -z $backlog ]] || rec pub_backlog "$tool" "$backlog"
	fi
	pub_iperf "$tool" host 127.0.0.1 pub_tcp_lo
	[[ -z $PEER ]] || note "pub ($tool): the container saw the loopback client (127.0.0.1) as $PEER"
	pub_iperf "$tool" up "$HOST_IP" pub_tcp_ext
	if [[ -n $PEER ]]; then
		if [[ $PEER == "$UP_IP" ]]; then
			rec pub_realaddr "$tool" 1
		else
			rec pub_realaddr "$tool" 0
			note "pub ($tool): the container saw the upstream client ($UP_IP) as $PEER"
		fi
	fi
	pub_wrk "$tool" close -t1 -c"$WRK_CONNS" -H 'Connection: close'
	pub_wrk "$tool" ka -t2 -c"$PUB_KA_CONNS"
}

m_pubmem() { # TOOL: a fresh container; CONNS connections from upstream held through the published port
	hold_measure "$1" pub pub_ ct "$CT_HOLD" up "$HOST_IP" "$PUB_HOLD" send
}

# ================================================================ RUN ========
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$SECONDS
log "run $RUN, work dir $WORK; TOOLS=\"$TOOLS\" SECTIONS=\"$SECTIONS\" ROUNDS=$ROUNDS SECS=$SECS CONNS=$CONNS"
topology
if ! err=$(host_user unshare --user --map-root-user --net true 2>&1); then
	echo "$USER_NAME cannot create a user and network namespace: $err" >&2
	exit 2
fi
start_servers
write_hold_py
: >"$RAW"

# case TOOL MTU FN...: one container, the measurements, tear-down
run_case() {
	local tool=$1 mtu=$2 fn
	shift 2
	log "$tool, MTU $mtu: $*"
	if ! start_ct "$tool" "$mtu"; then
		note "$CT_ERR"
		stop_ct
		return 0
	fi
	for fn in "$@"; do "$fn" "$tool" "$mtu"; done
	stop_ct
}

read -r -a TOOL_LIST <<<"$TOOLS"
for ((r = 1; r <= ROUNDS; r++)); do
	# rotate the order each round so drift (the machine is shared) spreads evenly
	for ((k = 0; k < ${#TOOL_LIST[@]}; k++)); do
		t=${TOOL_LIST[(k + r - 1) % ${#TOOL_LIST[@]}]}
		log "round $r/$ROUNDS: $t"
		fns=()
		want tcp && fns+=(m_tcp)
		want http && fns+=(m_http)
		want udp && fns+=(m_udp)
		((${#fns[@]} == 0)) || run_case "$t" 65520 "${fns[@]}"
		! want tcp || run_case "$t" 1500 m_tcp
		# a fresh container: the idle figure must not include buffers from earlier traffic
		! want mem || run_case "$t" 65520 m_mem
		if want pub; then
			PUBLISH=1
			run_case "$t" 65520 m_pub
			run_case "$t" 65520 m_pubmem
			PUBLISH=0
		fi
	done
done
ELAPSED=$((SECONDS - T_START))

# ================================================================ REPORT =====
declare -A RES=()
# shellcheck disable=SC2094 # both only read $RAW
while read -r m t _; do
	[[ -n ${RES[$m.$t]+x} ]] && continue
	RES[$m.$t]=$(awk -v m="$m" -v t="$t" '$1 == m && $2 == t {print $3}' "$RAW" | median)
done <"$RAW"

isnum() { [[ ${1:-} =~ ^-?[0-9]+([.][0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }
fmt() { # VALUE PRINTF-FORMAT (or yesno: 1 yes, 0 no, a median between them "mixed")
	if ! isnum "${1:-}"; then
		echo "-"
	elif [[ $2 == yesno ]]; then
		case $1 in 1) echo yes ;; 0) echo no ;; *) echo mixed ;; esac
	else
		# shellcheck disable=SC2059
		LC_ALL=C printf "$2" "$1"
	fi
}
ratio() { # a b -> a/b or "-"
	if isnum "${1:-}" && isnum "${2:-}" && awk -v b="$2" 'BEGIN{exit !(b > 0)}'; then
		awk -v a="$1" -v b="$2" 'BEGIN{ r = a / b; if (r < 0.095) printf "%.2g", r; else printf "%.2f", r }'
	else echo "-"; fi
}
PEERS=()
for t in slirp4netns pasta; do have "$t" && PEERS+=("$t"); done
COLS=()
for t in rnat slirp4netns pasta kernel; do have "$t" && COLS+=("$t"); done
label() { case $1 in kernel) echo "kernel veth + NAT" ;; *) echo "$1" ;; esac; }

# row LABEL METRIC FORMAT DIRECTION(hi|lo|none) [UNIT]: one table row, and a CSV line per tool
row() {
	local lab=$1 m=$2 f=$3 dir=$4 unit=${5:-} t v best="" bestt="" rb rk
	local line="| $lab |"
	for t in "${COLS[@]}"; do
		v=${RES[$m.$t]:-}
		line+=" $(fmt "$v" "$f") |"
		! isnum "$v" || echo "$SECTION,$m,\"$lab\",$unit,$t,$v" >>"$CSV"
	done
	# the better peer: higher is better for rates, lower for loss and memory
	for t in "${PEERS[@]}"; do
		v=${RES[$m.$t]:-}
		isnum "$v" || continue
		if [[ -z $best ]] || { [[ $dir == hi ]] && awk -v a="$v" -v b="$best" 'BEGIN{exit !(a > b)}'; } ||
			{ [[ $dir == lo ]] && awk -v a="$v" -v b="$best" 'BEGIN{exit !(a < b)}'; }; then
			best=$v bestt=$t
		fi
	done
	rb=$(ratio "${RES[$m.rnat]:-}" "$best")
	[[ $rb == - ]] || rb="$rb ($bestt)"
	rk=$(ratio "${RES[$m.rnat]:-}" "${RES[$m.kernel]:-}")
	[[ $dir != none ]] || rb=- rk=-
	echo "$line $rb | $rk |"
}
header() {
	local t h="| |" s="|---|"
	for t in "${COLS[@]}"; do h+=" $(label "$t") |"; s+="---:|"; done
	echo "$h rnat / better of slirp4netns, pasta | rnat / kernel |"
	echo "$s---:|---:|"
}

version_line() {
	local v
	echo -n "rnat ($RNAT_DESC)"
	v=$("$SLIRP4NETNS" --version 2>/dev/null | awk '/^slirp4netns version/{s=$3} /^libslirp/{l=$2} END{print s" (libslirp "l")"}')
	echo -n ", slirp4netns $v"
	echo -n ", pasta (passt $(dpkg-query -W -f '${Version}' passt 2>/dev/null || echo '?'))"
	echo ", iperf3 $(iperf3 --version 2>/dev/null | awk 'NR==1{print $2}'), wrk $(dpkg-query -W -f '${Version}' wrk 2>/dev/null || echo '?')."
}

# section_head NAME TITLE: the heading and table header of report section NAME
section_head() {
	SECTION=$1
	echo
	echo "## $2"
	echo
	header
}

report() {
	echo "# rnat rootless benchmark"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) cores; ROUNDS=$ROUNDS SECS=$SECS OMIT=$OMIT" \
		"CONNS=$CONNS WRK_CONNS=$WRK_CONNS UDP_LEN=$UDP_LEN UPLINK_MTU=$UPLINK_MTU FWD_NOFILE=$FWD_NOFILE${QUICK:+ QUICK=$QUICK};" \
		"took $((ELAPSED / 60)) min $((ELAPSED % 60)) s."
	version_line
	echo "Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine moves absolute figures; read the ratios)."
	echo
	echo "Every figure is the median of $ROUNDS round(s). Ratios are rnat / peer: for rates above 1 means rnat is faster;" \
		"for loss and memory below 1 means rnat loses or uses less. \"better of\" picks the peer with the better figure on that row."
	if want tcp; then
		section_head tcp "TCP bulk (iperf3, Gbit/s)"
		row "container → server, MTU 65520" tcp_up_65520 %.2f hi Gbit/s
		row "server → container, MTU 65520" tcp_down_65520 %.2f hi Gbit/s
		row "container → server, MTU 1500" tcp_up_1500 %.2f hi Gbit/s
		row "server → container, MTU 1500" tcp_down_1500 %.2f hi Gbit/s
	fi
	if want http; then
		section_head http "New connections, container → server (HTTP, one connection per request)"
		row "requests/s" http_rps %.0f hi req/s
		row "socket errors + non-2xx (sum over the run)" http_err %.0f none
	fi
	if want udp; then
		section_head udp "UDP, container → server (iperf3 -u, ${UDP_LEN}-byte datagrams, MTU 65520)"
		row "-b 100M: loss (%)" udp_loss_100M %.2f lo %
		row "-b 100M: received (Mbit/s)" udp_mbps_100M %.0f hi Mbit/s
		row "-b 0 (unlimited): received (Mbit/s)" udp_mbps_0 %.0f hi Mbit/s
		row "-b 0 (unlimited): loss (%)" udp_loss_0 %.1f lo %
		row "-b 0: reached the server's socket (Mbit/s)" udp_sock_mbps_0 %.0f hi Mbit/s
		row "-b 0: dropped by the server's full socket buffer (% of those)" udp_sock_drop_0 %.1f lo %
	fi
	if want mem; then
		section_head mem "Memory of the forwarding process (VmRSS, KB)"
		row "idle, after start" rss_idle %.0f lo KB
		row "holding the connections below" rss_conns %.0f lo KB
		row "connections held open (of $CONNS)" conns_held %.0f hi conns
	fi
	if want pub; then
		section_head pub "Published ports (host port → container port, servers in the container)"
		row "TCP, loopback client → container (Gbit/s)" pub_tcp_lo %.2f hi Gbit/s
		row "TCP, upstream client → container (Gbit/s)" pub_tcp_ext %.2f hi Gbit/s
		row "container saw the upstream client's address" pub_realaddr yesno none
		row "listen backlog of the forwarder's published port (ss Send-Q)" pub_backlog %.0f none
		row "HTTP, new connection per request: requests/s" pub_close_rps %.0f hi req/s
		row "HTTP, new connection per request: p99 latency (ms)" pub_close_p99 %.2f lo ms
		row "HTTP, new connection per request: socket errors + non-2xx" pub_close_err %.0f none
		row "HTTP, new connection per request: listen-queue overflows" pub_close_lqo %.0f none
		row "HTTP, $PUB_KA_CONNS keep-alive connections: requests/s" pub_ka_rps %.0f hi req/s
		row "HTTP, $PUB_KA_CONNS keep-alive connections: p99 latency (ms)" pub_ka_p99 %.2f lo ms
		row "HTTP, $PUB_KA_CONNS keep-alive connections: socket errors + non-2xx" pub_ka_err %.0f none
		row "HTTP, $PUB_KA_CONNS keep-alive connections: listen-queue overflows" pub_ka_lqo %.0f none
		row "forwarder VmRSS idle, after start (KB)" pub_rss_idle %.0f lo KB
		row "forwarder VmRSS holding the connections below (KB)" pub_rss_conns %.0f lo KB
		row "connections held open through the published port (of $CONNS)" pub_conns_held %.0f hi conns
	fi
	echo
	echo "Notes:"
	echo
	echo "- Topology: container netns --tap0--> tool in the host netns --veth (MTU $UPLINK_MTU)--> upstream netns" \
		"(iperf3 -s, nginx, the hold server). The user-space tools run as the unprivileged user $USER_NAME" \
		"(setpriv, RLIMIT_NOFILE $FWD_NOFILE); the kernel row is a root-made netns with a veth and nftables masquerade" \
		"(both veth ends at the row's MTU). Clients run as root inside the container's network namespace (nsenter)."
	echo "- Invocations: \`rnat run --mtu M -- sleep\`;" \
		"\`slirp4netns --configure --mtu=M --disable-host-loopback PID tap0\` and" \
		"\`pasta -f -q --config-net -4 -I tap0 -a $GUEST_IP -n 24 -g $GW_IP --no-map-gw --dns-forward $DNS_IP -m M -t none -u none -T none -U none PID\`" \
		"on \`unshare --user --map-root-user --net sleep\`."
	want tcp && echo "- tcp: \`iperf3 -c $UP_IP -t $SECS -O $OMIT\` (and \`-R\`), figure = receiver's bits/s. MTU 1500 is the container" \
		"interface's MTU; the host ↔ upstream link stays at $UPLINK_MTU."
	want http && echo "- http: \`wrk -t1 -c$WRK_CONNS -d${SECS}s -H 'Connection: close'\` against nginx with one worker (a 600-byte file)." \
		"nginx answers in one process; client, server and forwarder share $(nproc) cores."
	want udp && echo "- udp: figures are the server side's (\`sum_received\`). \"Reached the server's socket\" counts the datagrams the server's socket took or dropped for a full buffer (Udp InDatagrams + RcvbufErrors of the upstream netns, whose only UDP receiver is iperf3 -s): what the path delivered, whether or not the receiver kept up."
	want mem && echo "- mem: idle = 1 s after the container answers, in a fresh container; then a python client in the container opens" \
		"$CONNS connections (at most 256 connects in flight, each given 10 s, ${CONN_SECS} s in all) to a python server in upstream that holds them;" \
		"\"held\" = connections open at the server 1 s after the client finished. The kernel path has no process (its state is conntrack)."
	want pub && echo "- pub: the tool publishes host ports $PUB_IPERF, $PUB_HTTP, $PUB_HOLD (all addresses of the host netns) to container ports" \
		"$CT_IPERF (iperf3 -s), $CT_HTTP (nginx, one worker, the 600-byte file), $CT_HOLD (the hold server), all run as root in the" \
		"container's netns. rnat: \`rnat run -p $PUB_IPERF:$CT_IPERF -p $PUB_HTTP:$CT_HTTP -p $PUB_HOLD:$CT_HOLD\`;" \
		"slirp4netns: \`--api-socket\` and one \`add_hostfwd\` (host_addr 0.0.0.0) per port; pasta: \`-t $PUB_IPERF:$CT_IPERF -t $PUB_HTTP:$CT_HTTP -t $PUB_HOLD:$CT_HOLD\`" \
		"instead of \`-t none\`; kernel: nftables DNAT in the host netns (prerouting on the uplink; output for 127.0.0.1 with" \
		"\`net.ipv4.conf.all.route_localnet=1\` and masquerade of 127.0.0.0/8 to the veth, so the container sees 10.0.2.2 there)." \
		"Loopback client: \`iperf3 -c 127.0.0.1 -p $PUB_IPERF\` in the host netns; upstream client: from $UP_IP to $HOST_IP:$PUB_IPERF." \
		"The client sends; figure = receiver's bits/s. \"saw the address\" = the source address the container's iperf3 logged for the upstream" \
		"client's connection. HTTP from upstream: \`wrk -t1 -c$WRK_CONNS -H 'Connection: close' --latency\` and" \
		"\`wrk -t2 -c$PUB_KA_CONNS --latency\` (RLIMIT_NOFILE raised for wrk), ${SECS} s each. p99 is wrk's, which corrects for" \
		"coordinated omission (interval = run time / requests per connection): a request stalled 1 s (a handshake retried) adds samples from 1 s down, so a handful of" \
		"stalls set p90 and p99; requests over its 2 s timeout count as socket errors. Listen-queue overflows = TcpExt" \
		"ListenOverflows of the host netns (the user-space tools' listeners) plus the container's (nginx; the kernel path's only queue)" \
		"during the run; each overflow drops a handshake that the client retries 1 s later (the kernel row has no forwarder" \
		"listener: nginx listens with backlog 4096). Memory: a fresh container; idle = 1 s after nginx first answered" \
		"through the published port; then the hold client in upstream opens $CONNS connections to $HOST_IP:$PUB_HOLD and sends one byte" \
		"on each (pasta opens the container side of an inbound connection only when the client sends or closes), the hold" \
		"server in the container holds them (as in mem). The kernel path has no process. Each pub case starts with the host netns's" \
		"conntrack table flushed (it is loaded for the kernel row's NAT, and stale entries from another tool's case on the same ports" \
		"would misroute reused client ports)."
	local n
	for n in "${NOTES[@]}"; do echo "- $n"; done
}

if awk -v n="$(nproc)" '{ exit !($1 > n / 2) }' <<<"$LOAD_START"; then
	note "the machine was busy at start (load $LOAD_START on $(nproc) cores): absolute figures are noisy"
fi
mkdir -p "$(dirname "$OUT")"
echo "section,metric,label,unit,tool,value" >"$CSV"
report | tee "$OUT"
log "written to $OUT and $CSV"
if want tcp; then
	if "$PYTHON" "$ROOT/benches/plot_rootless.py" "$CSV" "$SVG" \
		--subtitle "$(date -u '+%Y-%m-%d'), median of $ROUNDS round(s) of ${SECS} s${QUICK:+ (QUICK=$QUICK)}, $(nproc) cores"; then
		log "chart: $SVG"
	else
		log "chart failed (see above)"
	fi
fi
