//! The client's side of a private-mode model (`--reveal logits` or
//! `argmax`): `client.onnx` split into the three parts the converter wrote.
//!
//! - the **prefix**: ordinary ONNX nodes on the client's own input (a
//!   Flatten, a standardisation), run in tract in f32;
//! - the **program**: `ai.secinfer` nodes, executed jointly with the server
//!   by the protocol crate; the client encodes the program's inputs (after
//!   checking each value against the range the converter proved the program
//!   safe for) and decodes what the program reveals;
//! - the **suffix**: a final Softmax or LogSoftmax on the revealed logits,
//!   applied here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::tract_ndarray::Dimension;

use secinfer_model::{DOMAIN, Program, StepOp};
use secinfer_protocol::private::Revealed;
use secinfer_ring::{Ring, RingTensor};

/// A client op applied after the reveal.
#[derive(Debug, Clone)]
struct SuffixOp {
    input: String,
    output: String,
    log: bool,
    axis: i64,
}

/// The three parts of a private client model.
pub struct PrivatePlan {
    prefix: Option<Arc<TypedRunnableModel>>,
    /// names of the prefix plan's outputs, in order
    prefix_outputs: Vec<String>,
    /// names of the model's inputs, in order
    inputs: Vec<String>,
    /// the first input's dimensions (`None`: symbolic)
    input_dims: Vec<Option<usize>>,
    /// the program
    pub program: Arc<Program>,
    suffix: Vec<SuffixOp>,
    /// names of the model's outputs, in order
    outputs: Vec<String>,
}

impl std::fmt::Debug for PrivatePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivatePlan({} steps)", self.program.steps.len())
    }
}

impl PrivatePlan {
    /// Splits a private `client.onnx` whose program has been read already.
    pub fn new(proto: &pb::ModelProto, program: Program) -> anyhow::Result<PrivatePlan> {
        let graph = proto.graph.as_ref().ok_or_else(|| anyhow!("no graph"))?;
        let revealed: HashSet<&str> = program.reveals().map(|s| s.output.as_str()).collect();
        let plain: Vec<&pb::NodeProto> = graph.node.iter().filter(|n| n.domain != DOMAIN).collect();
        // The suffix: plain nodes that read what the program reveals.
        let mut suffix = Vec::new();
        let mut downstream: HashSet<String> = revealed.iter().map(|s| s.to_string()).collect();
        for n in &plain {
            if n.input.iter().any(|i| downstream.contains(i)) {
                let log = match n.op_type.as_str() {
                    "Softmax" => false,
                    "LogSoftmax" => true,
                    other => bail!(
                        "node '{}' ({other}) runs on the revealed output; only a final Softmax or LogSoftmax may",
                        secinfer_model::node_name(n)
                    ),
                };
                let opset = proto
                    .opset_import
                    .iter()
                    .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
                    .map(|o| o.version)
                    .max()
                    .unwrap_or(13);
                let axis = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "axis")
                    .map_or(if opset >= 13 { -1 } else { 1 }, |a| a.i);
                let (input, output) = match (n.input.first(), n.output.first()) {
                    (Some(i), Some(o)) => (i.clone(), o.clone()),
                    _ => bail!(
                        "suffix node '{}' lacks an input or output",
                        secinfer_model::node_name(n)
                    ),
                };
                downstream.insert(output.clone());
                suffix.push(SuffixOp {
                    input,
                    output,
                    log,
                    axis,
                });
            }
        }
        let suffix_outputs: HashSet<&str> = suffix.iter().map(|s| s.output.as_str()).collect();
        let prefix_nodes: Vec<pb::NodeProto> = plain
            .iter()
            .filter(|n| !n.output.iter().any(|o| suffix_outputs.contains(o.as_str())))
            .map(|n| (*n).clone())
            .collect();
        let inputs: Vec<String> = graph.input.iter().map(|i| i.name.clone()).collect();
        let input_set: HashSet<&str> = inputs.iter().map(String::as_str).collect();
        let mut prefix_outputs: Vec<String> = Vec::new();
        for s in program.inputs() {
            if let StepOp::Input { tensor, .. } = &s.op
                && !input_set.contains(tensor.as_str())
                && !prefix_outputs.contains(tensor)
            {
                prefix_outputs.push(tensor.clone());
            }
        }
        let prefix = if prefix_outputs.is_empty() {
            None
        } else {
            let read: HashSet<&String> = prefix_nodes.iter().flat_map(|n| n.input.iter()).collect();
            let sub = pb::ModelProto {
                graph: Some(pb::GraphProto {
                    name: "prefix".into(),
                    node: prefix_nodes.clone(),
                    initializer: graph
                        .initializer
                        .iter()
                        .filter(|t| read.contains(&t.name))
                        .cloned()
                        .collect(),
                    input: graph.input.clone(),
                    output: prefix_outputs
                        .iter()
                        .map(|o| pb::ValueInfoProto {
                            name: o.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    value_info: graph.value_info.clone(),
                    ..Default::default()
                }),
                ..proto.clone()
            };
            let plan = tract_onnx::onnx()
                .model_for_proto_model(&sub)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(|e| anyhow!("preparing the client's prefix graph: {e:#}"))?;
            Some(plan)
        };
        let input_dims = graph
            .input
            .first()
            .and_then(|i| i.r#type.as_ref())
            .and_then(|t| match &t.value {
                Some(pb::type_proto::Value::TensorType(tt)) => tt.shape.as_ref(),
                _ => None,
            })
            .map(|sh| {
                sh.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => {
                            Some(*v as usize)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(PrivatePlan {
            prefix,
            prefix_outputs,
            inputs,
            input_dims,
            program: Arc::new(program),
            suffix,
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
        })
    }

    /// The first input's declared shape (`None` for a symbolic dimension).
    pub fn input_shape(&self) -> anyhow::Result<Vec<Option<usize>>> {
        Ok(self.input_dims.clone())
    }

    /// Runs the prefix and encodes every program input: one ring tensor per
    /// `Input` step, in program order. Refuses a value outside the range the
    /// program was proven safe for, or not a number.
    pub fn encode(&self, inputs: &TVec<TValue>) -> anyhow::Result<Vec<RingTensor>> {
        let mut named: HashMap<&str, TValue> = HashMap::new();
        for (name, v) in self.inputs.iter().zip(inputs.iter()) {
            named.insert(name, v.clone());
        }
        if let Some(plan) = &self.prefix {
            let out = plan
                .run(inputs.clone())
                .map_err(|e| anyhow!("client prefix graph: {e:#}"))?;
            for (name, v) in self.prefix_outputs.iter().zip(out) {
                named.insert(name, v);
            }
        }
        let ring = Ring::new(self.program.ring_bits)?;
        let mut encoded = Vec::new();
        for s in self.program.inputs() {
            let StepOp::Input { tensor, lo, hi } = &s.op else {
                continue;
            };
            let v = named.get(tensor.as_str()).ok_or_else(|| {
                anyhow!("the program reads '{tensor}', which the client graph does not produce")
            })?;
            let v = v.cast_to::<f32>().map_err(|e| anyhow!("{e:#}"))?;
            let view = v
                .to_plain_array_view::<f32>()
                .map_err(|e| anyhow!("{e:#}"))?;
            let bad = view
                .iter()
                .position(|x| !x.is_finite() || *x < lo.0 || *x > hi.0);
            if let Some((ix, x)) = bad.and_then(|i| view.indexed_iter().nth(i)) {
                bail!(
                    "input '{tensor}': value {x} at {:?} is {}; this model was converted for values in [{}, {}] (convert again with another --input-bound or calibration)",
                    ix.slice(),
                    if x.is_finite() {
                        "out of range"
                    } else {
                        "not a number"
                    },
                    lo.0,
                    hi.0
                );
            }
            encoded.push(
                secinfer_ring::encode_tensor(ring, view, s.frac_bits)
                    .with_context(|| format!("encoding input '{tensor}'"))?,
            );
        }
        Ok(encoded)
    }

    /// Decodes what the program revealed, applies the suffix and returns the
    /// model's outputs in order.
    pub fn finish(&self, revealed: Vec<Revealed>) -> anyhow::Result<TVec<TValue>> {
        let ring = Ring::new(self.program.ring_bits)?;
        let mut named: HashMap<String, Tensor> = HashMap::new();
        for r in revealed {
            let t = if r.index {
                r.values.mapv(|v| ring.to_signed(v)).into_tensor()
            } else {
                secinfer_ring::decode_tensor(ring, r.values.view(), r.frac_bits).into_tensor()
            };
            named.insert(r.name, t);
        }
        for op in &self.suffix {
            let x = named.get(&op.input).ok_or_else(|| {
                anyhow!("the suffix reads '{}', which was not revealed", op.input)
            })?;
            let y = softmax(x, op.axis, op.log)?;
            named.insert(op.output.clone(), y);
        }
        self.outputs
            .iter()
            .map(|o| {
                named
                    .remove(o)
                    .map(|t| t.into_tvalue())
                    .ok_or_else(|| anyhow!("model output '{o}' was not revealed"))
            })
            .collect()
    }
}

/// Softmax or log-softmax of a float tensor along `axis`.
fn softmax(x: &Tensor, axis: i64, log: bool) -> anyhow::Result<Tensor> {
    let a = x
        .to_plain_array_view::<f32>()
        .map_err(|e| anyhow!("{e:#}"))?;
    let rank = a.ndim() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&axis) {
        bail!("softmax axis {axis} of a rank-{rank} tensor");
    }
    let mut out = a.to_owned();
    for mut lane in out.lanes_mut(tract_ndarray::Axis(axis as usize)) {
        let m = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = lane.iter().map(|v| (v - m).exp()).sum();
        lane.mapv_inplace(|v| {
            if log {
                v - m - sum.ln()
            } else {
                (v - m).exp() / sum
            }
        });
    }
    Ok(out.into_tensor())
}

/// Splits `d` into demands of at most `max` random OTs per direction each.
pub fn split_demand(d: secinfer_ot::Demand, max: u64) -> Vec<secinfer_ot::Demand> {
    use secinfer_ot::Demand;
    let max = max.max(1);
    let mut left = d;
    let mut parts = Vec::new();
    while !left.is_zero() {
        // room per direction: (client sends, server sends)
        let (mut c, mut s) = (max, max);
        let mut part = Demand::default();
        let t = left.triples.min(c).min(s);
        part.triples = t;
        c -= t;
        s -= t;
        let take = |want: u64, room: &mut u64| {
            let n = want.min(*room);
            *room -= n;
            n
        };
        part.bit_ots_client_sends = take(left.bit_ots_client_sends, &mut c);
        part.word_ots_client_sends = take(left.word_ots_client_sends, &mut c);
        part.bit_ots_server_sends = take(left.bit_ots_server_sends, &mut s);
        part.word_ots_server_sends = take(left.word_ots_server_sends, &mut s);
        left = Demand {
            triples: left.triples - part.triples,
            bit_ots_client_sends: left.bit_ots_client_sends - part.bit_ots_client_sends,
            bit_ots_server_sends: left.bit_ots_server_sends - part.bit_ots_server_sends,
            word_ots_client_sends: left.word_ots_client_sends - part.word_ots_client_sends,
            word_ots_server_sends: left.word_ots_server_sends - part.word_ots_server_sends,
        };
        parts.push(part);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use secinfer_ot::Demand;

    #[test]
    fn split_demands_add_up_and_respect_the_limit() {
        let d = Demand {
            triples: 2500,
            bit_ots_client_sends: 0,
            bit_ots_server_sends: 1700,
            word_ots_client_sends: 300,
            word_ots_server_sends: 90,
        };
        let parts = split_demand(d, 1000);
        let sum = parts.iter().fold(Demand::default(), |a, p| a.plus(*p));
        assert_eq!(sum, d);
        for p in &parts {
            let (c, s) = p.random_ots();
            assert!(c <= 1000 && s <= 1000, "{p:?}");
        }
        assert!(split_demand(Demand::default(), 10).is_empty());
    }

    #[test]
    fn softmax_rows_sum_to_one_and_log_softmax_is_its_log() {
        let x = tract_ndarray::arr2(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]]).into_tensor();
        let s = softmax(&x, -1, false).unwrap();
        let s = s.to_plain_array_view::<f32>().unwrap();
        for row in s.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
        let l = softmax(&x, 1, true).unwrap();
        let l = l.to_plain_array_view::<f32>().unwrap();
        assert!((l[[0, 2]] - s[[0, 2]].ln()).abs() < 1e-6);
    }
}
