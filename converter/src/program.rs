//! Private modes, pass A: split the graph into the client's prefix, the
//! secure program and the client's suffix, and translate every node of the
//! program into a draft step (no scales yet; [`crate::bounds`] adds them).
//!
//! - A node none of whose inputs depends on a linear layer runs on the
//!   client in f32, as before (the **prefix**: a Flatten, the breast-cancer
//!   model's standardisation).
//! - Every weighted linear node (with what was folded into it) is a
//!   `Linear` step; every other node downstream of one must be in the table
//!   of [`translate`], else the conversion fails naming the node and op.
//! - A Softmax or LogSoftmax whose output is a model output is the
//!   **suffix**: its input is revealed and the client applies it.
//! - `Relu → MaxPool` becomes `MaxPool → Relu` (exact: both are monotone),
//!   so the ReLU compares a quarter of the elements of a 2×2 pool.
//!
//! Slots are named `share:<tensor>` so that a revealed tensor keeps its
//! original name in `client.onnx`.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::DimLike;

use secinfer_model::{PoolGeometry, Reveal, node_name};

use crate::ConvertError;
use crate::extract::LinearLayer;
use crate::graph::{Graph, catch_tract};

/// What a draft step computes (scales and comparison widths come later).
#[derive(Debug, Clone, PartialEq)]
pub enum DraftOp {
    /// The client encodes tensor `tensor` (an f32 tensor of the prefix or a model input).
    Input {
        /// the client's tensor
        tensor: String,
    },
    /// Linear layer number `layer` of the extracted layers.
    Linear {
        /// index into the extracted layers
        layer: usize,
    },
    /// max(x, 0)
    Relu,
    /// windowed max
    MaxPool(PoolGeometry),
    /// max over spatial axes
    GlobalMaxPool,
    /// windowed or global mean: a sum divided by `divisor`
    AvgPool {
        /// the windows (`None`: global)
        geometry: Option<PoolGeometry>,
        /// cells per window
        divisor: usize,
    },
    /// multiplication by a real constant
    Scale(f64),
    /// x + y
    Add,
    /// x − y
    Sub,
    /// same elements, new shape
    Reshape,
    /// permuted axes
    Transpose(Vec<usize>),
    /// joined along an axis
    Concat(usize),
    /// strided window (starts, steps) per axis
    Slice(Vec<usize>, Vec<usize>),
    /// zero padding (begin, end) per axis
    Pad(Vec<usize>, Vec<usize>),
    /// an elementwise activation evaluated as a public piecewise-linear function
    Activation(Activation),
    /// index of the first maximum along the last axis
    ArgMax,
    /// give the value to the client as tensor `tensor`
    Reveal {
        /// the client's tensor name
        tensor: String,
    },
}

/// An activation the program evaluates as a piecewise-linear function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// 1 / (1 + e^-x), approximated
    Sigmoid,
    /// tanh x, approximated
    Tanh,
    /// x for x >= 0, alpha·x below
    LeakyRelu(f64),
    /// min(max(x, lo), hi)
    Clip(f64, f64),
}

impl Activation {
    /// The real function.
    pub fn eval(self, x: f64) -> f64 {
        match self {
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Activation::Clip(lo, hi) => x.clamp(lo, hi),
        }
    }

    /// Whether it never decreases (then an interval maps to the interval of its ends).
    pub fn monotone(self) -> bool {
        !matches!(self, Activation::LeakyRelu(a) if a < 0.0)
    }

    /// The ONNX op it implements.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Sigmoid => "Sigmoid",
            Activation::Tanh => "Tanh",
            Activation::LeakyRelu(_) => "LeakyRelu",
            Activation::Clip(..) => "Clip",
        }
    }
}

/// One draft step.
#[derive(Debug, Clone)]
pub struct DraftStep {
    /// what it computes
    pub op: DraftOp,
    /// slots read
    pub inputs: Vec<String>,
    /// slot written
    pub output: String,
    /// one sample's output shape
    pub shape: Vec<usize>,
    /// original node(s)
    pub source: String,
}

/// A client-side operation applied after the reveal.
#[derive(Debug, Clone, PartialEq)]
pub struct SuffixOp {
    /// the node (Softmax or LogSoftmax), as in the model
    pub node: pb::NodeProto,
}

/// The split model.
#[derive(Debug, Clone)]
pub struct Draft {
    /// steps in execution order
    pub steps: Vec<DraftStep>,
    /// indices (into `Graph::nodes`) of the client's f32 prefix
    pub prefix: Vec<usize>,
    /// nodes the client applies after the reveal
    pub suffix: Vec<SuffixOp>,
    /// whether axis 0 is the batch axis
    pub batched: bool,
    /// argmax mode: the model's one output becomes an INT64 index `[N, 1]`
    pub index_output: Option<String>,
}

/// The slot holding tensor `t`'s shares.
pub fn slot(t: &str) -> String {
    format!("share:{t}")
}

fn unsupported(node: &pb::NodeProto, reveal: Reveal, why: &str) -> ConvertError {
    ConvertError::UnsupportedOp {
        node: node_name(node),
        op: node.op_type.clone(),
        reason: format!(
            "{why}; in --reveal {reveal} mode every operator between the input and the output runs jointly on secret shares, and this one is not implemented that way (--reveal activations would run it on the client, revealing every linear layer's output)"
        ),
    }
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_is(node: &pb::NodeProto, name: &str) -> Vec<i64> {
    attr(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn attr_s(node: &pb::NodeProto, name: &str, default: &str) -> String {
    attr(node, name)
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        .unwrap_or_else(|| default.to_string())
}

/// Per-sample shapes of tensors, with tract, and whether axis 0 is the batch.
fn infer(
    graph: &Graph,
    names: &[String],
) -> Result<(HashMap<String, Vec<usize>>, bool), ConvertError> {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (shapes, batch) = crate::resolve::infer_shapes(graph, &refs)?;
    let mut out = HashMap::new();
    for (name, shape) in names.iter().zip(shapes) {
        let mut sample = Vec::with_capacity(shape.len());
        for (i, d) in shape.iter().enumerate() {
            if i == 0 && batch.as_ref() == Some(d) {
                sample.push(1);
                continue;
            }
            let v = d.to_usize().map_err(|_| ConvertError::Shapes {
                problem: format!(
                    "tensor '{name}' has shape {shape:?}: only axis 0 may be the (symbolic) batch axis"
                ),
            })?;
            if i == 0 && batch.is_some() {
                return Err(ConvertError::Shapes {
                    problem: format!(
                        "tensor '{name}' has shape {shape:?}: its axis 0 is not the batch axis, so the batch would be mixed with other data"
                    ),
                });
            }
            sample.push(v);
        }
        if sample.is_empty() {
            return Err(ConvertError::Shapes {
                problem: format!("tensor '{name}' is a scalar; secure values need the batch axis"),
            });
        }
        out.insert(name.clone(), sample);
    }
    Ok((out, batch.is_some()))
}

fn const_ints(
    graph: &Graph,
    node: &pb::NodeProto,
    ix: usize,
) -> Result<Option<Vec<i64>>, ConvertError> {
    let Some(name) = node.input.get(ix).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let t = graph
        .consts
        .get(name)
        .ok_or_else(|| ConvertError::DynamicWeights {
            node: node_name(node),
            op: node.op_type.clone(),
            input: name.clone(),
        })?;
    let v = catch_tract(|| {
        Ok(t.cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .iter()
            .copied()
            .collect())
    })
    .map_err(|problem| ConvertError::Tensor {
        name: name.clone(),
        problem,
    })?;
    Ok(Some(v))
}

fn const_scalar(graph: &Graph, name: &str) -> Option<f64> {
    let t = graph.consts.get(name)?;
    if t.len() != 1 {
        return None;
    }
    catch_tract(|| {
        Ok(f64::from(
            t.cast_to::<f32>()?
                .to_plain_array_view::<f32>()?
                .iter()
                .next()
                .copied()
                .unwrap_or(0.0),
        ))
    })
    .ok()
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Window geometry of a pooling node for a per-sample input shape.
fn pool_geometry(
    node: &pb::NodeProto,
    input: &[usize],
    reveal: Reveal,
) -> Result<PoolGeometry, ConvertError> {
    let r = input.len().saturating_sub(2);
    let kernel: Vec<usize> = attr_is(node, "kernel_shape")
        .iter()
        .map(|&v| v.max(0) as usize)
        .collect();
    if kernel.len() != r || r == 0 {
        return Err(unsupported(
            node,
            reveal,
            "its kernel_shape does not match the input's spatial axes",
        ));
    }
    if attr_i(node, "ceil_mode", 0) != 0 {
        return Err(unsupported(node, reveal, "ceil_mode = 1 is not supported"));
    }
    if node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(unsupported(
            node,
            reveal,
            "the indices output of MaxPool is not supported",
        ));
    }
    let ones = vec![1usize; r];
    let pick = |name: &str| -> Vec<usize> {
        let v = attr_is(node, name);
        if v.is_empty() {
            ones.clone()
        } else {
            v.iter().map(|&x| x.max(0) as usize).collect()
        }
    };
    let strides = pick("strides");
    let dilations = pick("dilations");
    let pads = attr_is(node, "pads");
    let (pads_begin, pads_end) = match attr_s(node, "auto_pad", "NOTSET").as_str() {
        "NOTSET" if pads.is_empty() => (vec![0; r], vec![0; r]),
        "NOTSET" if pads.len() == 2 * r => (
            pads[..r].iter().map(|&x| x.max(0) as usize).collect(),
            pads[r..].iter().map(|&x| x.max(0) as usize).collect(),
        ),
        "VALID" => (vec![0; r], vec![0; r]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let upper = attr_s(node, "auto_pad", "") == "SAME_UPPER";
            let mut b = Vec::with_capacity(r);
            let mut e = Vec::with_capacity(r);
            for i in 0..r {
                let span = dilations[i] * (kernel[i].max(1) - 1) + 1;
                let out = input[2 + i].div_ceil(strides[i].max(1));
                let total = ((out - 1) * strides[i] + span).saturating_sub(input[2 + i]);
                let small = total / 2;
                if upper {
                    b.push(small);
                    e.push(total - small);
                } else {
                    b.push(total - small);
                    e.push(small);
                }
            }
            (b, e)
        }
        other => {
            return Err(unsupported(
                node,
                reveal,
                &format!("auto_pad '{other}' with pads {pads:?}"),
            ));
        }
    };
    Ok(PoolGeometry {
        kernel,
        strides,
        dilations,
        pads_begin,
        pads_end,
    })
}

/// Whether a slot holds an index (an ArgMax, perhaps reshaped) rather than a value.
pub fn is_index(steps: &[DraftStep], slot: &str) -> bool {
    match steps.iter().rev().find(|s| s.output == slot) {
        Some(s) if s.op == DraftOp::ArgMax => true,
        Some(s) if s.op == DraftOp::Reshape => s.inputs.first().is_some_and(|i| is_index(steps, i)),
        _ => false,
    }
}

/// Splits and translates. `layers` are the extracted linear layers.
pub fn draft(graph: &Graph, layers: &[LinearLayer], reveal: Reveal) -> Result<Draft, ConvertError> {
    let folded: HashSet<usize> = layers
        .iter()
        .flat_map(|l| l.folded.iter().copied())
        .collect();
    let layer_at: HashMap<usize, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.node, i))
        .collect();
    let outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();

    // Which tensors carry secure values (downstream of a linear layer).
    let mut secure: HashSet<String> = HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        let downstream = layer_at.contains_key(&i) || node.input.iter().any(|x| secure.contains(x));
        if downstream {
            let outs: Vec<String> = match layer_at.get(&i) {
                Some(&l) => vec![layers[l].output.clone()],
                None => node
                    .output
                    .iter()
                    .filter(|o| !o.is_empty())
                    .cloned()
                    .collect(),
            };
            secure.extend(outs);
        }
    }
    // Shapes of everything the program touches.
    let mut names: Vec<String> = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        let touches = layer_at.contains_key(&i) || node.input.iter().any(|x| secure.contains(x));
        if touches {
            for t in node
                .input
                .iter()
                .filter(|t| !t.is_empty() && !graph.consts.contains_key(*t))
            {
                names.push(t.clone());
            }
            match layer_at.get(&i) {
                Some(&l) => names.push(layers[l].output.clone()),
                None => names.extend(node.output.iter().filter(|o| !o.is_empty()).cloned()),
            }
        }
    }
    names.sort();
    names.dedup();
    let (shapes, batched) = infer(graph, &names)?;
    let shape = |t: &str| -> Result<Vec<usize>, ConvertError> {
        shapes.get(t).cloned().ok_or_else(|| ConvertError::Shapes {
            problem: format!("no shape for tensor '{t}'"),
        })
    };

    // Softmax/LogSoftmax producing a model output from a secure value: the suffix.
    let is_suffix = |node: &pb::NodeProto| {
        matches!(node.op_type.as_str(), "Softmax" | "LogSoftmax")
            && node.input.first().is_some_and(|x| secure.contains(x))
            && node
                .output
                .first()
                .is_some_and(|o| outputs.contains(o.as_str()))
    };
    // ReLUs whose only reader is a max pool: evaluated after the pool.
    let mut deferred_relu: HashMap<String, (String, String)> = HashMap::new();

    let mut d = Draft {
        steps: Vec::new(),
        prefix: Vec::new(),
        suffix: Vec::new(),
        batched,
        index_output: None,
    };
    // client tensors already encoded
    let mut encoded: HashSet<String> = HashSet::new();
    // tensors that are aliases of a slot (Identity, Dropout)
    let mut alias: HashMap<String, String> = HashMap::new();
    let slot_of =
        |alias: &HashMap<String, String>, t: &str| alias.get(t).cloned().unwrap_or_else(|| slot(t));

    for (i, node) in graph.nodes.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        let name = node_name(node);
        let is_linear = layer_at.contains_key(&i);
        let secure_in = node.input.iter().any(|x| secure.contains(x));
        if !is_linear && !secure_in {
            d.prefix.push(i);
            continue;
        }
        if is_suffix(node) {
            d.suffix.push(SuffixOp { node: node.clone() });
            continue;
        }
        // Client tensors this node reads become inputs of the program.
        let dynamic_inputs: Vec<&String> = match layer_at.get(&i) {
            Some(&l) => vec![&layers[l].input],
            None => node
                .input
                .iter()
                .filter(|t| !t.is_empty() && !graph.consts.contains_key(*t))
                .collect(),
        };
        for t in dynamic_inputs {
            if !secure.contains(t) && encoded.insert(t.clone()) {
                d.steps.push(DraftStep {
                    op: DraftOp::Input { tensor: t.clone() },
                    inputs: vec![],
                    output: slot(t),
                    shape: shape(t)?,
                    source: format!("input '{t}'"),
                });
            }
        }
        if let Some(&l) = layer_at.get(&i) {
            let layer = &layers[l];
            // The step's source is the spec's node name: the files carry
            // it once, in the SecureLinear node.
            d.steps.push(DraftStep {
                op: DraftOp::Linear { layer: l },
                inputs: vec![slot_of(&alias, &layer.input)],
                output: slot(&layer.output),
                shape: shape(&layer.output)?,
                source: layer.source_node.clone(),
            });
            continue;
        }
        let out = node.output.first().cloned().unwrap_or_default();
        let ins: Vec<&String> = node.input.iter().filter(|t| !t.is_empty()).collect();
        let in0 = ins.first().map(|s| s.as_str()).unwrap_or_default();
        let mut push = |op: DraftOp, inputs: Vec<String>, output: String, shape: Vec<usize>| {
            d.steps.push(DraftStep {
                op,
                inputs,
                output,
                shape,
                source: name.clone(),
            })
        };
        let bad = |why: &str| unsupported(node, reveal, why);
        match node.op_type.as_str() {
            "Identity" | "Dropout" => {
                if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(bad("the mask output of Dropout is not supported"));
                }
                alias.insert(out.clone(), slot_of(&alias, in0));
                if outputs.contains(out.as_str()) {
                    return Err(bad(
                        "a model output that only renames a secure value; remove the Identity",
                    ));
                }
            }
            "Relu" => {
                let readers = graph.consumers(&out);
                let pool_next = readers.len() == 1
                    && matches!(
                        graph.nodes[readers[0]].op_type.as_str(),
                        "MaxPool" | "GlobalMaxPool"
                    )
                    && !outputs.contains(out.as_str());
                if pool_next {
                    deferred_relu.insert(out.clone(), (slot_of(&alias, in0), name.clone()));
                } else {
                    push(
                        DraftOp::Relu,
                        vec![slot_of(&alias, in0)],
                        slot(&out),
                        shape(&out)?,
                    );
                }
            }
            "MaxPool" | "GlobalMaxPool" => {
                let op = if node.op_type == "MaxPool" {
                    DraftOp::MaxPool(pool_geometry(node, &shape(in0)?, reveal)?)
                } else {
                    DraftOp::GlobalMaxPool
                };
                match deferred_relu.remove(in0) {
                    Some((relu_in, relu_name)) => {
                        let pooled = format!("{}/pooled", slot(&out));
                        push(op, vec![relu_in], pooled.clone(), shape(&out)?);
                        d.steps.push(DraftStep {
                            op: DraftOp::Relu,
                            inputs: vec![pooled],
                            output: slot(&out),
                            shape: shape(&out)?,
                            source: format!("{relu_name} (after {name})"),
                        });
                    }
                    None => push(op, vec![slot_of(&alias, in0)], slot(&out), shape(&out)?),
                }
            }
            "AveragePool" | "GlobalAveragePool" => {
                let (geometry, divisor) = if node.op_type == "AveragePool" {
                    let g = pool_geometry(node, &shape(in0)?, reveal)?;
                    let padded = g.pads_begin.iter().chain(&g.pads_end).any(|&p| p > 0);
                    if padded && attr_i(node, "count_include_pad", 0) == 0 {
                        return Err(bad(
                            "padding with count_include_pad = 0 divides border windows by different counts",
                        ));
                    }
                    let k = g.window();
                    (Some(g), k)
                } else {
                    let s = shape(in0)?;
                    (None, s[2.min(s.len())..].iter().product())
                };
                push(
                    DraftOp::AvgPool { geometry, divisor },
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Add" | "Sub" => {
                let both_secure =
                    ins.len() == 2 && ins.iter().all(|t| !graph.consts.contains_key(*t));
                if !both_secure {
                    return Err(bad(
                        "adding or subtracting a constant here is not supported (a constant right after a linear layer is folded into its bias)",
                    ));
                }
                if shape(ins[0])? != shape(ins[1])? {
                    return Err(bad("broadcasting between secure tensors is not supported"));
                }
                let op = if node.op_type == "Add" {
                    DraftOp::Add
                } else {
                    DraftOp::Sub
                };
                push(
                    op,
                    vec![slot_of(&alias, ins[0]), slot_of(&alias, ins[1])],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Mul" | "Div" => {
                let (x, c) = match (ins.first(), ins.get(1)) {
                    (Some(a), Some(b)) if graph.consts.contains_key(*b) => (a, b),
                    (Some(a), Some(b))
                        if node.op_type == "Mul" && graph.consts.contains_key(*a) =>
                    {
                        (b, a)
                    }
                    _ => return Err(bad("multiplying two secure tensors is not supported")),
                };
                let v = const_scalar(graph, c)
                    .ok_or_else(|| bad("only a scalar constant factor is supported here"))?;
                let f = if node.op_type == "Mul" { v } else { 1.0 / v };
                if !f.is_finite() || f == 0.0 {
                    return Err(bad("the constant factor is zero or not finite"));
                }
                push(
                    DraftOp::Scale(f),
                    vec![slot_of(&alias, x)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
                push(
                    DraftOp::Reshape,
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Transpose" => {
                let rank = shape(in0)?.len();
                let mut perm: Vec<usize> = attr_is(node, "perm")
                    .iter()
                    .map(|&p| p.max(0) as usize)
                    .collect();
                if perm.is_empty() {
                    perm = (0..rank).rev().collect();
                }
                if batched && perm.first() != Some(&0) {
                    return Err(bad("a transpose that moves the batch axis"));
                }
                push(
                    DraftOp::Transpose(perm),
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Concat" => {
                let rank = shape(&out)?.len();
                let axis = norm_axis(attr_i(node, "axis", 0), rank)
                    .ok_or_else(|| bad("axis out of range"))?;
                if batched && axis == 0 {
                    return Err(bad("concatenation along the batch axis"));
                }
                if ins.iter().any(|t| graph.consts.contains_key(*t)) {
                    return Err(bad(
                        "concatenating a constant with secure values is not supported",
                    ));
                }
                push(
                    DraftOp::Concat(axis),
                    ins.iter().map(|t| slot_of(&alias, t)).collect(),
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Slice" => {
                let input = shape(in0)?;
                let output = shape(&out)?;
                let rank = input.len();
                let starts = const_ints(graph, node, 1)?.ok_or_else(|| bad("starts missing"))?;
                let axes = const_ints(graph, node, 3)?
                    .unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps_in = const_ints(graph, node, 4)?.unwrap_or_else(|| vec![1; starts.len()]);
                let mut st = vec![0usize; rank];
                let mut sp = vec![1usize; rank];
                for ((&a, &s), &p) in axes.iter().zip(&starts).zip(&steps_in) {
                    let a = norm_axis(a, rank).ok_or_else(|| bad("axis out of range"))?;
                    if p <= 0 {
                        return Err(bad("only positive slice steps are supported"));
                    }
                    let dim = input[a] as i64;
                    let s = if s < 0 { s + dim } else { s }.clamp(0, dim);
                    if batched && a == 0 {
                        return Err(bad("slicing the batch axis"));
                    }
                    st[a] = s as usize;
                    sp[a] = p as usize;
                }
                push(
                    DraftOp::Slice(st, sp),
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    output,
                );
            }
            "Pad" => {
                if attr_s(node, "mode", "constant") != "constant" {
                    return Err(bad("only constant (zero) padding is supported"));
                }
                if let Some(v) = node.input.get(2).filter(|s| !s.is_empty())
                    && const_scalar(graph, v) != Some(0.0)
                {
                    return Err(bad("only zero padding is supported"));
                }
                let rank = shape(in0)?.len();
                let pads = const_ints(graph, node, 1)?.unwrap_or_else(|| attr_is(node, "pads"));
                if pads.len() != 2 * rank
                    || pads.iter().any(|&p| p < 0)
                    || node.input.get(3).is_some_and(|s| !s.is_empty())
                {
                    return Err(bad("pads must be non-negative, one pair per axis"));
                }
                let begin: Vec<usize> = pads[..rank].iter().map(|&p| p as usize).collect();
                let end: Vec<usize> = pads[rank..].iter().map(|&p| p as usize).collect();
                if batched && (begin[0] != 0 || end[0] != 0) {
                    return Err(bad("padding the batch axis"));
                }
                push(
                    DraftOp::Pad(begin, end),
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "ArgMax" => {
                let input = shape(in0)?;
                let axis = norm_axis(attr_i(node, "axis", 0), input.len())
                    .ok_or_else(|| bad("axis out of range"))?;
                if axis + 1 != input.len() || (batched && axis == 0) {
                    return Err(bad(
                        "only an ArgMax over the last (non-batch) axis is supported",
                    ));
                }
                if attr_i(node, "select_last_index", 0) != 0 {
                    return Err(bad("select_last_index = 1 is not supported"));
                }
                let mut kept = input.clone();
                *kept.last_mut().unwrap_or(&mut 0) = 1;
                let out_shape = shape(&out)?;
                if out_shape == kept {
                    push(
                        DraftOp::ArgMax,
                        vec![slot_of(&alias, in0)],
                        slot(&out),
                        out_shape,
                    );
                } else {
                    let tmp = format!("{}/keepdims", slot(&out));
                    push(
                        DraftOp::ArgMax,
                        vec![slot_of(&alias, in0)],
                        tmp.clone(),
                        kept,
                    );
                    push(DraftOp::Reshape, vec![tmp], slot(&out), out_shape);
                }
            }
            "Clip" => {
                // bounds from inputs (opset >= 11) or attributes (older)
                let bound =
                    |ix: usize, attr_name: &str, default: f64| -> Result<f64, ConvertError> {
                        match node.input.get(ix).filter(|s| !s.is_empty()) {
                            Some(n) => const_scalar(graph, n)
                                .ok_or_else(|| bad("Clip bounds must be constant scalars")),
                            None => Ok(attr(node, attr_name).map_or(default, |a| f64::from(a.f))),
                        }
                    };
                let lo = bound(1, "min", f64::NEG_INFINITY)?;
                let hi = bound(2, "max", f64::INFINITY)?;
                let huge = |v: f64| !v.is_finite() || v.abs() >= f64::from(f32::MAX);
                if lo.is_nan() || hi.is_nan() || lo > hi {
                    return Err(bad("Clip bounds are not numbers or min > max"));
                }
                let op = if lo == 0.0 && huge(hi) {
                    DraftOp::Relu
                } else {
                    let lo = if huge(lo) { f64::NEG_INFINITY } else { lo };
                    let hi = if huge(hi) { f64::INFINITY } else { hi };
                    DraftOp::Activation(Activation::Clip(lo, hi))
                };
                push(op, vec![slot_of(&alias, in0)], slot(&out), shape(&out)?);
            }
            "Sigmoid" => push(
                DraftOp::Activation(Activation::Sigmoid),
                vec![slot_of(&alias, in0)],
                slot(&out),
                shape(&out)?,
            ),
            "Tanh" => push(
                DraftOp::Activation(Activation::Tanh),
                vec![slot_of(&alias, in0)],
                slot(&out),
                shape(&out)?,
            ),
            "LeakyRelu" => {
                let alpha = attr(node, "alpha").map_or(0.01, |a| f64::from(a.f));
                if !alpha.is_finite() {
                    return Err(bad("alpha is not a number"));
                }
                push(
                    DraftOp::Activation(Activation::LeakyRelu(alpha)),
                    vec![slot_of(&alias, in0)],
                    slot(&out),
                    shape(&out)?,
                );
            }
            "Softmax" | "LogSoftmax" => {
                return Err(bad(
                    "a Softmax inside the network (not applied to a model output) needs an approximation that is not implemented",
                ));
            }
            other => {
                let why = match other {
                    "Exp" | "Log" | "Erf" | "Gelu" | "Elu" | "Selu" | "Softplus"
                    | "HardSigmoid" | "PRelu" => {
                        "this activation needs a joint approximation that is not implemented yet (Sigmoid, Tanh, LeakyRelu and Clip are)"
                    }
                    _ => "no joint protocol exists for this operator",
                };
                return Err(bad(why));
            }
        }
    }
    if let Some(t) = deferred_relu.keys().next() {
        return Err(ConvertError::Invalid(format!(
            "internal: ReLU output '{t}' deferred to a pool that never came"
        )));
    }
    // Reveal the model outputs.
    let produced: HashSet<String> = d
        .steps
        .iter()
        .map(|s| s.output.clone())
        .chain(alias.values().cloned())
        .collect();
    let suffix_inputs: Vec<String> = d
        .suffix
        .iter()
        .filter_map(|s| s.node.input.first().cloned())
        .collect();
    let suffix_outputs: HashSet<String> = d
        .suffix
        .iter()
        .filter_map(|s| s.node.output.first().cloned())
        .collect();
    if reveal == Reveal::Argmax {
        if graph.outputs.len() != 1 {
            return Err(ConvertError::Invalid(format!(
                "--reveal argmax needs a model with one output (the logits); this one has {}",
                graph.outputs.len()
            )));
        }
        let out = graph.outputs[0].name.clone();
        // The logits: the suffix's input if the model ends in a softmax.
        let logits = d
            .suffix
            .iter()
            .find(|s| s.node.output.first() == Some(&out))
            .and_then(|s| s.node.input.first().cloned())
            .unwrap_or_else(|| out.clone());
        d.suffix.clear();
        let logit_slot = slot_of(&alias, &logits);
        let last = d
            .steps
            .iter()
            .rev()
            .find(|s| s.output == logit_slot)
            .ok_or_else(|| {
                ConvertError::Invalid(format!(
                    "model output '{out}' does not come from the secure program"
                ))
            })?;
        if is_index(&d.steps, &logit_slot) {
            // the model computes its own argmax
            let shape = last.shape.clone();
            d.steps.push(DraftStep {
                op: DraftOp::Reveal {
                    tensor: out.clone(),
                },
                inputs: vec![logit_slot],
                output: out.clone(),
                shape,
                source: format!("output '{out}'"),
            });
        } else {
            let mut shape = last.shape.clone();
            if let Some(l) = shape.last_mut() {
                *l = 1;
            }
            let idx = format!("{logit_slot}/argmax");
            d.steps.push(DraftStep {
                op: DraftOp::ArgMax,
                inputs: vec![logit_slot],
                output: idx.clone(),
                shape: shape.clone(),
                source: format!("argmax of '{logits}' (--reveal argmax)"),
            });
            d.steps.push(DraftStep {
                op: DraftOp::Reveal {
                    tensor: out.clone(),
                },
                inputs: vec![idx],
                output: out.clone(),
                shape,
                source: format!("output '{out}'"),
            });
        }
        d.index_output = Some(out);
        return Ok(d);
    }
    let mut to_reveal: Vec<String> = graph
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .filter(|o| !suffix_outputs.contains(o))
        .collect();
    to_reveal.extend(suffix_inputs);
    for t in to_reveal {
        let s = slot_of(&alias, &t);
        if !produced.contains(&s) {
            return Err(ConvertError::Invalid(format!(
                "model output '{t}' does not depend on any linear layer; a private model's outputs must come from the secure program"
            )));
        }
        let shape = d
            .steps
            .iter()
            .rev()
            .find(|st| st.output == s)
            .map(|st| st.shape.clone())
            .unwrap_or_default();
        d.steps.push(DraftStep {
            op: DraftOp::Reveal { tensor: t.clone() },
            inputs: vec![s],
            output: t.clone(),
            shape,
            source: format!("output '{t}'"),
        });
    }
    Ok(d)
}
