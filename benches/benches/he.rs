//! The HE offline phase, per operation, on the bundled models' real layers.
//!
//! One ciphertext carries one input (or output) feature of up to 8192
//! inferences, so every cost here is per batch of up to 8192 and does not
//! depend on how many inferences the batch holds (`evaluate_1` vs
//! `evaluate_8192` shows it). Throughput is set to the batch size, so
//! criterion's "elem/s" reads as inferences per second at that batch size.
//!
//! - `he_ciphertext/encrypt`, `/decrypt`: one mask ciphertext, one reply
//!   ciphertext (client side).
//! - `he_layer/mlp_opK/evaluate_B`: the server's whole work for MLP layer K
//!   and a batch of B (products, re-randomisation, flooding, shrinking).
//! - `he_layer/mlp_opK/blocks_B`: the same with the block packing that
//!   `Packing::choose` picks for a batch of B (cost follows B).
//! - `he_layer/cnn_opK/one_channel`: the same for one output channel of a CNN
//!   convolution (the layer costs about `channels ×` that).
//!
//! Bytes per ciphertext (up and down) are printed once at start.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use rand::{Rng, SeedableRng};
use secinfer_converter::{Options, convert_file};
use secinfer_he::{
    ClientKey, FirstBlocks, HeParams, LinearForm, Packing, ServerKey, evaluate, evaluate_blocks,
};
use secinfer_protocol::MaskedLinear;
use secinfer_tract_ext::ServerModel;

const N: usize = 8192;

fn server_model(name: &str) -> Arc<ServerModel> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../onnx-models")
        .join(name);
    let converted = convert_file(&path, &Options::default()).expect("converting a bundled model");
    Arc::new(
        ServerModel::from_bytes(&converted.server.encode_to_vec()).expect("loading server model"),
    )
}

fn masks(count: usize, len: usize, bits: u32) -> Vec<Vec<u64>> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| rng.next_u64() & ((1 << bits) - 1))
                .collect()
        })
        .collect()
}

fn run_evaluate(key: &ServerKey, form: &dyn LinearForm, cts: &[Vec<u8>], count: usize) -> usize {
    let mut replies = 0;
    evaluate(key, form, cts.to_vec(), count, &mut |p| {
        replies += p.ciphertexts.len();
        Ok(())
    })
    .expect("evaluate");
    replies
}

fn bench_he(c: &mut Criterion) {
    let params = HeParams::for_ring(37).expect("parameters");
    let client = ClientKey::generate(&params);
    let key = ServerKey::from_bytes(&params, &client.public_key_bytes()).expect("key");
    let mlp = server_model("mnist_mlp.onnx");
    let cnn = server_model("mnist_cnn.onnx");

    // One ciphertext each way, and their sizes.
    let one = masks(N, 1, 37);
    let views: Vec<&[u64]> = one.iter().map(|m| &m[..]).collect();
    let up = client.encrypt(&views, 1).expect("encrypt");
    let form = mlp.he_form(2).expect("op 2");
    let mlp2_in = masks(N, form.input_len(), 37);
    let v: Vec<&[u64]> = mlp2_in.iter().map(|m| &m[..]).collect();
    let cts = client.encrypt(&v, form.input_len()).expect("encrypt");
    let mut down = Vec::new();
    evaluate(&key, form, cts, N, &mut |p| {
        down = p.ciphertexts;
        Ok(())
    })
    .expect("evaluate");
    println!(
        "bytes per ciphertext: mask (up) {}, reply (down) {}; public key {}",
        up[0].len(),
        down[0].len(),
        client.public_key_bytes().len()
    );

    let mut g = c.benchmark_group("he_ciphertext");
    g.sample_size(20);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("encrypt", |b| {
        b.iter(|| client.encrypt(black_box(&views), 1).expect("encrypt"))
    });
    let reply = vec![down[0].clone()];
    g.bench_function("decrypt", |b| {
        b.iter(|| client.decrypt(black_box(&reply), N, 1).expect("decrypt"))
    });
    g.finish();

    let mut g = c.benchmark_group("he_layer");
    g.sample_size(10);
    for op in 0..3u32 {
        let form = mlp.he_form(op).expect("op");
        let m = masks(N, form.input_len(), 37);
        let v: Vec<&[u64]> = m.iter().map(|m| &m[..]).collect();
        let cts = client.encrypt(&v, form.input_len()).expect("encrypt");
        let counts: &[usize] = if op == 0 { &[1, N] } else { &[N] };
        for &count in counts {
            g.throughput(Throughput::Elements(count as u64));
            g.bench_function(format!("mlp_op{op}/evaluate_{count}"), |b| {
                b.iter(|| run_evaluate(&key, form, black_box(&cts), count))
            });
        }
    }
    // The block packing, as `Packing::choose` lays out each batch size
    // (the per-coefficient rows above cost the same for any batch).
    for op in 0..3u32 {
        let form = mlp.he_form(op).expect("op");
        for count in [1usize, 10, 100, 1000] {
            let Packing::Blocks(shape) =
                Packing::choose(&params, form.input_len(), form.output_len(), count)
                    .expect("layout")
            else {
                continue;
            };
            let m = masks(count, form.input_len(), 37);
            let v: Vec<&[u64]> = m.iter().map(|m| &m[..]).collect();
            let cts = client
                .encrypt_blocks(&shape, &v, 0..shape.input_ciphertexts())
                .expect("encrypt");
            g.throughput(Throughput::Elements(count as u64));
            g.bench_function(format!("mlp_op{op}/blocks_{count}"), |b| {
                b.iter(|| {
                    let mut replies = 0;
                    evaluate_blocks(&key, form, &shape, black_box(cts.clone()), &mut |p| {
                        replies += p.len();
                        Ok(())
                    })
                    .expect("evaluate");
                    replies
                })
            });
        }
    }
    for op in 0..2u32 {
        let inner = cnn.he_form(op).expect("op");
        let form = FirstBlocks::up_to_outputs(inner, 1);
        let m = masks(N, form.input_len(), 37);
        let v: Vec<&[u64]> = m.iter().map(|m| &m[..]).collect();
        let cts = client.encrypt(&v, form.input_len()).expect("encrypt");
        g.throughput(Throughput::Elements(N as u64));
        g.bench_function(format!("cnn_op{op}/one_channel"), |b| {
            b.iter(|| run_evaluate(&key, &form, black_box(&cts), N))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_he);
criterion_main!(benches);
