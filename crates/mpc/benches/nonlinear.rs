//! Joint nonlinear layers on a million elements, both parties in one
//! thread (no network): DReLU and ReLU at the full ring width and at a
//! narrower proven bound, truncation. Correlations are dealt in the clear
//! outside the timed part.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rand::rngs::ChaCha20Rng;
use rand::{Rng, SeedableRng};
use secinfer_mpc::{
    Io, Machine, MpcError, Party, Role, Sign, cost, drelu, relu, run_pair, truncate,
};
use secinfer_ot::{Demand, insecure_test_dealer};
use secinfer_ring::Ring;

const N: usize = 1 << 20;

fn parties(ring: Ring, demand: &Demand) -> (Party, Party, Io, Io) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (c, s) = insecure_test_dealer::stores(&mut rng, demand);
    let (ic, is) = (Io::default(), Io::default());
    let pc = Party::new(Role::Client, ring, c, ic.clone()).expect("client");
    let ps = Party::new(Role::Server, ring, s, is.clone()).expect("server");
    (pc, ps, ic, is)
}

fn shares(ring: Ring) -> (Vec<u64>, Vec<u64>) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let xc: Vec<u64> = (0..N).map(|_| ring.reduce(rng.next_u64())).collect();
    let xs: Vec<u64> = (0..N).map(|_| ring.reduce(rng.next_u64())).collect();
    (xc, xs)
}

#[derive(Clone, Copy)]
enum Op {
    Drelu(u32),
    Relu(u32),
    Truncate(u32),
}

async fn op(mut p: Party, x: Vec<u64>, op: Op) -> Result<usize, MpcError> {
    Ok(match op {
        Op::Drelu(bits) => drelu(&mut p, &x, bits).await?.len(),
        Op::Relu(bits) => relu(&mut p, &x, bits).await?.len(),
        Op::Truncate(shift) => truncate(&mut p, &x, shift, Sign::Signed).await?.len(),
    })
}

fn bench(c: &mut Criterion) {
    let ring = Ring::new(37).expect("ring");
    let (xc, xs) = shares(ring);
    let mut g = c.benchmark_group("nonlinear, 2^20 elements, k = 37");
    g.sample_size(10);
    for (name, o, demand) in [
        ("drelu, 37 bits", Op::Drelu(37), cost::drelu(N, 37).demand),
        ("drelu, 20 bits", Op::Drelu(20), cost::drelu(N, 20).demand),
        (
            "relu, 37 bits",
            Op::Relu(37),
            cost::relu(ring, N, 37).demand,
        ),
        (
            "relu, 20 bits",
            Op::Relu(20),
            cost::relu(ring, N, 20).demand,
        ),
        (
            "truncate 12 bits",
            Op::Truncate(12),
            cost::truncate(ring, N, 12).demand,
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || (parties(ring, &demand), xc.clone(), xs.clone()),
                |((pc, ps, ic, is), xc, xs)| {
                    let (a, b) = run_pair(
                        Machine::new(ic, op(pc, xc, o)),
                        Machine::new(is, op(ps, xs, o)),
                    )
                    .expect("run");
                    assert_eq!(a.expect("client"), N);
                    assert_eq!(b.expect("server"), N);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
