//! Benchmarks for secinfer (see `benches/ring_kernels.rs`, run with
//! `cargo bench -p secinfer-benches`): the exact `u64` ring kernels of
//! `secinfer-ring` (`matmul`, `conv`) against tract's `f32` on the same MNIST
//! shapes. This library holds the shared helpers: seeded random operands and
//! tiny single-node tract models (ONNX `MatMul` / `Conv` with the weight as an
//! initializer) built in memory, optimised and made runnable.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

/// A runnable single-node tract model.
pub type TractPlan = Arc<TypedRunnableModel>;

/// Uniform `u64` ring elements (masked activations) of `shape`.
pub fn random_u64(seed: u64, shape: &[usize]) -> ArrayD<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random::<u64>())
}

/// Small signed fixed-point weights (`|w| < 2^15`) as `u64` two's complement.
pub fn random_weights(seed: u64, shape: &[usize]) -> ArrayD<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-32767i64..32768) as u64)
}

/// `f32` values in `[-1, 1)` of `shape`.
pub fn random_f32(seed: u64, shape: &[usize]) -> ArrayD<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-1.0f32..1.0))
}

fn value_info(name: &str, shape: &[usize]) -> pb::ValueInfoProto {
    let dim = shape
        .iter()
        .map(|&d| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn f32_initializer(name: &str, t: &ArrayD<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[usize]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.iter().map(|&e| e as i64).collect(),
        ..Default::default()
    }
}

fn plan(node: pb::NodeProto, x_shape: &[usize], w: &ArrayD<f32>) -> TractResult<TractPlan> {
    let graph = pb::GraphProto {
        name: "bench".into(),
        node: vec![node],
        initializer: vec![f32_initializer("w", w)],
        input: vec![value_info("x", x_shape)],
        output: vec![pb::ValueInfoProto {
            name: "y".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    onnx()
        .model_for_proto_model(&model)?
        .into_optimized()?
        .into_runnable()
}

/// tract `f32` plan for `x [m, k] . w [k, n]`.
pub fn tract_matmul(m: usize, w: &ArrayD<f32>) -> TractResult<TractPlan> {
    let node = pb::NodeProto {
        op_type: "MatMul".into(),
        input: vec!["x".into(), "w".into()],
        output: vec!["y".into()],
        ..Default::default()
    };
    plan(node, &[m, w.shape()[0]], w)
}

/// tract `f32` plan for a 2-D `Conv` of `x_shape` with `w`, stride 1,
/// symmetric padding `pad`.
pub fn tract_conv2d(x_shape: &[usize], w: &ArrayD<f32>, pad: usize) -> TractResult<TractPlan> {
    let node = pb::NodeProto {
        op_type: "Conv".into(),
        input: vec!["x".into(), "w".into()],
        output: vec!["y".into()],
        attribute: vec![ints("pads", &[pad; 4]), ints("strides", &[1, 1])],
        ..Default::default()
    };
    plan(node, x_shape, w)
}

/// An `ndarray` array as a tract input value (cheap to clone).
pub fn tvalue(x: &ArrayD<f32>) -> TractResult<TValue> {
    let data: Vec<f32> = x.iter().copied().collect();
    Ok(Tensor::from_shape(x.shape(), &data)?.into_tvalue())
}

/// Runs a plan on one input, returning the first output.
pub fn run(plan: &TractPlan, x: &TValue) -> TractResult<TValue> {
    let mut out = plan.run(tvec!(x.clone()))?;
    out.pop()
        .ok_or_else(|| TractError::msg("tract model has no output"))
}
