//! One party's execution of a program for one batch of inferences.
//!
//! A [`PrivateRun`] walks the program's steps in order; each step reads its
//! input slots (this party's shares) and writes its output slot. Local steps
//! ([`super::layout`]) need no messages; joint ones call the protocols of
//! `secinfer-mpc`; a linear step uses the HE material of the batch's
//! preprocessing ids: the client sends `u = x_C − r` and keeps `c`, the
//! server keeps `W·(x_S + u) + b + s`. A reveal sends the server's share to
//! the client. The run owns all its material (taken when the batch began),
//! so it needs no session; it is a [`Machine`] driven from outside, sans IO.
//! Before the first message both parties know exactly which correlations the
//! batch consumes ([`program_cost`]); a run that ends with any left over
//! fails, since that would mean the parties disagreed on the program.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use secinfer_model::{LayerSpec, Program, Sign, StepOp};
use secinfer_mpc::cost::{self, Cost};
use secinfer_mpc::wire::{Reader, put_ring, ring_len};
use secinfer_mpc::{Io, Machine, Message, MpcError, Party, PartyStats, Role};
use secinfer_ot::CorrelationStore;
use secinfer_ring::{Ring, RingTensor};

use super::layout;
use crate::{OpId, ProtocolError};

/// `W·x + b` of op `op` on a batch (the server's linear layers).
pub type LinearEval = Arc<dyn Fn(OpId, RingTensor) -> Result<RingTensor, String> + Send + Sync>;

/// How a party evaluates the program's linear steps, with the batch's
/// material (every sample's, concatenated, per op).
pub enum LinearSide {
    /// the client: per op, `r` (inputs) and `c = W·r − s` (outputs)
    Client(Vec<(Vec<u64>, Vec<u64>)>),
    /// the server: its layers, and per op `s`
    Server(LinearEval, Vec<Vec<u64>>),
}

/// A value the client learns at the end of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revealed {
    /// the client tensor it becomes
    pub name: String,
    /// the ring values (two's complement, `frac_bits` fractional bits)
    pub values: RingTensor,
    /// fractional bits
    pub frac_bits: u32,
    /// whether it is an index (decoded as an integer)
    pub index: bool,
}

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// the revealed values (client only; empty on the server)
    pub revealed: Vec<Revealed>,
    /// this party's traffic
    pub stats: PartyStats,
}

/// The elements of one sample of a step's output.
fn per_sample(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// What running `program` on a batch of `n` costs: correlations (identical
/// for both parties), messages and payload bytes.
pub fn program_cost(
    program: &Program,
    layers: &[LayerSpec],
    n: usize,
) -> Result<Cost, ProtocolError> {
    Ok(step_costs(program, layers, n)?
        .into_iter()
        .fold(Cost::default(), Cost::plus))
}

/// The most payload bytes one party sends in one step of a run on one
/// inference: a bound on its largest message (a step's messages together).
pub fn largest_step_bytes(program: &Program, layers: &[LayerSpec]) -> Result<u64, ProtocolError> {
    Ok(step_costs(program, layers, 1)?
        .iter()
        .map(|c| c.client_bytes.max(c.server_bytes))
        .max()
        .unwrap_or(0))
}

/// The cost of each step of `program` on a batch of `n`.
fn step_costs(
    program: &Program,
    layers: &[LayerSpec],
    n: usize,
) -> Result<Vec<Cost>, ProtocolError> {
    let ring = Ring::new(program.ring_bits).map_err(|e| ProtocolError::Model(e.to_string()))?;
    let mut costs = Vec::with_capacity(program.steps.len());
    let mut shapes: HashMap<&str, &[usize]> = HashMap::new();
    for s in &program.steps {
        let input_len = |j: usize| -> usize {
            s.inputs
                .get(j)
                .and_then(|x| shapes.get(x.as_str()))
                .map_or(0, |sh| per_sample(sh) * n)
        };
        let out = per_sample(&s.shape) * n;
        let c = match &s.op {
            StepOp::Linear { op } => {
                let spec = layers
                    .get(*op as usize)
                    .ok_or(ProtocolError::UnknownOp(*op))?;
                let bytes = ring_len(ring, spec.input_len() * n) as u64;
                Cost {
                    client_messages: 1,
                    client_bytes: bytes,
                    ..Cost::default()
                }
            }
            StepOp::Truncate { shift, .. } => cost::truncate(ring, out, *shift),
            StepOp::Relu { bits } => cost::relu(ring, out, *bits),
            StepOp::MaxPool { geometry, bits } => {
                cost::max_groups(ring, out * geometry.window(), geometry.window(), *bits)
            }
            StepOp::GlobalMaxPool { bits } => {
                let len = input_len(0);
                cost::max_groups(ring, len, len / out.max(1), *bits)
            }
            StepOp::ArgMax { bits } => {
                let len = input_len(0);
                cost::argmax_groups(ring, len, len / out.max(1), *bits)
            }
            StepOp::Reveal => cost::reveal_to_client(ring, out),
            StepOp::Piecewise { bits, .. } => cost::piecewise(ring, out, &spline_of(&s.op)?, *bits),
            _ => Cost::default(),
        };
        costs.push(c);
        shapes.insert(&s.output, &s.shape);
    }
    Ok(costs)
}

/// The spline of a `Piecewise` step, checked.
fn spline_of(op: &StepOp) -> Result<secinfer_mpc::Spline, ProtocolError> {
    let StepOp::Piecewise {
        function,
        breaks,
        slopes,
        intercepts,
        slope_frac_bits,
        ..
    } = op
    else {
        return Err(ProtocolError::Model("not a piecewise-linear step".into()));
    };
    secinfer_mpc::Spline::new(
        breaks.clone(),
        slopes.clone(),
        intercepts.clone(),
        *slope_frac_bits,
    )
    .map_err(|e| ProtocolError::Model(format!("{function}: {e}")))
}

/// One party's run of a batch. See the module docs.
pub struct PrivateRun {
    machine: Machine<Result<RunReport, ProtocolError>>,
}

impl std::fmt::Debug for PrivateRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateRun({:?})", self.machine)
    }
}

impl PrivateRun {
    /// A run of `program` on `n` inferences. The client gives its encoded
    /// inputs (one tensor per `Input` step, in order, batch shape); the
    /// server none. `correlations` must hold exactly `program_cost(..).demand`.
    pub(crate) fn start(
        role: Role,
        program: Arc<Program>,
        layers: Arc<Vec<LayerSpec>>,
        n: usize,
        inputs: Vec<RingTensor>,
        linear: LinearSide,
        correlations: CorrelationStore,
    ) -> Result<PrivateRun, ProtocolError> {
        let ring = Ring::new(program.ring_bits).map_err(|e| ProtocolError::Model(e.to_string()))?;
        let io = Io::default();
        let party = Party::new(role, ring, correlations, io.clone())
            .map_err(|e| ProtocolError::Model(e.to_string()))?;
        let machine = Machine::new(io, async move {
            execute(party, &program, &layers, n, inputs.into(), linear).await
        });
        Ok(PrivateRun { machine })
    }

    /// The next message to send, if the run has one.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.machine.poll_transmit()
    }

    /// Delivers a message from the peer.
    pub fn handle(&mut self, message: Message) {
        self.machine.handle(message)
    }

    /// The result, once the run has ended.
    pub fn poll_output(&mut self) -> Option<Result<RunReport, ProtocolError>> {
        self.machine.poll_output()
    }
}

fn step_error(program: &Program, i: usize, problem: impl std::fmt::Display) -> ProtocolError {
    let s = &program.steps[i];
    ProtocolError::Step {
        step: i as u32,
        what: s.op.op_type().to_string(),
        node: s.source.clone(),
        problem: problem.to_string(),
    }
}

async fn execute(
    mut p: Party,
    program: &Program,
    layers: &[LayerSpec],
    n: usize,
    mut inputs: VecDeque<RingTensor>,
    linear: LinearSide,
) -> Result<RunReport, ProtocolError> {
    let ring = p.ring();
    let client = p.is_client();
    // slots freed after their last reader
    let mut last_use: HashMap<&str, usize> = HashMap::new();
    for (i, s) in program.steps.iter().enumerate() {
        for x in &s.inputs {
            last_use.insert(x, i);
        }
    }
    let mut index_slots: HashSet<&str> = HashSet::new();
    let mut slots: HashMap<&str, RingTensor> = HashMap::new();
    let mut revealed = Vec::new();
    for (i, s) in program.steps.iter().enumerate() {
        p.begin_step(i as u32);
        let err = |e: &dyn std::fmt::Display| step_error(program, i, e);
        let mpc = |e: MpcError| step_error(program, i, e);
        let shape = program.batch_shape(&s.shape, n);
        let x = |j: usize| -> Result<&RingTensor, ProtocolError> {
            s.inputs
                .get(j)
                .and_then(|name| slots.get(name.as_str()))
                .ok_or_else(|| err(&format!("input {j} is not available")))
        };
        let make = |v: Vec<u64>| layout::tensor(&shape, v).map_err(|e| err(&e));
        let y: RingTensor = match &s.op {
            StepOp::Input { .. } => {
                if client {
                    let t = inputs
                        .pop_front()
                        .ok_or_else(|| err(&"the client gave too few inputs"))?;
                    if t.shape() != shape.as_slice() {
                        return Err(err(&format!(
                            "input of shape {:?}, expected {shape:?}",
                            t.shape()
                        )));
                    }
                    t
                } else {
                    ArrayD::zeros(IxDyn(&shape))
                }
            }
            StepOp::Linear { op } => {
                let o = *op as usize;
                let spec = layers.get(o).ok_or(ProtocolError::UnknownOp(*op))?;
                let xs = x(0)?;
                match &linear {
                    LinearSide::Client(material) => {
                        let (r, c) = material
                            .get(o)
                            .ok_or_else(|| err(&"no material for this op"))?;
                        if r.len() != xs.len() || c.len() != per_sample(&shape) {
                            return Err(err(&"material does not match the batch"));
                        }
                        let u: Vec<u64> = xs
                            .iter()
                            .zip(r)
                            .map(|(x, r)| ring.reduce(x.wrapping_sub(*r)))
                            .collect();
                        let mut msg = Vec::with_capacity(ring_len(ring, u.len()));
                        put_ring(&mut msg, ring, &u);
                        p.send(msg);
                        make(c.clone())?
                    }
                    LinearSide::Server(eval, shares) => {
                        let s_op = shares
                            .get(o)
                            .ok_or_else(|| err(&"no material for this op"))?;
                        let msg = p.recv(ring_len(ring, xs.len())).await.map_err(mpc)?;
                        let mut rd = Reader::new(&msg, "masked input");
                        let u = rd.ring(ring, xs.len()).map_err(mpc)?;
                        rd.finish().map_err(mpc)?;
                        let sum: Vec<u64> = xs
                            .iter()
                            .zip(&u)
                            .map(|(a, b)| ring.reduce(a.wrapping_add(*b)))
                            .collect();
                        let input = layout::tensor(xs.shape(), sum).map_err(|e| err(&e))?;
                        let mut y = eval(*op, input).map_err(|e| err(&e))?;
                        if y.shape() != shape.as_slice() || s_op.len() != y.len() {
                            return Err(err(&format!(
                                "op {op} ('{}') produced {:?}, expected {shape:?}",
                                spec.source_node,
                                y.shape()
                            )));
                        }
                        for (v, s) in y.iter_mut().zip(s_op) {
                            *v = ring.reduce(v.wrapping_add(*s));
                        }
                        y
                    }
                }
            }
            StepOp::Truncate { shift, sign } => {
                let sign = match sign {
                    Sign::NonNegative => secinfer_mpc::Sign::NonNegative,
                    Sign::Signed => secinfer_mpc::Sign::Signed,
                };
                let v = layout::flat(x(0)?);
                make(
                    secinfer_mpc::truncate(&mut p, &v, *shift, sign)
                        .await
                        .map_err(mpc)?,
                )?
            }
            StepOp::ShiftLeft { shift } => x(0)?.mapv(|v| ring.reduce(v << shift)),
            StepOp::Relu { bits } => {
                let v = layout::flat(x(0)?);
                make(secinfer_mpc::relu(&mut p, &v, *bits).await.map_err(mpc)?)?
            }
            StepOp::Piecewise { bits, .. } => {
                let spline = spline_of(&s.op)?;
                let v = layout::flat(x(0)?);
                make(
                    secinfer_mpc::piecewise(&mut p, &v, &spline, *bits)
                        .await
                        .map_err(mpc)?,
                )?
            }
            StepOp::MaxPool { geometry, bits } => {
                let (out, v) = layout::gather_windows(x(0)?, geometry).map_err(|e| err(&e))?;
                if out != shape {
                    return Err(err(&format!("pool gives {out:?}, expected {shape:?}")));
                }
                make(
                    secinfer_mpc::max_groups(&mut p, &v, geometry.window(), *bits)
                        .await
                        .map_err(mpc)?,
                )?
            }
            StepOp::GlobalMaxPool { bits } => {
                let xs = x(0)?;
                let (_, lane) = layout::global_shape(xs.shape()).map_err(|e| err(&e))?;
                let v = layout::flat(xs);
                make(
                    secinfer_mpc::max_groups(&mut p, &v, lane, *bits)
                        .await
                        .map_err(mpc)?,
                )?
            }
            StepOp::SumPool { geometry } => {
                layout::sum_pool(ring, x(0)?, geometry).map_err(|e| err(&e))?
            }
            StepOp::GlobalSumPool => layout::global_sum(ring, x(0)?).map_err(|e| err(&e))?,
            StepOp::MulConst { factor } => layout::mul_const(ring, x(0)?, *factor),
            StepOp::Add | StepOp::Sub => {
                layout::add(ring, x(0)?, x(1)?, s.op == StepOp::Sub).map_err(|e| err(&e))?
            }
            StepOp::Reshape => layout::reshape(x(0)?.clone(), &shape).map_err(|e| err(&e))?,
            StepOp::Transpose { perm } => layout::transpose(x(0)?, perm).map_err(|e| err(&e))?,
            StepOp::Concat { axis } => {
                let parts = (0..s.inputs.len()).map(x).collect::<Result<Vec<_>, _>>()?;
                layout::concat(&parts, *axis).map_err(|e| err(&e))?
            }
            StepOp::Slice { starts, steps } => {
                layout::slice(x(0)?, starts, steps, &shape).map_err(|e| err(&e))?
            }
            StepOp::Pad { begin, end } => layout::pad(x(0)?, begin, end).map_err(|e| err(&e))?,
            StepOp::ArgMax { bits } => {
                let xs = x(0)?;
                let group = xs.shape().last().copied().unwrap_or(1);
                let v = layout::flat(xs);
                let idx = make(
                    secinfer_mpc::argmax_groups(&mut p, &v, group, *bits)
                        .await
                        .map_err(mpc)?,
                )?;
                index_slots.insert(&s.output);
                idx
            }
            StepOp::Reveal => {
                let xs = x(0)?;
                let v = layout::flat(xs);
                let values = secinfer_mpc::reveal_to_client(&mut p, &v)
                    .await
                    .map_err(mpc)?;
                if let Some(values) = values {
                    let index = s
                        .inputs
                        .first()
                        .is_some_and(|i| index_slots.contains(i.as_str()));
                    revealed.push(Revealed {
                        name: s.output.clone(),
                        values: make(values)?,
                        frac_bits: s.frac_bits,
                        index,
                    });
                }
                for name in &s.inputs {
                    if last_use.get(name.as_str()) == Some(&i) {
                        slots.remove(name.as_str());
                    }
                }
                continue;
            }
        };
        if y.shape() != shape.as_slice() {
            return Err(err(&format!(
                "produced {:?}, expected {shape:?}",
                y.shape()
            )));
        }
        if s.op == StepOp::Reshape
            && s.inputs
                .first()
                .is_some_and(|i| index_slots.contains(i.as_str()))
        {
            index_slots.insert(&s.output);
        }
        for name in &s.inputs {
            if last_use.get(name.as_str()) == Some(&i) {
                slots.remove(name.as_str());
            }
        }
        slots.insert(&s.output, y);
    }
    let left = p.correlations().available();
    if !left.is_zero() {
        return Err(ProtocolError::Model(format!(
            "the run left correlations unused ({left:?}): the parties disagree on the program"
        )));
    }
    if client && !inputs.is_empty() {
        return Err(ProtocolError::Model(format!(
            "the client gave {} more inputs than the program reads",
            inputs.len()
        )));
    }
    Ok(RunReport {
        revealed,
        stats: p.stats(),
    })
}
