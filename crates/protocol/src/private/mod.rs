//! Model-private inference (`--reveal logits` or `argmax`): both parties run
//! the converted model's program on secret shares, in lockstep, and only the
//! program's reveals reach the client. See `docs/private-mode.md`.
//!
//! A batch begins with the client's [`PrivateMessage::Begin`], naming its
//! preprocessing ids (whose HE material the linear steps use, once) and the
//! position of its correlation store (whose correlations the nonlinear steps
//! use, once); the server checks both against its own bookkeeping before it
//! takes anything. Then each side drives a [`PrivateRun`] and the two
//! exchange [`PrivateMessage::Step`]s until the run ends. Everything here is
//! sans IO, like the rest of the crate.

mod layout;
mod run;

pub use run::{
    LinearEval, LinearSide, PrivateRun, Revealed, RunReport, largest_step_bytes, program_cost,
};

use secinfer_ot::Position;
use serde::{Deserialize, Serialize};

use crate::PreprocessingId;

/// Online messages of a private batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrivateMessage {
    /// Client to server: run the program on one inference per id, taking
    /// correlations from the client's store `position` on (its own view).
    Begin {
        /// one preprocessing id per inference, in batch order
        ids: Vec<PreprocessingId>,
        /// the client's correlation position before the batch
        position: Position,
    },
    /// A message of the batch in progress (either direction).
    Step(secinfer_mpc::Message),
}

impl PrivateMessage {
    /// Bytes carried (payload, ids), for accounting.
    pub fn payload_bytes(&self) -> usize {
        match self {
            PrivateMessage::Begin { ids, .. } => 8 * ids.len() + 40,
            PrivateMessage::Step(m) => m.payload.len() + 8,
        }
    }
}

#[cfg(test)]
mod tests;
