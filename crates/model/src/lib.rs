//! The converted-model contract: what a `SecureLinear` node is.
//!
//! The converter writes two ONNX files, `server.onnx` (SecureLinear nodes with
//! their quantised weights) and `client.onnx` (the original graph with every
//! weighted linear node replaced by a weightless SecureLinear placeholder). Both
//! sides must agree, bit for bit, on what each SecureLinear op computes: its
//! kind (matrix product or convolution), geometry, shapes, ring and fixed-point
//! scales. That agreement is defined here, once: [`LayerSpec`] is the op, it is
//! written into and read from ONNX node attributes by [`LayerSpec::to_attributes`]
//! and [`LayerSpec::from_node`], and [`model_digest`] hashes the list of specs so
//! that a client holding the wrong `client.onnx` is caught before any traffic.
//!
//! Position in the data flow: ring < **model** < converter, protocol, tract-ext.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod program;

pub use program::{PoolGeometry, Program, Reveal, Sign, Step, StepOp};

use secinfer_ring::{ConvGeometry, Ring};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::pb;
use tract_onnx::pb::attribute_proto::AttributeType;

/// ONNX domain of the SecureLinear op.
pub const DOMAIN: &str = "ai.secinfer";
/// Version of [`DOMAIN`] this build reads and writes (2: the reveal mode and
/// the secure program's nodes).
pub const DOMAIN_VERSION: i64 = 2;
/// ONNX op_type of a secure linear node.
pub const OP_TYPE: &str = "SecureLinear";
/// `metadata_props` key holding the hex model digest in both files.
pub const DIGEST_KEY: &str = "secinfer.model_digest";
/// `metadata_props` key saying which side a file is for ("server" or "client").
pub const ROLE_KEY: &str = "secinfer.role";
/// `metadata_props` key holding the reveal mode ("logits", "argmax" or "activations").
pub const REVEAL_KEY: &str = "secinfer.reveal";
/// Ring size used by default: t = 2^37 is a plaintext modulus the BFV
/// parameters of the offline phase support with room for noise flooding.
pub const DEFAULT_RING_BITS: u32 = 37;

/// Errors reading or validating the contract.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A SecureLinear node lacks an attribute or has it with the wrong type.
    #[error("SecureLinear node '{node}': attribute '{attr}' {problem}")]
    Attribute {
        /// node name
        node: String,
        /// attribute name
        attr: String,
        /// what is wrong
        problem: String,
    },
    /// A node is in another domain or version than this build understands.
    #[error("node '{node}': {problem}")]
    Node {
        /// node name
        node: String,
        /// what is wrong
        problem: String,
    },
    /// The file as a whole does not follow the contract.
    #[error("converted model: {0}")]
    Model(String),
    /// Ring parameters are invalid.
    #[error(transparent)]
    Ring(#[from] secinfer_ring::RingError),
}

/// Which linear map a SecureLinear op computes (bias excluded).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearKind {
    /// `y = x · W`, x `[.., K]`, W `[K, M]`; bias over the last axis.
    /// Gemm and MatMul with a constant right operand.
    MatMul,
    /// `y = W · x`, W `[M, K]`, x `[.., K, N]`; bias over axis -2.
    /// MatMul with a constant left operand.
    LeftMatMul,
    /// ONNX Conv, W `[M, C/group, k..]`, padding resolved; bias over axis 1.
    Conv(ConvGeometry),
    /// ONNX ConvTranspose, W `[C, M/group, k..]`, padding and output shape
    /// resolved; bias over axis 1.
    ConvTranspose {
        /// strides, dilations, pads (as cropping) and group
        geometry: ConvGeometry,
        /// extra cells added at the end of each spatial axis
        output_padding: Vec<usize>,
    },
}

impl LinearKind {
    /// Short name stored in the `kind` attribute.
    pub fn tag(&self) -> &'static str {
        match self {
            LinearKind::MatMul => "matmul",
            LinearKind::LeftMatMul => "left_matmul",
            LinearKind::Conv(_) => "conv",
            LinearKind::ConvTranspose { .. } => "conv_transpose",
        }
    }

    /// Axis of the output tensor the bias vector runs along (negative: from the end).
    pub fn bias_axis(&self) -> isize {
        match self {
            LinearKind::MatMul => -1,
            LinearKind::LeftMatMul => -2,
            LinearKind::Conv(_) | LinearKind::ConvTranspose { .. } => 1,
        }
    }
}

/// One SecureLinear op: everything both parties must agree on, no weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Dense index of the op in the converted model, 0-based in graph order.
    pub op_id: u32,
    /// Name of the original ONNX node, for messages.
    pub source_node: String,
    /// Op type of the original ONNX node (Gemm, MatMul, Conv, ...).
    pub source_op: String,
    /// The linear map.
    pub kind: LinearKind,
    /// Shape of the quantised weight tensor.
    pub weight_shape: Vec<usize>,
    /// Input shape of one sample (axis 0 is 1 when `batched`).
    pub input_shape: Vec<usize>,
    /// Output shape of one sample.
    pub output_shape: Vec<usize>,
    /// Whether axis 0 of input and output is a batch axis along which samples
    /// are independent (then many inferences share one round trip).
    pub batched: bool,
    /// The ring Z_2^k.
    pub ring_bits: u32,
    /// Fractional bits of the encoded input.
    pub input_frac_bits: u32,
    /// Fractional bits of the quantised weights.
    pub weight_frac_bits: u32,
    /// Largest |input| the scales were chosen for; the client refuses to
    /// encode anything larger rather than let the ring wrap.
    pub input_bound: f32,
}

impl LayerSpec {
    /// Fractional bits of the output (and of the quantised bias).
    pub fn output_frac_bits(&self) -> u32 {
        self.input_frac_bits + self.weight_frac_bits
    }

    /// The ring, validated.
    pub fn ring(&self) -> Result<Ring, ModelError> {
        Ok(Ring::new(self.ring_bits)?)
    }

    /// Number of ring elements in one sample's input.
    pub fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Number of ring elements in one sample's output.
    pub fn output_len(&self) -> usize {
        self.output_shape.iter().product()
    }

    /// Length of the bias vector (output features or channels).
    pub fn bias_len(&self) -> usize {
        let rank = self.output_shape.len() as isize;
        let axis = self.kind.bias_axis();
        let axis = if axis < 0 { rank + axis } else { axis };
        usize::try_from(axis)
            .ok()
            .and_then(|a| self.output_shape.get(a).copied())
            .unwrap_or(1)
    }

    /// ONNX attributes carrying this spec (written on both sides).
    pub fn to_attributes(&self) -> Vec<pb::AttributeProto> {
        let mut a = vec![
            attr_int("op_id", self.op_id as i64),
            attr_string("source_node", &self.source_node),
            attr_string("source_op", &self.source_op),
            attr_string("kind", self.kind.tag()),
            attr_ints("weight_shape", &self.weight_shape),
            attr_ints("input_shape", &self.input_shape),
            attr_ints("output_shape", &self.output_shape),
            attr_int("batched", self.batched as i64),
            attr_int("ring_bits", self.ring_bits as i64),
            attr_int("input_frac_bits", self.input_frac_bits as i64),
            attr_int("weight_frac_bits", self.weight_frac_bits as i64),
            attr_float("input_bound", self.input_bound),
        ];
        let geometry = match &self.kind {
            LinearKind::Conv(g) => Some(g),
            LinearKind::ConvTranspose {
                geometry,
                output_padding,
            } => {
                a.push(attr_ints("output_padding", output_padding));
                Some(geometry)
            }
            _ => None,
        };
        if let Some(g) = geometry {
            a.push(attr_ints("strides", &g.strides));
            a.push(attr_ints("dilations", &g.dilations));
            a.push(attr_ints("pads_begin", &g.pads_begin));
            a.push(attr_ints("pads_end", &g.pads_end));
            a.push(attr_int("group", g.group as i64));
        }
        a
    }

    /// Reads a spec back from a SecureLinear node, checking domain and attributes.
    pub fn from_node(node: &pb::NodeProto) -> Result<LayerSpec, ModelError> {
        let name = node_name(node);
        if node.op_type != OP_TYPE || node.domain != DOMAIN {
            return Err(ModelError::Node {
                node: name,
                problem: format!(
                    "expected op {OP_TYPE} in domain {DOMAIN}, found {} in domain '{}'",
                    node.op_type, node.domain
                ),
            });
        }
        let r = AttrReader { node, name: &name };
        let kind_tag = r.string("kind")?;
        let kind = match kind_tag.as_str() {
            "matmul" => LinearKind::MatMul,
            "left_matmul" => LinearKind::LeftMatMul,
            "conv" | "conv_transpose" => {
                let geometry = ConvGeometry {
                    strides: r.usizes("strides")?,
                    dilations: r.usizes("dilations")?,
                    pads_begin: r.usizes("pads_begin")?,
                    pads_end: r.usizes("pads_end")?,
                    group: r.usize("group")?,
                };
                if kind_tag == "conv" {
                    LinearKind::Conv(geometry)
                } else {
                    LinearKind::ConvTranspose {
                        geometry,
                        output_padding: r.usizes("output_padding")?,
                    }
                }
            }
            other => {
                return Err(ModelError::Attribute {
                    node: name.clone(),
                    attr: "kind".into(),
                    problem: format!("has unknown value '{other}'"),
                });
            }
        };
        let spec = LayerSpec {
            op_id: u32::try_from(r.int("op_id")?).map_err(|_| r.bad("op_id", "is out of range"))?,
            source_node: r.string("source_node")?,
            source_op: r.string("source_op")?,
            kind,
            weight_shape: r.usizes("weight_shape")?,
            input_shape: r.usizes("input_shape")?,
            output_shape: r.usizes("output_shape")?,
            batched: r.int("batched")? != 0,
            ring_bits: r.u32("ring_bits")?,
            input_frac_bits: r.u32("input_frac_bits")?,
            weight_frac_bits: r.u32("weight_frac_bits")?,
            input_bound: r.float("input_bound")?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks internal consistency: ring, scales, shapes against the kind.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |problem: String| ModelError::Node {
            node: self.source_node.clone(),
            problem,
        };
        let ring = self.ring()?;
        if self.output_frac_bits() + 2 > ring.bits() {
            return Err(bad(format!(
                "{} + {} fractional bits leave no integer part in Z_2^{}",
                self.input_frac_bits, self.weight_frac_bits, self.ring_bits
            )));
        }
        if !(self.input_bound.is_finite() && self.input_bound > 0.0) {
            return Err(bad(format!(
                "input bound {} is not a positive number",
                self.input_bound
            )));
        }
        if self.input_shape.is_empty() || self.output_shape.is_empty() {
            return Err(bad("input and output shapes must have rank >= 1".into()));
        }
        if self.batched && (self.input_shape[0] != 1 || self.output_shape[0] != 1) {
            return Err(bad(
                "a batched op must describe one sample (axis 0 of size 1)".into(),
            ));
        }
        let expected = self.compute_output_shape(&self.input_shape).map_err(bad)?;
        if expected != self.output_shape {
            return Err(bad(format!(
                "output shape {:?} does not follow from input shape {:?} and weights {:?} (expected {:?})",
                self.output_shape, self.input_shape, self.weight_shape, expected
            )));
        }
        Ok(())
    }

    /// Output shape of this op for an input of shape `input` (any batch size).
    pub fn compute_output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        let w = &self.weight_shape;
        match &self.kind {
            LinearKind::MatMul => {
                if w.len() != 2 || input.is_empty() || input[input.len() - 1] != w[0] {
                    return Err(format!(
                        "input {input:?} cannot be multiplied by a weight {w:?}"
                    ));
                }
                let mut out = input.to_vec();
                let last = out.len() - 1;
                out[last] = w[1];
                Ok(out)
            }
            LinearKind::LeftMatMul => {
                if w.len() != 2 || input.len() < 2 || input[input.len() - 2] != w[1] {
                    return Err(format!("weight {w:?} cannot multiply an input {input:?}"));
                }
                let mut out = input.to_vec();
                let at = out.len() - 2;
                out[at] = w[0];
                Ok(out)
            }
            LinearKind::Conv(g) => {
                secinfer_ring::conv_output_shape(input, w, g).map_err(|e| e.to_string())
            }
            LinearKind::ConvTranspose {
                geometry,
                output_padding,
            } => secinfer_ring::conv_transpose_output_shape(input, w, geometry, output_padding)
                .map_err(|e| e.to_string()),
        }
    }

    /// Shape of a batch of `n` samples' input (`n` must be 1 for unbatched ops).
    pub fn batch_input_shape(&self, n: usize) -> Vec<usize> {
        let mut s = self.input_shape.clone();
        if self.batched {
            s[0] = n;
        }
        s
    }

    /// Shape of a batch of `n` samples' output.
    pub fn batch_output_shape(&self, n: usize) -> Vec<usize> {
        let mut s = self.output_shape.clone();
        if self.batched {
            s[0] = n;
        }
        s
    }

    /// How many samples a tensor of shape `shape` holds, or an error naming the
    /// mismatch with this op's input shape.
    pub fn samples_in_input(&self, shape: &[usize]) -> Result<usize, String> {
        let ok = shape.len() == self.input_shape.len()
            && shape
                .iter()
                .zip(&self.input_shape)
                .enumerate()
                .all(|(i, (a, b))| (i == 0 && self.batched) || a == b);
        if !ok || (self.batched && shape[0] == 0) {
            return Err(format!(
                "op {} ('{}') takes inputs of shape {:?}{}, got {:?}",
                self.op_id,
                self.source_node,
                self.input_shape,
                if self.batched {
                    " with any batch size on axis 0"
                } else {
                    ""
                },
                shape
            ));
        }
        Ok(if self.batched { shape[0] } else { 1 })
    }
}

/// SHA-256 over the format version, the reveal mode, the ordered layer specs
/// and the secure program: equal digests mean client and server files came
/// from the same conversion of the same model in the same mode. The
/// server's weights are hashed in too (as `weights_digest`, see the
/// converter), so two conversions of differently trained models differ.
pub fn model_digest(
    layers: &[LayerSpec],
    reveal: Reveal,
    program: Option<&Program>,
    weights_digest: &[u8; 32],
) -> String {
    let mut h = Sha256::new();
    h.update(format!("{DOMAIN}/{DOMAIN_VERSION}\nreveal {reveal}\n").as_bytes());
    for l in layers {
        // serde_json of plain data is deterministic: fields in declaration order.
        h.update(serde_json::to_vec(l).unwrap_or_default());
        h.update(b"\n");
    }
    if let Some(p) = program {
        h.update(serde_json::to_vec(p).unwrap_or_default());
        h.update(b"\n");
    }
    h.update(weights_digest);
    hex(&h.finalize())
}

/// SHA-256 over every op's quantised weights and bias, in op order: binds the
/// model digest to the weights, so the server can check its file is intact.
pub fn weights_digest<'a>(ops: impl IntoIterator<Item = (&'a [i64], &'a [i64])>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (w, b) in ops {
        h.update((w.len() as u64).to_le_bytes());
        w.iter().for_each(|v| h.update(v.to_le_bytes()));
        h.update((b.len() as u64).to_le_bytes());
        b.iter().for_each(|v| h.update(v.to_le_bytes()));
    }
    h.finalize().into()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which side a converted file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `server.onnx`: SecureLinear nodes with weights.
    Server,
    /// `client.onnx`: the graph with weightless SecureLinear placeholders.
    Client,
}

impl Role {
    /// Value of the [`ROLE_KEY`] metadata entry.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// What a converted file declares about itself.
#[derive(Clone, Debug)]
pub struct Contract {
    /// Which side the file is for.
    pub role: Role,
    /// SecureLinear specs by op id (index = op id).
    pub layers: Vec<LayerSpec>,
    /// The digest recorded by the converter.
    pub digest: String,
    /// What the client may learn.
    pub reveal: Reveal,
    /// The secure program (`logits` and `argmax` modes only).
    pub program: Option<Program>,
}

/// Reads and checks the contract of a converted model: role, domain import,
/// one SecureLinear node per op id 0..n, recorded digest present.
pub fn read_contract(model: &pb::ModelProto) -> Result<Contract, ModelError> {
    let meta = |key: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.clone())
    };
    let role = match meta(ROLE_KEY).as_deref() {
        Some("server") => Role::Server,
        Some("client") => Role::Client,
        Some(other) => {
            return Err(ModelError::Model(format!(
                "unknown role '{other}' in {ROLE_KEY}"
            )));
        }
        None => {
            return Err(ModelError::Model(format!(
                "no {ROLE_KEY} metadata: this file was not written by `secinfer convert`"
            )));
        }
    };
    let digest =
        meta(DIGEST_KEY).ok_or_else(|| ModelError::Model(format!("no {DIGEST_KEY} metadata")))?;
    let reveal: Reveal = meta(REVEAL_KEY)
        .ok_or_else(|| {
            ModelError::Model(format!(
                "no {REVEAL_KEY} metadata: convert the model again with this version of secinfer"
            ))
        })?
        .parse()?;
    let imported = model
        .opset_import
        .iter()
        .find(|o| o.domain == DOMAIN)
        .map(|o| o.version);
    match imported {
        Some(DOMAIN_VERSION) => {}
        Some(v) => {
            return Err(ModelError::Model(format!(
                "model uses {DOMAIN} version {v}; this build reads version {DOMAIN_VERSION}"
            )));
        }
        None => {
            return Err(ModelError::Model(format!(
                "model does not import domain {DOMAIN}"
            )));
        }
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Model("model has no graph".into()))?;
    let mut layers: Vec<LayerSpec> = graph
        .node
        .iter()
        .filter(|n| n.op_type == OP_TYPE)
        .map(LayerSpec::from_node)
        .collect::<Result<_, _>>()?;
    layers.sort_by_key(|l| l.op_id);
    for (i, l) in layers.iter().enumerate() {
        if l.op_id as usize != i {
            return Err(ModelError::Model(format!(
                "SecureLinear op ids must be 0..{} without gaps or repeats; found {} at position {i}",
                layers.len(),
                l.op_id
            )));
        }
    }
    let program = if reveal.is_private() {
        let ring_bits = layers.first().map_or(DEFAULT_RING_BITS, |l| l.ring_bits);
        let batched = layers.iter().all(|l| l.batched);
        Some(Program::from_nodes(
            &graph.node,
            &layers,
            reveal,
            batched,
            ring_bits,
        )?)
    } else {
        if let Some(n) = graph
            .node
            .iter()
            .find(|n| n.domain == DOMAIN && n.op_type != OP_TYPE)
        {
            return Err(ModelError::Model(format!(
                "node '{}' ({}) is part of a secure program, but the file is in activations mode",
                node_name(n),
                n.op_type
            )));
        }
        None
    };
    Ok(Contract {
        role,
        layers,
        digest,
        reveal,
        program,
    })
}

/// A node's display name: its name, else its first output.
pub fn node_name(node: &pb::NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output
            .first()
            .cloned()
            .unwrap_or_else(|| format!("<{}>", node.op_type))
    }
}

fn attr(name: &str, ty: AttributeType) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: ty as i32,
        ..Default::default()
    }
}

/// An INT attribute.
pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        i: v,
        ..attr(name, AttributeType::Int)
    }
}

/// A FLOAT attribute.
pub fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        f: v,
        ..attr(name, AttributeType::Float)
    }
}

/// A STRING attribute.
pub fn attr_string(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        s: v.as_bytes().to_vec(),
        ..attr(name, AttributeType::String)
    }
}

/// An INTS attribute from sizes.
pub fn attr_ints(name: &str, v: &[usize]) -> pb::AttributeProto {
    pb::AttributeProto {
        ints: v.iter().map(|&x| x as i64).collect(),
        ..attr(name, AttributeType::Ints)
    }
}

struct AttrReader<'a> {
    node: &'a pb::NodeProto,
    name: &'a str,
}

impl AttrReader<'_> {
    fn bad(&self, attr: &str, problem: &str) -> ModelError {
        ModelError::Attribute {
            node: self.name.to_string(),
            attr: attr.to_string(),
            problem: problem.to_string(),
        }
    }

    fn get(&self, attr: &str, ty: AttributeType) -> Result<&pb::AttributeProto, ModelError> {
        let a = self
            .node
            .attribute
            .iter()
            .find(|a| a.name == attr)
            .ok_or_else(|| self.bad(attr, "is missing"))?;
        if a.r#type != ty as i32 {
            return Err(self.bad(attr, &format!("must be of type {}", ty.as_str_name())));
        }
        Ok(a)
    }

    fn int(&self, attr: &str) -> Result<i64, ModelError> {
        Ok(self.get(attr, AttributeType::Int)?.i)
    }

    fn u32(&self, attr: &str) -> Result<u32, ModelError> {
        u32::try_from(self.int(attr)?).map_err(|_| self.bad(attr, "is out of range"))
    }

    fn usize(&self, attr: &str) -> Result<usize, ModelError> {
        usize::try_from(self.int(attr)?).map_err(|_| self.bad(attr, "must be non-negative"))
    }

    fn float(&self, attr: &str) -> Result<f32, ModelError> {
        Ok(self.get(attr, AttributeType::Float)?.f)
    }

    fn string(&self, attr: &str) -> Result<String, ModelError> {
        String::from_utf8(self.get(attr, AttributeType::String)?.s.clone())
            .map_err(|_| self.bad(attr, "is not UTF-8"))
    }

    fn i64s(&self, attr: &str) -> Result<Vec<i64>, ModelError> {
        Ok(self.get(attr, AttributeType::Ints)?.ints.clone())
    }

    fn usizes(&self, attr: &str) -> Result<Vec<usize>, ModelError> {
        self.get(attr, AttributeType::Ints)?
            .ints
            .iter()
            .map(|&v| usize::try_from(v).map_err(|_| self.bad(attr, "must be non-negative")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv_spec() -> LayerSpec {
        LayerSpec {
            op_id: 3,
            source_node: "conv1".into(),
            source_op: "Conv".into(),
            kind: LinearKind::Conv(ConvGeometry {
                strides: vec![2, 1],
                dilations: vec![1, 2],
                pads_begin: vec![1, 0],
                pads_end: vec![0, 2],
                group: 2,
            }),
            weight_shape: vec![4, 1, 3, 3],
            input_shape: vec![1, 2, 9, 9],
            output_shape: vec![1, 4, 4, 7],
            batched: true,
            ring_bits: 37,
            input_frac_bits: 12,
            weight_frac_bits: 11,
            input_bound: 8.0,
        }
    }

    fn node_of(spec: &LayerSpec) -> pb::NodeProto {
        pb::NodeProto {
            name: spec.source_node.clone(),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            attribute: spec.to_attributes(),
            ..Default::default()
        }
    }

    #[test]
    fn spec_round_trips_through_attributes() {
        let spec = conv_spec();
        assert_eq!(LayerSpec::from_node(&node_of(&spec)).unwrap(), spec);
        let mut t = spec.clone();
        t.kind = LinearKind::ConvTranspose {
            geometry: ConvGeometry {
                strides: vec![2],
                dilations: vec![1],
                pads_begin: vec![1],
                pads_end: vec![1],
                group: 1,
            },
            output_padding: vec![1],
        };
        t.weight_shape = vec![2, 3, 3];
        t.input_shape = vec![1, 2, 5];
        t.output_shape = vec![1, 3, 10];
        assert_eq!(LayerSpec::from_node(&node_of(&t)).unwrap(), t);
    }

    #[test]
    fn inconsistent_shapes_are_refused() {
        let mut spec = conv_spec();
        spec.output_shape = vec![1, 4, 5, 7];
        let err = LayerSpec::from_node(&node_of(&spec))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not follow"), "{err}");
    }

    #[test]
    fn missing_or_mistyped_attribute_is_named() {
        let spec = conv_spec();
        let mut node = node_of(&spec);
        node.attribute.retain(|a| a.name != "ring_bits");
        let err = LayerSpec::from_node(&node).unwrap_err().to_string();
        assert!(
            err.contains("ring_bits") && err.contains("missing"),
            "{err}"
        );
        let mut node = node_of(&spec);
        node.attribute.iter_mut().for_each(|a| {
            if a.name == "group" {
                a.r#type = AttributeType::Float as i32
            }
        });
        let err = LayerSpec::from_node(&node).unwrap_err().to_string();
        assert!(err.contains("group") && !err.contains("FLOAT"), "{err}");
        assert!(err.contains("INT"), "{err}");
    }

    #[test]
    fn scales_that_overflow_the_ring_are_refused() {
        let mut spec = conv_spec();
        spec.input_frac_bits = 20;
        spec.weight_frac_bits = 16;
        assert!(spec.validate().is_err());
        spec.weight_frac_bits = 15;
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn digest_changes_with_any_field_and_weights() {
        let a = conv_spec();
        let mut b = a.clone();
        b.input_frac_bits += 1;
        let w = [0u8; 32];
        let digest = |l: &LayerSpec, reveal, w: &[u8; 32]| {
            model_digest(std::slice::from_ref(l), reveal, None, w)
        };
        let d = digest(&a, Reveal::Activations, &w);
        assert_eq!(d, digest(&a, Reveal::Activations, &w));
        assert_ne!(d, digest(&b, Reveal::Activations, &w));
        assert_ne!(d, digest(&a, Reveal::Activations, &[1u8; 32]));
        assert_ne!(d, digest(&a, Reveal::Logits, &w));
    }

    #[test]
    fn batch_shapes_and_sample_counting() {
        let spec = conv_spec();
        assert_eq!(spec.batch_input_shape(5), vec![5, 2, 9, 9]);
        assert_eq!(spec.samples_in_input(&[7, 2, 9, 9]), Ok(7));
        assert!(spec.samples_in_input(&[7, 2, 9, 8]).is_err());
        assert!(spec.samples_in_input(&[0, 2, 9, 9]).is_err());
        assert_eq!(spec.bias_len(), 4);
    }
}
