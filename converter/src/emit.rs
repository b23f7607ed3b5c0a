//! Pass 6: write the two files.
//!
//! `client.onnx` is the folded graph with each weighted node (and what was
//! folded into it) replaced by a weightless SecureLinear node; `server.onnx`
//! holds one SecureLinear node per op, reading `masked_input_<id>` (UINT64 ring
//! elements) with its quantised weight and bias as INT64 initializers and
//! producing `masked_output_<id>`. Both import the secinfer domain and carry
//! the role and the model digest in `metadata_props`.

use std::collections::HashSet;

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;

use secinfer_model::{
    DIGEST_KEY, DOMAIN, DOMAIN_VERSION, LayerSpec, OP_TYPE, Program, REVEAL_KEY, ROLE_KEY, Reveal,
    Role, StepOp,
};

use crate::ConvertError;
use crate::graph::Graph;
use crate::tensor::to_proto;

/// A layer ready to be written.
pub struct EmittedLayer<'a> {
    /// the spec
    pub spec: LayerSpec,
    /// node index in the graph, and folded nodes
    pub nodes: (usize, &'a [usize]),
    /// input and output tensor names in the client graph
    pub io: (&'a str, &'a str),
    /// quantised weight, row-major
    pub weight: &'a [i64],
    /// quantised bias
    pub bias: &'a [i64],
}

fn secure_node(spec: &LayerSpec, inputs: Vec<String>, output: String) -> pb::NodeProto {
    pb::NodeProto {
        name: format!("secure_linear_{}", spec.op_id),
        op_type: OP_TYPE.into(),
        domain: DOMAIN.into(),
        input: inputs,
        output: vec![output],
        attribute: spec.to_attributes(),
        doc_string: format!(
            "{} node '{}' (and what was folded into it)",
            spec.source_op, spec.source_node
        ),
    }
}

fn header(graph: &Graph, role: Role, reveal: Reveal, digest: &str) -> pb::ModelProto {
    let mut m = graph.header.clone();
    m.ir_version = m.ir_version.max(7);
    m.producer_name = "secinfer".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    m.opset_import.retain(|o| o.domain != DOMAIN);
    m.opset_import.push(pb::OperatorSetIdProto {
        domain: DOMAIN.into(),
        version: DOMAIN_VERSION,
    });
    m.metadata_props
        .retain(|p| p.key != ROLE_KEY && p.key != DIGEST_KEY && p.key != REVEAL_KEY);
    m.metadata_props.push(pb::StringStringEntryProto {
        key: REVEAL_KEY.into(),
        value: reveal.as_str().into(),
    });
    m.metadata_props.push(pb::StringStringEntryProto {
        key: ROLE_KEY.into(),
        value: role.as_str().into(),
    });
    m.metadata_props.push(pb::StringStringEntryProto {
        key: DIGEST_KEY.into(),
        value: digest.into(),
    });
    m
}

/// The client file: the graph without weights.
pub fn client_model(
    graph: &Graph,
    layers: &[EmittedLayer],
    digest: &str,
) -> Result<pb::ModelProto, ConvertError> {
    let mut skip: HashSet<usize> = HashSet::new();
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for l in layers {
        skip.extend(l.nodes.1.iter().copied());
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        match layers.iter().find(|l| l.nodes.0 == i) {
            Some(l) => nodes.push(secure_node(
                &l.spec,
                vec![l.io.0.to_string()],
                l.io.1.to_string(),
            )),
            None => nodes.push(node.clone()),
        }
    }
    let read: HashSet<&String> = nodes.iter().flat_map(|n| n.input.iter()).collect();
    let produced: HashSet<&String> = nodes.iter().flat_map(|n| n.output.iter()).collect();
    let mut consts: Vec<&String> = graph
        .consts
        .keys()
        .filter(|k| read.contains(k) || (graph.is_output(k) && !produced.contains(k)))
        .collect();
    consts.sort();
    let initializer = consts
        .into_iter()
        .map(|n| to_proto(n, &graph.consts[n]))
        .collect::<Result<Vec<_>, _>>()?;
    let value_info = graph
        .value_info
        .iter()
        .filter(|v| produced.contains(&v.name))
        .cloned()
        .collect();
    let mut model = header(graph, Role::Client, Reveal::Activations, digest);
    model.graph = Some(pb::GraphProto {
        name: format!("{}-client", graph.name),
        node: nodes,
        initializer,
        input: graph.inputs.clone(),
        output: graph.outputs.clone(),
        value_info,
        doc_string:
            "secinfer client graph: SecureLinear nodes are evaluated jointly with the server".into(),
        ..Default::default()
    });
    Ok(model)
}

fn tensor_type(elem: DataType, shape: &[usize], batched: bool) -> pb::TypeProto {
    let dim = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| pb::tensor_shape_proto::Dimension {
            value: Some(if i == 0 && batched {
                DimValue::DimParam("N".into())
            } else {
                DimValue::DimValue(d as i64)
            }),
            ..Default::default()
        })
        .collect();
    pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: elem as i32,
            shape: Some(pb::TensorShapeProto { dim }),
        })),
        ..Default::default()
    }
}

fn value_info(name: String, elem: DataType, shape: &[usize], batched: bool) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name,
        r#type: Some(tensor_type(elem, shape, batched)),
        ..Default::default()
    }
}

fn i64_tensor(name: String, shape: &[usize], data: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name,
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Name of op `id`'s input in the server file.
pub fn server_input(id: u32) -> String {
    format!("masked_input_{id}")
}

/// Name of op `id`'s output in the server file.
pub fn server_output(id: u32) -> String {
    format!("masked_output_{id}")
}

/// The server file: the SecureLinear ops with their weights, nothing else.
pub fn server_model(graph: &Graph, layers: &[EmittedLayer], digest: &str) -> pb::ModelProto {
    let mut g = pb::GraphProto {
        name: format!("{}-server", graph.name),
        doc_string:
            "secinfer server: one SecureLinear op per weighted layer, on masked ring tensors".into(),
        ..Default::default()
    };
    for l in layers {
        let s = &l.spec;
        let (x, w, b, y) = (
            server_input(s.op_id),
            format!("weight_{}", s.op_id),
            format!("bias_{}", s.op_id),
            server_output(s.op_id),
        );
        g.input.push(value_info(
            x.clone(),
            DataType::Uint64,
            &s.input_shape,
            s.batched,
        ));
        g.output.push(value_info(
            y.clone(),
            DataType::Uint64,
            &s.output_shape,
            s.batched,
        ));
        g.initializer
            .push(i64_tensor(w.clone(), &s.weight_shape, l.weight));
        g.initializer
            .push(i64_tensor(b.clone(), &[l.bias.len()], l.bias));
        g.node.push(secure_node(s, vec![x, w, b], y));
    }
    let mut model = header(graph, Role::Server, Reveal::Activations, digest);
    model.graph = Some(g);
    model
}

/// Private modes: the server file holds the program, its SecureLinear nodes
/// with their weights. It reads nothing; its outputs are the revealed
/// slots (the server's shares of them).
pub fn server_private(
    graph: &Graph,
    program: &Program,
    layers: &[EmittedLayer],
    digest: &str,
) -> pb::ModelProto {
    let mut g = pb::GraphProto {
        name: format!("{}-server", graph.name),
        doc_string: format!(
            "secinfer server, --reveal {}: the secure program, run jointly with the client on secret shares",
            program.reveal
        ),
        ..Default::default()
    };
    for (i, step) in program.steps.iter().enumerate() {
        match &step.op {
            StepOp::Linear { op } => {
                let Some(l) = layers.get(*op as usize) else {
                    continue;
                };
                let (w, b) = (format!("weight_{op}"), format!("bias_{op}"));
                g.initializer
                    .push(i64_tensor(w.clone(), &l.spec.weight_shape, l.weight));
                g.initializer
                    .push(i64_tensor(b.clone(), &[l.bias.len()], l.bias));
                let x = step.inputs.first().cloned().unwrap_or_default();
                g.node
                    .push(secure_node(&l.spec, vec![x, w, b], step.output.clone()));
            }
            _ => {
                if let Some(n) = program.node(i, Role::Server) {
                    g.node.push(n);
                }
                if step.op == StepOp::Reveal {
                    g.output.push(value_info(
                        step.output.clone(),
                        DataType::Uint64,
                        &step.shape,
                        program.batched,
                    ));
                }
            }
        }
    }
    let mut model = header(graph, Role::Server, program.reveal, digest);
    model.graph = Some(g);
    model
}

/// Private modes: the client file is the prefix (f32 ops on the client's own
/// input), the program without weights, and the suffix (a final
/// Softmax/LogSoftmax on the revealed logits).
pub fn client_private(
    graph: &Graph,
    prefix: &[usize],
    suffix: &[pb::NodeProto],
    index_output: Option<&str>,
    program: &Program,
    specs: &[LayerSpec],
    digest: &str,
) -> Result<pb::ModelProto, ConvertError> {
    let mut nodes: Vec<pb::NodeProto> = prefix.iter().map(|&i| graph.nodes[i].clone()).collect();
    for (i, step) in program.steps.iter().enumerate() {
        match &step.op {
            StepOp::Linear { op } => {
                if let Some(spec) = specs.get(*op as usize) {
                    let x = step.inputs.first().cloned().unwrap_or_default();
                    nodes.push(secure_node(spec, vec![x], step.output.clone()));
                }
            }
            _ => nodes.extend(program.node(i, Role::Client)),
        }
    }
    nodes.extend(suffix.iter().cloned());
    let plain: Vec<&pb::NodeProto> = prefix
        .iter()
        .map(|&i| &graph.nodes[i])
        .chain(suffix.iter())
        .collect();
    let read: HashSet<&String> = plain.iter().flat_map(|n| n.input.iter()).collect();
    let produced: HashSet<&String> = plain.iter().flat_map(|n| n.output.iter()).collect();
    let mut consts: Vec<&String> = graph.consts.keys().filter(|k| read.contains(k)).collect();
    consts.sort();
    let initializer = consts
        .into_iter()
        .map(|n| to_proto(n, &graph.consts[n]))
        .collect::<Result<Vec<_>, _>>()?;
    let infos: Vec<pb::ValueInfoProto> = graph
        .value_info
        .iter()
        .filter(|v| produced.contains(&v.name))
        .cloned()
        .collect();
    let output = graph
        .outputs
        .iter()
        .map(|o| match index_output {
            Some(name) if name == o.name => {
                let shape = program
                    .reveals()
                    .find(|s| s.output == name)
                    .map(|s| s.shape.clone())
                    .unwrap_or_else(|| vec![1, 1]);
                value_info(o.name.clone(), DataType::Int64, &shape, program.batched)
            }
            _ => o.clone(),
        })
        .collect();
    let mut model = header(graph, Role::Client, program.reveal, digest);
    model.graph = Some(pb::GraphProto {
        name: format!("{}-client", graph.name),
        node: nodes,
        initializer,
        input: graph.inputs.clone(),
        output,
        value_info: infos,
        doc_string: format!(
            "secinfer client graph, --reveal {}: the client's f32 prefix, the secure program (run jointly with the server on secret shares) and the client's suffix",
            program.reveal
        ),
        ..Default::default()
    });
    Ok(model)
}
