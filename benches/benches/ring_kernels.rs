//! Ring kernels (`u64`, exact mod 2^64) vs tract `f32` on the MNIST shapes.
//!
//! Throughput is reported in elements/s where one element is one
//! multiply-add, so criterion's "Melem/s" reads as MMAC/s. `ring` uses the
//! global rayon pool (all cores), `ring_1t` a one-thread pool; tract runs on
//! one thread (its default executor). `exact_f64_1t` is the same kernel on
//! integer-valued `f64` (the HE server's residue products: limbs below 2^31
//! times 16-bit weights), one thread. `limbs_f64_1t` is the online server's
//! exact path: masked `Z_2^37` inputs cut into [`Limbs`], one `f64` product,
//! the limbs joined back (what `ring_1t` computes, exactly), one thread.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::Ix2;
use secinfer_benches::{
    random_f32, random_u64, random_weights, run, tract_conv2d, tract_matmul, tvalue,
};
use secinfer_ring::{ConvGeometry, Limbs, Ring, conv, matmul};

/// Ring values cut to 31-bit limbs (inputs) or signed weights, as exact `f64`.
fn exact_f64(t: &ndarray::ArrayViewD<u64>) -> ndarray::ArrayD<f64> {
    t.mapv(|v| {
        let s = v as i64;
        if s.unsigned_abs() < 1 << 15 {
            s as f64
        } else {
            (v >> 33) as f64
        }
    })
}

/// The ring of the bundled models, the limb cut for `w` (signed weights as
/// `u64` bits, output features on `out_axis`), and the weights as `f64`.
fn limb_plan(w: &ndarray::ArrayViewD<u64>, out_axis: usize) -> (Ring, Limbs, ndarray::ArrayD<f64>) {
    let ring = Ring::new(37).expect("ring");
    let row_sum = w
        .axis_iter(ndarray::Axis(out_axis))
        .map(|r| {
            r.iter()
                .map(|&v| u128::from((v as i64).unsigned_abs()))
                .sum::<u128>()
        })
        .max()
        .unwrap_or(0);
    let limbs = Limbs::plan(ring, row_sum).expect("a limb cut for 16-bit weights");
    (ring, limbs, w.mapv(|v| v as i64 as f64))
}

fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("building a one-thread rayon pool")
}

fn bench_matmul(c: &mut Criterion) {
    let pool = one_thread();
    let mut group = c.benchmark_group("matmul");
    for &(m, k, n) in &[(64, 784, 128), (64, 128, 128), (64, 128, 10)] {
        let id = format!("{m}x{k}x{n}");
        group.throughput(Throughput::Elements((m * k * n) as u64));
        let x = random_u64(1, &[m, k])
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        let w = random_weights(2, &[k, n])
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        group.bench_function(format!("ring/{id}"), |b| {
            b.iter(|| matmul(black_box(x.view()), black_box(w.view())).expect("matmul"))
        });
        group.bench_function(format!("ring_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| matmul(black_box(x.view()), black_box(w.view())).expect("matmul"))
            })
        });
        let (x64, w64) = (
            exact_f64(&x.view().into_dyn()),
            exact_f64(&w.view().into_dyn()),
        );
        let (x64, w64) = (
            x64.into_dimensionality::<Ix2>().expect("2-D"),
            w64.into_dimensionality::<Ix2>().expect("2-D"),
        );
        group.bench_function(format!("exact_f64_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| matmul(black_box(x64.view()), black_box(w64.view())).expect("matmul"))
            })
        });
        let (ring, limbs, wl) = limb_plan(&w.view().into_dyn(), 1);
        let wl = wl.into_dimensionality::<Ix2>().expect("2-D");
        let xr = x.mapv(|v| v & ring.mask()).into_dyn();
        group.bench_function(format!("limbs_f64_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let xs = limbs
                        .split(black_box(xr.view()))
                        .expect("split")
                        .into_dimensionality::<Ix2>()
                        .expect("2-D");
                    limbs
                        .join(matmul(xs.view(), wl.view()).expect("matmul").into_dyn())
                        .expect("join")
                })
            })
        });
        let wf = random_f32(3, &[k, n]);
        let plan = tract_matmul(m, &wf).expect("tract matmul plan");
        let xf = tvalue(&random_f32(4, &[m, k])).expect("tract input");
        group.bench_function(format!("tract_f32/{id}"), |b| {
            b.iter(|| run(&plan, black_box(&xf)).expect("tract run"))
        });
    }
    group.finish();
}

fn bench_conv(c: &mut Criterion) {
    let pool = one_thread();
    let mut group = c.benchmark_group("conv");
    group.sample_size(20);
    let cases: &[(&[usize], &[usize])] = &[
        (&[64, 1, 28, 28], &[32, 1, 3, 3]),
        (&[64, 32, 14, 14], &[64, 32, 3, 3]),
    ];
    for &(xs, ws) in cases {
        let g = ConvGeometry {
            pads_begin: vec![1, 1],
            pads_end: vec![1, 1],
            ..ConvGeometry::identity(2)
        };
        // pad 1, stride 1: output spatial = input spatial
        let macs = xs[0] * ws[0] * xs[2] * xs[3] * ws[1] * ws[2] * ws[3];
        let id = format!("x{:?}_w{:?}", xs, ws).replace(' ', "");
        group.throughput(Throughput::Elements(macs as u64));
        let x = random_u64(5, xs);
        let w = random_weights(6, ws);
        group.bench_function(format!("ring/{id}"), |b| {
            b.iter(|| conv(black_box(x.view()), black_box(w.view()), &g).expect("conv"))
        });
        group.bench_function(format!("ring_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| conv(black_box(x.view()), black_box(w.view()), &g).expect("conv"))
            })
        });
        let (x64, w64) = (exact_f64(&x.view()), exact_f64(&w.view()));
        group.bench_function(format!("exact_f64_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| conv(black_box(x64.view()), black_box(w64.view()), &g).expect("conv"))
            })
        });
        let (ring, limbs, wl) = limb_plan(&w.view(), 0);
        let xr = x.mapv(|v| v & ring.mask());
        group.bench_function(format!("limbs_f64_1t/{id}"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let xs = limbs.split(black_box(xr.view())).expect("split");
                    limbs
                        .join(conv(xs.view(), wl.view(), &g).expect("conv"))
                        .expect("join")
                })
            })
        });
        let wf = random_f32(7, ws);
        let plan = tract_conv2d(xs, &wf, 1).expect("tract conv plan");
        let xf = tvalue(&random_f32(8, xs)).expect("tract input");
        group.bench_function(format!("tract_f32/{id}"), |b| {
            b.iter(|| run(&plan, black_box(&xf)).expect("tract run"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_conv);
criterion_main!(benches);
