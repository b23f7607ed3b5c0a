//! Converter folding, end to end: a Conv whose weight is computed by a
//! constant subgraph (Reshape of an initializer), whose bias comes from
//! ConstantOfShape, followed by BatchNormalization, Mul, Add and Sub by
//! per-channel constants. Everything up to the Relu must fold into one
//! SecureLinear op, and the secure result must match plaintext tract on the
//! original model.

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

mod common;

fn floats(name: &str, dims: &[i64], v: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: v,
        ..Default::default()
    }
}

fn ints(name: &str, v: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: v,
        ..Default::default()
    }
}

fn node(
    name: &str,
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

fn input_info(name: &str) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::dimension::Value;
    let dim = |v: Value| pb::tensor_shape_proto::Dimension {
        value: Some(v),
        ..Default::default()
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        dim(Value::DimParam("N".into())),
                        dim(Value::DimValue(2)),
                        dim(Value::DimValue(6)),
                        dim(Value::DimValue(6)),
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn model() -> pb::ModelProto {
    let c_out = 3;
    let w: Vec<f32> = (0..c_out * 2 * 9)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    let value_attr = pb::AttributeProto {
        name: "value".into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(floats("", &[1], vec![0.25])),
        ..Default::default()
    };
    let per_channel = |name: &str, v: Vec<f32>| floats(name, &[c_out, 1, 1], v);
    common::opset13_model(pb::GraphProto {
        name: "folding".into(),
        node: vec![
            node(
                "reshape_w",
                "Reshape",
                &["w_flat", "w_shape"],
                &["w"],
                vec![],
            ),
            node(
                "bias_from_shape",
                "ConstantOfShape",
                &["bias_len"],
                &["bias"],
                vec![value_attr],
            ),
            node("conv", "Conv", &["x", "w", "bias"], &["c"], vec![]),
            node(
                "bn",
                "BatchNormalization",
                &["c", "gamma", "beta", "mean", "var"],
                &["b"],
                vec![],
            ),
            node("scale", "Mul", &["b", "m"], &["s"], vec![]),
            node("shift", "Add", &["a", "s"], &["t"], vec![]),
            node("unshift", "Sub", &["t", "d"], &["u"], vec![]),
            node("relu", "Relu", &["u"], &["y"], vec![]),
        ],
        initializer: vec![
            floats("w_flat", &[w.len() as i64], w),
            ints("w_shape", vec![c_out, 2, 3, 3]),
            ints("bias_len", vec![c_out]),
            floats("gamma", &[c_out], vec![1.5, 0.5, -1.0]),
            floats("beta", &[c_out], vec![0.1, -0.2, 0.3]),
            floats("mean", &[c_out], vec![0.05, 0.0, -0.1]),
            floats("var", &[c_out], vec![0.8, 1.2, 2.0]),
            per_channel("m", vec![2.0, -1.0, 0.5]),
            per_channel("a", vec![0.3, 0.0, -0.3]),
            per_channel("d", vec![0.1, 0.1, 0.1]),
        ],
        input: vec![input_info("x")],
        output: vec![pb::ValueInfoProto {
            name: "y".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

#[test]
fn constant_subgraphs_and_affine_successors_fold_into_one_secure_op() {
    let bytes = model().encode_to_vec();
    let converted = common::convert_bytes(&bytes);
    assert_eq!(converted.layers.len(), 1, "one SecureLinear op expected");
    let layer = &converted.layers[0];
    assert_eq!(
        layer.folded.len(),
        4,
        "BatchNormalization, Mul, Add, Sub fold: {:?}",
        layer.folded
    );
    assert!(
        converted
            .folded_constants
            .iter()
            .any(|f| f.contains("Reshape")),
        "{:?}",
        converted.folded_constants
    );
    assert!(
        converted
            .folded_constants
            .iter()
            .any(|f| f.contains("ConstantOfShape")),
        "{:?}",
        converted.folded_constants
    );
    // The client's program is input -> one SecureLinear -> ReLU -> reveal,
    // and its file holds no weights.
    let client = converted.client.graph.as_ref().unwrap();
    let ops: Vec<&str> = client.node.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        ["SecureInput", "SecureLinear", "SecureRelu", "SecureReveal"]
    );
    assert!(
        client.initializer.is_empty(),
        "{:?}",
        client
            .initializer
            .iter()
            .map(|t| &t.name)
            .collect::<Vec<_>>()
    );

    let x: Tensor = tract_ndarray::ArrayD::from_shape_fn(vec![4, 2, 6, 6], |ix| {
        ((ix[0] * 31 + ix[1] * 17 + ix[2] * 5 + ix[3]) % 13) as f32 / 6.0 - 1.0
    })
    .into_tensor();
    let plain = tract_onnx::onnx()
        .model_for_proto_model(&model())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
        .run(tvec!(x.clone().into_tvalue()))
        .unwrap();
    let mut pair = common::SecurePair::new(&converted);
    let secure = pair.predict(x);
    let (p, s) = (
        plain[0].to_plain_array_view::<f32>().unwrap(),
        secure[0].to_plain_array_view::<f32>().unwrap(),
    );
    assert_eq!(p.shape(), s.shape());
    let err = p
        .iter()
        .zip(s.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let tolerance = layer.error_bound(1.0) as f32;
    assert!(
        err <= tolerance,
        "max error {err} above the scale-derived bound {tolerance}"
    );
    assert!(
        p.iter().any(|v| *v > 0.1),
        "test input should exercise the layer"
    );
}
