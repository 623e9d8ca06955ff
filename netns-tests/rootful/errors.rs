//! Bad input and refused setups: each fails with one `Error:` line, does
//! not run CMD, and leaves nothing behind.

use std::path::Path;

use super::*;
use crate::procs::Finished;

/// Runs `rnat run` that must fail with an `Error:` line and exit CODE,
/// without running its CMD and without changing rnat's residue.
fn assert_run_rejected(t: &Topology, net: &str, specs: &[&str], code: i32, what: &str) {
    let marker = t.work_path(&format!("ran-{}", what.replace([' ', '/', ':'], "_")));
    let marker_s = marker.to_string_lossy().into_owned();
    let before = t.residue();
    let mut args = vec!["run", "--network", net];
    for s in specs {
        args.extend(["-p", s]);
    }
    args.extend(["--", "touch", &marker_s]);
    let out = t.rnat(&args);
    assert_failed_cleanly(t, &out, code, Some(&marker), &before, what);
}

/// Asserts that a run failed with an `Error:` line and exit CODE, did not
/// run its CMD (which would have created MARKER), and left rnat's residue
/// as it was BEFORE.
fn assert_failed_cleanly(
    t: &Topology,
    out: &Finished,
    code: i32,
    marker: Option<&Path>,
    before: &Residue,
    what: &str,
) {
    assert_rnat_error(out, code, what);
    if let Some(marker) = marker {
        assert!(!marker.exists(), "{what}: CMD ran although setup failed");
    }
    assert_eq!(
        &t.residue(),
        before,
        "{what}: the failed run left something behind"
    );
}

#[test]
fn malformed_port_specs_are_rejected() {
    let t = topology!("bad_specs");
    t.network_create(NET, SUBNET, &[]);
    for spec in ["abc", "70000:80", "80:", "1-5:1-3", "80/sctp"] {
        assert_run_rejected(&t, NET, &[spec], RNAT_ERROR, &format!("spec {spec}"));
    }
    t.assert_all_gone(&[]);
}

#[test]
fn host_port_taken_by_another_container_is_rejected() {
    let t = topology!("conflict_container");
    t.network_create(NET, SUBNET, &[]);
    let (mut web, _c) = start_web(&t, "web", &["8080:80"]);
    assert_run_rejected(&t, NET, &["8080:80"], RNAT_ERROR, "same host port");
    assert_run_rejected(
        &t,
        NET,
        &["9000:90", "8080:80"],
        RNAT_ERROR,
        "same host port, second spec",
    );
    let data = payload(4096, 6);
    assert_tcp_echo(
        &t,
        &t.c,
        H_CLIENT_SIDE_IP,
        8080,
        &data,
        "first container keeps its port",
    );
    assert!(web.exited().is_none(), "web died\n{}", web.describe_now());
}

#[test]
fn host_port_bound_by_a_process_is_rejected() {
    let t = topology!("conflict_socket");
    t.network_create(NET, SUBNET, &[]);
    let _squatter = t.server(&t.h, &tcp_echo_server(8082), "tcp", 8082);
    assert_run_rejected(&t, NET, &["8082:80"], RNAT_ERROR, "port bound in H");
    // The process in H still owns the port (no DNAT was installed).
    let data = payload(4096, 8);
    assert_tcp_echo(
        &t,
        &t.c,
        H_CLIENT_SIDE_IP,
        8082,
        &data,
        "squatter still answers",
    );
}

#[test]
fn exhausted_subnet_is_rejected() {
    let t = topology!("exhausted");
    t.network_create(NET, ONE_SLOT, &[]);
    let mut first = run_bg(&t, "only", NET, &[], &strs(&["sleep", "120"]));
    let c = t.wait_container(&mut first, "only");
    assert!(in_subnet(c.ipv4(), ONE_SLOT), "{} outside {ONE_SLOT}", c.ip);
    assert_eq!(
        c.ip, "192.0.2.2",
        "the only assignable address of {ONE_SLOT}"
    );
    assert_run_rejected(&t, NET, &[], RNAT_ERROR, "no free address");
    assert!(
        first.exited().is_none(),
        "first container died\n{}",
        first.describe_now()
    );
}

#[test]
/// An ordinary user gets rootless mode, where a rootful network (`--network`) is refused: one
/// line, nothing left, the command never runs.
fn unprivileged_run_with_a_rootful_network_fails_cleanly() {
    let t = topology!("unprivileged");
    t.network_create(NET, SUBNET, &[]);
    let marker = t.work_path("ran-unprivileged");
    let marker_s = marker.to_string_lossy().into_owned();
    let before = t.residue();
    let cmd = t.rnat_command_in(
        &t.h,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &[
            "run",
            "--network",
            NET,
            "-p",
            "8080:80",
            "--",
            "touch",
            &marker_s,
        ],
    );
    let out = crate::procs::run_bounded(cmd, None, crate::procs::FG_TIMEOUT);
    if matches!(out.code(), Some(126 | 127)) && out.stderr_str().contains("setpriv") {
        panic!(
            "uid 65534 cannot execute {RNAT} (check directory permissions)\n{}",
            out.describe()
        );
    }
    assert_failed_cleanly(
        &t,
        &out,
        RNAT_ERROR,
        Some(&marker),
        &before,
        "unprivileged run",
    );
}

#[test]
fn missing_cmd_exits_127() {
    let t = topology!("missing_cmd");
    t.network_create(NET, SUBNET, &[]);
    let before = t.residue();
    let out = t.rnat(&[
        "run",
        "--network",
        NET,
        "-p",
        "8080:80",
        "--",
        "/nonexistent/rnt-no-such-command",
    ]);
    assert_failed_cleanly(&t, &out, 127, None, &before, "missing CMD");
    t.assert_all_gone(&[]);
}

/// Rootless-only flags given to a rootful run are refused with one line naming the flag (not
/// silently ignored), and CMD does not run.
#[test]
fn rootless_only_flags_are_refused_in_rootful_mode() {
    let t = topology!("rootless_flags");
    t.network_create(NET, SUBNET, &[]);
    let marker = t.work_path("ran-rootless-flag");
    let marker_s = marker.to_string_lossy().into_owned();
    for flags in [
        &["--enable-ipv6"][..],
        &["--mtu", "1500"],
        &["--mtu", "65520"],
        &["--cidr", "192.0.2.0/24"],
        &["--allow-host-loopback"],
    ] {
        let before = t.residue();
        let mut args = vec!["run", "--network", NET];
        args.extend_from_slice(flags);
        args.extend(["--", "touch", &marker_s]);
        let out = t.rnat(&args);
        let what = flags.join(" ");
        assert_failed_cleanly(&t, &out, RNAT_ERROR, Some(&marker), &before, &what);
        assert!(
            out.stderr_str().contains(flags[0]) && out.stderr_str().contains("--rootless"),
            "{what}: the error names the flag and --rootless\n{}",
            out.describe()
        );
    }
    t.assert_all_gone(&[]);
}
