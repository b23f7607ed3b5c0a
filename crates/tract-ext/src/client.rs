//! Client side: the bound SecureLinear op, the backend it calls (fixed-point
//! encoding + the protocol's client session + a channel to the server), and
//! the client model that runs `client.onnx` with it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use ndarray::{ArrayD, ArrayViewD, Dimension};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use secinfer_model::{LayerSpec, Role, read_contract};
use secinfer_protocol::{
    ClientMaterial, ClientSession, MaskedInput, MaskedLinear, MaskedOutput, PreprocessingId,
    ProtocolError, ServerMaterial, ServerSession,
};

/// Evaluates one SecureLinear op for the client on real-valued inputs.
pub trait SecureLinearBackend: Send + Sync + std::fmt::Debug {
    /// `W·x + b` for op `spec`, computed jointly with the server.
    fn secure_linear(&self, spec: &LayerSpec, x: ArrayViewD<f32>) -> anyhow::Result<ArrayD<f32>>;
}

/// One online round trip: `x − r` to the server, `W·(x − r) + b + s` back.
pub trait OnlineChannel: Send + Sync {
    /// Sends the request and waits for the answer.
    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<MaskedOutput>;
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
}

/// The client's backend: encodes, masks through the protocol session, calls
/// the channel, unmasks and decodes.
pub struct SessionBackend<C: OnlineChannel> {
    state: Mutex<ClientState>,
    channel: C,
}

impl<C: OnlineChannel> std::fmt::Debug for SessionBackend<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionBackend")
    }
}

impl<C: OnlineChannel> SessionBackend<C> {
    /// A backend for a session over `channel`.
    pub fn new(session: ClientSession, channel: C) -> Self {
        SessionBackend {
            state: Mutex::new(ClientState {
                session,
                current: vec![],
            }),
            channel,
        }
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
        st.current = st.session.reserve(n)?;
        Ok(())
    }

    fn end(&self) {
        if let Ok(mut st) = self.lock() {
            let ids = std::mem::take(&mut st.current);
            st.session.retire(&ids);
        }
    }
}

impl<C: OnlineChannel> SecureLinearBackend for SessionBackend<C> {
    fn secure_linear(&self, spec: &LayerSpec, x: ArrayViewD<f32>) -> anyhow::Result<ArrayD<f32>> {
        let ring = spec.ring()?;
        if let Some((ix, v)) = x
            .indexed_iter()
            .find(|(_, v)| !v.is_finite() || v.abs() > spec.input_bound)
        {
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
        let response = self.channel.round_trip(request)?;
        let y = self.lock()?.session.unmask(response)?;
        Ok(secinfer_ring::decode_tensor(
            ring,
            y.view(),
            spec.output_frac_bits(),
        ))
    }
}

/// The server in the same process: serialised messages are not needed, but
/// the bytes that would travel are counted.
pub struct InMemoryChannel<L: MaskedLinear + ?Sized> {
    server: Mutex<ServerSession<L>>,
    bytes_up: std::sync::atomic::AtomicU64,
    bytes_down: std::sync::atomic::AtomicU64,
}

impl<L: MaskedLinear + ?Sized> InMemoryChannel<L> {
    /// A channel to a fresh server session for `linear`.
    pub fn new(linear: Arc<L>) -> Self {
        InMemoryChannel {
            server: Mutex::new(ServerSession::new(linear)),
            bytes_up: 0.into(),
            bytes_down: 0.into(),
        }
    }

    /// Files the server's share of offline material.
    pub fn accept_preprocessing(&self, m: ServerMaterial) -> anyhow::Result<()> {
        self.server
            .lock()
            .map_err(|_| anyhow!("server session poisoned"))?
            .accept_preprocessing(m)?;
        Ok(())
    }

    /// (client→server, server→client) online payload bytes so far.
    pub fn online_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.bytes_up.load(Relaxed), self.bytes_down.load(Relaxed))
    }
}

impl<L: MaskedLinear + ?Sized> OnlineChannel for InMemoryChannel<L> {
    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<MaskedOutput> {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes_up.fetch_add(
            (request.masked.payload_bytes() + 8 * request.ids.len() + 4) as u64,
            Relaxed,
        );
        let out = self
            .server
            .lock()
            .map_err(|_| anyhow!("server session poisoned"))?
            .handle(request)?;
        self.bytes_down.fetch_add(
            (out.masked.payload_bytes() + 8 * out.ids.len() + 4) as u64,
            Relaxed,
        );
        Ok(out)
    }
}

/// `client.onnx` loaded and bound to a backend, ready to predict.
pub struct ClientModel<C: OnlineChannel + 'static> {
    plan: Arc<TypedRunnableModel>,
    backend: Arc<SessionBackend<C>>,
    layers: Vec<LayerSpec>,
    digest: String,
    batched: bool,
}

impl<C: OnlineChannel + 'static> ClientModel<C> {
    /// Loads `client.onnx` and binds its SecureLinear ops to a new session over `channel`.
    pub fn load(path: &Path, channel: C) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes, channel)
            .with_context(|| format!("loading client model {}", path.display()))
    }

    /// As [`load`](Self::load), from bytes.
    pub fn from_bytes(bytes: &[u8], channel: C) -> anyhow::Result<Self> {
        let proto = pb::ModelProto::decode(bytes).map_err(|e| anyhow!("not an ONNX model: {e}"))?;
        let contract = read_contract(&proto)?;
        if contract.role != Role::Client {
            bail!(
                "this is a {} model; the client needs client.onnx",
                contract.role.as_str()
            );
        }
        let backend = Arc::new(SessionBackend::new(
            ClientSession::new(contract.layers.clone()),
            channel,
        ));
        let mut model = crate::onnx()
            .model_for_proto_model(&proto)
            .map_err(|e| anyhow!("{e:#}"))?;
        let bound =
            crate::bind_client_ops(&mut model, backend.clone()).map_err(|e| anyhow!("{e:#}"))?;
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
        let batched = contract.layers.iter().all(|l| l.batched);
        Ok(ClientModel {
            plan,
            backend,
            layers: contract.layers,
            digest: contract.digest,
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

    /// Inferences in a run with `input` as the first input.
    pub fn inferences_in(&self, input: &Tensor) -> usize {
        if self.batched {
            input.shape().first().copied().unwrap_or(1)
        } else {
            1
        }
    }

    /// Runs the client graph on `inputs`; every SecureLinear op makes one round trip.
    pub fn predict(&self, inputs: TVec<TValue>) -> anyhow::Result<TVec<TValue>> {
        let n = inputs.first().map(|t| self.inferences_in(t)).unwrap_or(1);
        self.backend.begin(n)?;
        let result = self.plan.run(inputs).map_err(|e| anyhow!("{e:#}"));
        self.backend.end();
        result
    }
}
