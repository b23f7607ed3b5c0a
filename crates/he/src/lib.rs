//! The offline phase over lattice HE: the client learns `c = W·r − s` for its
//! own random mask `r`, the server learns nothing about `r`, and the client
//! learns nothing about `W` beyond `c` (which is uniform, since `s` is).
//!
//! 1. The client encrypts its masks under its own BFV key ([`ClientKey`]).
//! 2. The server ([`evaluate`]) computes `Enc(W·r − s)` with the plain
//!    integer weights, re-randomises it with the client's public key, floods
//!    its noise ([`FloodPlan`]) and drops it to one prime to shrink it.
//! 3. The client decrypts `c`.
//!
//! **Two packings**, chosen per op and batch size by [`Packing::choose`]
//! (both parties run it on public numbers): one inference per coefficient
//! (below) for big batches, and polynomial products by blocks
//! ([`evaluate_blocks`], `packing.rs`) for small ones, so that a batch of one
//! costs a few ciphertexts instead of one per input feature.
//!
//! **Packing: one inference per coefficient.** The plaintext modulus is the
//! model's ring `Z_2^k`, and ciphertext `j` of a layer holds input feature `j`
//! of up to `N` inferences, one per coefficient. A plaintext integer times a
//! ciphertext multiplies every coefficient alike, so output feature `o` is the
//! ciphertext `Σ_j W_oj · ct_j`: the layer's own linear map applied to
//! ciphertexts instead of numbers. Every coefficient of every reply is an
//! output (one inference's), and every one is masked by `s`. Nothing here
//! knows the layer's form: the server applies its weights through
//! [`LinearForm`] to the ciphertexts' residues, split into limbs small enough
//! that the ring kernels' integer `f64` arithmetic is exact, so every form
//! the ring kernels run (matrix products on either side, convolutions of any
//! rank, stride, dilation, padding and group count, transposed convolutions)
//! is supported without a special case. Traffic is dense in both directions;
//! the cost is that a batch fills a ciphertext only with `N` inferences.
//!
//! The library's own plaintext × ciphertext product is not used (it lifts
//! weights to `[0, t)`, which multiplies the noise by up to `t`); weights are
//! applied centred, as signed integers.
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod blocks;
mod client;
mod conv_packing;
mod encoding;
mod packing;
mod params;
mod server;
#[cfg(test)]
mod tests;
mod wire;

pub use blocks::{BlockPart, evaluate_blocks, evaluate_packed};
pub use client::ClientKey;
pub use conv_packing::{ConvDims, ConvShape};
pub use packing::{
    BlockShape, JOB_MEMORY_BYTES, Kept, Layout, MAX_DENSE_WEIGHTS, Packing, max_flood_fan_in,
};
pub use params::{
    ERROR_BOUND, ERROR_VARIANCE, FloodPlan, HE_STANDARD_128, HeParams, MAX_REPLIES_BITS,
    STAT_SECURITY_BITS,
};
pub use server::{FirstBlocks, LinearForm, Part, Reply, ServerKey, evaluate, evaluate_all};

/// What can go wrong in the offline phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeError {
    /// A parameter set failed a security, correctness or noise check.
    #[error("HE parameters: {0}")]
    Params(String),
    /// A ciphertext or key from the other party is malformed.
    #[error("malformed {what}: {problem}")]
    Malformed {
        /// which object
        what: &'static str,
        /// what is wrong with it
        problem: String,
    },
    /// Counts or lengths do not match the layer.
    #[error("{0}")]
    Shape(String),
    /// The layer's linear map failed.
    #[error("layer evaluation failed: {0}")]
    Linear(String),
    /// The HE library failed.
    #[error("fhe: {0}")]
    Library(String),
    /// The work would take more memory than allowed (says the estimate).
    #[error("memory: {0}")]
    Memory(String),
}

pub(crate) fn lib_err(e: impl std::fmt::Display) -> HeError {
    HeError::Library(e.to_string())
}

/// Decodes bytes from the other party; `fhe`'s decoders are not audited
/// against hostile input, so a panic inside them becomes an error too.
pub(crate) fn decode_guarded<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, fhe::Error>,
) -> Result<T, HeError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(HeError::Malformed {
            what,
            problem: e.to_string(),
        }),
        Err(_) => Err(HeError::Malformed {
            what,
            problem: "the decoder rejected it (panicked)".into(),
        }),
    }
}
