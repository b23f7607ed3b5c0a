//! Joint nonlinear layers on secret shares: the part of model-private
//! inference that runs between two linear layers.
//!
//! Values are additive shares over `Z_2^k` (`x = x_C + x_S`), bits XOR
//! shares. Every protocol here is a function of one [`Party`] (its shares,
//! its correlations from `secinfer-ot`, its mailbox), vectorised over whole
//! tensors so that rounds never grow with the batch, and written as an
//! `async fn` that a [`Machine`] drives without IO ([`io`]). The
//! constructions and their formulas are in `docs/private-mode.md`.
//!
//! Position in the data flow: ring, ot < **mpc** < protocol (which runs the
//! converted model's program step by step, these protocols for its
//! nonlinear steps and HE material for its linear ones).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod io;
pub mod wire;

pub use io::{Io, Machine, Message, Party, PartyStats, run_pair};
pub use secinfer_ot::{Bits, Demand, Role};

/// Everything that can go wrong in a joint protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MpcError {
    /// Correlations are missing or would be reused.
    #[error(transparent)]
    Correlation(#[from] secinfer_ot::OtError),
    /// A peer message is for another step, out of order or of the wrong size.
    #[error("step {step}, message {seq}: {problem}")]
    Message {
        /// the step
        step: u32,
        /// the message's number within the step
        seq: u32,
        /// what is wrong
        problem: String,
    },
    /// A payload does not decode.
    #[error("{0}")]
    Payload(String),
    /// Inputs of a protocol disagree with each other (a caller bug or a
    /// converted model that contradicts itself).
    #[error("{0}")]
    Shape(String),
    /// A party could not be set up or driven.
    #[error("{0}")]
    Setup(String),
}
