//! The weight-extraction attack, run against both kinds of model.
//!
//! In `activations` mode a client built from the crate APIs sends unit
//! vectors (and zero) to every linear op and reads every weight and bias of
//! `server.onnx` exactly. In `logits` mode the same client learns nothing
//! before the final reveal: every bit of every message it receives is
//! uniform (a χ² test over many runs of a fixed input), and the
//! distribution of its view is the same for two different sets of weights
//! with the same program (the model with its hidden units permuted).

use std::sync::Arc;

use prost::Message;
use secinfer_converter::{Converted, Options};
use secinfer_model::Reveal;
use secinfer_protocol::private::PrivateMessage;
use secinfer_protocol::{Channel, ClientSession, Preprocessor};
use secinfer_ring::Ring;
use secinfer_tract_ext::{ClientModel, InMemoryChannel, ServerModel};
use tract_onnx::pb;
use tract_onnx::prelude::*;

mod common;

const MODEL: &str = "breast_cancer_mlp.onnx";

fn convert(bytes: &[u8], reveal: Reveal) -> Converted {
    let options = Options {
        calibration: Some(secinfer::data::calibration_samples("breast-cancer", 1000).unwrap()),
        reveal,
        ..Options::default()
    };
    secinfer_converter::convert(bytes, &options).expect("converts")
}

/// The INT64 initializer `name` of `server.onnx`.
fn initializer(server: &pb::ModelProto, name: &str) -> Vec<i64> {
    let g = server.graph.as_ref().unwrap();
    let t = g.initializer.iter().find(|t| t.name == name).unwrap();
    t.raw_data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn activations_mode_gives_away_every_weight() {
    let bytes = std::fs::read(common::model(MODEL)).unwrap();
    let converted = convert(&bytes, Reveal::Activations);
    let server = Arc::new(ServerModel::from_bytes(&converted.server.encode_to_vec()).unwrap());
    let layers = secinfer_protocol::MaskedLinear::layers(&*server).to_vec();
    let ring = Ring::new(layers[0].ring_bits).unwrap();
    let channel = InMemoryChannel::new(server.clone());

    // The attacker: an honest offline phase, then crafted online requests.
    let n = layers.iter().map(|l| l.input_len()).max().unwrap() + 1;
    let mut session = ClientSession::new(layers.clone());
    let mut pre = Preprocessor::new(layers.clone()).unwrap();
    channel.hello(pre.hello()).unwrap();
    let first = pre.start(n).unwrap();
    while let Some(req) = pre.next_request(first).unwrap() {
        channel
            .offline(req, &mut |reply| {
                for m in pre.accept(reply)? {
                    session.accept_preprocessing(m)?;
                }
                Ok(())
            })
            .unwrap();
    }
    let ids = session.reserve(n).unwrap();
    for spec in &layers {
        let (k, m) = (spec.weight_shape[0], spec.weight_shape[1]);
        assert_eq!(spec.input_shape, vec![1, k], "a dense layer");
        // row 0: zero; row j + 1: the unit vector e_j (one unit in the ring)
        let x =
            ndarray::Array2::from_shape_fn((k + 1, k), |(r, c)| u64::from(r == c + 1)).into_dyn();
        let req = session.mask(spec.op_id, &ids[..k + 1], &x).unwrap();
        let y = session.unmask(channel.round_trip(req).unwrap()).unwrap();
        let y = y.into_dimensionality::<ndarray::Ix2>().unwrap();
        let signed = |v: u64| ring.to_signed(v);
        let bias: Vec<i64> = (0..m).map(|o| signed(y[[0, o]])).collect();
        let mut weight = Vec::with_capacity(k * m);
        for j in 0..k {
            for o in 0..m {
                weight.push(signed(y[[j + 1, o]].wrapping_sub(y[[0, o]])));
            }
        }
        assert_eq!(
            weight,
            initializer(&converted.server, &format!("weight_{}", spec.op_id)),
            "op {}: the attacker reads the exact weights",
            spec.op_id
        );
        assert_eq!(
            bias,
            initializer(&converted.server, &format!("bias_{}", spec.op_id)),
            "op {}: and the exact bias",
            spec.op_id
        );
    }
}

/// An in-memory channel that records every message the client receives
/// during a private batch.
struct Recording {
    inner: InMemoryChannel<ServerModel>,
    seen: std::sync::Mutex<Vec<secinfer_mpc::Message>>,
}

impl Channel for Recording {
    fn round_trip(
        &self,
        r: secinfer_protocol::MaskedInput,
    ) -> anyhow::Result<secinfer_protocol::MaskedOutput> {
        self.inner.round_trip(r)
    }
    fn hello(&self, h: secinfer_protocol::OfflineHello) -> anyhow::Result<()> {
        self.inner.hello(h)
    }
    fn offline(
        &self,
        r: secinfer_protocol::MaskRequest,
        on_reply: &mut dyn FnMut(secinfer_protocol::ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.inner.offline(r, on_reply)
    }
    fn ot(&self, m: secinfer_ot::OtMessage) -> anyhow::Result<Option<secinfer_ot::OtMessage>> {
        self.inner.ot(m)
    }
    fn send_private(&self, m: PrivateMessage) -> anyhow::Result<()> {
        self.inner.send_private(m)
    }
    fn recv_private(&self) -> anyhow::Result<PrivateMessage> {
        let m = self.inner.recv_private()?;
        if let PrivateMessage::Step(s) = &m {
            self.seen.lock().unwrap().push(s.clone());
        }
        Ok(m)
    }
    fn traffic(&self) -> secinfer_protocol::Traffic {
        self.inner.traffic()
    }
}

const RUNS: usize = 64;
const BATCH: usize = 32;

/// Per message position (step, seq), one bit vector per run: what the
/// client received before the reveal, over `RUNS` batches of one fixed input.
fn client_views(converted: &Converted) -> Vec<Vec<Vec<u8>>> {
    let server = Arc::new(ServerModel::from_bytes(&converted.server.encode_to_vec()).unwrap());
    let client = ClientModel::from_bytes(
        &converted.client.encode_to_vec(),
        Recording {
            inner: InMemoryChannel::new(server),
            seen: Default::default(),
        },
    )
    .unwrap();
    let reveal_step = client
        .program()
        .unwrap()
        .steps
        .iter()
        .position(|s| s.op == secinfer_model::StepOp::Reveal)
        .unwrap() as u32;
    let data = secinfer::data::load("breast-cancer").unwrap();
    let row = data.inputs.index_axis(ndarray::Axis(0), 0).to_owned();
    let input = ndarray::stack(ndarray::Axis(0), &vec![row.view(); BATCH]).unwrap();
    client
        .backend()
        .preprocess_in_batches(RUNS * BATCH, secinfer_tract_ext::MAX_BATCH)
        .unwrap();
    let mut views: Vec<Vec<Vec<u8>>> = Vec::new();
    for _ in 0..RUNS {
        client
            .predict(tvec!(input.clone().into_tensor().into_tvalue()))
            .unwrap();
        let seen: Vec<_> = std::mem::take(&mut *client.backend().channel().seen.lock().unwrap());
        let before: Vec<_> = seen.into_iter().filter(|m| m.step < reveal_step).collect();
        if views.is_empty() {
            views = vec![Vec::new(); before.len()];
        }
        assert_eq!(before.len(), views.len(), "every run has the same messages");
        for (slot, m) in views.iter_mut().zip(before) {
            slot.push(m.payload);
        }
    }
    views
}

/// Bit positions of a message that vary over the runs: the others are
/// padding (a uniform bit is zero in all 64 runs with probability 2^-64).
fn active_bits(runs: &[Vec<u8>]) -> Vec<usize> {
    let len = runs[0].len() * 8;
    (0..len)
        .filter(|&i| runs.iter().any(|r| (r[i / 8] >> (i % 8)) & 1 == 1))
        .collect()
}

fn ones(runs: &[Vec<u8>], bit: usize) -> f64 {
    runs.iter()
        .filter(|r| (r[bit / 8] >> (bit % 8)) & 1 == 1)
        .count() as f64
}

/// χ² limit at z = 8 (Wilson–Hilferty): a false failure is below 10^-14.
fn chi2_limit(df: f64) -> f64 {
    let t = 2.0 / (9.0 * df);
    df * (1.0 - t + 8.0 * t.sqrt()).powi(3)
}

#[test]
fn logits_mode_shows_the_client_only_uniform_values_whatever_the_weights() {
    let bytes = std::fs::read(common::model(MODEL)).unwrap();
    let a = convert(&bytes, Reveal::Logits);
    let b = convert(&permute_hidden_units(&bytes), Reveal::Logits);
    assert_eq!(
        a.program, b.program,
        "the permuted model has the same program"
    );
    assert_ne!(a.digest, b.digest, "but other weights");
    let (va, vb) = (client_views(&a), client_views(&b));
    assert_eq!(va.len(), vb.len());
    assert!(va.len() >= 5, "{} messages before the reveal", va.len());
    let (mut total_bits, mut total_ones) = (0f64, 0f64);
    let (mut uniform, mut uniform_df) = (0f64, 0f64);
    let (mut same, mut same_df) = (0f64, 0f64);
    for (ra, rb) in va.iter().zip(&vb) {
        assert_eq!(ra[0].len(), rb[0].len());
        let active = active_bits(ra);
        // padding is the same for both models: the same bits never vary
        assert_eq!(active, active_bits(rb));
        for &bit in &active {
            let (ca, cb) = (ones(ra, bit), ones(rb, bit));
            let r = RUNS as f64;
            // each bit against Bin(RUNS, 1/2), for each model
            uniform += (ca - r / 2.0).powi(2) / (r / 4.0) + (cb - r / 2.0).powi(2) / (r / 4.0);
            uniform_df += 2.0;
            // and the two models' counts against each other
            if ca + cb > 0.0 {
                same += (ca - cb).powi(2) / (ca + cb);
                same_df += 1.0;
            }
            total_bits += 2.0 * r;
            total_ones += ca + cb;
        }
    }
    assert!(total_bits > 1e5, "{total_bits} bits observed");
    assert!(
        uniform < chi2_limit(uniform_df),
        "the client's view is not uniform: χ² {uniform} over {uniform_df} bits"
    );
    assert!(
        same < chi2_limit(same_df),
        "the client's view depends on the weights: χ² {same} over {same_df} bits"
    );
    let z = (total_ones - total_bits / 2.0) / (total_bits / 4.0).sqrt();
    assert!(z.abs() < 8.0, "bias over all bits: z = {z}");
}

/// The breast-cancer MLP with its 16 hidden units in another order: other
/// weight tensors, the same function and the same program.
fn permute_hidden_units(bytes: &[u8]) -> Vec<u8> {
    let mut m = pb::ModelProto::decode(bytes).unwrap();
    let g = m.graph.as_mut().unwrap();
    let gemms: Vec<pb::NodeProto> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Gemm")
        .cloned()
        .collect();
    assert_eq!(gemms.len(), 2);
    let trans_b = |n: &pb::NodeProto| {
        n.attribute
            .iter()
            .find(|a| a.name == "transB")
            .is_some_and(|a| a.i == 1)
    };
    let hidden = 16;
    let perm: Vec<usize> = (0..hidden).map(|i| (i * 5 + 3) % hidden).collect();
    // a new value for an initializer, from its dims and values
    type Edit<'a> = &'a dyn Fn(&[usize], &[f32]) -> Vec<f32>;
    let mut edit = |name: &str, f: Edit| {
        let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let vals: Vec<f32> = if t.raw_data.is_empty() {
            t.float_data.clone()
        } else {
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let out = f(&dims, &vals);
        t.float_data.clear();
        t.raw_data = out.iter().flat_map(|v| v.to_le_bytes()).collect();
    };
    // first layer: permute its output features (weight rows or columns, bias)
    let (w0, b0, tb0) = (
        gemms[0].input[1].clone(),
        gemms[0].input[2].clone(),
        trans_b(&gemms[0]),
    );
    edit(&w0, &|d, v| {
        let (r, c) = (d[0], d[1]);
        (0..r * c)
            .map(|i| {
                let (y, x) = (i / c, i % c);
                if tb0 {
                    v[perm[y] * c + x]
                } else {
                    v[y * c + perm[x]]
                }
            })
            .collect()
    });
    edit(&b0, &|_, v| perm.iter().map(|&p| v[p]).collect());
    // second layer: permute its input features the same way
    let (w1, tb1) = (gemms[1].input[1].clone(), trans_b(&gemms[1]));
    edit(&w1, &|d, v| {
        let (r, c) = (d[0], d[1]);
        (0..r * c)
            .map(|i| {
                let (y, x) = (i / c, i % c);
                if tb1 {
                    v[y * c + perm[x]]
                } else {
                    v[perm[y] * c + x]
                }
            })
            .collect()
    });
    m.encode_to_vec()
}
