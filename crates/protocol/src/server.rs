//! The server's session: holds `s` per (id, op) and answers masked inputs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use secinfer_he::{LinearForm, Packing, ServerKey};
use secinfer_model::{LayerSpec, Program};
use secinfer_ot::{Backend, OtEngine, OtMessage, Role};
use secinfer_ring::RingTensor;

use crate::ProtocolError;
#[cfg(test)]
use crate::messages::ServerMaterial;
use crate::messages::{MaskedInput, MaskedOutput, OpId, PreprocessingId, WireTensor};
use crate::offline::{
    CIPHERTEXTS_PER_MESSAGE, MaskRequest, OfflineHello, ProductReply, he_err, layout_tag,
    packing_for, params_for,
};
use crate::private::{LinearEval, LinearSide, PrivateMessage, PrivateRun, program_cost};
use crate::store::SingleUseStore;

/// Batches a client may have in flight at once on the server (each holds one
/// op's ciphertexts at a time plus the batch's `s`).
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// The server's linear layers: `W·x + b` in Z_2^k for a batch of samples.
/// Implemented by the tract plugin (`secinfer-tract-ext`), which runs the
/// SecureLinear ops of `server.onnx`.
pub trait MaskedLinear: Send + Sync {
    /// The ops, indexed by op id.
    fn layers(&self) -> &[LayerSpec];
    /// `W·x + b mod 2^k`; `x` has the op's input shape with any batch size.
    fn evaluate(&self, op: OpId, x: RingTensor) -> Result<RingTensor, String>;
    /// Op `op`'s weights as the HE offline phase applies them.
    fn he_form(&self, op: OpId) -> Result<&dyn LinearForm, String>;
    /// The secure program, for a model converted in a private mode.
    fn program(&self) -> Option<&Arc<Program>> {
        None
    }
    /// Reply ciphertexts made with these weights so far, across every
    /// session that shares the model (the noise flooding's bound counts them
    /// all); `None` leaves the count to each session.
    fn reply_counter(&self) -> Option<&AtomicU64> {
        None
    }
}

/// A batch being preprocessed on the server.
struct ServerBatch {
    count: usize,
    /// per op: how the batch is laid out in ciphertexts (both sides choose
    /// it the same way from the op's shape and `count`)
    packing: Vec<Packing>,
    /// per op: the client's ciphertexts received so far
    inputs: Vec<Vec<Option<Vec<u8>>>>,
    /// per op: ciphertexts received
    received: Vec<usize>,
    /// per op: `s` once the op is answered, `count` rows of `output_len`
    masks: Vec<Option<Vec<Vec<u64>>>>,
}

/// One client's session on the server. Not thread-safe by itself: the
/// transport gives each connection its own session.
pub struct ServerSession<L: MaskedLinear + ?Sized> {
    linear: Arc<L>,
    store: SingleUseStore<Vec<u64>>,
    key: Option<ServerKey>,
    batches: HashMap<PreprocessingId, ServerBatch>,
    max_pending: usize,
    ot: Option<OtEngine>,
    /// what the OT engine held when it was checked out to handle a
    /// correlation message without the session ([`ServerSession::check_out_ot`]):
    /// (store bytes, source's retained bytes); `None` while it is here
    ot_out: Option<(usize, u64)>,
    max_ot_bytes: u64,
    /// the correlation backends this session accepts from the client
    ot_backends: Vec<Backend>,
    /// reply ciphertexts this session's batches committed to, counted here
    /// when the model keeps no count of its own, and the most allowed
    replies: u64,
    max_replies: u64,
}

/// Reply ciphertexts one model's weights may be used for, across all
/// sessions: the noise flooding's statistical bound is proven for this many
/// (`secinfer_he::MAX_REPLIES_BITS`).
pub const MAX_REPLIES: u64 = 1 << secinfer_he::MAX_REPLIES_BITS;

/// Bytes of stored correlations a session may hold by default (512 MiB).
pub const DEFAULT_MAX_OT_BYTES: u64 = 512 << 20;

/// Preprocessed inferences (ready plus in flight) a session may hold by
/// default: two full batches.
pub const DEFAULT_MAX_PENDING: usize = 2 * 8192;

/// One op's HE evaluation for a batch, taken out of the session so that it
/// can run while the session serves online requests.
pub struct OfflineJob {
    first: PreprocessingId,
    op: OpId,
    count: usize,
    packing: Packing,
    inputs: Vec<Vec<u8>>,
    key: ServerKey,
}

/// A finished [`OfflineJob`]: the masks `s` to file, `count` rows.
pub struct OfflineProduct {
    first: PreprocessingId,
    op: OpId,
    masks: Vec<Vec<u64>>,
}

impl OfflineJob {
    /// The batch this job belongs to.
    pub fn batch(&self) -> PreprocessingId {
        self.first
    }

    /// Estimated peak bytes the job holds while it runs, its input
    /// ciphertexts included ([`secinfer_he::Packing::server_bytes`]).
    pub fn memory_bytes(&self) -> usize {
        self.packing.server_bytes(self.key.params())
    }

    /// Computes `Enc(W·r − s)` with fresh `s` and hands the reply to `emit`
    /// in parts of at most [`CIPHERTEXTS_PER_MESSAGE`] ciphertexts.
    pub fn run<L: MaskedLinear + ?Sized>(
        self,
        linear: &L,
        emit: &mut dyn FnMut(ProductReply) -> Result<(), ProtocolError>,
    ) -> Result<OfflineProduct, ProtocolError> {
        let OfflineJob {
            first,
            op,
            count,
            packing,
            inputs,
            key,
        } = self;
        let (spec, _) = crate::op_spec(linear.layers(), op)?;
        let form = linear
            .he_form(op)
            .map_err(|problem| ProtocolError::Evaluation { op, problem })?;
        let mut masks = vec![vec![0u64; spec.output_len()]; count];
        let mut emit_err = None;
        // sends replies `(index, ciphertext)` in messages of at most
        // CIPHERTEXTS_PER_MESSAGE, remembering a send error
        let mut send = |replies: Vec<(usize, Vec<u8>)>| -> Result<(), secinfer_he::HeError> {
            let mut it = replies.into_iter().peekable();
            while it.peek().is_some() {
                let chunk: Vec<(usize, Vec<u8>)> =
                    it.by_ref().take(CIPHERTEXTS_PER_MESSAGE).collect();
                let reply = ProductReply {
                    first_id: first,
                    op,
                    outputs: chunk.iter().map(|(o, _)| *o as u32).collect(),
                    ciphertexts: chunk.into_iter().map(|(_, c)| c).collect(),
                };
                if let Err(e) = emit(reply) {
                    emit_err = Some(e.clone());
                    return Err(secinfer_he::HeError::Linear(format!(
                        "sending the reply: {e}"
                    )));
                }
            }
            Ok(())
        };
        let result = match packing {
            Packing::PerCoefficient { .. } => {
                secinfer_he::evaluate(&key, form, inputs, count, &mut |part| {
                    for (k, &o) in part.outputs.iter().enumerate() {
                        for (b, row) in masks.iter_mut().enumerate() {
                            row[o] = part.masks[b][k];
                        }
                    }
                    send(part.outputs.into_iter().zip(part.ciphertexts).collect())
                })
            }
            ref packed => {
                let layout = packed
                    .layout()
                    .ok_or_else(|| he_err(op, secinfer_he::HeError::Shape("no layout".into())))?;
                secinfer_he::evaluate_packed(&key, form, packed, inputs, &mut |parts| {
                    let mut replies = Vec::with_capacity(parts.len());
                    for part in parts {
                        for (kept, s) in layout.kept(part.index).into_iter().zip(part.masks) {
                            masks[kept.inference][kept.output] = s;
                        }
                        replies.push((part.index, part.ciphertext));
                    }
                    send(replies)
                })
            }
        };
        result.map_err(|e| emit_err.take().unwrap_or_else(|| he_err(op, e)))?;
        Ok(OfflineProduct { first, op, masks })
    }
}

impl<L: MaskedLinear + ?Sized> ServerSession<L> {
    /// A session with no material.
    pub fn new(linear: Arc<L>) -> Self {
        ServerSession {
            linear,
            store: SingleUseStore::new(),
            key: None,
            batches: HashMap::new(),
            max_pending: DEFAULT_MAX_PENDING,
            ot: None,
            ot_out: None,
            max_ot_bytes: DEFAULT_MAX_OT_BYTES,
            ot_backends: Backend::ALL.to_vec(),
            replies: 0,
            max_replies: MAX_REPLIES,
        }
    }

    /// Lowers how many reply ciphertexts the model's weights may be used for
    /// (never above [`MAX_REPLIES`], which the noise flooding's bound
    /// assumes). The count is the model's own across sessions
    /// ([`MaskedLinear::reply_counter`]) or, without one, this session's. A
    /// batch that would pass it is refused.
    pub fn set_max_replies(&mut self, replies: u64) {
        self.max_replies = replies.min(MAX_REPLIES);
    }

    /// Sets how many bytes of correlations this session may store; the
    /// default is [`DEFAULT_MAX_OT_BYTES`].
    pub fn set_max_ot_bytes(&mut self, bytes: u64) {
        self.max_ot_bytes = bytes;
        if let Some(e) = &mut self.ot {
            e.set_budget(bytes);
        }
    }

    /// Sets which correlation backends the client may choose (all by
    /// default); a client naming another is refused at its first setup
    /// flight, by name. Takes effect for an engine not yet set up.
    pub fn set_ot_backends(&mut self, accepted: &[Backend]) {
        self.ot_backends = accepted.to_vec();
    }

    /// Bytes of correlations stored (while the engine is checked out, what
    /// it held then).
    pub fn ot_bytes(&self) -> usize {
        match (&self.ot, self.ot_out) {
            (Some(e), _) => e.store().bytes(),
            (None, Some((store, _))) => store,
            (None, None) => 0,
        }
    }

    /// Bytes this session holds between requests: the client's key, the
    /// shares `s` filed or made for batches still open, the correlations,
    /// the buffers its OT source keeps between batches, and the ids it
    /// remembers. (The input ciphertexts of an op being
    /// received are not included: they belong to the op's HE job, which a
    /// server prices from its layout, [`OfflineJob::memory_bytes`].)
    pub fn stored_bytes(&self) -> usize {
        let open: usize = self
            .batches
            .values()
            .flat_map(|b| b.masks.iter().flatten())
            .map(|rows| rows.iter().map(|r| r.len() * 8 + 24).sum::<usize>())
            .sum();
        self.key.as_ref().map_or(0, ServerKey::memory_bytes)
            + self.store.bytes()
            + open
            + self.ot_bytes()
            + match (&self.ot, self.ot_out) {
                (Some(e), _) => e.retained_bytes() as usize,
                (None, Some((_, retained))) => retained as usize,
                (None, None) => 0,
            }
    }

    /// The most this session's memory may grow while it handles `message`
    /// ([`OtEngine::growth_bound`]; before the engine exists, as a fresh
    /// engine would price it: the setup's first flight), for the transport
    /// to reserve before the work.
    pub fn ot_growth_bound(&self, message: &OtMessage) -> u64 {
        if self.linear.program().is_none() || self.ot_out.is_some() {
            return 0; // refused: no correlations in activations mode, or
            // one message at a time
        }
        match &self.ot {
            Some(e) => e.growth_bound(message),
            None => OtEngine::server(&self.ot_backends, self.max_ot_bytes).growth_bound(message),
        }
    }

    /// Handles a message of the offline phase for correlations (the first
    /// one sets the session's OT engine up); returns the answer, if any.
    /// [`check_out_ot`](Self::check_out_ot), [`OtEngine::handle`] and
    /// [`check_in_ot`](Self::check_in_ot) in a row.
    pub fn handle_ot(&mut self, message: OtMessage) -> Result<Option<OtMessage>, ProtocolError> {
        let mut engine = self.check_out_ot()?;
        let reply = engine.handle(message);
        self.check_in_ot(engine);
        Ok(reply?)
    }

    /// Takes the session's OT engine out (setting it up on first use), so
    /// that a correlation message, whose expansion takes tens to hundreds
    /// of milliseconds, is handled without holding the session: its other
    /// requests (an HE batch's messages) go on meanwhile. While it is out
    /// the session counts what it held then ([`stored_bytes`](Self::stored_bytes)),
    /// a second correlation message is refused (an honest client waits for
    /// its batch's answer before sending another), and so is a private
    /// batch's start, which needs the engine's store: a client may send
    /// one while its pool's batch is in flight, so the transport waits for
    /// the engine ([`ot_checked_out`](Self::ot_checked_out)) before starting
    /// it. The engine must come back with [`check_in_ot`](Self::check_in_ot),
    /// whatever the outcome.
    pub fn check_out_ot(&mut self) -> Result<OtEngine, ProtocolError> {
        if self.linear.program().is_none() {
            return Err(ProtocolError::Ot(
                "this model is served in activations mode, which uses no oblivious transfer".into(),
            ));
        }
        if self.ot_out.is_some() {
            return Err(ProtocolError::Ot(
                "a correlation message arrived while another is being handled".into(),
            ));
        }
        let engine = match self.ot.take() {
            Some(e) => e,
            None => OtEngine::server(&self.ot_backends, self.max_ot_bytes),
        };
        self.ot_out = Some((engine.store().bytes(), engine.retained_bytes()));
        Ok(engine)
    }

    /// Whether the OT engine is checked out ([`check_out_ot`](Self::check_out_ot)):
    /// a private batch's start must wait until it is back.
    pub fn ot_checked_out(&self) -> bool {
        self.ot_out.is_some()
    }

    /// Puts the engine taken by [`check_out_ot`](Self::check_out_ot) back.
    pub fn check_in_ot(&mut self, mut engine: OtEngine) {
        engine.set_budget(self.max_ot_bytes);
        self.ot = Some(engine);
        self.ot_out = None;
    }

    /// Begins a private batch from the client's [`PrivateMessage::Begin`]:
    /// checks the ids and the correlation position, takes the batch's
    /// material (nothing unless all of it is there) and returns the
    /// server's run to drive.
    pub fn begin_private(&mut self, message: PrivateMessage) -> Result<PrivateRun, ProtocolError>
    where
        L: 'static,
    {
        let PrivateMessage::Begin { ids, position } = message else {
            return Err(ProtocolError::Unexpected {
                op: 0,
                problem: "a private batch must begin with Begin".into(),
            });
        };
        let program = self.linear.program().cloned().ok_or_else(|| {
            ProtocolError::Model(
                "this model is served in activations mode; it runs no program".into(),
            )
        })?;
        if ids.is_empty() {
            return Err(ProtocolError::Model(
                "a private batch needs at least one inference".into(),
            ));
        }
        let layers = self.linear.layers().to_vec();
        let cost = program_cost(&program, &layers, ids.len())?;
        for spec in &layers {
            self.store.check(&ids, spec.op_id)?;
        }
        if self.ot_out.is_some() {
            return Err(ProtocolError::Ot(
                "a private batch began while a correlation batch was being made (wait for ot_checked_out)".into(),
            ));
        }
        let correlations = match self.ot.as_mut() {
            Some(engine) => engine.take_at(position, &cost.demand)?,
            // a program without comparisons needs no OT at all
            None if cost.demand.is_zero() => secinfer_ot::CorrelationStore::new(Role::Server),
            None => {
                return Err(ProtocolError::Ot(
                    "a private batch before the correlations' setup".into(),
                ));
            }
        };
        let mut shares = Vec::with_capacity(layers.len());
        for spec in &layers {
            shares.push(self.store.take(&ids, spec.op_id)?.concat());
        }
        let linear = self.linear.clone();
        let eval: LinearEval = Arc::new(move |op, x| linear.evaluate(op, x));
        PrivateRun::start(
            secinfer_mpc::Role::Server,
            program,
            Arc::new(layers),
            ids.len(),
            Vec::new(),
            LinearSide::Server(eval, shares),
            correlations,
        )
    }

    /// Takes the client's public key (once per session), after checking that
    /// it is for this model's HE parameters.
    pub fn accept_hello(&mut self, hello: OfflineHello) -> Result<(), ProtocolError> {
        if self.key.is_some() {
            return Err(ProtocolError::Model(
                "the session already has a client key".into(),
            ));
        }
        let params = params_for(self.linear.layers())?;
        if hello.degree as usize != params.degree() || hello.ring_bits != params.ring_bits() {
            return Err(ProtocolError::Model(format!(
                "client key is for N = {}, t = 2^{}; this model uses N = {}, t = 2^{}",
                hello.degree,
                hello.ring_bits,
                params.degree(),
                params.ring_bits()
            )));
        }
        let key = ServerKey::from_bytes(&params, &hello.public_key)
            .map_err(|e| ProtocolError::Model(format!("client public key: {e}")))?;
        self.key = Some(key);
        Ok(())
    }

    /// Takes a chunk of a batch's encrypted masks. When it completes an op,
    /// computes `Enc(W·r − s)` and hands the reply to `emit` in parts; when the
    /// batch is complete, files `s` for every id of it. A batch that names an
    /// id this session has seen is refused whole. This is [`receive_offline`],
    /// [`OfflineJob::run`] and [`complete_offline`] in one call; a server that
    /// serves online requests while a job runs calls them apart.
    ///
    /// [`receive_offline`]: Self::receive_offline
    /// [`complete_offline`]: Self::complete_offline
    pub fn handle_offline(
        &mut self,
        req: MaskRequest,
        emit: &mut dyn FnMut(ProductReply) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let Some(job) = self.receive_offline(req)? else {
            return Ok(());
        };
        let first = job.first;
        match job.run(&*self.linear, emit) {
            Ok(product) => self.complete_offline(product),
            Err(e) => {
                self.abort_offline(first);
                Err(e)
            }
        }
    }

    /// Takes a chunk of a batch's encrypted masks and checks it against the
    /// batch, without evaluating anything. Returns the op's evaluation job
    /// when this chunk completes the op's inputs.
    ///
    /// Memory per session is bounded: ciphertexts of only one (batch, op)
    /// are buffered at a time (the client sends op after op), at most
    /// [`MAX_BATCHES_IN_FLIGHT`] batches are open, and material already made
    /// plus batches in flight stay within the session's pending limit.
    pub fn receive_offline(
        &mut self,
        req: MaskRequest,
    ) -> Result<Option<OfflineJob>, ProtocolError> {
        let op = req.op;
        let key = self.key.clone().ok_or_else(|| {
            ProtocolError::Model("offline request before the client's key".into())
        })?;
        let layers = self.linear.layers();
        crate::op_spec(layers, op)?;
        let count = req.count as usize;
        let max = key.params().degree();
        if count == 0 || count > max {
            return Err(ProtocolError::Shape {
                op,
                problem: format!("a batch holds 1..={max} inferences, not {count}"),
            });
        }
        if req.ciphertexts.len() > CIPHERTEXTS_PER_MESSAGE {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "{} ciphertexts in one message; at most {CIPHERTEXTS_PER_MESSAGE}",
                    req.ciphertexts.len()
                ),
            });
        }
        let max_ct = key.params().max_ciphertext_bytes();
        if let Some((j, ct)) = req
            .ciphertexts
            .iter()
            .enumerate()
            .find(|(_, c)| c.len() > max_ct)
        {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "ciphertext {} has {} bytes; a ciphertext of these parameters has at most {max_ct}",
                    req.offset as usize + j,
                    ct.len()
                ),
            });
        }
        let first = req.first_id;
        if !self.batches.contains_key(&first) {
            if self.batches.len() >= MAX_BATCHES_IN_FLIGHT {
                return Err(ProtocolError::Model(format!(
                    "{MAX_BATCHES_IN_FLIGHT} preprocessing batches are already in flight"
                )));
            }
            let open: usize = self.batches.values().map(|b| b.count).sum();
            if self.store.live() + open + count > self.max_pending {
                return Err(ProtocolError::Model(format!(
                    "a batch of {count} would exceed this session's limit of {} preprocessed inferences ({} ready, {open} in flight); use some first",
                    self.max_pending,
                    self.store.live()
                )));
            }
            let end = first
                .0
                .checked_add(count as u64)
                .ok_or(ProtocolError::DuplicateId(first))?;
            for id in first.0..end {
                let id = PreprocessingId(id);
                if self.store.known(id) {
                    return Err(ProtocolError::DuplicateId(id));
                }
            }
            if let Some((&other, _)) = self
                .batches
                .iter()
                .find(|(o, b)| first.0 < o.0 + b.count as u64 && o.0 < end)
            {
                return Err(ProtocolError::DuplicateId(PreprocessingId(
                    first.0.max(other.0),
                )));
            }
            let packing: Vec<Packing> = layers
                .iter()
                .map(|spec| packing_for(key.params(), spec, count))
                .collect::<Result<_, _>>()?;
            let replies: u64 = packing.iter().map(|p| p.output_ciphertexts() as u64).sum();
            let counter = self.linear.reply_counter();
            let before = match counter {
                Some(c) => c.fetch_add(replies, Ordering::SeqCst),
                None => self.replies,
            };
            if before.saturating_add(replies) > self.max_replies {
                if let Some(c) = counter {
                    c.fetch_sub(replies, Ordering::SeqCst);
                }
                return Err(ProtocolError::Model(format!(
                    "a batch of {count} needs {replies} replies; the model's weights have been used \
                     for {before} of the {} replies its noise flooding is proven for",
                    self.max_replies
                )));
            }
            self.replies += replies;
            self.batches.insert(
                first,
                ServerBatch {
                    count,
                    packing,
                    inputs: layers.iter().map(|_| Vec::new()).collect(),
                    received: vec![0; layers.len()],
                    masks: vec![None; layers.len()],
                },
            );
        }
        if let Some((other, o)) = self.batches.iter().find_map(|(b, batch)| {
            batch
                .received
                .iter()
                .enumerate()
                .find(|&(o, &r)| {
                    r > 0
                        && r < batch.packing[o].input_ciphertexts()
                        && (*b, o) != (first, op as usize)
                })
                .map(|(o, _)| (*b, o))
        }) {
            return Err(ProtocolError::Unexpected {
                op,
                problem: format!(
                    "op {o} of batch {other} is still incomplete; send one op's ciphertexts at a time"
                ),
            });
        }
        let batch = self
            .batches
            .get_mut(&first)
            .ok_or(ProtocolError::UnknownId(first))?;
        if batch.count != count {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "batch {first} has {} inferences, request says {count}",
                    batch.count
                ),
            });
        }
        let packing = batch.packing[op as usize];
        if req.layout != layout_tag(&packing) {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "the client laid this batch out differently (layout tag {:#x}); the server's \
                     layout is {} (tag {:#x}): are both at the same version?",
                    req.layout,
                    packing.describe(),
                    layout_tag(&packing)
                ),
            });
        }
        let in_len = packing.input_ciphertexts();
        if batch.received[op as usize] >= in_len {
            return Err(ProtocolError::Unexpected {
                op,
                problem: format!("batch {first} already has all ciphertexts of this op"),
            });
        }
        let slots = &mut batch.inputs[op as usize];
        if slots.is_empty() {
            slots.resize(in_len, None);
        }
        let offset = req.offset as usize;
        if offset
            .checked_add(req.ciphertexts.len())
            .is_none_or(|e| e > in_len)
        {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "ciphertexts {offset}..+{} exceed the op's {in_len} input ciphertexts",
                    req.ciphertexts.len()
                ),
            });
        }
        if slots[offset..offset + req.ciphertexts.len()]
            .iter()
            .any(Option::is_some)
        {
            return Err(ProtocolError::Unexpected {
                op,
                problem: format!("ciphertexts from {offset} arrived twice"),
            });
        }
        batch.received[op as usize] += req.ciphertexts.len();
        for (j, ct) in req.ciphertexts.into_iter().enumerate() {
            slots[offset + j] = Some(ct);
        }
        if batch.received[op as usize] < in_len {
            return Ok(None);
        }
        let inputs: Vec<Vec<u8>> = std::mem::take(slots).into_iter().flatten().collect();
        Ok(Some(OfflineJob {
            first,
            op,
            count,
            packing,
            inputs,
            key,
        }))
    }

    /// Files the result of a job from [`receive_offline`](Self::receive_offline);
    /// when it completes its batch, files `s` for every id of it.
    pub fn complete_offline(&mut self, product: OfflineProduct) -> Result<(), ProtocolError> {
        let OfflineProduct { first, op, masks } = product;
        let batch = self
            .batches
            .get_mut(&first)
            .ok_or(ProtocolError::UnknownId(first))?;
        let slot = batch
            .masks
            .get_mut(op as usize)
            .ok_or(ProtocolError::UnknownOp(op))?;
        if slot.is_some() || masks.len() != batch.count {
            return Err(ProtocolError::Unexpected {
                op,
                problem: format!("batch {first} cannot take this product"),
            });
        }
        *slot = Some(masks);
        if batch.masks.iter().all(Option::is_some) {
            let batch = self
                .batches
                .remove(&first)
                .ok_or(ProtocolError::UnknownId(first))?;
            let mut per_op: Vec<_> = batch
                .masks
                .into_iter()
                .flatten()
                .map(Vec::into_iter)
                .collect();
            for b in 0..batch.count {
                let ops = per_op
                    .iter_mut()
                    .map(|it| it.next().unwrap_or_default())
                    .collect();
                self.store
                    .insert(PreprocessingId(first.0 + b as u64), ops)?;
            }
        }
        Ok(())
    }

    /// Drops batch `first` and everything buffered for it (its job failed or
    /// its reply could not be delivered). Its ids stay unusable.
    pub fn abort_offline(&mut self, first: PreprocessingId) {
        if let Some(batch) = self.batches.remove(&first) {
            for b in 0..batch.count {
                self.store.retire(PreprocessingId(first.0 + b as u64));
            }
        }
    }

    /// The server's linear layers.
    pub fn linear(&self) -> &Arc<L> {
        &self.linear
    }

    /// Sets how many preprocessed inferences (ready plus in flight) this
    /// session may hold; the default is [`DEFAULT_MAX_PENDING`].
    pub fn set_max_pending(&mut self, max: usize) {
        self.max_pending = max;
    }

    /// Preprocessing batches started by the client and not yet complete.
    pub fn batches_in_flight(&self) -> usize {
        self.batches.len()
    }

    /// Files the server's share `s` of one inference's material, made
    /// elsewhere (tests' in-the-clear dealer only).
    #[cfg(test)]
    pub(crate) fn accept_preprocessing(&mut self, m: ServerMaterial) -> Result<(), ProtocolError> {
        let layers = self.linear.layers();
        if m.ops.len() != layers.len() {
            return Err(ProtocolError::Model(format!(
                "material {} has {} ops, model has {}",
                m.id,
                m.ops.len(),
                layers.len()
            )));
        }
        for (spec, s) in layers.iter().zip(&m.ops) {
            if s.len() != spec.output_len() {
                return Err(ProtocolError::Shape {
                    op: spec.op_id,
                    problem: format!(
                        "share has {} elements, output has {}",
                        s.len(),
                        spec.output_len()
                    ),
                });
            }
        }
        self.store.insert(m.id, m.ops)
    }

    /// Number of inferences whose material is (at least partly) unused.
    pub fn pending_material(&self) -> usize {
        self.store.live()
    }

    /// Answers `x − r` with `W·(x − r) + b + s`. The request is checked whole
    /// (op, ids, shape, ring) before any material is consumed.
    pub fn handle(&mut self, req: MaskedInput) -> Result<MaskedOutput, ProtocolError> {
        let op = req.op;
        // In a private mode the answer `W·(x − r) + b + s` would hand the
        // client the linear op's exact output for an input of its choice,
        // which is what the mode exists to prevent: only private batches run.
        if let Some(program) = self.linear.program() {
            return Err(ProtocolError::Model(format!(
                "this model is served in --reveal {} mode: linear ops run only inside private batches, never answered one by one",
                program.reveal
            )));
        }
        let (spec, ring) = crate::op_spec(self.linear.layers(), op)?;
        let x = req.masked.into_tensor(op)?;
        let n = spec
            .samples_in_input(x.shape())
            .map_err(|problem| ProtocolError::Shape { op, problem })?;
        if n != req.ids.len() {
            return Err(ProtocolError::Shape {
                op,
                problem: format!("{n} samples but {} preprocessing ids", req.ids.len()),
            });
        }
        check_ring(op, ring.bits(), x.iter())?;
        self.store.check(&req.ids, op)?;
        let expected = spec.batch_output_shape(n);
        let mut y = self
            .linear
            .evaluate(op, x)
            .map_err(|problem| ProtocolError::Evaluation { op, problem })?;
        if y.shape() != expected.as_slice() {
            return Err(ProtocolError::Evaluation {
                op,
                problem: format!("produced shape {:?}, expected {:?}", y.shape(), expected),
            });
        }
        let shares = self.store.take(&req.ids, op)?;
        let out_len = spec.output_len();
        let flat = y.as_slice_mut().ok_or_else(|| ProtocolError::Evaluation {
            op,
            problem: "output not contiguous".into(),
        })?;
        for (chunk, s) in flat.chunks_mut(out_len).zip(&shares) {
            for (v, s) in chunk.iter_mut().zip(s) {
                *v = ring.reduce(v.wrapping_add(*s));
            }
        }
        Ok(MaskedOutput {
            op,
            ids: req.ids,
            masked: WireTensor::from_tensor(y),
        })
    }
}

pub(crate) fn check_ring<'a>(
    op: OpId,
    bits: u32,
    values: impl Iterator<Item = &'a u64>,
) -> Result<(), ProtocolError> {
    if bits >= 64 {
        return Ok(());
    }
    for (index, &value) in values.enumerate() {
        if value >> bits != 0 {
            return Err(ProtocolError::NotInRing {
                op,
                index,
                value,
                bits,
            });
        }
    }
    Ok(())
}
