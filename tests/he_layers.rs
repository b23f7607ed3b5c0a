//! The HE offline phase on the bundled models' real layers: what the client
//! decrypts is exactly `W·r − s` in Z_2^k, where `W·r` is computed here by
//! the server's own online op (`W·r + b` minus `W·0 + b`).
//!
//! The big convolutions are checked on their first block group of outputs
//! (output channels), through the same code path as the rest; the whole
//! layers are exercised by the 10,000-image agreement tests.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use prost::Message;
use rand::{Rng, SeedableRng};
use secinfer_he::{
    BlockShape, ClientKey, FirstBlocks, HeParams, Packing, ServerKey, evaluate, evaluate_packed,
};
use secinfer_protocol::MaskedLinear;
use secinfer_protocol::offline::packing_for;
use secinfer_tract_ext::ServerModel;

mod common;

/// At most this many outputs of a layer are checked.
const MAX_OUTPUTS: usize = 600;

fn check_model(name: &str) {
    let bytes = std::fs::read(common::model(name)).unwrap();
    let converted = common::convert_bytes(&bytes);
    let server = Arc::new(ServerModel::from_bytes(&converted.server.encode_to_vec()).unwrap());
    let layers = server.layers().to_vec();
    let params = HeParams::for_ring(layers[0].ring_bits).unwrap();
    let client = ClientKey::generate(&params);
    let key = ServerKey::from_bytes(&params, &client.public_key_bytes()).unwrap();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(11);
    let count = 5;
    for spec in &layers {
        let op = spec.op_id;
        let ring = spec.ring().unwrap();
        let r: Vec<Vec<u64>> = (0..count)
            .map(|_| {
                (0..spec.input_len())
                    .map(|_| rng.next_u64() & ring.mask())
                    .collect()
            })
            .collect();
        let form = FirstBlocks::up_to_outputs(server.he_form(op).unwrap(), MAX_OUTPUTS);
        let views: Vec<&[u64]> = r.iter().map(|v| &v[..]).collect();
        let cts = client.encrypt(&views, spec.input_len()).unwrap();
        let mut checked = 0;
        let mut parts = Vec::new();
        evaluate(&key, &form, cts, count, &mut |p| {
            parts.push(p);
            Ok(())
        })
        .unwrap();

        // W·r = (W·r + b) − (W·0 + b), from the online op.
        let stacked =
            ArrayD::from_shape_vec(IxDyn(&spec.batch_input_shape(count)), r.concat()).unwrap();
        let zeros = ArrayD::zeros(IxDyn(&spec.batch_input_shape(count)));
        let wrb = server.evaluate(op, stacked).unwrap();
        let b = server.evaluate(op, zeros).unwrap();
        let out_len = spec.output_len();
        let wr: Vec<u64> = wrb
            .iter()
            .zip(b.iter())
            .map(|(a, b)| ring.reduce(a.wrapping_sub(*b)))
            .collect();
        for p in parts {
            let c = client
                .decrypt(&p.ciphertexts, count, p.outputs.len())
                .unwrap();
            for (k, &o) in p.outputs.iter().enumerate() {
                for i in 0..count {
                    assert_eq!(
                        ring.reduce(c[k][i].wrapping_add(p.masks[i][k])),
                        wr[i * out_len + o],
                        "{name} op {op}: output {o} of inference {i}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= count * out_len.min(MAX_OUTPUTS / 4),
            "{name} op {op}: only {checked} checked"
        );
        println!(
            "{name} op {op} ({}): {checked} values exact",
            spec.source_op
        );
    }
}

/// The packings by polynomial products on every layer that takes one for
/// small batches: a batch of 1, of 2, and of 7 (for dense layers also in
/// groups of 4, the last partial), each decrypting exactly to `W·r − s` at
/// every output.
fn check_blocks(name: &str) -> usize {
    let bytes = std::fs::read(common::model(name)).unwrap();
    let converted = common::convert_bytes(&bytes);
    let server = Arc::new(ServerModel::from_bytes(&converted.server.encode_to_vec()).unwrap());
    let layers = server.layers().to_vec();
    let params = HeParams::for_ring(layers[0].ring_bits).unwrap();
    let client = ClientKey::generate(&params);
    let key = ServerKey::from_bytes(&params, &client.public_key_bytes()).unwrap();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(12);
    let mut layouts = 0;
    for spec in &layers {
        let op = spec.op_id;
        let ring = spec.ring().unwrap();
        let form = server.he_form(op).unwrap();
        for count in [1usize, 2, 7] {
            let chosen = packing_for(&params, spec, count).unwrap();
            let packings: Vec<Packing> = match chosen {
                Packing::Blocks(s) if count == 7 => vec![
                    chosen,
                    Packing::Blocks(BlockShape {
                        width: 4,
                        in_block: s.in_block.min(params.degree() / 4),
                        out_block: 1,
                        ..s
                    }),
                ],
                Packing::PerCoefficient { .. } => continue,
                _ => vec![chosen],
            };
            for packing in packings {
                let shape = packing.layout().unwrap();
                let r: Vec<Vec<u64>> = (0..count)
                    .map(|_| {
                        (0..spec.input_len())
                            .map(|_| rng.next_u64() & ring.mask())
                            .collect()
                    })
                    .collect();
                let views: Vec<&[u64]> = r.iter().map(|v| &v[..]).collect();
                let cts = client
                    .encrypt_blocks(shape, &views, 0..shape.input_ciphertexts())
                    .unwrap();
                let stacked =
                    ArrayD::from_shape_vec(IxDyn(&spec.batch_input_shape(count)), r.concat())
                        .unwrap();
                let zeros = ArrayD::zeros(IxDyn(&spec.batch_input_shape(count)));
                let wrb = server.evaluate(op, stacked).unwrap();
                let b = server.evaluate(op, zeros).unwrap();
                let (wrb, b) = (wrb.as_slice().unwrap(), b.as_slice().unwrap());
                let out_len = spec.output_len();
                let mut checked = vec![false; count * out_len];
                evaluate_packed(&key, form, &packing, cts, &mut |parts| {
                    for part in parts {
                        let c = client
                            .decrypt_block(shape, part.index, &part.ciphertext)
                            .unwrap();
                        for ((kept, c), s) in shape.kept(part.index).iter().zip(c).zip(part.masks) {
                            let at = kept.inference * out_len + kept.output;
                            let wr = ring.reduce(wrb[at].wrapping_sub(b[kept.output]));
                            assert_eq!(
                                ring.reduce(c.wrapping_add(s)),
                                wr,
                                "{name} op {op}, {packing:?}: output {} of inference {}",
                                kept.output,
                                kept.inference
                            );
                            assert!(!checked[at], "output {at} twice");
                            checked[at] = true;
                        }
                    }
                    Ok(())
                })
                .unwrap();
                assert!(checked.iter().all(|&c| c), "{name} op {op}: every output");
                println!(
                    "{name} op {op}, batch {count}: {} exact",
                    packing.describe()
                );
                layouts += 1;
            }
        }
    }
    layouts
}

#[test]
fn mnist_mlp_layers_decrypt_to_w_r_minus_s() {
    check_model("mnist_mlp.onnx");
    assert_eq!(
        check_blocks("mnist_mlp.onnx"),
        3 * 4,
        "every MLP layer takes blocks"
    );
}

#[test]
fn mnist_cnn_layers_decrypt_to_w_r_minus_s() {
    check_model("mnist_cnn.onnx");
}

#[test]
fn breast_cancer_layers_decrypt_to_w_r_minus_s() {
    check_model("breast_cancer_mlp.onnx");
    assert!(check_blocks("breast_cancer_mlp.onnx") >= 4);
}

#[test]
fn cnn_layers_in_blocks_for_small_batches() {
    // every layer, the convolutions included, takes a packing by polynomial
    // products for batches of 1, 2 and 7
    assert!(check_blocks("mnist_cnn.onnx") >= 4 * 3);
    assert!(check_blocks("mnist_cnn_small.onnx") >= 4 * 3);
}
