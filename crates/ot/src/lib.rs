//! Oblivious transfer for secinfer, sans IO.
//!
//! The joint nonlinear layers (`secinfer-mpc`) consume random correlations:
//! bit triples, one-bit random OTs and 64-bit random OTs, in both
//! directions ([`correlation`]). This crate makes them without a trusted
//! party and hands each out once:
//!
//! - base OTs ([`base`]): Chou–Orlandi on ristretto255, once per session;
//! - extension ([`iknp`]): IKNP (semi-honest) into 128-bit correlated OTs,
//!   behind the [`CorrelationSource`] trait ([`source`]) so that a faster
//!   backend (silent OT) can replace it;
//! - refinement ([`refine`]): a tweakable correlation-robust hash
//!   (fixed-key AES) turns correlated OTs into the random OTs and triples
//!   of [`correlation`];
//! - the [`CorrelationStore`]: a queue per kind whose position only moves
//!   forward, so a correlation is never used twice;
//! - the [`OtEngine`] ([`engine`]): one per party and session, it runs the
//!   setup and the batches over [`OtMessage`]s (the client leads), checks
//!   every message and the server's budget, and fills the party's store.
//!
//! Position in the data flow: ot < mpc < protocol. Like `secinfer-protocol`,
//! nothing here owns a socket, a thread or a clock: the parties' engines
//! consume and produce messages, and the transport moves them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod base;
pub mod bits;
pub mod correlation;
pub mod engine;
pub mod iknp;
pub mod refine;
pub mod silent;
pub mod source;

pub use bits::Bits;
#[cfg(any(test, feature = "insecure-test-dealer"))]
pub use correlation::insecure_test_dealer;
pub use correlation::{
    BitOtReceiver, BitOtSender, BitTriples, CorrelationBatch, CorrelationStore, Demand, Position,
    WordOtReceiver, WordOtSender,
};
pub use engine::{MAX_BATCH_OTS, OtEngine, OtMessage};
pub use iknp::IknpSource;
pub use silent::{LpnParams, SilentSource};
pub use source::{Backend, CorrelationSource, CotBatch, CotCounts, CotReceiver, CotSender};

/// Which party: the client leads the offline phase, the server follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// the party with the input
    Client,
    /// the party with the model
    Server,
}

impl Role {
    /// The other party.
    pub fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// Everything that can go wrong with OT material or OT messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtError {
    /// Fewer correlations of a kind are left than a step needs.
    #[error("{wanted} {kind}s needed, {available} left; make more in the offline phase")]
    Exhausted {
        /// which kind
        kind: &'static str,
        /// how many were asked for
        wanted: u64,
        /// how many are left
        available: u64,
    },
    /// A run's material is not all there.
    #[error("correlations needed {wanted:?}, available {available:?}")]
    Short {
        /// what was asked for
        wanted: Demand,
        /// what is left
        available: Demand,
    },
    /// The peer names correlations this store has handed out already.
    #[error(
        "the peer would reuse correlations: it is at {claimed:?}, this store is at {store:?}; each OT and triple is single-use"
    )]
    Reused {
        /// the position the peer reported (in this party's view)
        claimed: Position,
        /// this store's position
        store: Position,
    },
    /// The peer names a position ahead of this store.
    #[error("the peer skipped correlations: it is at {claimed:?}, this store is at {store:?}")]
    Skipped {
        /// the position the peer reported (in this party's view)
        claimed: Position,
        /// this store's position
        store: Position,
    },
    /// A message of the OT protocols is malformed or out of order.
    #[error("OT message: {0}")]
    Message(String),
    /// A batch would take this party over the session's limit on memory for
    /// correlations (what its store holds plus what the batch adds and
    /// needs while it runs); refused before any work.
    #[error(
        "batch {batch} refused: it would store {requested} bytes of correlations on top of {stored} and need {transient} more while it runs, over the budget of {budget} bytes"
    )]
    OverBudget {
        /// the batch's number
        batch: u64,
        /// bytes the batch would add to this party's store
        /// ([`Demand::stored_bytes_for`] this party)
        requested: u64,
        /// bytes this party's store holds now
        stored: u64,
        /// bytes of the batch's buffers while it runs (messages both ways
        /// and correlated OTs before refinement)
        transient: u64,
        /// the limit
        budget: u64,
    },
    /// A counter that numbers OTs over the session would pass its limit;
    /// refused rather than wrapped or saturated, since a repeated number
    /// would reuse a hash tweak (or PRG output) and break the OTs' secrecy.
    #[error("{counter} would overflow: {more} more after {at}; start a new session")]
    CounterOverflow {
        /// which counter
        counter: &'static str,
        /// its value
        at: u128,
        /// how far it was asked to advance
        more: u128,
    },
    /// The operating system's randomness failed.
    #[error("OS randomness unavailable: {0}")]
    Randomness(String),
}
