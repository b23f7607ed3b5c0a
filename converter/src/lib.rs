//! ONNX model -> (server model, client model).
//!
//! The converter is a sequence of small passes, each testable alone:
//!
//! 1. [`graph::Graph::load`]: decode, check every input is defined, refuse
//!    foreign domains and already converted models;
//! 2. [`graph::Graph::fold_constants`]: evaluate (with tract) every node whose
//!    inputs are known, so computed weights become constants;
//! 3. [`extract::extract`]: find weighted linear nodes (the table in
//!    [`extract::handling`]), pull out their weights, fold BatchNormalization
//!    and Mul/Add/Sub/Div by per-feature constants into them;
//! 4. [`resolve`]: infer input shapes with tract, make padding explicit,
//!    decide the batch axis;
//! 5. [`scale`]: choose fixed-point scales from a worst-case no-overflow bound
//!    and quantise;
//! 6. [`emit`]: write `server.onnx` (SecureLinear ops with weights) and
//!    `client.onnx` (the rest of the graph, no weights).
//!
//! Anything it cannot convert is an error naming the node and op; output files
//! are written to temporary names and renamed only when both are complete.
#![forbid(unsafe_code)]

pub mod emit;
pub mod extract;
pub mod graph;
pub mod resolve;
pub mod scale;
pub mod tensor;

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use secinfer_model::{DEFAULT_RING_BITS, LayerSpec, model_digest, weights_digest};

/// Everything that stops a conversion.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The file is not a usable ONNX model.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// A node uses an op the converter cannot handle.
    #[error("node '{node}' ({op}) is not supported: {reason}")]
    UnsupportedOp {
        /// node name
        node: String,
        /// op type
        op: String,
        /// why
        reason: String,
    },
    /// A weighted node's weights are computed from run-time inputs.
    #[error(
        "node '{node}' ({op}) takes its weights from '{input}', which is computed at run time; secinfer needs constant weights"
    )]
    DynamicWeights {
        /// node name
        node: String,
        /// op type
        op: String,
        /// the non-constant input
        input: String,
    },
    /// A tensor in the file is malformed or of an unsupported type.
    #[error("tensor '{name}': {problem}")]
    Tensor {
        /// tensor name
        name: String,
        /// what is wrong
        problem: String,
    },
    /// Evaluating a constant subgraph failed.
    #[error("cannot fold node '{node}' ({op}) with constant inputs: {problem}")]
    Fold {
        /// node name
        node: String,
        /// op type
        op: String,
        /// tract's message
        problem: String,
    },
    /// Shape inference failed.
    #[error("cannot infer shapes: {problem}")]
    Shapes {
        /// tract's message
        problem: String,
    },
    /// A layer's shapes do not allow a secure op.
    #[error("node '{node}' ({op}): {problem}")]
    Shape {
        /// node name
        node: String,
        /// op type
        op: String,
        /// what is wrong
        problem: String,
    },
    /// No fixed-point scale fits the ring.
    #[error("node '{node}': {problem}")]
    Scale {
        /// node name
        node: String,
        /// what is wrong
        problem: String,
    },
    /// Reading or writing files.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the error
        source: std::io::Error,
    },
    /// A spec failed its own validation (a converter bug).
    #[error(transparent)]
    Model(#[from] secinfer_model::ModelError),
}

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Ring Z_2^k of the secure ops.
    pub ring_bits: u32,
    /// Largest |value| any SecureLinear input may take. Scales are chosen so
    /// that no input within it can overflow the ring; the client refuses larger
    /// inputs rather than decode garbage.
    pub input_bound: f32,
    /// Representative inputs (stacked on the batch axis). When given, each
    /// layer's bound is the smallest power of two at least twice the largest
    /// |value| seen at its input (capped by `input_bound`), which buys
    /// precision for layers whose inputs are small. The bound is still
    /// enforced: a client input beyond it is refused, never wrapped.
    pub calibration: Option<tract_onnx::prelude::Tensor>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_bits: DEFAULT_RING_BITS,
            input_bound: 64.0,
            calibration: None,
        }
    }
}

/// Per-layer bound from an observed maximum: a power of two with at least 2x margin.
fn calibrated_bound(observed: f64, cap: f32) -> f32 {
    let target = (2.0 * observed).max(2f64.powi(-8));
    let bound = 2f64.powi(target.log2().ceil() as i32) as f32;
    bound.min(cap)
}

/// What the converter did to one layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// the spec written
    pub spec: LayerSpec,
    /// names of nodes folded into it
    pub folded: Vec<String>,
    /// log2 of the worst-case output, in ring units
    pub bound_bits: f64,
    /// spare bits below the ring's half range
    pub headroom_bits: f64,
    /// max over output features of sum |w|
    pub weight_l1_max: f64,
    /// max number of weights feeding one output feature
    pub fan_in: usize,
}

impl LayerReport {
    /// Bound on |secure output − exact output| of this layer alone, for inputs
    /// with |x| <= `input_max`: input rounding (2^-(fa+1) per input, times the
    /// weights' L1 norm), weight rounding (2^-(fw+1) per weight, times |x|),
    /// and bias rounding.
    pub fn error_bound(&self, input_max: f64) -> f64 {
        let fa = self.spec.input_frac_bits as i32;
        let fw = self.spec.weight_frac_bits as i32;
        let x = input_max + 2f64.powi(-fa - 1);
        self.weight_l1_max * 2f64.powi(-fa - 1)
            + self.fan_in as f64 * x * 2f64.powi(-fw - 1)
            + 2f64.powi(-fa - fw - 1)
    }
}

/// The result of a conversion, not yet written.
pub struct Converted {
    /// `server.onnx`
    pub server: pb::ModelProto,
    /// `client.onnx`
    pub client: pb::ModelProto,
    /// per layer
    pub layers: Vec<LayerReport>,
    /// nodes evaluated at conversion time
    pub folded_constants: Vec<String>,
    /// constants left in the client graph (not weights of linear layers, but
    /// visible to the client), with the node reading them
    pub client_constants: Vec<String>,
    /// the model digest both files carry
    pub digest: String,
}

/// Converts a model given as ONNX bytes.
pub fn convert(bytes: &[u8], options: &Options) -> Result<Converted, ConvertError> {
    secinfer_ring::Ring::new(options.ring_bits)
        .map_err(|e| ConvertError::Invalid(e.to_string()))?;
    if !(options.input_bound.is_finite() && options.input_bound > 0.0) {
        return Err(ConvertError::Invalid(format!(
            "input bound {} must be a positive number",
            options.input_bound
        )));
    }
    let mut graph = graph::Graph::load(bytes)?;
    let folded_constants = graph.fold_constants()?;
    for node in &graph.nodes {
        if let extract::Handling::Unsupported(reason) = extract::handling(&node.op_type) {
            return Err(ConvertError::UnsupportedOp {
                node: secinfer_model::node_name(node),
                op: node.op_type.clone(),
                reason: reason.into(),
            });
        }
    }
    let mut layers = extract::extract(&graph)?;
    if layers.is_empty() {
        return Err(ConvertError::Invalid("the model has no weighted linear node (Gemm, MatMul with a constant, Conv, ConvTranspose, BatchNormalization)".into()));
    }
    let names: Vec<&str> = layers.iter().map(|l| l.input.as_str()).collect();
    let (shapes, batch) = resolve::infer_shapes(&graph, &names)?;
    // Per layer: the bound |x| <= A the scales guarantee, and a typical |x|
    // (rms) for splitting fractional bits between inputs and weights. Without
    // calibration, inputs are assumed to be A/8 on average.
    let observed: Vec<(f32, f64)> = match &options.calibration {
        Some(samples) => resolve::observe(&graph, &names, samples)?
            .into_iter()
            .map(|o| {
                let bound = calibrated_bound(o.max, options.input_bound);
                (
                    bound,
                    o.rms.clamp(f64::from(bound) / 4096.0, f64::from(bound)),
                )
            })
            .collect(),
        None => vec![(options.input_bound, f64::from(options.input_bound) / 8.0); names.len()],
    };

    let mut specs = Vec::with_capacity(layers.len());
    let mut quantised = Vec::with_capacity(layers.len());
    for (id, ((layer, shape), &(bound, typical))) in
        layers.iter_mut().zip(&shapes).zip(&observed).enumerate()
    {
        let resolved = resolve::resolve(layer, shape, batch.as_ref())?;
        let q = scale::choose(layer, options.ring_bits, f64::from(bound), typical)?;
        let spec = LayerSpec {
            op_id: id as u32,
            source_node: layer.source_node.clone(),
            source_op: layer.source_op.clone(),
            kind: resolved.kind,
            weight_shape: layer.weight.shape().to_vec(),
            input_shape: resolved.input_shape,
            output_shape: resolved.output_shape,
            batched: resolved.batched,
            ring_bits: options.ring_bits,
            input_frac_bits: q.input_frac_bits,
            weight_frac_bits: q.weight_frac_bits,
            input_bound: bound,
        };
        spec.validate()?;
        specs.push(spec);
        quantised.push(q);
    }
    let wd = weights_digest(
        quantised
            .iter()
            .map(|q| (q.weight.as_slice(), q.bias.as_slice())),
    );
    let digest = model_digest(&specs, &wd);
    let emitted: Vec<emit::EmittedLayer> = layers
        .iter()
        .zip(&specs)
        .zip(&quantised)
        .map(|((l, s), q)| emit::EmittedLayer {
            spec: s.clone(),
            nodes: (l.node, &l.folded),
            io: (&l.input, &l.output),
            weight: &q.weight,
            bias: &q.bias,
        })
        .collect();
    let client = emit::client_model(&graph, &emitted, &digest)?;
    let server = emit::server_model(&graph, &emitted, &digest);
    let client_constants = client
        .graph
        .iter()
        .flat_map(|g| {
            g.initializer
                .iter()
                .filter(|t| {
                    t.data_type == pb::tensor_proto::DataType::Float as i32
                        && t.dims.iter().product::<i64>() > 1
                })
                .map(move |t| {
                    let reader = g
                        .node
                        .iter()
                        .find(|n| n.input.contains(&t.name))
                        .map(secinfer_model::node_name)
                        .unwrap_or_default();
                    format!("{} {:?} read by '{}'", t.name, t.dims, reader)
                })
        })
        .collect();
    let reports = layers
        .iter()
        .zip(specs)
        .zip(&quantised)
        .map(|((l, spec), q)| LayerReport {
            folded: l
                .folded
                .iter()
                .map(|&i| secinfer_model::node_name(&graph.nodes[i]))
                .collect(),
            spec,
            bound_bits: q.bound_bits,
            headroom_bits: q.headroom_bits,
            weight_l1_max: q.weight_l1_max,
            fan_in: q.fan_in,
        })
        .collect();
    Ok(Converted {
        server,
        client,
        layers: reports,
        folded_constants,
        client_constants,
        digest,
    })
}

/// Reads and converts a model file.
pub fn convert_file(path: &Path, options: &Options) -> Result<Converted, ConvertError> {
    let bytes = std::fs::read(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    convert(&bytes, options)
}

impl Converted {
    /// Writes `dir/server.onnx` and `dir/client.onnx`. Both are written to
    /// temporary files first and renamed into place only when both are
    /// complete, so a failure never leaves a half-written pair behind.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), ConvertError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ConvertError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let server = dir.join("server.onnx");
        let client = dir.join("client.onnx");
        let tmp_server = dir.join(".server.onnx.partial");
        let tmp_client = dir.join(".client.onnx.partial");
        let result = (|| {
            std::fs::write(&tmp_server, self.server.encode_to_vec()).map_err(io(&tmp_server))?;
            std::fs::write(&tmp_client, self.client.encode_to_vec()).map_err(io(&tmp_client))?;
            std::fs::rename(&tmp_server, &server).map_err(io(&server))?;
            std::fs::rename(&tmp_client, &client).map_err(io(&client))?;
            Ok((server.clone(), client.clone()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp_server);
            let _ = std::fs::remove_file(&tmp_client);
        }
        result
    }
}
