//! Where 128-bit correlated OTs come from: the [`CorrelationSource`] trait.
//!
//! A source makes correlated OTs (COTs) in both directions between the
//! client and the server: in the direction where this party sends it holds
//! a global `Δ` and one `q_j` per COT ([`CotSender`]); where it receives it
//! holds a random choice `ρ_j` and `t_j = q_j ⊕ ρ_j·Δ` ([`CotReceiver`]).
//! The per-session engine ([`crate::engine`]) runs a source and refines its
//! output ([`crate::refine`]) into the correlations the protocols consume;
//! it never looks inside the source's messages. A source is a sans-IO state
//! machine over opaque byte messages: [`start_setup`] once, feeding the
//! peer's messages to [`handle`] until [`is_ready`]; then, per batch,
//! [`start_batch`] and [`handle`] until [`poll_batch`] yields the batch. The
//! client leads (its `start_*` calls return the first message), the server
//! follows (its `start_*` calls return `None` and it answers in `handle`).
//! Both parties must start the same batches with matching counts, in the
//! same order. IKNP ([`crate::iknp::IknpSource`]) needs three setup flights
//! and one round trip per batch; a silent-OT backend may use more rounds of
//! either kind without changing the engine.
//!
//! [`start_setup`]: CorrelationSource::start_setup
//! [`handle`]: CorrelationSource::handle
//! [`is_ready`]: CorrelationSource::is_ready
//! [`start_batch`]: CorrelationSource::start_batch
//! [`poll_batch`]: CorrelationSource::poll_batch

use crate::{Bits, OtError, Role};

/// COTs this party sent in one batch: the session's `Δ` and `q_j`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CotSender {
    /// the global correlation `Δ` (the same in every batch of a session)
    pub delta: u128,
    /// `q_j`, one per COT
    pub q: Vec<u128>,
}

/// COTs this party received in one batch: random choices `ρ_j` and
/// `t_j = q_j ⊕ ρ_j·Δ`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CotReceiver {
    /// `ρ_j`
    pub choice: Bits,
    /// `t_j`
    pub t: Vec<u128>,
}

// Secrets stay out of logs: Debug shows sizes only.
impl std::fmt::Debug for CotSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CotSender")
            .field("cots", &self.q.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CotReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CotReceiver")
            .field("cots", &self.t.len())
            .finish_non_exhaustive()
    }
}

/// One finished batch as this party holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CotBatch {
    /// COTs in the direction where this party sends
    pub sent: CotSender,
    /// COTs in the direction where this party receives
    pub received: CotReceiver,
}

/// How many COTs a batch makes, from this party's point of view. The
/// peer's counts are the same with `sent` and `received` swapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CotCounts {
    /// COTs this party sends
    pub sent: usize,
    /// COTs this party receives
    pub received: usize,
}

impl CotCounts {
    /// The same batch as the peer counts it.
    pub fn as_seen_by_peer(self) -> CotCounts {
        CotCounts {
            sent: self.received,
            received: self.sent,
        }
    }
}

/// A maker of 128-bit correlated OTs in both directions. See the module
/// docs for the call sequence. Every method that takes a peer message
/// validates it (phase, length, encoding) and returns [`OtError::Message`]
/// naming the problem; after an error the source is unusable (the session
/// is over).
pub trait CorrelationSource: Send {
    /// This party.
    fn role(&self) -> Role;

    /// Begins the one-time setup. The client gets the first message to
    /// send; the server gets `None` and waits for it.
    fn start_setup(&mut self) -> Result<Option<Vec<u8>>, OtError>;

    /// Whether the setup is complete on this side and no batch is running:
    /// [`start_batch`](Self::start_batch) may be called.
    fn is_ready(&self) -> bool;

    /// Begins a batch of `counts` COTs. The client gets the first message
    /// to send; the server gets `None` and waits for it.
    fn start_batch(&mut self, counts: CotCounts) -> Result<Option<Vec<u8>>, OtError>;

    /// Feeds one message from the peer (of the setup or of the running
    /// batch); returns the message to send back, if any.
    fn handle(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, OtError>;

    /// The running batch, once this side has all of it (then the source is
    /// ready again).
    fn poll_batch(&mut self) -> Option<CotBatch>;

    /// Bytes this party holds while it runs a batch of `counts`, beyond the
    /// refined correlations its store will keep: both parties' messages,
    /// its COTs before refinement and any buffers kept for the next batch.
    /// The engine adds this to its budget check before the batch starts.
    /// The default assumes IKNP-like costs: 16 bytes per COT for the COTs
    /// themselves and 16 for a message, each way.
    fn batch_buffer_bytes(&self, counts: CotCounts) -> u64 {
        (counts.sent as u64)
            .saturating_add(counts.received as u64)
            .saturating_mul(32)
    }

    /// Bytes this source may hold at any point of its setup (what it keeps
    /// afterwards included), for a server to reserve before it handles a
    /// setup flight. The default covers IKNP, whose setup is two sets of
    /// 128 Chou–Orlandi base OTs (points, keys and seeds: tens of KB).
    fn setup_buffer_bytes(&self) -> u64 {
        1 << 20
    }

    /// Bytes this source keeps between batches (recycled buffers, pools of
    /// COTs made ahead), for the session's memory accounting. The default
    /// keeps nothing.
    fn retained_bytes(&self) -> u64 {
        0
    }

    /// Hands a batch back once it has been used up, so that the next batch
    /// can reuse its memory instead of faulting in fresh pages (megabytes
    /// per batch). Optional: the default drops it.
    fn recycle(&mut self, batch: CotBatch) {
        drop(batch);
    }
}

/// Which correlation source a session runs. The client chooses; its first
/// setup message names the choice in one leading byte, and a server
/// engine made with [`crate::OtEngine::new`] follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// silent OT ([`crate::silent`]): ~3 bits of traffic per COT; the default
    #[default]
    Silent,
    /// IKNP extension ([`crate::iknp`]): 128 bits per COT, kept for comparison
    Iknp,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 2] = [Backend::Silent, Backend::Iknp];

    /// The backend's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Silent => "silent",
            Backend::Iknp => "iknp",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Backend::Silent => 1,
            Backend::Iknp => 0,
        }
    }

    fn from_tag(tag: u8) -> Option<Backend> {
        match tag {
            1 => Some(Backend::Silent),
            0 => Some(Backend::Iknp),
            _ => None,
        }
    }

    /// [`CorrelationSource::setup_buffer_bytes`] of this backend's source
    /// with its default parameters.
    pub fn setup_buffer_bytes(self) -> u64 {
        match self {
            Backend::Silent => crate::silent::setup_buffer_bytes(crate::silent::DEFAULT_LPN),
            Backend::Iknp => 1 << 20,
        }
    }

    /// A fresh source of this backend for `role`, seeded from the
    /// operating system.
    pub fn source(self, role: Role) -> Result<Box<dyn CorrelationSource>, OtError> {
        Ok(match self {
            Backend::Silent => Box::new(crate::silent::SilentSource::new(role)?),
            Backend::Iknp => Box::new(crate::iknp::IknpSource::new(role)?),
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "silent" => Ok(Backend::Silent),
            "iknp" => Ok(Backend::Iknp),
            other => Err(format!("unknown OT backend '{other}': silent or iknp")),
        }
    }
}

/// A source whose backend is named on the wire: the client's wraps the
/// backend it chose and puts its tag before the first setup message; the
/// server's makes the backend the tag names when that message arrives.
pub(crate) struct Chosen {
    role: Role,
    inner: Option<Box<dyn CorrelationSource>>,
    backend: Option<Backend>,
    /// the backends a server accepts
    accepted: Vec<Backend>,
}

impl Chosen {
    /// The client's, running `backend`.
    pub(crate) fn client(backend: Backend) -> Result<Chosen, OtError> {
        Ok(Chosen {
            role: Role::Client,
            inner: Some(backend.source(Role::Client)?),
            backend: Some(backend),
            accepted: vec![backend],
        })
    }

    /// The server's, running whichever of `accepted` the client names.
    pub(crate) fn server(accepted: &[Backend]) -> Chosen {
        Chosen {
            role: Role::Server,
            inner: None,
            backend: None,
            accepted: accepted.to_vec(),
        }
    }

    fn inner(&mut self) -> Result<&mut Box<dyn CorrelationSource>, OtError> {
        self.inner
            .as_mut()
            .ok_or_else(|| OtError::Message("no correlation source before the setup".into()))
    }
}

impl CorrelationSource for Chosen {
    fn role(&self) -> Role {
        self.role
    }

    fn start_setup(&mut self) -> Result<Option<Vec<u8>>, OtError> {
        match (self.role, self.backend) {
            (Role::Client, Some(backend)) => {
                let first = self.inner()?.start_setup()?;
                Ok(first.map(|m| {
                    let mut tagged = Vec::with_capacity(1 + m.len());
                    tagged.push(backend.tag());
                    tagged.extend_from_slice(&m);
                    tagged
                }))
            }
            // the server's backend is chosen by the first message
            _ => Ok(None),
        }
    }

    fn is_ready(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_ready())
    }

    fn start_batch(&mut self, counts: CotCounts) -> Result<Option<Vec<u8>>, OtError> {
        self.inner()?.start_batch(counts)
    }

    fn handle(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, OtError> {
        if self.inner.is_none() {
            let (&tag, rest) = message
                .split_first()
                .ok_or_else(|| OtError::Message("an empty first setup message".into()))?;
            let backend = Backend::from_tag(tag).ok_or_else(|| {
                OtError::Message(format!(
                    "the client asks for OT backend {tag}, which this server does not know (0 = IKNP, 1 = silent)"
                ))
            })?;
            if !self.accepted.contains(&backend) {
                let names: Vec<&str> = self.accepted.iter().map(|b| b.name()).collect();
                return Err(OtError::Message(format!(
                    "the client asks for OT backend {}, which this server does not accept (it accepts: {})",
                    backend.name(),
                    names.join(", ")
                )));
            }
            let mut source = backend.source(self.role)?;
            source.start_setup()?;
            self.backend = Some(backend);
            return self.inner.insert(source).handle(rest);
        }
        self.inner()?.handle(message)
    }

    fn poll_batch(&mut self) -> Option<CotBatch> {
        self.inner.as_mut().and_then(|s| s.poll_batch())
    }

    fn batch_buffer_bytes(&self, counts: CotCounts) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |s| s.batch_buffer_bytes(counts))
    }

    /// Before the client names the backend: the most any accepted
    /// backend's setup may hold.
    fn setup_buffer_bytes(&self) -> u64 {
        match &self.inner {
            Some(s) => s.setup_buffer_bytes(),
            None => self
                .accepted
                .iter()
                .map(|b| b.setup_buffer_bytes())
                .max()
                .unwrap_or(0),
        }
    }

    fn retained_bytes(&self) -> u64 {
        self.inner.as_ref().map_or(0, |s| s.retained_bytes())
    }

    fn recycle(&mut self, batch: CotBatch) {
        if let Some(s) = self.inner.as_mut() {
            s.recycle(batch);
        }
    }
}
