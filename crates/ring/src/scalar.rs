//! The element types the kernels compute in.
//!
//! [`matmul`](crate::matmul), [`conv`](crate::conv) and
//! [`conv_transpose`](crate::conv_transpose) are written once over
//! [`Scalar`] and run in two arithmetics:
//!
//! - `u64`, wrapping: exact modulo `2^64`, hence modulo `2^k` for every ring
//!   `Z_{2^k}`. The online phase uses it on masked ring elements.
//! - `f64` holding integers: exact as long as every product and every partial
//!   sum stays below `2^53` in magnitude, which the caller must guarantee
//!   (the HE server cuts its residues into limbs small enough). On x86-64 a
//!   `f64` multiply-add is two vector instructions for four lanes, against
//!   about eight for the `u64` one (three `pmuludq` plus shifts and adds), so
//!   exact integer products that fit run several times faster this way.

/// An element type the kernels accept: `zero`, and `acc + a * b` in that
/// type's arithmetic (wrapping for `u64`, IEEE for `f64`).
pub trait Scalar: Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// Whether this is a floating-point type (selects the micro-kernel's tile).
    const FLOAT: bool;
    /// `self + a * b`.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `self + b`.
    fn plus(self, b: Self) -> Self;
}

impl Scalar for u64 {
    const FLOAT: bool = false;
    #[inline(always)]
    fn mul_add(self, a: u64, b: u64) -> u64 {
        self.wrapping_add(a.wrapping_mul(b))
    }
    #[inline(always)]
    fn plus(self, b: u64) -> u64 {
        self.wrapping_add(b)
    }
}

impl Scalar for f64 {
    const FLOAT: bool = true;
    #[inline(always)]
    fn mul_add(self, a: f64, b: f64) -> f64 {
        // Not `f64::mul_add`: without FMA hardware that is a slow library
        // call, and for integers below 2^53 the separate product is exact.
        self + a * b
    }
    #[inline(always)]
    fn plus(self, b: f64) -> f64 {
        self + b
    }
}
