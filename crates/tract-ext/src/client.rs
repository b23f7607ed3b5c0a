//! Client side: the bound SecureLinear op, the backend it calls (fixed-point
//! encoding + the protocol's client session + a channel to the server), the
//! offline driver and its background pool, and the client model that runs
//! `client.onnx` with it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, anyhow, bail};
use ndarray::{ArrayD, ArrayViewD, Dimension};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use secinfer_model::{LayerSpec, Program, Reveal, Role, read_contract};
use secinfer_ot::{Demand, OtEngine, OtMessage};
use secinfer_protocol::private::{PrivateMessage, PrivateRun, Revealed, program_cost};
pub use secinfer_protocol::{Channel, Traffic};
use secinfer_protocol::{
    ClientMaterial, ClientSession, MaskRequest, MaskedInput, MaskedLinear, MaskedOutput,
    OfflineHello, PoolPolicy, PreprocessingId, Preprocessor, ProductReply, ProtocolError,
    ServerSession,
};

use crate::private::{PrivatePlan, split_demand};

/// Most random OTs one correlation request makes per direction: an IKNP
/// message of 16 bytes per OT stays at 32 MiB, half the default frame limit.
pub const MAX_OTS_PER_REQUEST: u64 = 1 << 21;

/// Bytes of correlations the client keeps ready at most by default (half
/// the server's default limit per session).
pub const DEFAULT_CORRELATION_BUDGET: u64 = 256 << 20;

/// Evaluates one SecureLinear op for the client on real-valued inputs.
pub trait SecureLinearBackend: Send + Sync + std::fmt::Debug {
    /// `W·x + b` for op `spec`, computed jointly with the server.
    fn secure_linear(&self, spec: &LayerSpec, x: ArrayViewD<f32>) -> anyhow::Result<ArrayD<f32>>;
}

/// The bound client op: typed, f32 in and out.
#[derive(Debug, Clone)]
pub struct ClientSecureLinear {
    /// what the op computes
    pub spec: Arc<LayerSpec>,
    /// the session
    pub backend: Arc<dyn SecureLinearBackend>,
}

impl PartialEq for ClientSecureLinear {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec && Arc::ptr_eq(&self.backend, &other.backend)
    }
}
impl Eq for ClientSecureLinear {}

impl Op for ClientSecureLinear {
    fn name(&self) -> StaticName {
        "SecureLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("op {} (client)", self.spec.op_id)])
    }

    op_as_typed_op!();
}

impl EvalOp for ClientSecureLinear {
    // It talks to a server: never evaluated outside a plan.
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let x = x.cast_to::<f32>()?;
        let y = self
            .backend
            .secure_linear(&self.spec, x.to_plain_array_view::<f32>()?)?;
        Ok(tvec!(y.into_tensor().into_tvalue()))
    }
}

impl TypedOp for ClientSecureLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = crate::output_shape(&self.spec, &inputs[0].shape.to_tvec())?;
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

struct ClientState {
    session: ClientSession,
    /// Ids of the inferences of the run in progress.
    current: Vec<PreprocessingId>,
    /// Inferences a waiting prediction needs (the pool refills up to this).
    demand: usize,
    /// Why the background pool stopped, if it failed.
    pool_error: Option<String>,
    /// Why the pool's correlation thread stopped, if it failed.
    correlations_error: Option<String>,
    /// Whether a background pool is running.
    pool_running: bool,
    /// private batches run so far
    runs: RunStats,
    /// Bumped (under this lock) whenever correlations are taken, so that the
    /// pool's correlation thread never misses a wake-up.
    correlations_taken: u64,
}

/// The client's backend: encodes, masks through the protocol session, calls
/// the channel, unmasks and decodes; and drives the offline phase.
pub struct SessionBackend<C: Channel> {
    state: Mutex<ClientState>,
    /// signalled when material arrives or the pool stops
    changed: Condvar,
    /// the offline engine (the client's HE key and batches in flight)
    offline: Mutex<Option<Preprocessor>>,
    /// [`SessionBackend::max_batch`], computed on first use
    max_batch: std::sync::OnceLock<usize>,
    /// the correlations' engine and store (private modes)
    ot: Mutex<Option<OtEngine>>,
    /// the OT backend the session's correlations will use
    ot_backend: Mutex<secinfer_ot::Backend>,
    /// correlations one inference consumes (private modes; set by
    /// [`ClientModel`]), which the pool keeps ready
    per_inference: std::sync::OnceLock<Demand>,
    /// private batches whose correlations are ready, waiting to take them:
    /// the pool's correlation thread makes no new request while one waits,
    /// since the OT engine's lock (held for a request's round trip) does
    /// not go to the longest waiter
    takers: AtomicUsize,
    channel: C,
}

/// What one private batch cost, as the client saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// private batches run
    pub batches: u64,
    /// messages the client waited for (round trips), summed over batches
    pub round_trips: u64,
    /// batches that found too few correlations ready and made them first
    pub correlations_made_on_demand: u64,
}

impl<C: Channel> std::fmt::Debug for SessionBackend<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionBackend")
    }
}

impl<C: Channel> SessionBackend<C> {
    /// A backend for a session over `channel`.
    pub fn new(session: ClientSession, channel: C) -> Self {
        SessionBackend {
            state: Mutex::new(ClientState {
                session,
                current: vec![],
                demand: 0,
                pool_error: None,
                correlations_error: None,
                pool_running: false,
                runs: RunStats::default(),
                correlations_taken: 0,
            }),
            changed: Condvar::new(),
            offline: Mutex::new(None),
            max_batch: std::sync::OnceLock::new(),
            ot: Mutex::new(None),
            ot_backend: Mutex::new(secinfer_ot::Backend::default()),
            per_inference: std::sync::OnceLock::new(),
            takers: AtomicUsize::new(0),
            channel,
        }
    }

    /// Declares the correlations one inference consumes, so that a
    /// [`PreprocessingPool`] keeps them ready (set once, by the private
    /// modes' [`ClientModel`]).
    pub fn set_correlations_per_inference(&self, per: Demand) -> anyhow::Result<()> {
        self.per_inference
            .set(per)
            .map_err(|_| anyhow!("the correlations per inference are already set"))
    }

    /// Inferences the correlations ready would cover (`None` outside the
    /// private modes).
    pub fn correlations_ready_for(&self) -> Option<u64> {
        let per = self.per_inference.get()?;
        Some(self.correlations_ready().times_in(per))
    }

    /// Waits until the correlations ready cover `n` inferences (a pool
    /// makes them) or `limit` passes; returns whether they do. Outside the
    /// private modes nothing is needed: `true` at once.
    pub fn wait_for_correlations(
        &self,
        n: u64,
        limit: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.correlations_ready_for().is_none_or(|have| have >= n) {
                return Ok(true);
            }
            if let Some(e) = &self.lock()?.correlations_error {
                bail!("the pool stopped making correlations: {e}");
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // woken when correlations arrive; the slice bounds a missed wake-up
            let state = self.lock()?;
            let slice = left.min(std::time::Duration::from_millis(50));
            drop(
                self.changed
                    .wait_timeout(state, slice)
                    .map_err(|_| anyhow!("client session poisoned by an earlier panic"))?,
            );
        }
    }

    /// Chooses the OT backend for the correlations (before the first are
    /// made; silent OT by default, IKNP for comparison). Refused once the
    /// session's correlation setup has run.
    pub fn set_ot_backend(&self, backend: secinfer_ot::Backend) -> anyhow::Result<()> {
        // the engine's lock is held throughout, so that a pool cannot make
        // the engine between the check and the choice
        let engine = self.ot_engine()?;
        if engine.is_some() {
            bail!("the OT backend is chosen before the first correlations are made");
        }
        *self
            .ot_backend
            .lock()
            .map_err(|_| anyhow!("OT backend choice poisoned"))? = backend;
        drop(engine);
        Ok(())
    }

    /// The OT backend the correlations use.
    pub fn ot_backend(&self) -> secinfer_ot::Backend {
        self.ot_backend
            .lock()
            .map_or_else(|p| *p.into_inner(), |b| *b)
    }

    fn ot_engine(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Option<OtEngine>>> {
        self.ot
            .lock()
            .map_err(|_| anyhow!("correlation engine poisoned by an earlier panic"))
    }

    /// Correlations ready (what is left in the client's store).
    pub fn correlations_ready(&self) -> Demand {
        self.ot_engine()
            .ok()
            .and_then(|g| g.as_ref().map(|e| e.store().available()))
            .unwrap_or_default()
    }

    /// Makes `demand` more correlations with the server (the offline phase of
    /// the private modes): a setup once per session, then extension in
    /// requests of at most [`MAX_OTS_PER_REQUEST`] OTs per direction, from
    /// the chosen backend ([`set_ot_backend`](Self::set_ot_backend)).
    pub fn make_correlations(&self, demand: Demand) -> anyhow::Result<()> {
        let mut guard = self.ot_engine()?;
        if guard.is_none() {
            let mut engine = OtEngine::client(self.ot_backend(), u64::MAX)?;
            let mut next = Some(engine.start_setup()?);
            while let Some(m) = next.take() {
                if let Some(reply) = self
                    .channel
                    .ot(m)
                    .context("setting up oblivious transfer with the server")?
                {
                    next = engine.handle(reply)?;
                }
            }
            if !engine.is_ready() {
                bail!("the server did not complete the oblivious-transfer setup");
            }
            *guard = Some(engine);
        }
        let engine = guard
            .as_mut()
            .ok_or_else(|| anyhow!("no correlation engine"))?;
        for part in split_demand(demand, MAX_OTS_PER_REQUEST) {
            let request = engine.request(part)?;
            let reply = self
                .channel
                .ot(request)
                .context("making correlations with the server")?
                .ok_or_else(|| anyhow!("the server did not answer a correlation request"))?;
            if let Some(m) = engine.handle(reply)? {
                bail!(
                    "the correlation engine wants to send {m:?} after a batch; the server's answer was incomplete"
                );
            }
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Runs `program` jointly on the current prediction's `n` inferences
    /// (after [`begin`](Self::begin)): takes their HE material and exactly the
    /// correlations the batch consumes (making more first if the store is
    /// short), drives the client's run against the server and returns what
    /// the program reveals.
    pub fn run_private(
        &self,
        program: &Arc<Program>,
        inputs: Vec<secinfer_ring::RingTensor>,
    ) -> anyhow::Result<Vec<Revealed>> {
        let (ids, layers) = {
            let st = self.lock()?;
            (st.current.clone(), st.session.layers().to_vec())
        };
        let demand = program_cost(program, &layers, ids.len())?.demand;
        let short = {
            let have = self.correlations_ready();
            (!demand.fits_in(&have)).then(|| demand.shortfall(&have))
        };
        if let Some(missing) = short {
            self.make_correlations(missing)?;
            if let Ok(mut st) = self.lock() {
                st.runs.correlations_made_on_demand += 1;
            }
        }
        // with its correlations ready, this batch only needs the engine's
        // lock to take them: the pool's correlation thread makes no new
        // request until it has (it would hold the lock for a round trip)
        let taking = Taking::new(self);
        let (position, correlations) = {
            let mut guard = self.ot_engine()?;
            match guard.as_mut() {
                Some(engine) => (engine.position(), engine.store_mut().split_off(&demand)?),
                // a program without comparisons needs no OT at all
                None if demand.is_zero() => (
                    secinfer_ot::Position::default(),
                    secinfer_ot::CorrelationStore::new(secinfer_ot::Role::Client),
                ),
                None => bail!("no correlation engine"),
            }
        };
        drop(taking);
        // the pool refills what was taken
        self.lock()?.correlations_taken += 1;
        self.changed.notify_all();
        let (begin, mut run) =
            self.lock()?
                .session
                .begin_private(program, &ids, inputs, correlations, position)?;
        self.channel.send_private(begin)?;
        let report = drive(&mut run, &self.channel)?;
        if let Ok(mut st) = self.lock() {
            st.runs.batches += 1;
            st.runs.round_trips += report.stats.messages_received;
        }
        Ok(report.revealed)
    }

    /// Private batches run so far, and their round trips.
    pub fn run_stats(&self) -> RunStats {
        self.lock().map(|s| s.runs).unwrap_or_default()
    }

    /// Runs one offline batch of `count` inferences (at most the HE ring
    /// degree, 8192) with the server and files the material. The first call
    /// makes the session's HE key and sends it.
    pub fn preprocess(&self, count: usize) -> anyhow::Result<()> {
        let mut guard = self
            .offline
            .lock()
            .map_err(|_| anyhow!("offline engine poisoned by an earlier panic"))?;
        if guard.is_none() {
            let layers = self.lock()?.session.layers().to_vec();
            let pre = Preprocessor::new(layers)?;
            self.channel
                .hello(pre.hello())
                .context("sending the HE public key")?;
            *guard = Some(pre);
        }
        let pre = guard.as_mut().ok_or_else(|| anyhow!("no offline engine"))?;
        let first = pre.start(count)?;
        let result = (|| -> anyhow::Result<()> {
            while let Some(req) = pre.next_request(first)? {
                self.channel.offline(req, &mut |reply| {
                    for m in pre.accept(reply)? {
                        self.lock()?.session.accept_preprocessing(m)?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })();
        let incomplete = pre.in_flight() > 0;
        if result.is_err() || incomplete {
            pre.abandon(first);
        }
        let result = result.and_then(|()| {
            if incomplete {
                bail!("the server did not answer every op of offline batch {first}");
            }
            Ok(())
        });
        self.changed.notify_all();
        result
    }

    /// The most inferences one offline batch of this model may hold
    /// ([`secinfer_protocol::offline::max_batch`]: memory on both sides is
    /// bounded by it), and no more than the server lets a session hold.
    pub fn max_batch(&self) -> anyhow::Result<usize> {
        if let Some(&m) = self.max_batch.get() {
            return Ok(m);
        }
        let layers = self.lock()?.session.layers().to_vec();
        let params = secinfer_protocol::params_for(&layers)?;
        let m = secinfer_protocol::offline::max_batch(&params, &layers)?
            .min(self.channel.max_pending().unwrap_or(usize::MAX))
            .max(1);
        Ok(*self.max_batch.get_or_init(|| m))
    }

    /// Preprocesses `total` inferences in batches of at most `batch` (and
    /// at most [`max_batch`](Self::max_batch)).
    pub fn preprocess_in_batches(&self, total: usize, batch: usize) -> anyhow::Result<()> {
        let batch = batch.clamp(1, self.max_batch()?);
        let mut left = total;
        while left > 0 {
            let n = left.min(batch);
            self.preprocess(n)?;
            left -= n;
        }
        Ok(())
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, ClientState>> {
        self.state
            .lock()
            .map_err(|_| anyhow!("client session poisoned by an earlier panic"))
    }

    /// Files offline material.
    pub fn accept_preprocessing(&self, m: ClientMaterial) -> Result<(), ProtocolError> {
        self.lock()
            .map_err(|e| ProtocolError::Model(e.to_string()))?
            .session
            .accept_preprocessing(m)
    }

    /// Inferences' worth of material ready.
    pub fn ready(&self) -> usize {
        self.lock().map(|s| s.session.ready()).unwrap_or(0)
    }

    /// The channel.
    pub fn channel(&self) -> &C {
        &self.channel
    }

    fn begin(&self, n: usize) -> anyhow::Result<()> {
        let mut st = self.lock()?;
        if !st.current.is_empty() {
            bail!("a prediction is already running on this session");
        }
        while st.session.ready() < n && st.pool_running {
            st.demand = n;
            self.changed.notify_all();
            st = self
                .changed
                .wait(st)
                .map_err(|_| anyhow!("client session poisoned by an earlier panic"))?;
        }
        st.demand = 0;
        if st.session.ready() < n
            && let Some(e) = &st.pool_error
        {
            bail!("the preprocessing pool stopped: {e}");
        }
        st.current = st.session.reserve(n)?;
        self.changed.notify_all();
        Ok(())
    }

    fn end(&self) {
        if let Ok(mut st) = self.lock() {
            let ids = std::mem::take(&mut st.current);
            st.session.retire(&ids);
        }
    }
}

impl<C: Channel> SessionBackend<C> {
    /// Sends `request`, split along the batch axis into as many round trips
    /// as the channel's message limit needs (answers can be larger than
    /// requests: a convolution's output), and joins the answers.
    fn round_trips(&self, spec: &LayerSpec, request: MaskedInput) -> anyhow::Result<MaskedOutput> {
        let rows = request.ids.len();
        // Worst case per sample on the wire: 10 bytes per element (a u64
        // varint), input or output, whichever is larger.
        let per_row = 10 * spec.input_len().max(spec.output_len()) + 16;
        let fit = (self.channel.max_message_bytes().saturating_sub(4096) / per_row).max(1);
        let splittable = request.masked.shape.first() == Some(&(rows as u64))
            && request.masked.data.len().is_multiple_of(rows.max(1));
        if rows <= fit || !splittable {
            return self.channel.round_trip(request);
        }
        let width = request.masked.data.len() / rows;
        let MaskedInput { op, ids, masked } = request;
        let mut joined: Option<MaskedOutput> = None;
        for (chunk_ids, chunk) in ids.chunks(fit).zip(masked.data.chunks(fit * width)) {
            let mut shape = masked.shape.clone();
            shape[0] = chunk_ids.len() as u64;
            let part = self.channel.round_trip(MaskedInput {
                op,
                ids: chunk_ids.to_vec(),
                masked: secinfer_protocol::WireTensor {
                    shape,
                    data: chunk.to_vec(),
                },
            })?;
            match &mut joined {
                None => joined = Some(part),
                Some(all) => {
                    if all.masked.shape.get(1..) != part.masked.shape.get(1..) {
                        bail!("op {op}: the server's answers to one batch have different shapes");
                    }
                    all.ids.extend(part.ids);
                    all.masked.data.extend(part.masked.data);
                    if let Some(n) = all.masked.shape.first_mut() {
                        *n += part.masked.shape.first().copied().unwrap_or(0);
                    }
                }
            }
        }
        joined.ok_or_else(|| anyhow!("op {op}: empty batch"))
    }
}

impl<C: Channel> SecureLinearBackend for SessionBackend<C> {
    fn secure_linear(&self, spec: &LayerSpec, x: ArrayViewD<f32>) -> anyhow::Result<ArrayD<f32>> {
        let ring = spec.ring()?;
        // A plain scan; the multi-index is worked out only for the message.
        let bad = x
            .iter()
            .position(|v| !v.is_finite() || v.abs() > spec.input_bound);
        if let Some((ix, v)) = bad.and_then(|i| x.indexed_iter().nth(i)) {
            bail!(
                "SecureLinear op {} ('{}'): input value {v} at {:?} is {}; the model was converted for |x| <= {} (convert again with a larger --input-bound)",
                spec.op_id,
                spec.source_node,
                ix.slice(),
                if v.is_finite() {
                    "out of range"
                } else {
                    "not a number"
                },
                spec.input_bound
            );
        }
        let xq = secinfer_ring::encode_tensor(ring, x, spec.input_frac_bits)?;
        let request = {
            let mut st = self.lock()?;
            let ids = st.current.clone();
            st.session.mask(spec.op_id, &ids, &xq)?
        };
        let response = match self.round_trips(spec, request) {
            Ok(r) => r,
            Err(e) => {
                // no answer will come: the op must not stay "in flight"
                if let Ok(mut st) = self.lock() {
                    st.session.abandon(spec.op_id);
                }
                return Err(e);
            }
        };
        let y = self.lock()?.session.unmask(response)?;
        Ok(secinfer_ring::decode_tensor(
            ring,
            y.view(),
            spec.output_frac_bits(),
        ))
    }
}

/// Drives the client's run over the channel until it ends.
fn drive<C: Channel + ?Sized>(
    run: &mut PrivateRun,
    channel: &C,
) -> anyhow::Result<secinfer_protocol::private::RunReport> {
    loop {
        while let Some(m) = run.poll_transmit() {
            channel.send_private(PrivateMessage::Step(m))?;
        }
        if let Some(out) = run.poll_output() {
            return Ok(out?);
        }
        match channel.recv_private()? {
            PrivateMessage::Step(m) => run.handle(m),
            PrivateMessage::Begin { .. } => {
                bail!("the server sent a Begin message; only clients begin batches")
            }
        }
    }
}

/// Inferences per offline batch at most (the HE ring degree).
pub const MAX_BATCH: usize = 8192;

/// Keeps a client session supplied with offline material from background
/// threads: whenever fewer than the policy's low-water mark (or fewer than a
/// waiting prediction needs) are ready, one thread runs an HE batch; in the
/// private modes a second thread keeps correlations for up to one batch of
/// inferences (within half the client's correlation budget) on their own
/// stream, so that OT expansion runs while HE batches do. Dropping the pool
/// stops it after the batches in progress.
pub struct PreprocessingPool {
    stop: Arc<AtomicBool>,
    wake: Arc<dyn Fn() + Send + Sync>,
    threads: Vec<JoinHandle<()>>,
}

impl PreprocessingPool {
    /// Starts filling `backend` according to `policy`.
    pub fn start<C: Channel + 'static>(
        backend: Arc<SessionBackend<C>>,
        policy: PoolPolicy,
    ) -> anyhow::Result<PreprocessingPool> {
        if policy.batch == 0 || policy.batch > MAX_BATCH {
            bail!(
                "pool batch size must be 1..={MAX_BATCH}, not {}",
                policy.batch
            );
        }
        // memory on both sides bounds a batch, whatever the policy asks
        let policy = PoolPolicy {
            batch: policy.batch.min(backend.max_batch()?),
            ..policy
        };
        backend.lock()?.pool_running = true;
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (backend.clone(), stop.clone());
        let mut threads = vec![
            std::thread::Builder::new()
                .name("secinfer-preprocessing".into())
                .spawn(move || {
                    let outcome = keep_material(&b, policy, &st);
                    if let Ok(mut state) = b.lock() {
                        state.pool_running = false;
                        if let Err(e) = outcome {
                            state.pool_error = Some(format!("{e:#}"));
                        }
                    }
                    b.changed.notify_all();
                })?,
        ];
        if let Some(&per) = backend.per_inference.get()
            && !per.is_zero()
        {
            let (b, st) = (backend.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name("secinfer-correlations".into())
                .spawn(move || {
                    if let Err(e) = keep_correlations(&b, per, policy, &st)
                        && let Ok(mut state) = b.lock()
                    {
                        state.correlations_error = Some(format!("{e:#}"));
                    }
                    b.changed.notify_all();
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // stop the HE thread rather than leave it running
                    stop.store(true, Ordering::SeqCst);
                    if let Ok(_state) = backend.lock() {
                        backend.changed.notify_all();
                    }
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e.into());
                }
            }
        }
        let b = backend.clone();
        Ok(PreprocessingPool {
            stop,
            // under the state lock, so that a thread between its check of
            // `stop` and its wait cannot miss the wake-up
            wake: Arc::new(move || {
                let _state = b.lock();
                b.changed.notify_all();
            }),
            threads,
        })
    }

    /// Stops the pool and waits for its threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        (self.wake)();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for PreprocessingPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The pool's HE thread: runs a batch whenever fewer inferences than the
/// low-water mark (or a waiting prediction's demand) are ready.
fn keep_material<C: Channel>(
    b: &SessionBackend<C>,
    policy: PoolPolicy,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    loop {
        let next = {
            let mut state = b.lock()?;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let ready = state.session.ready();
                let low = policy.low_water.max(state.demand);
                let want = PoolPolicy {
                    low_water: low,
                    ..policy
                }
                .next_batch(ready, 0);
                if let Some(n) = want {
                    break n;
                }
                state = b
                    .changed
                    .wait(state)
                    .map_err(|_| anyhow!("session poisoned"))?;
            }
        };
        b.preprocess(next)?;
    }
}

/// Counts a private batch in [`SessionBackend::takers`] until dropped, and
/// then wakes the pool (which stood back meanwhile), whether the batch took
/// its correlations or failed.
struct Taking<'a, C: Channel>(&'a SessionBackend<C>);

impl<'a, C: Channel> Taking<'a, C> {
    fn new(b: &'a SessionBackend<C>) -> Taking<'a, C> {
        b.takers.fetch_add(1, Ordering::SeqCst);
        Taking(b)
    }
}

impl<C: Channel> Drop for Taking<'_, C> {
    fn drop(&mut self) {
        self.0.takers.fetch_sub(1, Ordering::SeqCst);
        // under the state lock, so that the pool between its check and its
        // wait cannot miss the wake-up
        if let Ok(_state) = self.0.lock() {
            self.0.changed.notify_all();
        }
    }
}

/// The pool's correlation thread: once the correlations ready cover fewer
/// inferences than the low-water mark, makes them up to one batch's worth,
/// one request at a time, both within half the client's correlation budget.
fn keep_correlations<C: Channel>(
    b: &SessionBackend<C>,
    per: Demand,
    policy: PoolPolicy,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let most = (DEFAULT_CORRELATION_BUDGET / 2 / per.stored_bytes().max(1)).max(1);
    let keep = (policy.batch as u64).min(most);
    let low = (policy.low_water as u64).clamp(1, keep);
    // below the low-water mark the pool fills up to `keep`, one request at
    // a time, before it waits again (without this it made one request and
    // waited, keeping barely more than the mark)
    let mut filling = false;
    loop {
        let taken = b.lock()?.correlations_taken;
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // read without the state lock: the OT engine's lock may be held by
        // a batch in progress for a while
        let have = b.correlations_ready();
        let ready = have.times_in(&per);
        filling = ready < keep && (filling || ready < low);
        // a private batch waiting to take ready correlations goes first
        if filling && b.takers.load(Ordering::SeqCst) == 0 {
            let want = per
                .times(keep)
                .ok_or_else(|| anyhow!("correlations for {keep} inferences overflow"))?;
            // one request at a time: between requests a prediction can take
            // what is ready, and a stop is seen
            let short = want.shortfall(&have);
            if let Some(&part) = split_demand(short, MAX_OTS_PER_REQUEST).first() {
                b.make_correlations(part)?;
            }
            continue;
        }
        let state = b.lock()?;
        if state.correlations_taken == taken && !stop.load(Ordering::SeqCst) {
            // nothing taken since the check: wait for the next prediction
            drop(
                b.changed
                    .wait(state)
                    .map_err(|_| anyhow!("session poisoned"))?,
            );
        }
    }
}

/// The server in the same process: serialised messages are not needed, but
/// the bytes that would travel are counted.
pub struct InMemoryChannel<L: MaskedLinear + ?Sized> {
    server: Mutex<ServerSession<L>>,
    /// the server's run of the private batch in progress, and what it sent
    private: Mutex<(
        Option<PrivateRun>,
        std::collections::VecDeque<PrivateMessage>,
    )>,
    bytes: [std::sync::atomic::AtomicU64; 6],
}

impl<L: MaskedLinear + ?Sized> InMemoryChannel<L> {
    /// A channel to a fresh server session for `linear`.
    pub fn new(linear: Arc<L>) -> Self {
        InMemoryChannel {
            server: Mutex::new(ServerSession::new(linear)),
            private: Mutex::new((None, Default::default())),
            bytes: Default::default(),
        }
    }

    fn count(&self, i: usize, n: usize) {
        self.bytes[i].fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn server(&self) -> anyhow::Result<std::sync::MutexGuard<'_, ServerSession<L>>> {
        self.server
            .lock()
            .map_err(|_| anyhow!("server session poisoned"))
    }
}

impl<L: MaskedLinear + ?Sized + 'static> Channel for InMemoryChannel<L> {
    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<MaskedOutput> {
        self.count(
            0,
            request.masked.payload_bytes() + 8 * request.ids.len() + 4,
        );
        let out = self.server()?.handle(request)?;
        self.count(1, out.masked.payload_bytes() + 8 * out.ids.len() + 4);
        Ok(out)
    }

    fn hello(&self, hello: OfflineHello) -> anyhow::Result<()> {
        self.count(2, hello.public_key.len() + 8);
        self.server()?.accept_hello(hello)?;
        Ok(())
    }

    fn offline(
        &self,
        request: MaskRequest,
        on_reply: &mut dyn FnMut(ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.count(2, request.payload_bytes() + 24);
        // The session lock is held only to file the chunk and the result, not
        // while the HE job runs, so online requests are not held up by it.
        let Some(job) = self.server()?.receive_offline(request)? else {
            return Ok(());
        };
        let first = job.batch();
        let linear = self.server()?.linear().clone();
        let mut failure = None;
        let product = job.run(&*linear, &mut |reply| {
            self.count(3, reply.payload_bytes() + 16);
            on_reply(reply).map_err(|e| {
                let msg = format!("{e:#}");
                failure = Some(e);
                ProtocolError::Model(msg)
            })
        });
        match (product, failure) {
            (Ok(p), None) => Ok(self.server()?.complete_offline(p)?),
            (Ok(_), Some(e)) | (Err(_), Some(e)) => {
                self.server()?.abort_offline(first);
                Err(e)
            }
            (Err(e), None) => {
                self.server()?.abort_offline(first);
                Err(e.into())
            }
        }
    }

    fn ot(&self, message: OtMessage) -> anyhow::Result<Option<OtMessage>> {
        self.count(4, message.payload_len() + 16);
        let reply = self.server()?.handle_ot(message)?;
        if let Some(r) = &reply {
            self.count(5, r.payload_len() + 16);
        }
        Ok(reply)
    }

    fn send_private(&self, message: PrivateMessage) -> anyhow::Result<()> {
        self.count(0, message.payload_bytes());
        let mut guard = self
            .private
            .lock()
            .map_err(|_| anyhow!("server run poisoned"))?;
        let (run, outbox) = &mut *guard;
        match message {
            PrivateMessage::Begin { .. } => {
                if run.is_some() {
                    bail!("a private batch began while another runs");
                }
                *run = Some(self.server()?.begin_private(message)?);
            }
            PrivateMessage::Step(m) => run
                .as_mut()
                .ok_or_else(|| anyhow!("a private step with no batch in progress"))?
                .handle(m),
        }
        if let Some(r) = run.as_mut() {
            while let Some(m) = r.poll_transmit() {
                let m = PrivateMessage::Step(m);
                self.count(1, m.payload_bytes());
                outbox.push_back(m);
            }
            if let Some(done) = r.poll_output() {
                *run = None;
                done?;
            }
        }
        Ok(())
    }

    fn recv_private(&self) -> anyhow::Result<PrivateMessage> {
        let mut guard = self
            .private
            .lock()
            .map_err(|_| anyhow!("server run poisoned"))?;
        guard
            .1
            .pop_front()
            .ok_or_else(|| anyhow!("the server has nothing to send: both parties wait"))
    }

    fn traffic(&self) -> Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        let b = |i: usize| self.bytes[i].load(Relaxed);
        Traffic {
            online_up: b(0),
            online_down: b(1),
            offline_up: b(2),
            offline_down: b(3),
            ot_up: b(4),
            ot_down: b(5),
        }
    }
}

/// How a client model computes: the whole graph in tract with bound
/// SecureLinear ops (`activations`), or prefix, joint program and suffix
/// (`logits`, `argmax`).
enum Engine {
    Activations(Arc<TypedRunnableModel>),
    Private(PrivatePlan),
}

/// `client.onnx` loaded and bound to a backend, ready to predict.
pub struct ClientModel<C: Channel + 'static> {
    engine: Engine,
    backend: Arc<SessionBackend<C>>,
    layers: Vec<LayerSpec>,
    digest: String,
    reveal: Reveal,
    batched: bool,
}

impl<C: Channel + 'static> ClientModel<C> {
    /// Loads `client.onnx` and binds its SecureLinear ops to a new session over `channel`.
    pub fn load(path: &Path, channel: C) -> anyhow::Result<Self> {
        Self::load_with(path, |_, _| Ok(channel))
    }

    /// Loads `client.onnx`, then opens the channel with `connect`, which is
    /// given the model's digest and reveal mode (a network channel sends both
    /// in its handshake so the server can refuse a mismatched model).
    pub fn load_with(
        path: &Path,
        connect: impl FnOnce(&str, Reveal) -> anyhow::Result<C>,
    ) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let context = || format!("loading client model {}", path.display());
        let proto = pb::ModelProto::decode(&bytes[..])
            .map_err(|e| anyhow!("not an ONNX model: {e}"))
            .with_context(context)?;
        let contract = read_contract(&proto).with_context(context)?;
        // Connection errors are reported as they are, not as model errors.
        let channel = connect(&contract.digest, contract.reveal)?;
        Self::from_bytes(&bytes, channel).with_context(context)
    }

    /// As [`load`](Self::load), from bytes.
    pub fn from_bytes(bytes: &[u8], channel: C) -> anyhow::Result<Self> {
        Self::from_bytes_with(bytes, |_, _| Ok(channel))
    }

    /// As [`load_with`](Self::load_with), from bytes.
    pub fn from_bytes_with(
        bytes: &[u8],
        connect: impl FnOnce(&str, Reveal) -> anyhow::Result<C>,
    ) -> anyhow::Result<Self> {
        let proto = pb::ModelProto::decode(bytes).map_err(|e| anyhow!("not an ONNX model: {e}"))?;
        let contract = read_contract(&proto)?;
        if contract.role != Role::Client {
            bail!(
                "this is a {} model; the client needs client.onnx",
                contract.role.as_str()
            );
        }
        let channel = connect(&contract.digest, contract.reveal)?;
        let backend = Arc::new(SessionBackend::new(
            ClientSession::new(contract.layers.clone()),
            channel,
        ));
        let engine = match contract.program {
            Some(program) => {
                let plan = PrivatePlan::new(&proto, program)?;
                let per = program_cost(&plan.program, &contract.layers, 1)?.demand;
                backend.set_correlations_per_inference(per)?;
                Engine::Private(plan)
            }
            None => {
                let mut model = crate::onnx()
                    .model_for_proto_model(&proto)
                    .map_err(|e| anyhow!("{e:#}"))?;
                let bound = crate::bind_client_ops(&mut model, backend.clone())
                    .map_err(|e| anyhow!("{e:#}"))?;
                if bound != contract.layers.len() {
                    bail!(
                        "bound {bound} SecureLinear ops, the model declares {}",
                        contract.layers.len()
                    );
                }
                let plan = model
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(|e| anyhow!("preparing the client graph: {e:#}"))?;
                Engine::Activations(plan)
            }
        };
        let batched = contract.layers.iter().all(|l| l.batched);
        Ok(ClientModel {
            engine,
            backend,
            layers: contract.layers,
            digest: contract.digest,
            reveal: contract.reveal,
            batched,
        })
    }

    /// The session backend (to file offline material, read counters).
    pub fn backend(&self) -> &Arc<SessionBackend<C>> {
        &self.backend
    }

    /// The SecureLinear ops.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// The digest recorded by the converter.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// What this model reveals to the client.
    pub fn reveal(&self) -> Reveal {
        self.reveal
    }

    /// The secure program (private modes).
    pub fn program(&self) -> Option<&Arc<Program>> {
        match &self.engine {
            Engine::Private(p) => Some(&p.program),
            Engine::Activations(_) => None,
        }
    }

    /// The first input's shape as the model declares it (`None` for a
    /// symbolic dimension such as the batch).
    pub fn input_shape(&self) -> anyhow::Result<Vec<Option<usize>>> {
        let Engine::Activations(plan) = &self.engine else {
            return self.private_input_shape();
        };
        let fact = plan
            .model()
            .input_fact(0)
            .map_err(|e| anyhow!("the client model has no input: {e:#}"))?;
        Ok(fact.shape.iter().map(|d| d.to_usize().ok()).collect())
    }

    /// Inferences in a run with `input` as the first input.
    pub fn inferences_in(&self, input: &Tensor) -> usize {
        if self.batched {
            input.shape().first().copied().unwrap_or(1)
        } else {
            1
        }
    }

    /// One private run on `n` inferences.
    fn predict_private(
        &self,
        plan: &PrivatePlan,
        inputs: &TVec<TValue>,
        n: usize,
    ) -> anyhow::Result<TVec<TValue>> {
        let encoded = plan.encode(inputs)?;
        self.backend.begin(n)?;
        let result = self.backend.run_private(&plan.program, encoded);
        self.backend.end();
        plan.finish(result?)
    }

    /// Inferences per private run at most: the run's correlations within
    /// half the client's correlation budget, and its largest step's traffic
    /// within 8 MiB and a quarter of the channel's message limit (so that
    /// both parties' simultaneous messages fit the transport's windows).
    fn private_run_size(&self) -> anyhow::Result<usize> {
        let Engine::Private(plan) = &self.engine else {
            bail!("not a private model");
        };
        let one = program_cost(&plan.program, &self.layers, 1)?;
        let by_memory = DEFAULT_CORRELATION_BUDGET / 2 / one.demand.stored_bytes().max(1);
        let limit = (self.backend.channel().max_message_bytes() / 4).min(8 << 20) as u64;
        let step = secinfer_protocol::private::largest_step_bytes(&plan.program, &self.layers)?;
        let by_messages = limit / step.max(1);
        Ok(by_memory.min(by_messages).max(1) as usize)
    }

    fn private_input_shape(&self) -> anyhow::Result<Vec<Option<usize>>> {
        let Engine::Private(p) = &self.engine else {
            bail!("not a private model");
        };
        p.input_shape()
    }

    /// Runs the model on `inputs`. In `activations` mode every SecureLinear
    /// op makes one round trip; in the private modes the prefix runs here,
    /// the program jointly with the server, and the suffix here.
    pub fn predict(&self, inputs: TVec<TValue>) -> anyhow::Result<TVec<TValue>> {
        let n = inputs.first().map(|t| self.inferences_in(t)).unwrap_or(1);
        match &self.engine {
            Engine::Activations(plan) => {
                self.backend.begin(n)?;
                let result = plan.run(inputs).map_err(|e| anyhow!("{e:#}"));
                self.backend.end();
                result
            }
            Engine::Private(plan) => {
                let run = self.private_run_size()?;
                if !self.batched || n <= run {
                    return self.predict_private(plan, &inputs, n);
                }
                // Several runs: each run's correlations stay within the
                // budget and its messages well below the frame limit.
                let mut parts: Vec<TVec<TValue>> = Vec::new();
                let mut at = 0;
                while at < n {
                    let k = run.min(n - at);
                    let slice = inputs
                        .iter()
                        .map(|t| {
                            t.slice(0, at, at + k)
                                .map(|t| t.into_tvalue())
                                .map_err(|e| anyhow!("{e:#}"))
                        })
                        .collect::<anyhow::Result<TVec<TValue>>>()?;
                    parts.push(self.predict_private(plan, &slice, k)?);
                    at += k;
                }
                let outputs = parts.first().map_or(0, |p| p.len());
                (0..outputs)
                    .map(|o| {
                        let pieces: Vec<&Tensor> = parts.iter().map(|p| &*p[o]).collect();
                        Tensor::stack_tensors(0, &pieces)
                            .map(|t| t.into_tvalue())
                            .map_err(|e| anyhow!("joining outputs: {e:#}"))
                    })
                    .collect()
            }
        }
    }
}
