//! The ONNX forms that ONNX's own pytorch-converted cases do not cover:
//! auto_pad SAME_UPPER/SAME_LOWER/VALID, ConvTranspose with output_shape and
//! auto_pad, group + dilation in ConvTranspose, MatMul with a constant left
//! operand, Gemm with transB/alpha/beta and a row bias, and a residual graph
//! that branches around secure ops. Each is converted, run securely, and
//! compared with plaintext tract on the original model.

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::tract_ndarray::Dimension;

mod common;

fn floats(name: &str, dims: &[usize], seed: usize) -> pb::TensorProto {
    let n: usize = dims.iter().product();
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        float_data: (0..n)
            .map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 16.0)
            .collect(),
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn float_attr(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

fn str_attr(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn input_info(shape: &[usize]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::dimension::Value;
    pb::ValueInfoProto {
        name: "x".into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(Value::DimValue(d as i64)),
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

fn model(
    input: &[usize],
    nodes: Vec<pb::NodeProto>,
    initializer: Vec<pb::TensorProto>,
    output: &str,
) -> pb::ModelProto {
    common::opset13_model(pb::GraphProto {
        name: "forms".into(),
        node: nodes,
        initializer,
        input: vec![input_info(input)],
        output: vec![pb::ValueInfoProto {
            name: output.into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        name: format!("{op}_{output}"),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// Converts, runs both ways, compares within the layers' summed error bounds.
fn check(name: &str, m: pb::ModelProto, input_shape: &[usize]) {
    let converted = common::convert_bytes(&m.encode_to_vec());
    let x: Tensor = tract_ndarray::ArrayD::from_shape_fn(input_shape.to_vec(), |ix| {
        let s: usize = ix
            .slice()
            .iter()
            .enumerate()
            .map(|(i, v)| (i + 3) * v)
            .sum();
        (s % 17) as f32 / 8.0 - 1.0
    })
    .into_tensor();
    let plain = tract_onnx::onnx()
        .model_for_proto_model(&m)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .and_then(|p| p.run(tvec!(x.clone().into_tvalue())))
        .unwrap_or_else(|e| panic!("{name}: plaintext tract: {e:#}"));
    let secure = common::SecurePair::new(&converted).predict(x);
    let (p, s) = (
        plain[0].to_plain_array_view::<f32>().unwrap(),
        secure[0].to_plain_array_view::<f32>().unwrap(),
    );
    assert_eq!(p.shape(), s.shape(), "{name}: shapes");
    // Inputs here are within [-1, 1]; later layers within the converter's bound.
    let tolerance = common::tolerance(&converted, 1.0, 0.03);
    let err = p
        .iter()
        .zip(s.iter())
        .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    assert!(
        err <= tolerance,
        "{name}: max error {err:.3e} above {tolerance:.3e}"
    );
    assert!(
        p.iter().any(|v| v.abs() > 0.05),
        "{name}: degenerate test output"
    );
}

fn conv_case(name: &str, op: &str, input: &[usize], w: &[usize], attrs: Vec<pb::AttributeProto>) {
    let m = model(
        input,
        vec![node(op, &["x", "w", "b"], "y", attrs)],
        vec![
            floats("w", w, 1),
            floats("b", &[if op == "Conv" { w[0] } else { w[1] * 2 }], 5),
        ],
        "y",
    );
    check(name, m, input);
}

#[test]
fn conv_auto_pad_forms() {
    conv_case(
        "same_upper",
        "Conv",
        &[2, 3, 7, 6],
        &[4, 3, 3, 2],
        vec![
            str_attr("auto_pad", "SAME_UPPER"),
            ints_attr("strides", &[2, 2]),
        ],
    );
    conv_case(
        "same_lower",
        "Conv",
        &[2, 3, 7, 6],
        &[4, 3, 4, 3],
        vec![str_attr("auto_pad", "SAME_LOWER")],
    );
    conv_case(
        "valid",
        "Conv",
        &[1, 2, 9],
        &[3, 2, 4],
        vec![str_attr("auto_pad", "VALID"), ints_attr("dilations", &[2])],
    );
    conv_case(
        "asymmetric pads",
        "Conv",
        &[1, 2, 5, 5],
        &[2, 1, 3, 3],
        vec![ints_attr("pads", &[0, 2, 1, 0]), int_attr("group", 2)],
    );
}

#[test]
fn conv_transpose_forms() {
    // ConvTranspose weights are [C, M/group, k..]; the bias has M = 2 * w[1] entries only for group 2.
    let base = |extra: Vec<pb::AttributeProto>| {
        let mut a = vec![int_attr("group", 2), ints_attr("strides", &[2, 3])];
        a.extend(extra);
        a
    };
    conv_case(
        "output_shape",
        "ConvTranspose",
        &[1, 4, 3, 4],
        &[4, 1, 3, 3],
        base(vec![ints_attr("output_shape", &[8, 12])]),
    );
    conv_case(
        "same_upper",
        "ConvTranspose",
        &[1, 4, 3, 4],
        &[4, 1, 3, 3],
        // tract (the plaintext reference) needs (k - 1) * dilation > stride - 1 for SAME.
        vec![
            int_attr("group", 2),
            ints_attr("strides", &[2, 2]),
            str_attr("auto_pad", "SAME_UPPER"),
        ],
    );
    conv_case(
        "dilated, output_padding",
        "ConvTranspose",
        &[1, 4, 3, 3],
        &[4, 1, 2, 2],
        base(vec![
            ints_attr("dilations", &[2, 1]),
            ints_attr("output_padding", &[1, 2]),
        ]),
    );
}

#[test]
fn matmul_and_gemm_forms() {
    // Constant left operand: y = A · x with x [N, K, cols].
    let m = model(
        &[2, 5, 3],
        vec![node("MatMul", &["a", "x"], "y", vec![])],
        vec![floats("a", &[4, 5], 2)],
        "y",
    );
    check("left matmul", m, &[2, 5, 3]);
    // Gemm with transB, alpha, beta and a [1, M] bias.
    let m = model(
        &[3, 6],
        vec![node(
            "Gemm",
            &["x", "w", "c"],
            "y",
            vec![
                int_attr("transB", 1),
                float_attr("alpha", 0.5),
                float_attr("beta", -2.0),
            ],
        )],
        vec![floats("w", &[4, 6], 3), floats("c", &[1, 4], 4)],
        "y",
    );
    check("gemm transB alpha beta", m, &[3, 6]);
    // Batched 3-D MatMul with a constant right operand.
    let m = model(
        &[2, 3, 6],
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![floats("w", &[6, 5], 6)],
        "y",
    );
    check("3-D matmul", m, &[2, 3, 6]);
}

#[test]
fn residual_graph_branches_around_secure_ops() {
    // y = relu(x·W1) · W2 + x : the client joins a secure op's output with its own input.
    let m = model(
        &[3, 6],
        vec![
            node("MatMul", &["x", "w1"], "h", vec![]),
            node("Relu", &["h"], "r", vec![]),
            node("MatMul", &["r", "w2"], "z", vec![]),
            node("Add", &["z", "x"], "y", vec![]),
        ],
        vec![floats("w1", &[6, 8], 7), floats("w2", &[8, 6], 8)],
        "y",
    );
    check("residual", m, &[3, 6]);
}
