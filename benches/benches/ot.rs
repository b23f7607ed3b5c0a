//! The offline phase for correlations (`secinfer-ot`), for both backends
//! (silent OT, the default, and IKNP): extension plus refinement into
//! random OTs and bit triples, through the engines' public API exactly as a
//! session drives them.
//!
//! - `ot_setup/<backend>`: the one-time setup (128 Chou–Orlandi base OTs
//!   in each direction; for silent OT also the IKNP batch that bootstraps
//!   it), both parties' work.
//! - `ot_extend/<backend>/<kind>`: one batch of 2^20 random OTs: the client's
//!   request, the server's answer and the client's handling of it, so both
//!   parties' whole work (PRG expansion, transposes, hashing, appending to
//!   the stores) in one thread. Throughput is set to the number of random
//!   OTs (a bit triple is two, one each way), so criterion's "elem/s" reads
//!   as random OTs per second per core with both parties on that core.
//!   Taking the material back out of the stores is not timed.
//!
//! Bytes on the wire per random OT (the payloads of the batch's messages;
//! the serde framing adds a few bytes per message) are printed once at start.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use secinfer_ot::{Backend, Demand, OtEngine, OtMessage, Role};

const OTS: u64 = 1 << 20;

fn engines(backend: Backend) -> (OtEngine, OtEngine) {
    let mut client = OtEngine::client(backend, u64::MAX).expect("client engine");
    let mut server = OtEngine::new(Role::Server, u64::MAX).expect("server engine");
    let mut next = Some(client.start_setup().expect("setup"));
    while let Some(m) = next.take() {
        if let Some(reply) = server.handle(m).expect("server's setup step") {
            next = client.handle(reply).expect("client's setup step");
        }
    }
    assert!(client.is_ready() && server.is_ready(), "setup incomplete");
    (client, server)
}

/// One batch; returns the bytes of both messages' payloads.
fn batch(client: &mut OtEngine, server: &mut OtEngine, demand: Demand) -> usize {
    let request = client.request(demand).expect("request");
    let up = request.payload_len();
    let answer: OtMessage = server.handle(request).expect("server").expect("answer");
    let down = answer.payload_len();
    client.handle(answer).expect("client");
    up + down
}

fn drain(client: &mut OtEngine, server: &mut OtEngine, demand: &Demand) {
    black_box(client.store_mut().split_off(demand).expect("client store"));
    black_box(server.store_mut().split_off(demand).expect("server store"));
}

fn kinds() -> Vec<(&'static str, Demand)> {
    vec![
        (
            "word_ots_client_sends",
            Demand {
                word_ots_client_sends: OTS,
                ..Demand::default()
            },
        ),
        (
            "bit_ots_server_sends",
            Demand {
                bit_ots_server_sends: OTS,
                ..Demand::default()
            },
        ),
        (
            "bit_triples",
            Demand {
                triples: OTS / 2,
                ..Demand::default()
            },
        ),
    ]
}

fn bench_ot(c: &mut Criterion) {
    for backend in [Backend::Silent, Backend::Iknp] {
        let (mut client, mut server) = engines(backend);
        let b = backend.name();
        for (name, demand) in kinds() {
            let bytes = batch(&mut client, &mut server, demand);
            drain(&mut client, &mut server, &demand);
            println!(
                "ot {b} {name}: {bytes} payload bytes for {OTS} random OTs = {:.3} bytes per random OT",
                bytes as f64 / OTS as f64
            );
        }

        let mut g = c.benchmark_group("ot_setup");
        g.sample_size(10);
        g.bench_function(b, |bench| bench.iter(|| black_box(engines(backend))));
        g.finish();

        let mut g = c.benchmark_group(format!("ot_extend/{b}"));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(8));
        g.throughput(Throughput::Elements(OTS));
        for (name, demand) in kinds() {
            g.bench_function(name, |bench| {
                bench.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        black_box(batch(&mut client, &mut server, demand));
                        timed += start.elapsed();
                        drain(&mut client, &mut server, &demand);
                    }
                    timed
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_ot);
criterion_main!(benches);
