//! Every kind of step of the secure program, end to end in `logits` mode:
//! small ONNX graphs around a convolution, converted, evaluated jointly (HE
//! offline phase and OT correlations for real, in memory) and compared with
//! plaintext tract. Pools with padding and odd divisors, global pools,
//! concatenation, slicing, padding, transposition, constant factors,
//! subtraction, and a model that ends in its own ArgMax.

use prost::Message;
use rand::{Rng, SeedableRng};
use secinfer_converter::Options;
use secinfer_model::StepOp;
use tract_onnx::pb;
use tract_onnx::prelude::*;

mod common;

fn float_tensor(name: &str, dims: &[i64], data: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn int_tensor(name: &str, data: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: data,
        ..Default::default()
    }
}

fn value_info(
    name: &str,
    dims: &[Option<i64>],
    elem: pb::tensor_proto::DataType,
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Some(v) => Value::DimValue(*v),
                                None => Value::DimParam("N".into()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn node(
    name: &str,
    op: &str,
    input: &[&str],
    output: &str,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: input.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn seeded(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 2.0 * scale)
        .collect()
}

/// `x [N, 2, 6, 6] → conv 3x3 pad 1 (4 channels) → body → Flatten → Gemm
/// (to 3) → y`: `body` maps tensor "c" [N, 4, 6, 6] to tensor "b" and
/// returns its per-sample element count.
fn network(
    body: Vec<pb::NodeProto>,
    mut extra: Vec<pb::TensorProto>,
    body_len: i64,
    tail: Vec<pb::NodeProto>,
    output: pb::ValueInfoProto,
) -> Vec<u8> {
    let mut initializer = vec![
        float_tensor("cw", &[4, 2, 3, 3], seeded(1, 72, 0.5)),
        float_tensor("cb", &[4], seeded(2, 4, 0.2)),
        float_tensor("fw", &[body_len, 3], seeded(3, body_len as usize * 3, 0.3)),
        float_tensor("fb", &[3], seeded(4, 3, 0.1)),
        int_tensor("flat", vec![0, -1]),
    ];
    initializer.append(&mut extra);
    let mut nodes = vec![node(
        "conv",
        "Conv",
        &["x", "cw", "cb"],
        "c",
        vec![attr_ints("pads", &[1, 1, 1, 1])],
    )];
    nodes.extend(body);
    nodes.push(node("flatten", "Reshape", &["b", "flat"], "f", vec![]));
    nodes.push(node("fc", "Gemm", &["f", "fw", "fb"], "y", vec![]));
    nodes.extend(tail);
    let graph = pb::GraphProto {
        name: "ops".into(),
        node: nodes,
        initializer,
        input: vec![value_info(
            "x",
            &[None, Some(2), Some(6), Some(6)],
            pb::tensor_proto::DataType::Float,
        )],
        output: vec![output],
        ..Default::default()
    };
    common::opset13_model(graph).encode_to_vec()
}

fn logits() -> pb::ValueInfoProto {
    value_info("y", &[None, Some(3)], pb::tensor_proto::DataType::Float)
}

/// Converts in logits mode (inputs in [-1, 1]), checks the program holds
/// `expect` steps, runs 40 random inputs securely and in plaintext, and
/// returns (secure, plain) outputs as f32.
fn run(bytes: &[u8], expect: &[&str]) -> (Vec<f32>, Vec<f32>, f64) {
    let options = Options {
        input_bound: 1.0,
        ..Options::default()
    };
    let converted = secinfer_converter::convert(bytes, &options).expect("converts");
    let steps: Vec<&str> = converted
        .program
        .as_ref()
        .unwrap()
        .steps
        .iter()
        .map(|s| s.op.op_type())
        .collect();
    for e in expect {
        assert!(steps.contains(e), "no {e} in {steps:?}");
    }
    let mut pair = common::SecurePair::new(&converted);
    let x = seeded(5, 40 * 72, 1.0);
    let input = tract_ndarray::ArrayD::from_shape_vec(vec![40, 2, 6, 6], x)
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
    let f = |t: &TValue| -> Vec<f32> {
        t.cast_to::<f32>()
            .unwrap()
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    };
    (
        f(&secure[0]),
        f(&plain[0]),
        common::tolerance(&converted, 1.0, 0.04),
    )
}

fn assert_close(name: &str, (secure, plain, tol): (Vec<f32>, Vec<f32>, f64)) {
    assert_eq!(secure.len(), plain.len(), "{name}");
    let err = secure
        .iter()
        .zip(&plain)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    // the converter's per-layer bound; pooling, slicing and the like add no error
    assert!(
        err <= tol.max(1e-3),
        "{name}: max error {err}, tolerance {tol}"
    );
}

#[test]
fn pools_with_padding_odd_divisors_and_global_pools() {
    // average 3x3 stride 2 pad 1 counting pads (divisor 9) -> [N,4,3,3]
    let avg = network(
        vec![node(
            "avg",
            "AveragePool",
            &["c"],
            "b",
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_int("count_include_pad", 1),
            ],
        )],
        vec![],
        36,
        vec![],
        logits(),
    );
    assert_close(
        "AveragePool 3x3",
        run(&avg, &["SecureSumPool", "SecureMulConst"]),
    );
    // average 2x2 (a power of two: a relabelled sum)
    let avg2 = network(
        vec![node(
            "avg",
            "AveragePool",
            &["c"],
            "b",
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        )],
        vec![],
        36,
        vec![],
        logits(),
    );
    assert_close("AveragePool 2x2", run(&avg2, &["SecureSumPool"]));
    // max 3x3 stride 2 with padding (padding cells never win)
    let max = network(
        vec![node(
            "max",
            "MaxPool",
            &["c"],
            "b",
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
        )],
        vec![],
        36,
        vec![],
        logits(),
    );
    assert_close("MaxPool 3x3 padded", run(&max, &["SecureMaxPool"]));
    // global max and global average side by side, concatenated on channels
    let global = network(
        vec![
            node("gmax", "GlobalMaxPool", &["c"], "g1", vec![]),
            node("gavg", "GlobalAveragePool", &["c"], "g2", vec![]),
            node(
                "cat",
                "Concat",
                &["g1", "g2"],
                "b",
                vec![attr_int("axis", 1)],
            ),
        ],
        vec![],
        8,
        vec![],
        logits(),
    );
    assert_close(
        "global pools",
        run(
            &global,
            &["SecureGlobalMaxPool", "SecureGlobalSumPool", "SecureConcat"],
        ),
    );
}

#[test]
fn layout_steps_and_constant_factors() {
    // relu, slice the middle 4x4, zero-pad it back by one, transpose H and W,
    // halve, subtract from the conv's own output cropped the same way
    let body = vec![
        node("relu", "Relu", &["c"], "r", vec![]),
        node(
            "slice",
            "Slice",
            &["r", "starts", "ends", "axes"],
            "s",
            vec![],
        ),
        node("pad", "Pad", &["s", "pads"], "p", vec![]),
        node(
            "transpose",
            "Transpose",
            &["p"],
            "t",
            vec![attr_ints("perm", &[0, 1, 3, 2])],
        ),
        node("half", "Mul", &["t", "half"], "h", vec![]),
        node("sub", "Sub", &["c", "h"], "b", vec![]),
    ];
    let extra = vec![
        int_tensor("starts", vec![1, 1]),
        int_tensor("ends", vec![5, 5]),
        int_tensor("axes", vec![2, 3]),
        int_tensor("pads", vec![0, 0, 1, 1, 0, 0, 1, 1]),
        float_tensor("half", &[], vec![0.5]),
    ];
    let bytes = network(body, extra, 144, vec![], logits());
    assert_close(
        "layout",
        run(
            &bytes,
            &[
                "SecureSlice",
                "SecurePad",
                "SecureTranspose",
                "SecureMulConst",
                "SecureSub",
                "SecureRelu",
            ],
        ),
    );
}

#[test]
fn a_model_ending_in_its_own_argmax_reveals_the_index_in_logits_mode() {
    let bytes = network(
        vec![node("relu", "Relu", &["c"], "b", vec![])],
        vec![],
        144,
        vec![node(
            "argmax",
            "ArgMax",
            &["y"],
            "class",
            vec![attr_int("axis", 1), attr_int("keepdims", 0)],
        )],
        value_info("class", &[None], pb::tensor_proto::DataType::Int64),
    );
    // y is an intermediate now: the output is the class
    let mut m = pb::ModelProto::decode(&bytes[..]).unwrap();
    m.graph.as_mut().unwrap().output[0].name = "class".into();
    let bytes = m.encode_to_vec();
    let (secure, plain, _) = run(&bytes, &["SecureArgMax", "SecureReveal"]);
    assert_eq!(secure.len(), 40);
    // near-ties may go either way within the rounding; nearly all agree
    let agree = secure.iter().zip(&plain).filter(|(a, b)| a == b).count();
    assert!(
        agree >= 38,
        "{agree}/40 indices agree: {secure:?} vs {plain:?}"
    );
    let converted = secinfer_converter::convert(
        &bytes,
        &Options {
            input_bound: 1.0,
            ..Options::default()
        },
    )
    .unwrap();
    let program = converted.program.unwrap();
    let revealed: Vec<&StepOp> = program
        .steps
        .iter()
        .filter(|s| s.op == StepOp::Reveal)
        .map(|s| &s.op)
        .collect();
    assert_eq!(revealed.len(), 1, "only the index is revealed");
}
