//! Message and material types. Everything a party sends is a serde type here;
//! nothing here knows how bytes travel.

use std::fmt;

use ndarray::{ArrayD, IxDyn};
use secinfer_ring::RingTensor;
use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Index of a SecureLinear op in the converted model.
pub type OpId = u32;

/// Names the offline material of one inference (all ops), on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PreprocessingId(pub u64);

impl fmt::Display for PreprocessingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A ring tensor as sent: row-major elements and the shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTensor {
    /// dimensions
    pub shape: Vec<u64>,
    /// row-major elements, each < 2^k
    pub data: Vec<u64>,
}

impl WireTensor {
    /// Takes a tensor's elements (copies only if it is not in standard layout).
    pub fn from_tensor(t: RingTensor) -> WireTensor {
        let shape = t.shape().iter().map(|&d| d as u64).collect();
        let data = if t.is_standard_layout() {
            t.into_raw_vec_and_offset().0
        } else {
            t.iter().copied().collect()
        };
        WireTensor { shape, data }
    }

    /// Rebuilds the tensor, checking that the element count matches the shape.
    pub fn into_tensor(self, op: OpId) -> Result<RingTensor, ProtocolError> {
        let shape = self
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| shape_err(op, "dimension does not fit this machine".into()))?;
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| shape_err(op, format!("shape {shape:?} overflows")))?;
        if expected != self.data.len() {
            return Err(shape_err(
                op,
                format!(
                    "shape {:?} needs {expected} elements, message has {}",
                    shape,
                    self.data.len()
                ),
            ));
        }
        ArrayD::from_shape_vec(IxDyn(&shape), self.data).map_err(|e| shape_err(op, e.to_string()))
    }

    /// Size of the payload in bytes (8 per element), for accounting.
    pub fn payload_bytes(&self) -> usize {
        8 * (self.data.len() + self.shape.len())
    }
}

fn shape_err(op: OpId, problem: String) -> ProtocolError {
    ProtocolError::Shape { op, problem }
}

/// Online, client to server: `x − r` for op `op`, one preprocessing id per
/// sample along the batch axis (in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// the op
    pub op: OpId,
    /// one id per sample
    pub ids: Vec<PreprocessingId>,
    /// `x − r`, shape = the op's input shape with the batch size on axis 0
    pub masked: WireTensor,
}

/// Online, server to client: `W·(x − r) + b + s`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedOutput {
    /// the op
    pub op: OpId,
    /// the ids of the request, echoed
    pub ids: Vec<PreprocessingId>,
    /// `W·(x − r) + b + s`
    pub masked: WireTensor,
}

/// The client's secret offline material for one inference: per op, the mask
/// `r` (one sample's input) and `c = W·r − s` (one sample's output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMaterial {
    /// the id both parties file it under
    pub id: PreprocessingId,
    /// per op id: (r, c), row-major
    pub ops: Vec<(Vec<u64>, Vec<u64>)>,
}

/// The server's secret offline material for one inference: per op, `s`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerMaterial {
    /// the id both parties file it under
    pub id: PreprocessingId,
    /// per op id: s, row-major, one sample's output
    pub ops: Vec<Vec<u64>>,
}
