//! Sigmoid, Tanh, LeakyRelu and Clip in `logits` mode: a small network
//! `Gemm → activation → Gemm` converted, evaluated jointly (in memory, HE
//! offline phase and OT correlations for real) and compared with plaintext
//! tract, within the activation's proven error carried through the last
//! layer plus the fixed-point bound.

use prost::Message;
use rand::{Rng, SeedableRng};
use secinfer_converter::Options;
use tract_onnx::pb;
use tract_onnx::prelude::*;

mod common;

fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn value_info(name: &str, width: i64) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(Value::DimParam("N".into())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(Value::DimValue(width)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `x [N, 8] → Gemm → act → Gemm → y [N, 3]`, seeded weights; returns the
/// model and the largest row L1 norm of the last layer's weights.
fn network(act: &str, attribute: Vec<pb::AttributeProto>, extra: &[(&str, f32)]) -> (Vec<u8>, f64) {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(7);
    let mut normal = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 2.0 * scale)
            .collect()
    };
    let (w1, b1, w2, b2) = (
        normal(48, 0.8),
        normal(6, 0.2),
        normal(18, 0.8),
        normal(3, 0.2),
    );
    let l1 = (0..3)
        .map(|o| (0..6).map(|i| f64::from(w2[i * 3 + o].abs())).sum::<f64>())
        .fold(0.0, f64::max);
    let mut initializer = vec![
        tensor("W1", &[8, 6], w1),
        tensor("b1", &[6], b1),
        tensor("W2", &[6, 3], w2),
        tensor("b2", &[3], b2),
    ];
    let mut act_inputs = vec!["h".to_string()];
    for (name, v) in extra {
        initializer.push(tensor(name, &[], vec![*v]));
        act_inputs.push(name.to_string());
    }
    let node = |name: &str, op: &str, input: Vec<String>, output: &str, attribute| pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input,
        output: vec![output.into()],
        attribute,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "act".into(),
        node: vec![
            node(
                "fc1",
                "Gemm",
                vec!["x".into(), "W1".into(), "b1".into()],
                "h",
                vec![],
            ),
            node("the_activation", act, act_inputs, "a", attribute),
            node(
                "fc2",
                "Gemm",
                vec!["a".into(), "W2".into(), "b2".into()],
                "y",
                vec![],
            ),
        ],
        initializer,
        input: vec![value_info("x", 8)],
        output: vec![value_info("y", 3)],
        ..Default::default()
    };
    (common::opset13_model(graph).encode_to_vec(), l1)
}

fn float_attr(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// Converts in logits mode with inputs in [-2, 2], runs 200 random inputs
/// securely and in plaintext; returns the largest output error and the
/// program's piecewise step.
fn run(bytes: &[u8]) -> (f64, secinfer_model::StepOp) {
    let options = Options {
        input_bound: 2.0,
        ..Options::default()
    };
    let converted = secinfer_converter::convert(bytes, &options).expect("converts");
    let step = converted
        .program
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .find(|s| matches!(s.op, secinfer_model::StepOp::Piecewise { .. }))
        .expect("a piecewise-linear step")
        .op
        .clone();
    let mut pair = common::SecurePair::new(&converted);
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(11);
    let x: Vec<f32> = (0..200 * 8)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 4.0 - 2.0)
        .collect();
    let input = tract_ndarray::ArrayD::from_shape_vec(vec![200, 8], x)
        .unwrap()
        .into_tensor();
    let secure = pair.predict(input.clone());
    let plain = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap()
        .run(tvec!(input.into_tvalue()))
        .unwrap();
    let (s, p) = (
        secure[0].to_plain_array_view::<f32>().unwrap(),
        plain[0].to_plain_array_view::<f32>().unwrap(),
    );
    let err = s
        .iter()
        .zip(p.iter())
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    (err, step)
}

#[test]
fn sigmoid_and_tanh_stay_within_their_proven_error() {
    for (act, bound) in [
        ("Sigmoid", secinfer_converter::bounds::SIGMOID_ERROR),
        ("Tanh", secinfer_converter::bounds::TANH_ERROR),
    ] {
        let (bytes, l1) = network(act, vec![], &[]);
        let (err, step) = run(&bytes);
        let secinfer_model::StepOp::Piecewise {
            function, breaks, ..
        } = step
        else {
            unreachable!()
        };
        assert_eq!(function, act);
        assert!(breaks.len() >= 10, "{act}: {} breakpoints", breaks.len());
        // the approximation's error through the last layer, plus rounding
        let limit = bound * l1 + 5e-3;
        assert!(err <= limit, "{act}: error {err} above {limit}");
        assert!(err > 0.0, "{act}: an approximation is not exact");
    }
}

#[test]
fn leaky_relu_and_clip_are_exact_up_to_the_fixed_point_rounding() {
    let (leaky, _) = network("LeakyRelu", vec![float_attr("alpha", 0.1)], &[]);
    let (clip, _) = network("Clip", vec![], &[("lo", -0.5), ("hi", 0.7)]);
    for (name, bytes) in [("LeakyRelu", leaky), ("Clip", clip)] {
        let (err, step) = run(&bytes);
        let secinfer_model::StepOp::Piecewise { function, .. } = step else {
            unreachable!()
        };
        assert_eq!(function, name);
        assert!(err < 2e-3, "{name}: error {err}");
    }
}

#[test]
fn clip_from_zero_to_infinity_is_a_relu() {
    let (bytes, _) = network("Clip", vec![], &[("lo", 0.0)]);
    let converted = secinfer_converter::convert(
        &bytes,
        &Options {
            input_bound: 2.0,
            ..Options::default()
        },
    )
    .unwrap();
    let ops: Vec<&str> = converted
        .program
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .map(|s| s.op.op_type())
        .collect();
    assert!(
        ops.contains(&"SecureRelu") && !ops.contains(&"SecurePiecewise"),
        "{ops:?}"
    );
}
