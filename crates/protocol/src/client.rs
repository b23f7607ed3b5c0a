//! The client's session: holds `(r, c)` per (id, op), masks inputs and
//! unmasks outputs.

use std::collections::{HashMap, VecDeque};

use ndarray::{ArrayD, IxDyn};
use secinfer_model::LayerSpec;
use secinfer_ring::RingTensor;

use std::sync::Arc;

use secinfer_model::Program;
use secinfer_ot::{CorrelationStore, Position};

use crate::ProtocolError;
use crate::messages::{
    ClientMaterial, MaskedInput, MaskedOutput, OpId, PreprocessingId, WireTensor,
};
use crate::private::{LinearSide, PrivateMessage, PrivateRun, program_cost};
use crate::server::check_ring;
use crate::store::SingleUseStore;

/// What the client waits for after sending `x − r` for an op.
#[derive(Debug)]
struct Pending {
    ids: Vec<PreprocessingId>,
    /// `c = W·r − s` of every sample, concatenated.
    correction: Vec<u64>,
}

/// The client's side of one connection.
pub struct ClientSession {
    layers: Vec<LayerSpec>,
    store: SingleUseStore<(Vec<u64>, Vec<u64>)>,
    /// Ids whose material is complete and not yet handed to an inference.
    ready: VecDeque<PreprocessingId>,
    pending: HashMap<OpId, Pending>,
}

impl ClientSession {
    /// A session for a model's ops (indexed by op id), with no material.
    pub fn new(layers: Vec<LayerSpec>) -> Self {
        ClientSession {
            layers,
            store: SingleUseStore::new(),
            ready: VecDeque::new(),
            pending: HashMap::new(),
        }
    }

    /// The ops this session serves.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// Files one inference's `(r, c)` for every op.
    pub fn accept_preprocessing(&mut self, m: ClientMaterial) -> Result<(), ProtocolError> {
        if m.ops.len() != self.layers.len() {
            return Err(ProtocolError::Model(format!(
                "material {} has {} ops, model has {}",
                m.id,
                m.ops.len(),
                self.layers.len()
            )));
        }
        for (spec, (r, c)) in self.layers.iter().zip(&m.ops) {
            if r.len() != spec.input_len() || c.len() != spec.output_len() {
                return Err(ProtocolError::Shape {
                    op: spec.op_id,
                    problem: format!(
                        "material has {}/{} elements, op needs {}/{}",
                        r.len(),
                        c.len(),
                        spec.input_len(),
                        spec.output_len()
                    ),
                });
            }
        }
        self.store.insert(m.id, m.ops)?;
        self.ready.push_back(m.id);
        Ok(())
    }

    /// Number of inferences' worth of unused material.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Hands out `n` fresh ids for one batch of `n` inferences; each op of that
    /// batch then uses the same ids, in order.
    pub fn reserve(&mut self, n: usize) -> Result<Vec<PreprocessingId>, ProtocolError> {
        if n > self.ready.len() {
            return Err(ProtocolError::Model(format!(
                "{n} inferences need preprocessing, only {} are ready",
                self.ready.len()
            )));
        }
        Ok(self.ready.drain(..n).collect())
    }

    /// Discards what is left of the material of finished inferences (ops the
    /// graph did not reach). The ids stay spent.
    pub fn retire(&mut self, ids: &[PreprocessingId]) {
        for &id in ids {
            self.store.retire(id);
        }
    }

    /// Masks the encoded input `x` of op `op` for samples `ids`: returns the
    /// message carrying `x − r` and remembers `c` for [`unmask`](Self::unmask).
    pub fn mask(
        &mut self,
        op: OpId,
        ids: &[PreprocessingId],
        x: &RingTensor,
    ) -> Result<MaskedInput, ProtocolError> {
        let (spec, ring) = crate::op_spec(&self.layers, op)?;
        let n = spec
            .samples_in_input(x.shape())
            .map_err(|problem| ProtocolError::Shape { op, problem })?;
        if n != ids.len() {
            return Err(ProtocolError::Shape {
                op,
                problem: format!("{n} samples but {} preprocessing ids", ids.len()),
            });
        }
        if self.pending.contains_key(&op) {
            return Err(ProtocolError::Unexpected {
                op,
                problem: "a request for this op is already in flight".into(),
            });
        }
        check_ring(op, ring.bits(), x.iter())?;
        let material = self.store.take(ids, op)?;
        let in_len = spec.input_len();
        let mut masked = Vec::with_capacity(n * in_len);
        let mut correction = Vec::with_capacity(n * spec.output_len());
        for ((r, c), xs) in material.iter().zip(x_chunks(x, in_len)) {
            masked.extend(xs.zip(r).map(|(x, r)| ring.reduce(x.wrapping_sub(*r))));
            correction.extend_from_slice(c);
        }
        self.pending.insert(
            op,
            Pending {
                ids: ids.to_vec(),
                correction,
            },
        );
        Ok(MaskedInput {
            op,
            ids: ids.to_vec(),
            masked: WireTensor {
                shape: x.shape().iter().map(|&d| d as u64).collect(),
                data: masked,
            },
        })
    }

    /// Forgets the request in flight for `op`, whose answer will not come
    /// (its round trip failed): the op can be used again, with fresh ids;
    /// the material the request took stays spent.
    pub fn abandon(&mut self, op: OpId) {
        self.pending.remove(&op);
    }

    /// Unmasks the server's answer: `W·(x − r) + b + s + c = W·x + b`.
    pub fn unmask(&mut self, out: MaskedOutput) -> Result<RingTensor, ProtocolError> {
        let op = out.op;
        let (spec, ring) = crate::op_spec(&self.layers, op)?;
        let pending = self
            .pending
            .remove(&op)
            .ok_or_else(|| ProtocolError::Unexpected {
                op,
                problem: "answer to a request that was not sent".into(),
            })?;
        if pending.ids != out.ids {
            return Err(ProtocolError::Unexpected {
                op,
                problem: "answer names other preprocessing ids than the request".into(),
            });
        }
        let z = out.masked.into_tensor(op)?;
        let expected = spec.batch_output_shape(pending.ids.len());
        if z.shape() != expected.as_slice() {
            return Err(ProtocolError::Shape {
                op,
                problem: format!("answer has shape {:?}, expected {:?}", z.shape(), expected),
            });
        }
        check_ring(op, ring.bits(), z.iter())?;
        let data: Vec<u64> = z
            .iter()
            .zip(&pending.correction)
            .map(|(z, c)| ring.reduce(z.wrapping_add(*c)))
            .collect();
        ArrayD::from_shape_vec(IxDyn(&expected), data).map_err(|e| ProtocolError::Shape {
            op,
            problem: e.to_string(),
        })
    }
}

impl ClientSession {
    /// Begins a private batch: takes every linear op's material for `ids`
    /// (single use; nothing is taken unless all of it is there) and starts
    /// the client's run of `program` on `inputs` (one encoded tensor per
    /// input step, batch shape). `correlations` is the batch's share of the
    /// client's store, taken at `position`. Returns the message that begins
    /// the batch on the server, and the run to drive.
    pub fn begin_private(
        &mut self,
        program: &Arc<Program>,
        ids: &[PreprocessingId],
        inputs: Vec<RingTensor>,
        correlations: CorrelationStore,
        position: Position,
    ) -> Result<(PrivateMessage, PrivateRun), ProtocolError> {
        if ids.is_empty() {
            return Err(ProtocolError::Model(
                "a private batch needs at least one inference".into(),
            ));
        }
        let cost = program_cost(program, &self.layers, ids.len())?;
        if correlations.available() != cost.demand {
            return Err(ProtocolError::Model(format!(
                "the batch needs correlations {:?}, was given {:?}",
                cost.demand,
                correlations.available()
            )));
        }
        for spec in &self.layers {
            self.store.check(ids, spec.op_id)?;
        }
        let mut material = Vec::with_capacity(self.layers.len());
        for spec in &self.layers {
            let per_id = self.store.take(ids, spec.op_id)?;
            let mut r = Vec::with_capacity(ids.len() * spec.input_len());
            let mut c = Vec::with_capacity(ids.len() * spec.output_len());
            for (ri, ci) in per_id {
                r.extend(ri);
                c.extend(ci);
            }
            material.push((r, c));
        }
        let run = PrivateRun::start(
            secinfer_mpc::Role::Client,
            program.clone(),
            Arc::new(self.layers.clone()),
            ids.len(),
            inputs,
            LinearSide::Client(material),
            correlations,
        )?;
        Ok((
            PrivateMessage::Begin {
                ids: ids.to_vec(),
                position,
            },
            run,
        ))
    }
}

/// The samples of `x` as flat element iterators of `len` elements each.
fn x_chunks(x: &RingTensor, len: usize) -> impl Iterator<Item = impl Iterator<Item = &u64>> {
    let total = x.len();
    let mut it = x.iter();
    (0..total.checked_div(len).unwrap_or(0)).map(move |_| {
        let chunk: Vec<&u64> = it.by_ref().take(len).collect();
        chunk.into_iter()
    })
}
