//! The converter's working form of a model: the ONNX nodes in order plus every
//! tensor whose value is known at conversion time. Pass 1 (`load`) builds it
//! and checks the graph is well formed; pass 2 (`fold_constants`) evaluates
//! every node whose inputs are all known, with tract itself, so weights that
//! a model computes (ConstantOfShape, Reshape or Transpose of an initializer,
//! ...) become plain constants like initializers.

use std::collections::{HashMap, HashSet};

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::ConvertError;
use crate::tensor::{from_proto, to_proto};

/// ONNX domain names of the standard operator set.
pub fn is_default_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// A model being converted.
#[derive(Clone, Debug)]
pub struct Graph {
    /// The original model with its graph emptied (metadata, opsets, ir version).
    pub header: pb::ModelProto,
    /// Graph name.
    pub name: String,
    /// Nodes in topological order.
    pub nodes: Vec<pb::NodeProto>,
    /// Tensors known at conversion time, by name.
    pub consts: HashMap<String, Tensor>,
    /// Inputs fed at run time.
    pub inputs: Vec<pb::ValueInfoProto>,
    /// Graph outputs.
    pub outputs: Vec<pb::ValueInfoProto>,
    /// Shape annotations of intermediate tensors.
    pub value_info: Vec<pb::ValueInfoProto>,
}

/// Ops never folded even when their inputs are known: random, or with subgraphs.
const NEVER_FOLD: &[&str] = &[
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
];

impl Graph {
    /// Pass 1: decode and check. Every node input must be defined before use.
    pub fn load(bytes: &[u8]) -> Result<Graph, ConvertError> {
        let mut model = pb::ModelProto::decode(bytes)
            .map_err(|e| ConvertError::Invalid(format!("not an ONNX model (protobuf: {e})")))?;
        let graph = model
            .graph
            .take()
            .ok_or_else(|| ConvertError::Invalid("the model has no graph".into()))?;
        if !model
            .opset_import
            .iter()
            .any(|o| is_default_domain(&o.domain))
        {
            return Err(ConvertError::Invalid(
                "the model imports no version of the standard ONNX operator set".into(),
            ));
        }
        if graph.node.is_empty() {
            return Err(ConvertError::Invalid("the graph has no nodes".into()));
        }
        let mut consts = HashMap::new();
        for init in &graph.initializer {
            consts.insert(init.name.clone(), from_proto(init)?);
        }
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !consts.contains_key(&i.name))
            .cloned()
            .collect();
        if inputs.is_empty() {
            return Err(ConvertError::Invalid(
                "the graph has no run-time input".into(),
            ));
        }
        let mut defined: HashSet<String> = consts.keys().cloned().collect();
        defined.extend(inputs.iter().map(|i| i.name.clone()));
        let mut nodes = Vec::with_capacity(graph.node.len());
        for node in graph.node {
            let name = secinfer_model::node_name(&node);
            if node.domain == secinfer_model::DOMAIN {
                return Err(ConvertError::Invalid(format!(
                    "node '{name}' is a {} node: this model was converted already",
                    node.op_type
                )));
            }
            if !is_default_domain(&node.domain) {
                return Err(ConvertError::UnsupportedOp {
                    node: name,
                    op: format!("{}::{}", node.domain, node.op_type),
                    reason: "operators outside the standard ONNX domain are not supported".into(),
                });
            }
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                if !defined.contains(input) {
                    return Err(ConvertError::Invalid(format!(
                        "node '{name}' ({}) reads '{input}', which no input, initializer or earlier node defines",
                        node.op_type
                    )));
                }
            }
            defined.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
            if node.op_type == "Constant" {
                let value = constant_value(&node)?;
                let out = node.output.first().cloned().unwrap_or_default();
                consts.insert(out, value);
                continue;
            }
            nodes.push(node);
        }
        for output in &graph.output {
            if !defined.contains(&output.name) {
                return Err(ConvertError::Invalid(format!(
                    "graph output '{}' is not produced by any node",
                    output.name
                )));
            }
        }
        Ok(Graph {
            header: model,
            name: graph.name,
            nodes,
            consts,
            inputs,
            outputs: graph.output,
            value_info: graph.value_info,
        })
    }

    /// The standard-domain opset version.
    pub fn opset(&self) -> i64 {
        self.header
            .opset_import
            .iter()
            .filter(|o| is_default_domain(&o.domain))
            .map(|o| o.version)
            .max()
            .unwrap_or(1)
    }

    /// Pass 2: evaluate, with tract, every node whose inputs are all known.
    /// Returns the names of folded nodes (for the report).
    pub fn fold_constants(&mut self) -> Result<Vec<String>, ConvertError> {
        let mut folded = Vec::new();
        let mut kept = Vec::with_capacity(self.nodes.len());
        let nodes = std::mem::take(&mut self.nodes);
        for node in nodes {
            let inputs: Vec<&String> = node.input.iter().filter(|i| !i.is_empty()).collect();
            let foldable = !inputs.is_empty()
                && !NEVER_FOLD.contains(&node.op_type.as_str())
                && inputs.iter().all(|i| self.consts.contains_key(*i))
                && !node
                    .output
                    .iter()
                    .any(|o| self.outputs.iter().any(|go| &go.name == o));
            if !foldable {
                kept.push(node);
                continue;
            }
            let values = self.evaluate_node(&node)?;
            for (name, value) in node.output.iter().zip(values) {
                if !name.is_empty() {
                    self.consts.insert(name.clone(), value);
                }
            }
            folded.push(format!(
                "{} ({})",
                secinfer_model::node_name(&node),
                node.op_type
            ));
        }
        self.nodes = kept;
        Ok(folded)
    }

    /// Runs one node whose inputs are constants through tract.
    fn evaluate_node(&self, node: &pb::NodeProto) -> Result<Vec<Tensor>, ConvertError> {
        let name = secinfer_model::node_name(node);
        let fail = |e: String| ConvertError::Fold {
            node: name.clone(),
            op: node.op_type.clone(),
            problem: e,
        };
        let initializer = node
            .input
            .iter()
            .filter(|i| !i.is_empty())
            .map(|i| to_proto(i, &self.consts[i]))
            .collect::<Result<Vec<_>, _>>()?;
        let output = node
            .output
            .iter()
            .filter(|o| !o.is_empty())
            .map(|o| pb::ValueInfoProto {
                name: o.clone(),
                ..Default::default()
            })
            .collect();
        let proto = pb::ModelProto {
            ir_version: self.header.ir_version.max(7),
            opset_import: self.header.opset_import.clone(),
            graph: Some(pb::GraphProto {
                name: "fold".into(),
                node: vec![node.clone()],
                initializer,
                output,
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = catch_tract(|| {
            let model = tract_onnx::onnx().model_for_proto_model(&proto)?;
            let plan = model.into_typed()?.into_runnable()?;
            plan.run(tvec![])
        })
        .map_err(fail)?;
        Ok(result.into_iter().map(|v| v.into_tensor()).collect())
    }

    /// The graph as an ONNX model again: known tensors that live nodes read
    /// become initializers. Used to hand the folded model to tract.
    pub fn to_model(&self) -> Result<pb::ModelProto, ConvertError> {
        let used: HashSet<&String> = self.nodes.iter().flat_map(|n| n.input.iter()).collect();
        let mut names: Vec<&String> = self
            .consts
            .keys()
            .filter(|k| used.contains(k) || self.outputs.iter().any(|o| &o.name == *k))
            .collect();
        names.sort();
        let initializer = names
            .into_iter()
            .map(|n| to_proto(n, &self.consts[n]))
            .collect::<Result<Vec<_>, _>>()?;
        let mut model = self.header.clone();
        model.graph = Some(pb::GraphProto {
            name: self.name.clone(),
            node: self.nodes.clone(),
            initializer,
            input: self.inputs.clone(),
            output: self.outputs.clone(),
            value_info: self.value_info.clone(),
            ..Default::default()
        });
        Ok(model)
    }

    /// Indices of the nodes reading tensor `name`.
    pub fn consumers(&self, name: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.input.iter().any(|i| i == name))
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether `name` is a graph output.
    pub fn is_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o.name == name)
    }
}

/// Runs tract code, turning its errors and panics into a message: tract is fed
/// user models here and must not be able to take the converter down.
pub fn catch_tract<T>(f: impl FnOnce() -> TractResult<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(match panic.downcast_ref::<String>() {
            Some(s) => format!("tract panicked: {s}"),
            None => match panic.downcast_ref::<&str>() {
                Some(s) => format!("tract panicked: {s}"),
                None => "tract panicked".into(),
            },
        }),
    }
}

/// The value of a Constant node, in any of its attribute forms.
fn constant_value(node: &pb::NodeProto) -> Result<Tensor, ConvertError> {
    let name = secinfer_model::node_name(node);
    let attr = node
        .attribute
        .first()
        .ok_or_else(|| ConvertError::Invalid(format!("Constant node '{name}' has no value")))?;
    let bad = |what: &str| ConvertError::UnsupportedOp {
        node: name.clone(),
        op: "Constant".into(),
        reason: format!("the '{what}' form is not supported"),
    };
    let t = match attr.name.as_str() {
        "value" => from_proto(attr.t.as_ref().ok_or_else(|| bad("value without tensor"))?)?,
        "value_float" => tensor0(attr.f),
        "value_int" => tensor0(attr.i),
        "value_floats" => tensor1(&attr.floats),
        "value_ints" => tensor1(&attr.ints),
        other => return Err(bad(other)),
    };
    Ok(t)
}
