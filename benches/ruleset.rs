//! The ruleset update path without the kernel: building the netlink batch that publishes N ports
//! (spec parsing, DNAT model, libnftnl encoding). The kernel side is measured by benches/rootful.sh.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rnat::nft::model::dnat_elems;
use rnat::nft::{BatchBuf, Dnat, Op};
use rnat::spec;

fn publish_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish_batch");
    for n in [1u16, 100, 1_000, 10_000] {
        let specs = vec![format!("10000-{}:10000-{}", 9999 + n, 9999 + n)];
        g.throughput(Throughput::Elements(u64::from(n)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &specs, |b, specs| {
            b.iter(|| {
                let ports = spec::expand_all(black_box(specs)).expect("spec");
                let to = Ipv4Addr::new(192, 0, 2, 2);
                let dnats: Vec<Dnat> = ports
                    .iter()
                    .filter_map(|m| Dnat::for_mapping(m, to))
                    .collect();
                let mut batch = BatchBuf::new();
                dnat_elems(&mut batch, Op::CreateExcl, &dnats).expect("batch");
                black_box(batch.finish())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, publish_batch);
criterion_main!(benches);
