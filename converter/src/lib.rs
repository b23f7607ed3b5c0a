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
//! In the private modes (`--reveal logits`, the default, and `argmax`)
//! passes 4–6 differ: [`program`] splits the graph into the client's f32
//! prefix, a secure program run jointly on shares, and a final softmax;
//! [`bounds`] proves every value's range from the input bound and chooses
//! scales, truncations and comparison widths from it; [`emit`] writes the
//! program into both files (see docs/private-mode.md).
//!
//! Anything it cannot convert is an error naming the node and op; output files
//! are written to temporary names and renamed only when both are complete.
#![forbid(unsafe_code)]

pub mod bounds;
pub mod emit;
pub mod extract;
pub mod graph;
pub mod program;
pub mod resolve;
pub mod scale;
pub mod tensor;

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use std::collections::HashMap;

use secinfer_model::{DEFAULT_RING_BITS, LayerSpec, Program, Reveal, model_digest, weights_digest};

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
    /// What the client may learn (default: the logits).
    pub reveal: Reveal,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_bits: DEFAULT_RING_BITS,
            input_bound: 64.0,
            calibration: None,
            reveal: Reveal::Logits,
        }
    }
}

/// Per-layer bound from an observed maximum: a power of two with at least 2x margin.
fn calibrated_bound(observed: f64, cap: f32) -> f32 {
    let target = (2.0 * observed).max(2f64.powi(-8));
    let bound = 2f64.powi(target.log2().ceil() as i32) as f32;
    bound.min(cap)
}

/// A private-mode input range from what calibration saw: the observed range
/// widened by a quarter of its span (at least 2^-8) on each side, within
/// `±cap`. The client refuses values outside it.
fn calibrated_range(o: &resolve::Observed, cap: f32) -> (f32, f32) {
    let margin = ((o.hi - o.lo) / 4.0).max(2f64.powi(-8));
    let cap = f64::from(cap);
    (
        (o.lo - margin).clamp(-cap, cap) as f32,
        (o.hi + margin).clamp(-cap, cap) as f32,
    )
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
    /// largest |input| calibration saw (private modes with calibration)
    pub observed_max: Option<f64>,
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
    /// what the client may learn
    pub reveal: Reveal,
    /// the secure program (private modes)
    pub program: Option<Program>,
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
    if options.reveal.is_private() {
        return convert_private(graph, layers, folded_constants, options);
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
    let digest = model_digest(&specs, Reveal::Activations, None, &wd);
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
    let client_constants = client_constants(&client);
    let reports = layers
        .iter()
        .zip(specs)
        .zip(&quantised)
        .map(|((l, spec), q)| report(&graph, l, spec, q))
        .collect();
    Ok(Converted {
        server,
        client,
        layers: reports,
        folded_constants,
        client_constants,
        digest,
        reveal: Reveal::Activations,
        program: None,
    })
}

/// Float tensors of more than one element in the client file (not weights
/// of linear layers, but visible to the client), with the node reading them.
fn client_constants(client: &pb::ModelProto) -> Vec<String> {
    client
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
        .collect()
}

fn report(
    graph: &graph::Graph,
    l: &extract::LinearLayer,
    spec: LayerSpec,
    q: &scale::Quantised,
) -> LayerReport {
    LayerReport {
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
        observed_max: None,
    }
}

/// Passes 4–6 of the private modes (see the crate docs).
fn convert_private(
    graph: graph::Graph,
    mut layers: Vec<extract::LinearLayer>,
    folded_constants: Vec<String>,
    options: &Options,
) -> Result<Converted, ConvertError> {
    let draft = program::draft(&graph, &layers, options.reveal)?;
    let input_names: Vec<String> = layers.iter().map(|l| l.input.clone()).collect();
    let names: Vec<&str> = input_names.iter().map(String::as_str).collect();
    let (shapes, batch) = resolve::infer_shapes(&graph, &names)?;
    let resolved = layers
        .iter_mut()
        .zip(&shapes)
        .map(|(l, shape)| resolve::resolve(l, shape, batch.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(l) = resolved.iter().find(|r| r.batched != draft.batched) {
        return Err(ConvertError::Shapes {
            problem: format!(
                "a linear layer with input {:?} does not share the model's batch axis",
                l.input_shape
            ),
        });
    }
    let input_tensors: Vec<String> = draft
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            program::DraftOp::Input { tensor } => Some(tensor.clone()),
            _ => None,
        })
        .collect();
    // Calibration sets the client's input bound (which the client checks)
    // and the split of fractional bits, never a bound the protocol relies on.
    let mut observed_max = vec![None; layers.len()];
    // per layer: typical |input|; per program input: the range the client checks
    type Calibrated = (Vec<Option<f64>>, HashMap<String, (f32, f32)>);
    let (typicals, input_bounds): Calibrated = match &options.calibration {
        Some(samples) => {
            let mut all: Vec<&str> = names.clone();
            all.extend(input_tensors.iter().map(String::as_str));
            let seen = resolve::observe(&graph, &all, samples)?;
            observed_max = seen[..names.len()].iter().map(|o| Some(o.max)).collect();
            let typical = seen[..names.len()].iter().map(|o| Some(o.rms)).collect();
            let bounds = input_tensors
                .iter()
                .zip(&seen[names.len()..])
                .map(|(t, o)| (t.clone(), calibrated_range(o, options.input_bound)))
                .collect();
            (typical, bounds)
        }
        None => (
            vec![None; layers.len()],
            input_tensors
                .iter()
                .map(|t| (t.clone(), (-options.input_bound, options.input_bound)))
                .collect(),
        ),
    };
    let inputs: Vec<bounds::LayerInput> = resolved
        .iter()
        .zip(&typicals)
        .map(|(shapes, &typical)| bounds::LayerInput { shapes, typical })
        .collect();
    let fin = bounds::finalise(
        &draft,
        &layers,
        &inputs,
        &input_bounds,
        options.ring_bits,
        options.reveal,
    )?;
    let wd = weights_digest(
        fin.quantised
            .iter()
            .map(|q| (q.weight.as_slice(), q.bias.as_slice())),
    );
    let digest = model_digest(&fin.specs, options.reveal, Some(&fin.program), &wd);
    let emitted: Vec<emit::EmittedLayer> = layers
        .iter()
        .zip(&fin.specs)
        .zip(&fin.quantised)
        .map(|((l, s), q)| emit::EmittedLayer {
            spec: s.clone(),
            nodes: (l.node, &l.folded),
            io: (&l.input, &l.output),
            weight: &q.weight,
            bias: &q.bias,
        })
        .collect();
    let suffix: Vec<pb::NodeProto> = draft.suffix.iter().map(|s| s.node.clone()).collect();
    let client = emit::client_private(
        &graph,
        &draft.prefix,
        &suffix,
        draft.index_output.as_deref(),
        &fin.program,
        &fin.specs,
        &digest,
    )?;
    let server = emit::server_private(&graph, &fin.program, &emitted, &digest);
    // Both files must read back as exactly this program, or the parties'
    // digests (and runs) would disagree.
    for (role, file) in [("client", &client), ("server", &server)] {
        let back = secinfer_model::read_contract(file)?;
        if back.program.as_ref() != Some(&fin.program) || back.layers != fin.specs {
            return Err(ConvertError::Invalid(format!(
                "internal: the {role} file does not read back as the program that was written"
            )));
        }
    }
    let client_constants = client_constants(&client);
    let reports = layers
        .iter()
        .zip(fin.specs)
        .zip(&fin.quantised)
        .zip(observed_max)
        .map(|(((l, spec), q), seen)| LayerReport {
            observed_max: seen,
            ..report(&graph, l, spec, q)
        })
        .collect();
    Ok(Converted {
        server,
        client,
        layers: reports,
        folded_constants,
        client_constants,
        digest,
        reveal: options.reveal,
        program: Some(fin.program),
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
