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
use secinfer_ring::{Ring, RingTensor};

/// `W·x + b` in Z_2^k: the typed tract op the server runs.
#[derive(Debug, Clone)]
pub struct ServerSecureLinear {
    /// what the op computes
    pub spec: Arc<LayerSpec>,
    weight: Arc<RingTensor>,
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
        Ok(ServerSecureLinear {
            spec,
            weight: Arc::new(w),
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
        let mut y = match &spec.kind {
            LinearKind::MatMul => {
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
            LinearKind::LeftMatMul => {
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
            LinearKind::Conv(g) => secinfer_ring::conv(x.view(), w, g)?,
            LinearKind::ConvTranspose {
                geometry,
                output_padding,
            } => secinfer_ring::conv_transpose(x.view(), w, geometry, output_padding)?,
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
