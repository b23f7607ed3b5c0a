//! Pass 3: find the weighted linear nodes and pull their weights out.
//!
//! One table ([`handling`]) says what happens to each ONNX op. Weighted nodes
//! become [`LinearLayer`]s with weights in a normalised layout per
//! [`LinearKind`]; a BatchNormalization, or a Mul/Add/Sub/Div by a per-feature
//! constant, that directly follows one (and is its only reader) is folded into
//! its weights and bias.

use std::collections::HashSet;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::tract_ndarray::{ArrayD, IxDyn};

use crate::ConvertError;
use crate::graph::Graph;
use crate::tensor::to_f32;

/// What the converter does with a node of a given op type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Weighted linear: becomes a SecureLinear op (when its weight is constant).
    Secure,
    /// Stays in the client graph and runs in tract there.
    Client,
    /// Refused, with the reason.
    Unsupported(&'static str),
}

/// The table of ONNX ops. Everything tract can run and that is not listed
/// stays on the client.
pub fn handling(op_type: &str) -> Handling {
    match op_type {
        "Gemm" | "MatMul" | "Conv" | "ConvTranspose" | "BatchNormalization" => Handling::Secure,
        "RNN" | "LSTM" | "GRU" => {
            Handling::Unsupported("recurrent layers carry weights secinfer cannot split out")
        }
        "ConvInteger" | "MatMulInteger" | "QLinearConv" | "QLinearMatMul" | "QGemm" => {
            Handling::Unsupported("quantised operators are not supported; convert the float model")
        }
        "Einsum" => Handling::Unsupported("Einsum with weights is not supported; export as MatMul"),
        _ if tract_onnx::onnx().op_register.0.contains_key(op_type) => Handling::Client,
        _ => Handling::Unsupported("tract, which runs the client graph, does not implement it"),
    }
}

/// Conv or ConvTranspose attributes as written in the model; padding is
/// resolved once the input shape is known.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvAttrs {
    /// NOTSET, SAME_UPPER, SAME_LOWER or VALID
    pub auto_pad: String,
    /// per spatial axis
    pub strides: Vec<usize>,
    /// per spatial axis
    pub dilations: Vec<usize>,
    /// begins then ends, or empty
    pub pads: Vec<usize>,
    /// groups
    pub group: usize,
    /// ConvTranspose only
    pub output_padding: Vec<usize>,
    /// ConvTranspose only: requested output spatial shape
    pub output_shape: Vec<usize>,
    /// ConvTranspose rather than Conv
    pub transpose: bool,
}

/// Kind of a layer before its geometry is resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum RawKind {
    /// `x·W`, W `[K, M]`
    MatMul,
    /// `W·x`, W `[M, K]`
    LeftMatMul,
    /// Conv / ConvTranspose
    Conv(ConvAttrs),
}

/// A weighted linear node and what was folded into it.
#[derive(Debug, Clone)]
pub struct LinearLayer {
    /// index of the weighted node in `Graph::nodes`
    pub node: usize,
    /// its name
    pub source_node: String,
    /// its op type
    pub source_op: String,
    /// the dynamic input tensor
    pub input: String,
    /// the output tensor (of the last folded node)
    pub output: String,
    /// the map
    pub kind: RawKind,
    /// weights, normalised layout (see [`RawKind`])
    pub weight: ArrayD<f64>,
    /// one bias per output feature or channel
    pub bias: Vec<f64>,
    /// indices of nodes folded into this one
    pub folded: Vec<usize>,
}

impl LinearLayer {
    /// Number of output features or channels.
    pub fn features(&self) -> usize {
        self.bias.len()
    }

    /// Output feature of each weight element (row-major), for scaling and bounds.
    pub fn feature_of_weights(&self) -> Vec<usize> {
        let s = self.weight.shape();
        let n = self.weight.len();
        match &self.kind {
            RawKind::MatMul => (0..n).map(|i| i % s[1]).collect(),
            RawKind::LeftMatMul => (0..n).map(|i| i / s[1]).collect(),
            RawKind::Conv(a) if !a.transpose => {
                let per = n / s[0].max(1);
                (0..n).map(|i| i / per.max(1)).collect()
            }
            RawKind::Conv(a) => {
                // W [C, M/g, k..]: input channel c belongs to group c / (C/g).
                let (c, mg) = (s[0], s[1]);
                let kk = n / (c * mg).max(1);
                let cg = c / a.group.max(1);
                (0..n)
                    .map(|i| {
                        let ci = i / (mg * kk).max(1);
                        let j = (i / kk.max(1)) % mg.max(1);
                        (ci / cg.max(1)) * mg + j
                    })
                    .collect()
            }
        }
    }

    /// Multiplies output feature `m` by `scale[m]` (weights and bias).
    fn scale_features(&mut self, scale: &[f64]) {
        let features = self.feature_of_weights();
        for (w, m) in self.weight.iter_mut().zip(features) {
            *w *= scale[m];
        }
        for (b, s) in self.bias.iter_mut().zip(scale) {
            *b *= s;
        }
    }
}

/// Finds every weighted node, extracts its layer and folds what follows it.
/// Returns the layers in graph order.
pub fn extract(graph: &Graph) -> Result<Vec<LinearLayer>, ConvertError> {
    let mut layers: Vec<LinearLayer> = Vec::new();
    let mut folded: HashSet<usize> = HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if folded.contains(&i) {
            continue;
        }
        let name = secinfer_model::node_name(node);
        match handling(&node.op_type) {
            Handling::Unsupported(reason) => {
                return Err(ConvertError::UnsupportedOp {
                    node: name,
                    op: node.op_type.clone(),
                    reason: reason.into(),
                });
            }
            Handling::Client => continue,
            Handling::Secure => {}
        }
        let Some(mut layer) = extract_node(graph, i, node)? else {
            continue;
        };
        while let Some(next) = foldable_successor(graph, &layer)? {
            folded.insert(next.0);
            layer.folded.push(next.0);
            layer.output = next.1;
            layer.scale_features(&next.2);
            for (b, add) in layer.bias.iter_mut().zip(&next.3) {
                *b += add;
            }
        }
        layers.push(layer);
    }
    Ok(layers)
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map(|a| a.i).unwrap_or(default)
}

fn attr_float(node: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map(|a| a.f).unwrap_or(default)
}

fn attr_usizes(node: &pb::NodeProto, name: &str) -> Result<Vec<usize>, ConvertError> {
    attr(node, name)
        .map(|a| a.ints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            usize::try_from(v).map_err(|_| ConvertError::UnsupportedOp {
                node: secinfer_model::node_name(node),
                op: node.op_type.clone(),
                reason: format!("attribute {name} has the negative value {v}"),
            })
        })
        .collect()
}

fn weight_f64(graph: &Graph, name: &str) -> Result<ArrayD<f64>, ConvertError> {
    Ok(to_f32(name, &graph.consts[name])?.mapv(f64::from))
}

fn unsupported(node: &pb::NodeProto, reason: String) -> ConvertError {
    ConvertError::UnsupportedOp {
        node: secinfer_model::node_name(node),
        op: node.op_type.clone(),
        reason,
    }
}

fn dynamic_weights(node: &pb::NodeProto, input: &str) -> ConvertError {
    ConvertError::DynamicWeights {
        node: secinfer_model::node_name(node),
        op: node.op_type.clone(),
        input: input.to_string(),
    }
}

/// Input `ix` of a node, if present and non-empty.
fn input(node: &pb::NodeProto, ix: usize) -> Option<&str> {
    node.input
        .get(ix)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// Bias vector of length `m` from a constant broadcastable to one.
fn bias_vector(
    graph: &Graph,
    node: &pb::NodeProto,
    name: Option<&str>,
    m: usize,
    scale: f64,
) -> Result<Vec<f64>, ConvertError> {
    let Some(name) = name else {
        return Ok(vec![0.0; m]);
    };
    if !graph.consts.contains_key(name) {
        return Err(dynamic_weights(node, name));
    }
    let b = weight_f64(graph, name)?;
    let dims: Vec<usize> = b.shape().iter().copied().filter(|&d| d != 1).collect();
    match dims.as_slice() {
        [] => Ok(vec![b.iter().next().copied().unwrap_or(0.0) * scale; m]),
        [d] if *d == m && b.shape().last() == Some(&m) => Ok(b.iter().map(|v| v * scale).collect()),
        _ => Err(unsupported(
            node,
            format!(
                "bias of shape {:?} is not one value per output feature ({m})",
                b.shape()
            ),
        )),
    }
}

fn extract_node(
    graph: &Graph,
    i: usize,
    node: &pb::NodeProto,
) -> Result<Option<LinearLayer>, ConvertError> {
    let is_const = |n: Option<&str>| n.is_some_and(|n| graph.consts.contains_key(n));
    let name = secinfer_model::node_name(node);
    let output = node.output.first().cloned().unwrap_or_default();
    let layer = |input: &str, kind, weight, bias| LinearLayer {
        node: i,
        source_node: name.clone(),
        source_op: node.op_type.clone(),
        input: input.to_string(),
        output: output.clone(),
        kind,
        weight,
        bias,
        folded: vec![],
    };
    let (a, b) = (input(node, 0), input(node, 1));
    let Some(a) = a else {
        return Err(unsupported(node, "has no data input".into()));
    };
    match node.op_type.as_str() {
        "MatMul" => {
            let Some(b) = b else {
                return Err(unsupported(node, "has one input".into()));
            };
            match (is_const(Some(a)), is_const(Some(b))) {
                (false, true) => {
                    let w = weight_f64(graph, b)?;
                    if w.ndim() != 2 {
                        return Err(unsupported(
                            node,
                            format!(
                                "constant right operand of rank {} (only matrices)",
                                w.ndim()
                            ),
                        ));
                    }
                    let m = w.shape()[1];
                    Ok(Some(layer(a, RawKind::MatMul, w, vec![0.0; m])))
                }
                (true, false) => {
                    let w = weight_f64(graph, a)?;
                    if w.ndim() != 2 {
                        return Err(unsupported(
                            node,
                            format!("constant left operand of rank {} (only matrices)", w.ndim()),
                        ));
                    }
                    let m = w.shape()[0];
                    Ok(Some(layer(b, RawKind::LeftMatMul, w, vec![0.0; m])))
                }
                // Both operands computed at run time: no weights, the client runs it.
                (false, false) => Ok(None),
                (true, true) => Ok(None),
            }
        }
        "Gemm" => {
            let Some(b) = b else {
                return Err(unsupported(node, "has one input".into()));
            };
            if !is_const(Some(b)) {
                return Err(dynamic_weights(node, b));
            }
            if attr_int(node, "transA", 0) != 0 {
                return Err(unsupported(node, "transA=1 on the data input".into()));
            }
            let alpha = f64::from(attr_float(node, "alpha", 1.0));
            let beta = f64::from(attr_float(node, "beta", 1.0));
            let mut w = weight_f64(graph, b)?;
            if w.ndim() != 2 {
                return Err(unsupported(node, format!("B of rank {}", w.ndim())));
            }
            if attr_int(node, "transB", 0) != 0 {
                w = w.reversed_axes().as_standard_layout().to_owned();
            }
            w.mapv_inplace(|v| v * alpha);
            let m = w.shape()[1];
            let bias = bias_vector(graph, node, input(node, 2), m, beta)?;
            Ok(Some(layer(a, RawKind::MatMul, w, bias)))
        }
        "Conv" | "ConvTranspose" => {
            let Some(b) = b else {
                return Err(unsupported(node, "has no weight input".into()));
            };
            if !is_const(Some(b)) {
                return Err(dynamic_weights(node, b));
            }
            let w = weight_f64(graph, b)?;
            if w.ndim() < 2 || w.ndim() > 5 {
                return Err(unsupported(
                    node,
                    format!("weight of rank {} (1-D to 3-D convolutions only)", w.ndim()),
                ));
            }
            let transpose = node.op_type == "ConvTranspose";
            let group = usize::try_from(attr_int(node, "group", 1))
                .ok()
                .filter(|&g| g >= 1)
                .ok_or_else(|| unsupported(node, "group must be >= 1".into()))?;
            let m = if transpose {
                w.shape()[1] * group
            } else {
                w.shape()[0]
            };
            let spatial = w.ndim() - 2;
            let kernel_shape = attr_usizes(node, "kernel_shape")?;
            if !kernel_shape.is_empty() && kernel_shape != w.shape()[2..] {
                return Err(unsupported(
                    node,
                    format!(
                        "kernel_shape {kernel_shape:?} disagrees with weight {:?}",
                        w.shape()
                    ),
                ));
            }
            let or_ones = |v: Vec<usize>| if v.is_empty() { vec![1; spatial] } else { v };
            let auto_pad = attr(node, "auto_pad")
                .map(|a| String::from_utf8_lossy(&a.s).to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "NOTSET".into());
            let attrs = ConvAttrs {
                auto_pad,
                strides: or_ones(attr_usizes(node, "strides")?),
                dilations: or_ones(attr_usizes(node, "dilations")?),
                pads: attr_usizes(node, "pads")?,
                group,
                output_padding: attr_usizes(node, "output_padding")?,
                output_shape: attr_usizes(node, "output_shape")?,
                transpose,
            };
            if attrs.strides.len() != spatial
                || attrs.dilations.len() != spatial
                || (!attrs.pads.is_empty() && attrs.pads.len() != 2 * spatial)
            {
                return Err(unsupported(
                    node,
                    "strides, dilations or pads do not match the kernel's rank".into(),
                ));
            }
            if attrs.strides.contains(&0) || attrs.dilations.contains(&0) {
                return Err(unsupported(node, "zero stride or dilation".into()));
            }
            let bias = bias_vector(graph, node, input(node, 2), m, 1.0)?;
            Ok(Some(layer(a, RawKind::Conv(attrs), w, bias)))
        }
        "BatchNormalization" => {
            // A BatchNormalization that no weighted node precedes: a per-channel
            // affine map with weights of its own, so a depthwise 1x1 convolution.
            let (slope, shift) = batch_norm_affine(graph, node)?;
            let c = slope.len();
            let attrs = ConvAttrs {
                auto_pad: "NOTSET".into(),
                strides: vec![],
                dilations: vec![],
                pads: vec![],
                group: c,
                output_padding: vec![],
                output_shape: vec![],
                transpose: false,
            };
            // Spatial rank is only known with the input shape; `shapes` widens it.
            let w = ArrayD::from_shape_vec(IxDyn(&[c, 1]), slope)
                .map_err(|e| unsupported(node, e.to_string()))?;
            Ok(Some(layer(a, RawKind::Conv(attrs), w, shift)))
        }
        _ => Ok(None),
    }
}

/// `y = slope·x + shift` per channel of a BatchNormalization in inference mode.
fn batch_norm_affine(
    graph: &Graph,
    node: &pb::NodeProto,
) -> Result<(Vec<f64>, Vec<f64>), ConvertError> {
    if attr_int(node, "training_mode", 0) != 0
        || node.output.iter().filter(|o| !o.is_empty()).count() > 1
    {
        return Err(unsupported(
            node,
            "training mode (running statistics as outputs)".into(),
        ));
    }
    let eps = f64::from(attr_float(node, "epsilon", 1e-5));
    let mut params = Vec::with_capacity(4);
    for ix in 1..5 {
        let name =
            input(node, ix).ok_or_else(|| unsupported(node, format!("input {ix} is missing")))?;
        if !graph.consts.contains_key(name) {
            return Err(dynamic_weights(node, name));
        }
        let p = weight_f64(graph, name)?;
        params.push(p.iter().copied().collect::<Vec<f64>>());
    }
    let c = params[0].len();
    if params.iter().any(|p| p.len() != c) {
        return Err(unsupported(
            node,
            "scale, bias, mean and var differ in length".into(),
        ));
    }
    let mut slope = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    let [gamma, beta, mean, variance] = [&params[0], &params[1], &params[2], &params[3]];
    for (k, &var) in variance.iter().enumerate() {
        if var + eps <= 0.0 {
            return Err(unsupported(
                node,
                format!("variance {var} of channel {k} is negative"),
            ));
        }
        let s = gamma[k] / (var + eps).sqrt();
        slope.push(s);
        shift.push(beta[k] - mean[k] * s);
    }
    Ok((slope, shift))
}

/// The node right after `layer`, if it can be folded into it: returns
/// (node index, its output, per-feature scale, per-feature shift).
#[allow(clippy::type_complexity)]
fn foldable_successor(
    graph: &Graph,
    layer: &LinearLayer,
) -> Result<Option<(usize, String, Vec<f64>, Vec<f64>)>, ConvertError> {
    if graph.is_output(&layer.output) {
        return Ok(None);
    }
    let consumers = graph.consumers(&layer.output);
    let [next] = consumers.as_slice() else {
        return Ok(None);
    };
    let node = &graph.nodes[*next];
    let m = layer.features();
    let Some(out) = node.output.first().cloned() else {
        return Ok(None);
    };
    if node.input.first().map(String::as_str) != Some(layer.output.as_str())
        && !matches!(node.op_type.as_str(), "Mul" | "Add")
    {
        return Ok(None);
    }
    match node.op_type.as_str() {
        "BatchNormalization" => {
            if !matches!(layer.kind, RawKind::Conv(_) | RawKind::MatMul)
                || node.input.first() != Some(&layer.output)
            {
                return Ok(None);
            }
            if matches!(layer.kind, RawKind::MatMul) {
                // BatchNorm's channel axis is 1; a MatMul's features are on the last
                // axis. They coincide only for rank-2 outputs, unknown until shapes.
                return Ok(None);
            }
            let (slope, shift) = batch_norm_affine(graph, node)?;
            if slope.len() != m {
                return Ok(None);
            }
            Ok(Some((*next, out, slope, shift)))
        }
        "Mul" | "Add" | "Sub" | "Div" => {
            let other = node.input.iter().find(|i| *i != &layer.output);
            let Some(other) = other else { return Ok(None) };
            let Some(c) = graph.consts.get(other) else {
                return Ok(None);
            };
            if node.input.len() != 2 || !c.datum_type().is_float() {
                return Ok(None);
            }
            let Some(v) = per_feature(layer, c)? else {
                return Ok(None);
            };
            let Some(v) = v.resolve(m) else {
                return Ok(None);
            };
            let ones = vec![1.0; m];
            let zeros = vec![0.0; m];
            Ok(match node.op_type.as_str() {
                "Mul" => Some((*next, out, v, zeros)),
                "Add" => Some((*next, out, ones, v)),
                "Sub" if node.input[0] == layer.output => {
                    Some((*next, out, ones, v.iter().map(|x| -x).collect()))
                }
                "Div" if node.input[0] == layer.output && v.iter().all(|&x| x != 0.0) => {
                    Some((*next, out, v.iter().map(|x| 1.0 / x).collect(), zeros))
                }
                _ => None,
            })
        }
        _ => Ok(None),
    }
}

/// A constant that multiplies or shifts each output feature by one value.
enum PerFeature {
    Scalar(f64),
    Vector(Vec<f64>),
}

impl PerFeature {
    fn resolve(self, m: usize) -> Option<Vec<f64>> {
        match self {
            PerFeature::Scalar(v) => Some(vec![v; m]),
            PerFeature::Vector(v) if v.len() == m => Some(v),
            PerFeature::Vector(_) => None,
        }
    }
}

/// Whether constant `c`, broadcast against the layer's output, is one value
/// per feature. Conv outputs are [N, M, ...]: c must be [M, 1, .., 1] after
/// alignment; MatMul outputs [.., M]: c must be [M] or [1, M].
fn per_feature(layer: &LinearLayer, c: &Tensor) -> Result<Option<PerFeature>, ConvertError> {
    let v = to_f32("folded constant", c)?;
    if v.len() == 1 {
        return Ok(v.iter().next().map(|&x| PerFeature::Scalar(f64::from(x))));
    }
    let shape = v.shape();
    let non_unit: Vec<usize> = (0..shape.len()).filter(|&i| shape[i] != 1).collect();
    let [axis] = non_unit.as_slice() else {
        return Ok(None);
    };
    let from_end = shape.len() - 1 - axis;
    let ok = match layer.kind {
        RawKind::MatMul => from_end == 0,
        RawKind::LeftMatMul => from_end == 1,
        // Output rank is 2 + spatial rank; channel axis 1 is `spatial` from the end.
        RawKind::Conv(_) => {
            let spatial = layer.weight.ndim().saturating_sub(2);
            from_end == spatial && shape.len() <= spatial + 2
        }
    };
    if !ok {
        return Ok(None);
    }
    Ok(Some(PerFeature::Vector(
        v.iter().map(|&x| f64::from(x)).collect(),
    )))
}
