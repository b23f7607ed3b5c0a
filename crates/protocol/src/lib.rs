//! The two-party protocol for secure linear layers, sans IO.
//!
//! For every SecureLinear op `l` and every inference, the client holds a mask
//! `r` (uniform over Z_2^k) and `c = W·r − s`, the server holds `s` (uniform);
//! both under one [`PreprocessingId`]. Online, the client sends `x − r`
//! ([`MaskedInput`]); the server answers `W·(x − r) + b + s` ([`MaskedOutput`]);
//! the client adds `c` and holds `W·x + b` exactly. The server's whole view is
//! uniform ring elements.
//!
//! This crate is the deterministic core of that exchange, in the quinn-proto
//! style: message types ([`messages`]) and the two session state machines
//! ([`ClientSession`], [`ServerSession`]) that consume and produce them. It owns
//! no sockets, threads or clocks; `transport/` and the in-process bench drive it.
//! Its invariant: **a preprocessing id is usable exactly once per op on each
//! side**, since reusing a mask leaks the difference of two inputs. A second use
//! is an error on both sides, and a request is checked whole before anything in
//! it is consumed.
//!
//! Offline material is made by the two parties together with lattice HE
//! ([`offline`]): the client's [`Preprocessor`] encrypts its masks, the
//! server session answers `Enc(W·r − s)` and keeps `s`. No party ever sees
//! the other's secrets. (The unit tests also use an in-the-clear dealer,
//! which exists only in `cfg(test)`.)
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod channel;
mod client;
#[cfg(test)]
mod dealer;
pub mod messages;
pub mod offline;
pub mod private;
mod server;
mod store;

pub use channel::{Channel, Traffic};
pub use client::ClientSession;
#[cfg(test)]
pub(crate) use dealer::InsecureLocalDealer;
pub use messages::{
    ClientMaterial, MaskedInput, MaskedOutput, OpId, PreprocessingId, ServerMaterial, WireTensor,
};
pub use offline::{MaskRequest, OfflineHello, PoolPolicy, Preprocessor, ProductReply, params_for};
pub use server::{
    DEFAULT_MAX_OT_BYTES, DEFAULT_MAX_PENDING, MAX_BATCHES_IN_FLIGHT, MaskedLinear, OfflineJob,
    OfflineProduct, ServerSession,
};

/// Everything that can go wrong in a session; each variant names the op and id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The op id is not in the model.
    #[error("unknown SecureLinear op {0}")]
    UnknownOp(OpId),
    /// No material was ever accepted under this id.
    #[error("preprocessing id {0} is unknown")]
    UnknownId(PreprocessingId),
    /// The (id, op) pair was used already: reusing a mask would leak x1 − x2.
    #[error("preprocessing id {id} was already used for op {op}; masks are single-use")]
    Reused {
        /// the id
        id: PreprocessingId,
        /// the op
        op: OpId,
    },
    /// Material arrived under an id that exists or existed already.
    #[error("preprocessing id {0} was already delivered; ids are single-use")]
    DuplicateId(PreprocessingId),
    /// A request names the same id twice.
    #[error("preprocessing id {0} appears twice in one request")]
    RepeatedIdInRequest(PreprocessingId),
    /// Shapes, sizes or counts disagree with the model.
    #[error("op {op}: {problem}")]
    Shape {
        /// the op
        op: OpId,
        /// what disagrees
        problem: String,
    },
    /// A ring element is not reduced mod 2^k.
    #[error("op {op}: element {index} = {value} is not in Z_2^{bits}")]
    NotInRing {
        /// the op
        op: OpId,
        /// flat index
        index: usize,
        /// the value
        value: u64,
        /// ring bits
        bits: u32,
    },
    /// A response arrived that the client is not waiting for.
    #[error("op {op}: {problem}")]
    Unexpected {
        /// the op
        op: OpId,
        /// what was unexpected
        problem: String,
    },
    /// Evaluating the linear layer failed on the server.
    #[error("op {op}: evaluation failed: {problem}")]
    Evaluation {
        /// the op
        op: OpId,
        /// the evaluator's message
        problem: String,
    },
    /// The offline (HE) phase failed for this op.
    #[error("op {op}: offline phase: {problem}")]
    Offline {
        /// the op
        op: OpId,
        /// what failed
        problem: String,
    },
    /// The model description itself is unusable.
    #[error("model: {0}")]
    Model(String),
    /// A step of a private batch failed.
    #[error("step {step} ({what} from '{node}'): {problem}")]
    Step {
        /// the step's index in the program
        step: u32,
        /// its op type
        what: String,
        /// the original node(s)
        node: String,
        /// what went wrong
        problem: String,
    },
    /// The offline phase for correlations (oblivious transfer) failed.
    #[error("oblivious transfer: {0}")]
    Ot(String),
}

impl From<secinfer_ot::OtError> for ProtocolError {
    fn from(e: secinfer_ot::OtError) -> Self {
        ProtocolError::Ot(e.to_string())
    }
}

/// The spec of op `op` and its ring, or the error naming what is wrong.
pub(crate) fn op_spec(
    layers: &[secinfer_model::LayerSpec],
    op: OpId,
) -> Result<(&secinfer_model::LayerSpec, secinfer_ring::Ring), ProtocolError> {
    let spec = layers
        .get(op as usize)
        .ok_or(ProtocolError::UnknownOp(op))?;
    let ring = spec
        .ring()
        .map_err(|e| ProtocolError::Model(e.to_string()))?;
    Ok((spec, ring))
}

#[cfg(test)]
mod tests;
