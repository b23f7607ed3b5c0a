//! Server side: SecureLinear as a tract op on masked u64 tensors, and the
//! server model (one tract plan per op) that the protocol's server session uses.

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use secinfer_model::{LayerSpec, LinearKind, Role, read_contract};
use secinfer_protocol::{MaskedLinear, OpId};

use crate::he_form::HeLayer;
use secinfer_ring::{Limbs, Ring, RingTensor};
use tract_onnx::tract_hir::internal::tract_ndarray::Ix2;

/// `W·x + b` in Z_2^k: the typed tract op the server runs.
#[derive(Debug, Clone)]
pub struct ServerSecureLinear {
    /// what the op computes
    pub spec: Arc<LayerSpec>,
    weight: Arc<RingTensor>,
    /// the weights as exact `f64` and how inputs are cut for them, where
    /// the `f64` kernels apply (every kind but `LeftMatMul`)
    exact: Option<(Arc<tract_ndarray::ArrayD<f64>>, Limbs)>,
    bias: Arc<Vec<u64>>,
    ring: Ring,
}

impl PartialEq for ServerSecureLinear {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec && self.weight == other.weight && self.bias == other.bias
    }
}
impl Eq for ServerSecureLinear {}

impl ServerSecureLinear {
    /// Builds the op from its spec and its INT64 weight and bias tensors.
    pub fn new(spec: Arc<LayerSpec>, weight: &Tensor, bias: &Tensor) -> TractResult<Self> {
        let ring = spec.ring()?;
        let w = weight
            .cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .mapv(|v| ring.from_signed(v));
        if w.shape() != spec.weight_shape.as_slice() {
            bail!(
                "SecureLinear op {}: weight has shape {:?}, spec says {:?}",
                spec.op_id,
                w.shape(),
                spec.weight_shape
            );
        }
        let b: Vec<u64> = bias
            .cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .iter()
            .map(|&v| ring.from_signed(v))
            .collect();
        if b.len() != spec.bias_len() {
            bail!(
                "SecureLinear op {}: bias has {} values, the op has {} outputs features",
                spec.op_id,
                b.len(),
                spec.bias_len()
            );
        }
        let exact = exact_weights(&spec, &w, ring);
        Ok(ServerSecureLinear {
            spec,
            weight: Arc::new(w),
            exact,
            bias: Arc::new(b),
            ring,
        })
    }

    /// `W·x + b mod 2^k` for a batch.
    pub fn apply(&self, x: tract_ndarray::ArrayViewD<u64>) -> TractResult<RingTensor> {
        let spec = &self.spec;
        spec.samples_in_input(x.shape())
            .map_err(|e| format_err!(e))?;
        let w = self.weight.view();
        let mut y = match (&spec.kind, &self.exact) {
            (LinearKind::MatMul, Some((wf, limbs))) => {
                let k = spec.weight_shape[0];
                let rows = x.len() / k.max(1);
                let x2 = x.view().into_shape_with_order((rows, k))?;
                let xs = limbs.split(x2.into_dyn())?.into_dimensionality::<Ix2>()?;
                let w2 = wf.view().into_shape_with_order((k, spec.weight_shape[1]))?;
                let y = limbs.join(secinfer_ring::matmul(xs.view(), w2)?.into_dyn())?;
                let mut shape = x.shape().to_vec();
                let last = shape.len() - 1;
                shape[last] = spec.weight_shape[1];
                y.into_shape_with_order(shape)?
            }
            (LinearKind::Conv(g), Some((wf, limbs))) => limbs.join(secinfer_ring::conv(
                limbs.split(x.view())?.view(),
                wf.view(),
                g,
            )?)?,
            (
                LinearKind::ConvTranspose {
                    geometry,
                    output_padding,
                },
                Some((wf, limbs)),
            ) => limbs.join(secinfer_ring::conv_transpose(
                limbs.split(x.view())?.view(),
                wf.view(),
                geometry,
                output_padding,
            )?)?,
            (LinearKind::MatMul, _) => {
                let k = spec.weight_shape[0];
                let rows = x.len() / k.max(1);
                let x2 = x.view().into_shape_with_order((rows, k))?;
                let w2 = w.into_shape_with_order((k, spec.weight_shape[1]))?;
                let y = secinfer_ring::matmul(x2, w2)?;
                let mut shape = x.shape().to_vec();
                let last = shape.len() - 1;
                shape[last] = spec.weight_shape[1];
                y.into_shape_with_order(shape)?.into_dyn()
            }
            (LinearKind::LeftMatMul, _) => {
                let (m, k) = (spec.weight_shape[0], spec.weight_shape[1]);
                let cols = x.shape()[x.ndim() - 1];
                let batches = x.len() / (k * cols).max(1);
                let x3 = x.view().into_shape_with_order((batches, k, cols))?;
                let w2 = w.into_shape_with_order((m, k))?;
                let mut out = Vec::with_capacity(batches * m * cols);
                for b in 0..batches {
                    let y =
                        secinfer_ring::matmul(w2.view(), x3.index_axis(tract_ndarray::Axis(0), b))?;
                    out.extend(y.iter());
                }
                let mut shape = x.shape().to_vec();
                let at = shape.len() - 2;
                shape[at] = m;
                RingTensor::from_shape_vec(shape, out)?
            }
            (LinearKind::Conv(g), None) => secinfer_ring::conv(x.view(), w, g)?,
            (
                LinearKind::ConvTranspose {
                    geometry,
                    output_padding,
                },
                None,
            ) => secinfer_ring::conv_transpose(x.view(), w, geometry, output_padding)?,
        };
        let rank = y.ndim() as isize;
        let axis = spec.kind.bias_axis();
        let axis = if axis < 0 { rank + axis } else { axis } as usize;
        let ring = self.ring;
        // the bias along `axis`, broadcast over the rest (one contiguous pass)
        let mut bias_shape = vec![1; y.ndim()];
        bias_shape[axis] = self.bias.len();
        let bias = tract_ndarray::ArrayView::from_shape(bias_shape, &self.bias[..])?;
        let bias = bias.broadcast(y.raw_dim()).ok_or_else(|| {
            format_err!("bias of {} does not fit {:?}", self.bias.len(), y.shape())
        })?;
        tract_ndarray::Zip::from(&mut y)
            .and(&bias)
            .for_each(|v, &b| *v = ring.reduce(v.wrapping_add(b)));
        Ok(y)
    }
}

/// The limb path pays for splitting and joining once per input and output
/// element; it wins only where each element takes part in enough products.
/// Criterion (`ring_kernels`, one thread, 2 limbs): `64x784x128` 2.5 → 4.3
/// GMAC/s, conv 32→64 3×3 2.3 → 3.7, but `64x128x10` 1.9 → 1.7 and the
/// one-channel conv 1→32 3×3 1.3 → 0.6. So: fan-in and outputs per
/// position at least these.
const LIMBS_MIN_FAN_IN: usize = 64;
const LIMBS_MIN_OUTPUTS: usize = 16;

/// The weights as exact `f64` and the limb cut that keeps every product
/// exact (`secinfer_ring::Limbs`), for the kinds whose inputs stack on the
/// batch axis; `None` keeps the wrapping `u64` kernels (a `LeftMatMul`, an
/// op too small to gain, or weights too large for few limbs).
fn exact_weights(
    spec: &LayerSpec,
    w: &RingTensor,
    ring: Ring,
) -> Option<(Arc<tract_ndarray::ArrayD<f64>>, Limbs)> {
    let shape = &spec.weight_shape;
    // (fan-in, outputs per position)
    let (fan_in, outputs) = match &spec.kind {
        LinearKind::MatMul => (*shape.first()?, *shape.get(1)?),
        LinearKind::Conv(_) => (shape[1..].iter().product(), *shape.first()?),
        LinearKind::ConvTranspose { .. } => (
            shape[0] * shape[2..].iter().product::<usize>(),
            *shape.get(1)?,
        ),
        LinearKind::LeftMatMul => return None,
    };
    if fan_in < LIMBS_MIN_FAN_IN || outputs < LIMBS_MIN_OUTPUTS {
        return None;
    }
    let signed = |v: &u64| u128::from(ring.to_signed(*v).unsigned_abs());
    // the largest sum of |w| feeding one output
    let row_sum = match &spec.kind {
        LinearKind::MatMul => w
            .axis_iter(tract_ndarray::Axis(w.ndim().checked_sub(1)?))
            .map(|col| col.iter().map(signed).sum::<u128>())
            .max()?,
        LinearKind::Conv(_) => w
            .axis_iter(tract_ndarray::Axis(0))
            .map(|m| m.iter().map(signed).sum::<u128>())
            .max()?,
        // an output of a transposed convolution gathers from every input
        // channel of its group: the whole tensor bounds it
        LinearKind::ConvTranspose { .. } => w.iter().map(signed).sum(),
        LinearKind::LeftMatMul => return None,
    };
    let limbs = Limbs::plan(ring, row_sum)?;
    Some((Arc::new(w.mapv(|v| ring.to_signed(v) as f64)), limbs))
}

impl Op for ServerSecureLinear {
    fn name(&self) -> StaticName {
        "SecureLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "op {} ({:?}) in Z_2^{}",
            self.spec.op_id,
            self.spec.kind.tag(),
            self.ring.bits()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ServerSecureLinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let y = self.apply(x.to_plain_array_view::<u64>()?)?;
        Ok(tvec!(y.into_tensor().into_tvalue()))
    }
}

impl TypedOp for ServerSecureLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        if inputs[0].datum_type != u64::datum_type() {
            bail!(
                "SecureLinear op {} takes u64 ring elements, got {:?}",
                self.spec.op_id,
                inputs[0].datum_type
            );
        }
        let shape = crate::output_shape(&self.spec, &inputs[0].shape.to_tvec())?;
        Ok(tvec!(u64::fact(shape)))
    }

    as_op!();
}

/// `server.onnx` loaded: one tract plan per SecureLinear op.
pub struct ServerModel {
    layers: Vec<LayerSpec>,
    plans: Vec<Arc<TypedRunnableModel>>,
    he: Vec<HeLayer>,
    digest: String,
    program: Option<Arc<secinfer_model::Program>>,
    /// offline replies made with these weights, by every session of this
    /// process (the flood's bound: `secinfer_protocol::MAX_REPLIES`)
    replies: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ServerModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerModel({} ops, digest {})",
            self.layers.len(),
            self.digest
        )
    }
}

impl ServerModel {
    /// Loads and checks `server.onnx`.
    pub fn load(path: &Path) -> anyhow::Result<ServerModel> {
        use anyhow::Context;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("loading server model {}", path.display()))
    }

    /// Loads and checks a server model from bytes: role, digest over specs and
    /// weights, one SecureLinear node per op.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<ServerModel> {
        let proto =
            pb::ModelProto::decode(bytes).map_err(|e| anyhow::anyhow!("not an ONNX model: {e}"))?;
        let contract = read_contract(&proto)?;
        if contract.role != Role::Server {
            anyhow::bail!(
                "this is a {} model; the server needs server.onnx",
                contract.role.as_str()
            );
        }
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no graph"))?;
        let mut weights = Vec::with_capacity(contract.layers.len());
        for spec in &contract.layers {
            let node = graph
                .node
                .iter()
                .find(|n| LayerSpec::from_node(n).is_ok_and(|s| s.op_id == spec.op_id))
                .ok_or_else(|| anyhow::anyhow!("op {} has no node", spec.op_id))?;
            let init = |ix: usize| -> anyhow::Result<Vec<i64>> {
                let name = node
                    .input
                    .get(ix)
                    .ok_or_else(|| anyhow::anyhow!("op {} lacks input {ix}", spec.op_id))?;
                let t = graph
                    .initializer
                    .iter()
                    .find(|t| &t.name == name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("op {}: initializer {name} is missing", spec.op_id)
                    })?;
                if t.data_type != pb::tensor_proto::DataType::Int64 as i32
                    || t.raw_data.len() % 8 != 0
                {
                    anyhow::bail!("op {}: {name} must be INT64 raw data", spec.op_id);
                }
                Ok(t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect())
            };
            weights.push((init(1)?, init(2)?));
        }
        let wd = secinfer_model::weights_digest(
            weights.iter().map(|(w, b)| (w.as_slice(), b.as_slice())),
        );
        let digest = secinfer_model::model_digest(
            &contract.layers,
            contract.reveal,
            contract.program.as_ref(),
            &wd,
        );
        if digest != contract.digest {
            anyhow::bail!(
                "model digest mismatch: the file records {}, its contents hash to {digest}; the file is damaged or edited",
                contract.digest
            );
        }
        let mut plans = Vec::with_capacity(contract.layers.len());
        let mut he = Vec::with_capacity(contract.layers.len());
        for (spec, (w, _)) in contract.layers.iter().zip(&weights) {
            plans.push(Self::plan_for(&proto, spec)?);
            he.push(HeLayer::new(spec, w).map_err(|e| anyhow::anyhow!(e))?);
        }
        Ok(ServerModel {
            layers: contract.layers,
            plans,
            he,
            digest,
            program: contract.program.map(Arc::new),
            replies: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A one-node model for op `spec`, loaded through tract with the plugin.
    fn plan_for(
        proto: &pb::ModelProto,
        spec: &LayerSpec,
    ) -> anyhow::Result<Arc<TypedRunnableModel>> {
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no graph"))?;
        let node = graph
            .node
            .iter()
            .find(|n| LayerSpec::from_node(n).is_ok_and(|s| s.op_id == spec.op_id))
            .ok_or_else(|| anyhow::anyhow!("op {} has no node", spec.op_id))?;
        let pick = |name: &String| graph.initializer.iter().find(|t| &t.name == name).cloned();
        // The op's input and output, typed here: in a private-mode file they
        // are slots of the program, not graph inputs and outputs.
        let io = |name: Option<&String>, shape: &[usize]| {
            let dim = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| pb::tensor_shape_proto::Dimension {
                    value: Some(if i == 0 && spec.batched {
                        pb::tensor_shape_proto::dimension::Value::DimParam("N".into())
                    } else {
                        pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)
                    }),
                    ..Default::default()
                })
                .collect();
            pb::ValueInfoProto {
                name: name.cloned().unwrap_or_default(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: pb::tensor_proto::DataType::Uint64 as i32,
                        shape: Some(pb::TensorShapeProto { dim }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let sub = pb::ModelProto {
            graph: Some(pb::GraphProto {
                name: format!("op{}", spec.op_id),
                node: vec![node.clone()],
                initializer: node.input.iter().skip(1).filter_map(pick).collect(),
                input: vec![io(node.input.first(), &spec.input_shape)],
                output: vec![io(node.output.first(), &spec.output_shape)],
                ..Default::default()
            }),
            ..proto.clone()
        };
        let model = crate::onnx()
            .model_for_proto_model(&sub)
            .map_err(|e| anyhow::anyhow!("op {}: {e:#}", spec.op_id))?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| anyhow::anyhow!("op {}: {e:#}", spec.op_id))?;
        Ok(plan)
    }

    /// The digest both files carry.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl MaskedLinear for ServerModel {
    fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    fn reply_counter(&self) -> Option<&std::sync::atomic::AtomicU64> {
        Some(&self.replies)
    }

    fn program(&self) -> Option<&Arc<secinfer_model::Program>> {
        self.program.as_ref()
    }

    fn he_form(&self, op: OpId) -> Result<&dyn secinfer_he::LinearForm, String> {
        self.he
            .get(op as usize)
            .map(|l| l as &dyn secinfer_he::LinearForm)
            .ok_or_else(|| format!("no op {op}"))
    }

    fn evaluate(&self, op: OpId, x: RingTensor) -> Result<RingTensor, String> {
        let plan = self
            .plans
            .get(op as usize)
            .ok_or_else(|| format!("no op {op}"))?;
        let out = plan
            .run(tvec!(x.into_tensor().into_tvalue()))
            .map_err(|e| format!("{e:#}"))?;
        let y = out.into_iter().next().ok_or("no output")?;
        y.into_tensor()
            .into_plain_array::<u64>()
            .map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: LinearKind, weight: &[usize], input: &[usize], output: &[usize]) -> LayerSpec {
        LayerSpec {
            op_id: 0,
            source_node: "op".into(),
            source_op: "Op".into(),
            kind,
            weight_shape: weight.to_vec(),
            input_shape: input.to_vec(),
            output_shape: output.to_vec(),
            batched: true,
            ring_bits: 37,
            input_frac_bits: 8,
            weight_frac_bits: 8,
            input_bound: 1.0,
        }
    }

    /// Deterministic pseudo-random values (a test input, not a secret).
    fn values(n: usize, seed: u64) -> impl Iterator<Item = u64> {
        let mut s = seed;
        (0..n).map(move |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s ^ (s >> 29)
        })
    }

    /// The `f64`-limb path and the wrapping `u64` path give the same ring
    /// elements, on uniform masked inputs with the extreme values in them.
    #[test]
    fn exact_f64_products_equal_the_wrapping_ones() {
        let conv = LinearKind::Conv(secinfer_ring::ConvGeometry {
            strides: vec![2, 1],
            pads_begin: vec![1, 1],
            pads_end: vec![1, 0],
            ..secinfer_ring::ConvGeometry::identity(2)
        });
        let transpose = LinearKind::ConvTranspose {
            geometry: secinfer_ring::ConvGeometry::identity(2),
            output_padding: vec![0, 0],
        };
        let cases = [
            (
                spec(LinearKind::MatMul, &[70, 17], &[1, 70], &[1, 17]),
                vec![3usize, 70],
                17,
            ),
            (
                spec(conv, &[16, 8, 3, 3], &[1, 8, 8, 8], &[1, 16, 4, 7]),
                vec![2, 8, 8, 8],
                16,
            ),
            (
                spec(transpose, &[16, 16, 2, 2], &[1, 16, 4, 4], &[1, 16, 5, 5]),
                vec![2, 16, 4, 4],
                16,
            ),
        ];
        for (spec, x_shape, outputs) in cases {
            let ring = spec.ring().unwrap();
            let n_w: usize = spec.weight_shape.iter().product();
            let max = 1i64 << 14;
            let w: Vec<i64> = values(n_w, 1)
                .enumerate()
                .map(|(i, v)| match i % 9 {
                    0 => max,
                    1 => -max,
                    _ => (v % (2 * max as u64 + 1)) as i64 - max,
                })
                .collect();
            let weight = tract_ndarray::ArrayD::from_shape_vec(spec.weight_shape.clone(), w)
                .unwrap()
                .into_tensor();
            let bias = tract_ndarray::Array1::from_elem(outputs, -3i64).into_tensor();
            let op = ServerSecureLinear::new(Arc::new(spec.clone()), &weight, &bias).unwrap();
            let (_, limbs) = op.exact.as_ref().expect("small weights take the f64 path");
            assert_eq!(limbs.count(), 2, "{:?}", spec.kind);
            let n_x: usize = x_shape.iter().product();
            let x = tract_ndarray::ArrayD::from_shape_vec(
                x_shape,
                values(n_x, 2)
                    .enumerate()
                    .map(|(i, v)| {
                        if i % 4 == 0 {
                            ring.mask()
                        } else {
                            v & ring.mask()
                        }
                    })
                    .collect(),
            )
            .unwrap();
            let wrapping = ServerSecureLinear {
                exact: None,
                ..op.clone()
            };
            assert_eq!(
                op.apply(x.view()).unwrap(),
                wrapping.apply(x.view()).unwrap(),
                "{:?}",
                spec.kind
            );
        }
        // an op too small to gain keeps the wrapping kernel
        let small = spec(LinearKind::MatMul, &[128, 10], &[1, 128], &[1, 10]);
        let w = tract_ndarray::ArrayD::from_elem(vec![128, 10], 3i64).into_tensor();
        let b = tract_ndarray::Array1::from_elem(10, 0i64).into_tensor();
        let op = ServerSecureLinear::new(Arc::new(small), &w, &b).unwrap();
        assert!(op.exact.is_none());
    }
}
