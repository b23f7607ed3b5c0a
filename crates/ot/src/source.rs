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
