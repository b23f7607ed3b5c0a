//! One secure prediction end to end over loopback QUIC (TLS 1.3, pinned
//! certificate, token), against the same prediction over the in-memory
//! channel and plaintext tract, for the MNIST MLP:
//!
//! - `quic_prediction/{quic,memory}/batch_B`: the client graph plus one
//!   round trip per SecureLinear op for a batch of B MNIST images, material
//!   ready (the online phase; offline batches are made outside the timed
//!   loop, as many as the iterations use);
//! - `quic_prediction/plaintext/batch_B`: tract f32 on the original model.
//!
//! Throughput is set to B, so "elem/s" reads as predictions per second.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use secinfer_converter::{Options, convert_file};
use secinfer_protocol::Channel;
use secinfer_tract_ext::{ClientModel, InMemoryChannel, MAX_BATCH, ServerModel};
use secinfer_transport::{Limits, Loopback};
use tract_onnx::prelude::*;

fn model_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx-models/mnist_mlp.onnx")
}

/// B inputs in the MLP's input shape (values in [0, 1), like MNIST pixels).
fn inputs(b: usize) -> Tensor {
    let data: Vec<f32> = (0..b * 784)
        .map(|i| ((i * 37) % 256) as f32 / 256.0)
        .collect();
    tract_ndarray::Array4::from_shape_vec((b, 1, 28, 28), data)
        .expect("shape")
        .into_tensor()
}

/// Times `iters` predictions of batch `input`, making material first.
fn timed<C: Channel + 'static>(client: &ClientModel<C>, input: &Tensor, iters: u64) -> Duration {
    let b = client.inferences_in(input);
    let need = b * iters as usize;
    let ready = client.backend().ready();
    if ready < need {
        client
            .backend()
            .preprocess_in_batches(need - ready, MAX_BATCH)
            .expect("offline phase");
    }
    let start = Instant::now();
    for _ in 0..iters {
        black_box(
            client
                .predict(tvec!(input.clone().into_tvalue()))
                .expect("prediction"),
        );
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let converted = convert_file(&model_path(), &Options::default()).expect("converting the MLP");
    let server =
        Arc::new(ServerModel::from_bytes(&converted.server.encode_to_vec()).expect("server model"));
    let client_bytes = converted.client.encode_to_vec();
    let lo = Loopback::start(server.clone(), server.digest(), Limits::default()).expect("server");
    let quic = ClientModel::from_bytes(
        &client_bytes,
        lo.connect(server.digest()).expect("connecting"),
    )
    .expect("client over QUIC");
    let memory = ClientModel::from_bytes(&client_bytes, InMemoryChannel::new(server.clone()))
        .expect("client in memory");
    let plain = tract_onnx::onnx()
        .model_for_path(model_path())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plaintext model");

    let mut g = c.benchmark_group("quic_prediction");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for b in [1usize, 100] {
        let input = inputs(b);
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("quic/batch_{b}"), |bench| {
            bench.iter_custom(|iters| timed(&quic, &input, iters))
        });
        g.bench_function(format!("memory/batch_{b}"), |bench| {
            bench.iter_custom(|iters| timed(&memory, &input, iters))
        });
        g.bench_function(format!("plaintext/batch_{b}"), |bench| {
            bench.iter(|| black_box(plain.run(tvec!(input.clone().into_tvalue())).expect("run")))
        });
    }
    g.finish();
    let t = quic.backend().channel().traffic();
    println!("QUIC traffic during the bench: {t:?}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
