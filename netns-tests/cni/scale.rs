//! Many attachments on one network at once: parallel ADDs (each its own
//! namespace and published port) all succeed with distinct addresses and
//! the right container answering on each port; parallel DELs leave nothing.

use std::collections::BTreeMap;

use super::*;

const N: usize = 32;
const FIRST_PORT: u16 = 21000;

#[test]
fn parallel_adds_and_dels() {
    let ct = cni_topology!("cni_scale");
    let namespaces: Vec<String> = (0..N).map(|_| ct.netns_add()).collect();
    let calls: Vec<Call> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| Call::new(&format!("par{i:02}"), ns))
        .collect();
    let confs: Vec<Value> = (0..N)
        .map(|i| {
            ct.conf(
                "1.0.0",
                ports(&[pm(u32::from(FIRST_PORT) + i as u32, 80, "tcp", None)]),
            )
        })
        .collect();

    // N ADDs at once, each in its own thread spawning the plugin.
    let outs: Vec<Finished> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (ct, call, conf) = (&ct, &calls[i], &confs[i]);
                s.spawn(move || ct.cni("ADD", call, conf))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread panicked"))
            .collect()
    });
    let mut atts = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        let result = parse_success(out, &format!("[{}] parallel ADD {i}", ct.label));
        atts.push(ct.assert_add_result(&result, "1.0.0", &calls[i], "parallel ADD"));
    }

    // Distinct addresses in the subnet, one element per port to the right one.
    let by_ip: BTreeMap<&str, usize> = atts
        .iter()
        .enumerate()
        .map(|(i, a)| (a.ip.as_str(), i))
        .collect();
    assert_eq!(
        by_ip.len(),
        N,
        "[{}] addresses are not distinct: {:?}",
        ct.label,
        atts.iter().map(|a| &a.ip).collect::<Vec<_>>()
    );
    assert!(
        atts.iter().all(|a| in_test_subnet(&a.ip)),
        "[{}] addresses outside {SUBNET}",
        ct.label
    );
    let want: BTreeSet<MapElem> = atts
        .iter()
        .enumerate()
        .map(|(i, a)| MapElem::any("tcp", FIRST_PORT + i as u16, &a.ip, 80))
        .collect();
    let s = ct.snap();
    assert_eq!(s.pub_any, want, "[{}] pub_any after the ADDs", ct.label);
    assert_eq!(s.rv_links.len(), N, "[{}] rv links", ct.label);
    assert_eq!(s.ipam.len(), N, "[{}] allocations", ct.label);

    // Each port answers from C, from its own container, with exact bytes.
    let _servers: Vec<BgProc> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| ct.server(ns, &tagged_echo_server(80, &i.to_string()), "tcp", 80))
        .collect();
    for i in 0..N {
        let port = FIRST_PORT + i as u16;
        let data = payload(4096, 100 + i as u64);
        let mut want = format!("tag={i}\n").into_bytes();
        want.extend_from_slice(&data);
        let out = tcp_exchange(&ct, &ct.c, H_CLIENT_SIDE_IP, port, &data);
        assert!(
            out.success(),
            "[{}] exchange via {port} failed\n{}",
            ct.label,
            out.describe()
        );
        assert_same_bytes(
            &out.stdout,
            &want,
            &format!("[{}] port {port} → container {i}", ct.label),
        );
    }

    // N DELs at once.
    let outs: Vec<Finished> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (ct, call, conf) = (&ct, &calls[i], &confs[i]);
                s.spawn(move || ct.cni("DEL", call, conf))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("DEL thread panicked"))
            .collect()
    });
    for (i, out) in outs.iter().enumerate() {
        assert!(
            out.success(),
            "[{}] parallel DEL {i} failed\n{}",
            ct.label,
            out.describe()
        );
    }
    ct.assert_clean("after the parallel DELs");
    for ns in &namespaces {
        assert!(
            ct.link_json(ns, IFNAME).is_none(),
            "[{}] eth0 survived DEL in {ns}",
            ct.label
        );
    }
}
