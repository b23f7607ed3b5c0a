//! The crate's error type.

use std::fmt;

/// Everything that can go wrong in this crate; each message names the problem.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RingError {
    /// A ring bit width outside `1..=64`.
    #[error("ring bit width {bits} is not in 1..=64")]
    InvalidRingBits {
        /// The rejected width.
        bits: u32,
    },
    /// A fractional bit count too large to scale by.
    #[error("{frac_bits} fractional bits is too many (at most {max})")]
    InvalidFracBits {
        /// The rejected count.
        frac_bits: u32,
        /// The largest accepted count.
        max: u32,
    },
    /// NaN or an infinity was given to the fixed-point encoder.
    #[error("{value}{at} cannot be encoded in fixed point")]
    NotFinite {
        /// The offending value (`NaN`, `inf` or `-inf`).
        value: f64,
        /// Where it was, for tensors.
        at: TensorIndex,
    },
    /// A finite value whose fixed-point encoding does not fit the ring.
    #[error("value {value:e}{at} does not fit Z_2^{bits} with {frac_bits} fractional bits")]
    OutOfRange {
        /// The real value.
        value: f64,
        /// Where it was, for tensors.
        at: TensorIndex,
        /// The ring bit width.
        bits: u32,
        /// The fractional bits.
        frac_bits: u32,
    },
    /// A finite value whose fixed-point encoding does not fit an `i64`.
    #[error("value {value:e} with {frac_bits} fractional bits does not fit in an i64")]
    QuantizeOverflow {
        /// The real value.
        value: f64,
        /// The fractional bits.
        frac_bits: u32,
    },
    /// Two operands of an elementwise operation have different shapes.
    #[error("{op}: shapes {left:?} and {right:?} differ")]
    ShapeMismatch {
        /// The operation (`add`, `sub`).
        op: &'static str,
        /// Shape of the left operand.
        left: Vec<usize>,
        /// Shape of the right operand.
        right: Vec<usize>,
    },
    /// The inner dimensions of a matrix product differ.
    #[error("matmul: [{m}, {k}] x [{k2}, {n}]: inner dimensions {k} and {k2} differ")]
    MatmulShape {
        /// Rows of the left operand.
        m: usize,
        /// Columns of the left operand.
        k: usize,
        /// Rows of the right operand.
        k2: usize,
        /// Columns of the right operand.
        n: usize,
    },
    /// Inconsistent convolution operands or geometry; the message says what.
    #[error("{0}")]
    InvalidConv(String),
    /// A broken internal invariant (a bug in this crate, not bad input).
    #[error("internal error in secinfer-ring (please report): {0}")]
    Internal(String),
}

/// An optional tensor index, displayed as `" at index [0, 3]"` or nothing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TensorIndex(pub Option<Vec<usize>>);

impl fmt::Display for TensorIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(i) => write!(f, " at index {i:?}"),
            None => Ok(()),
        }
    }
}
