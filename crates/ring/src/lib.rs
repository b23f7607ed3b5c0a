//! Ring arithmetic for secinfer: the ground layer of the workspace.
//!
//! The server evaluates the linear layers of a network on additively masked
//! integer tensors in the ring `Z_{2^k}`. This crate holds what every other
//! crate builds on: the [`Ring`] type (a bit width `k` with reduction and the
//! centred signed lift), fixed-point encoding of reals as two's-complement ring
//! elements ([`encode`], [`decode`], [`quantize`]), and the exact wrapping
//! kernels that the converter, the server's tract op and the protocol call:
//! [`matmul`], [`conv`] and [`conv_transpose`] (ONNX semantics). On `u64` the
//! kernels compute modulo `2^64`, which is exact modulo `2^k` for every
//! `k <= 64`; the caller reduces with [`Ring::reduce_tensor`] when it needs
//! canonical values. The same kernels run on integer-valued `f64` (see
//! [`Scalar`]), which the HE server uses for its exact residue products and
//! the online server for its ring products, cut into [`Limbs`].
//! Signed weights are passed as the `u64` two's-complement bits of an `i64`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod conv;
mod error;
mod fixed;
mod limbs;
mod matmul;
mod scalar;

pub use conv::{
    ConvGeometry, conv, conv_output_shape, conv_transpose, conv_transpose_output_shape,
};
pub use error::{RingError, TensorIndex};
pub use fixed::{MAX_FRAC_BITS, decode, decode_tensor, encode, encode_tensor, quantize};
pub use limbs::{Limbs, MAX_LIMBS};
pub use matmul::matmul;
pub use scalar::Scalar;

/// A tensor of ring elements (one `u64` per element, reduced or not).
pub type RingTensor = ndarray::ArrayD<u64>;

/// The ring `Z_{2^bits}`, `1 <= bits <= 64`.
///
/// Elements are stored in `u64`; a reduced element is `< 2^bits`. Serialises
/// as `{"bits": k}`; deserialising checks the bit width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RingRepr")]
pub struct Ring {
    bits: u32,
}

/// Unchecked serde form of [`Ring`], validated through [`Ring::new`].
#[derive(serde::Deserialize)]
struct RingRepr {
    bits: u32,
}

impl TryFrom<RingRepr> for Ring {
    type Error = RingError;
    fn try_from(r: RingRepr) -> Result<Ring, RingError> {
        Ring::new(r.bits)
    }
}

impl Ring {
    /// The ring `Z_{2^bits}`; errors unless `1 <= bits <= 64`.
    pub fn new(bits: u32) -> Result<Ring, RingError> {
        if (1..=64).contains(&bits) {
            Ok(Ring { bits })
        } else {
            Err(RingError::InvalidRingBits { bits })
        }
    }

    /// The bit width `k` of `Z_{2^k}`.
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// `2^bits - 1` (`u64::MAX` for 64 bits).
    pub fn mask(self) -> u64 {
        u64::MAX >> (64 - self.bits)
    }

    /// `v mod 2^bits`.
    pub fn reduce(self, v: u64) -> u64 {
        v & self.mask()
    }

    /// Reduces every element of `t` modulo `2^bits`, in place.
    pub fn reduce_tensor(self, t: &mut RingTensor) {
        let m = self.mask();
        if m != u64::MAX {
            t.mapv_inplace(|v| v & m);
        }
    }

    /// Centred lift of `v mod 2^bits` into `[-2^(bits-1), 2^(bits-1))`.
    pub fn to_signed(self, v: u64) -> i64 {
        let s = 64 - self.bits;
        ((v << s) as i64) >> s
    }

    /// The ring element congruent to `v` (two's complement, reduced).
    pub fn from_signed(self, v: i64) -> u64 {
        (v as u64) & self.mask()
    }

    /// Elementwise `a + b mod 2^bits`; errors if the shapes differ.
    pub fn add(self, a: &RingTensor, b: &RingTensor) -> Result<RingTensor, RingError> {
        self.zip(a, b, "add", u64::wrapping_add)
    }

    /// Elementwise `a - b mod 2^bits`; errors if the shapes differ.
    pub fn sub(self, a: &RingTensor, b: &RingTensor) -> Result<RingTensor, RingError> {
        self.zip(a, b, "sub", u64::wrapping_sub)
    }

    fn zip(
        self,
        a: &RingTensor,
        b: &RingTensor,
        op: &'static str,
        f: fn(u64, u64) -> u64,
    ) -> Result<RingTensor, RingError> {
        if a.shape() != b.shape() {
            return Err(RingError::ShapeMismatch {
                op,
                left: a.shape().to_vec(),
                right: b.shape().to_vec(),
            });
        }
        let m = self.mask();
        Ok(ndarray::Zip::from(a)
            .and(b)
            .map_collect(|&x, &y| f(x, y) & m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use proptest::prelude::*;

    #[test]
    fn ring_bits_validated() {
        assert!(Ring::new(0).is_err());
        assert!(Ring::new(65).is_err());
        assert_eq!(
            Ring::new(0).unwrap_err().to_string(),
            "ring bit width 0 is not in 1..=64"
        );
        for b in 1..=64 {
            assert_eq!(Ring::new(b).unwrap().bits(), b);
        }
    }

    #[test]
    fn mask_and_reduce() {
        assert_eq!(Ring::new(64).unwrap().mask(), u64::MAX);
        assert_eq!(Ring::new(1).unwrap().mask(), 1);
        let r = Ring::new(37).unwrap();
        assert_eq!(r.mask(), (1u64 << 37) - 1);
        assert_eq!(r.reduce(u64::MAX), (1u64 << 37) - 1);
        let mut t = ArrayD::from_elem(IxDyn(&[2, 2]), u64::MAX);
        r.reduce_tensor(&mut t);
        assert!(t.iter().all(|&v| v == r.mask()));
    }

    #[test]
    fn signed_lift_edges() {
        let r = Ring::new(8).unwrap();
        assert_eq!(r.to_signed(127), 127);
        assert_eq!(r.to_signed(128), -128);
        assert_eq!(r.to_signed(255), -1);
        assert_eq!(r.to_signed(256 + 5), 5);
        assert_eq!(r.from_signed(-1), 255);
        assert_eq!(r.from_signed(-128), 128);
        let r64 = Ring::new(64).unwrap();
        assert_eq!(r64.to_signed(u64::MAX), -1);
        assert_eq!(r64.from_signed(i64::MIN), 1u64 << 63);
        let r1 = Ring::new(1).unwrap();
        assert_eq!(r1.to_signed(1), -1);
        assert_eq!(r1.to_signed(0), 0);
    }

    #[test]
    fn add_sub_and_shape_mismatch() {
        let r = Ring::new(4).unwrap();
        let a = ArrayD::from_shape_vec(IxDyn(&[3]), vec![15, 3, 0]).unwrap();
        let b = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1, 4, 1]).unwrap();
        assert_eq!(
            r.add(&a, &b).unwrap().into_raw_vec_and_offset().0,
            vec![0, 7, 1]
        );
        assert_eq!(
            r.sub(&a, &b).unwrap().into_raw_vec_and_offset().0,
            vec![14, 15, 15]
        );
        let c = ArrayD::from_elem(IxDyn(&[1, 3]), 0u64);
        let e = r.add(&a, &c).unwrap_err();
        assert_eq!(e.to_string(), "add: shapes [3] and [1, 3] differ");
        assert!(r.sub(&a, &c).is_err());
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let r = Ring::new(37).unwrap();
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"bits":37}"#);
        assert_eq!(serde_json::from_str::<Ring>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Ring>(r#"{"bits":0}"#).is_err());
        assert!(serde_json::from_str::<Ring>(r#"{"bits":65}"#).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn signed_round_trip(bits in 1u32..=64, v in any::<u64>()) {
            let r = Ring::new(bits).unwrap();
            let s = r.to_signed(v);
            let half = 1i128 << (bits - 1);
            prop_assert!((s as i128) >= -half && (s as i128) < half);
            prop_assert_eq!(r.from_signed(s), r.reduce(v));
            prop_assert_eq!(((s as i128) - (v as i128)).rem_euclid(1i128 << bits), 0);
        }

        #[test]
        fn add_sub_inverse(bits in 1u32..=64, xs in proptest::collection::vec(any::<(u64, u64)>(), 0..20)) {
            let r = Ring::new(bits).unwrap();
            let n = xs.len();
            let a = ArrayD::from_shape_vec(IxDyn(&[n]), xs.iter().map(|p| r.reduce(p.0)).collect()).unwrap();
            let b = ArrayD::from_shape_vec(IxDyn(&[n]), xs.iter().map(|p| r.reduce(p.1)).collect()).unwrap();
            let s = r.add(&a, &b).unwrap();
            prop_assert_eq!(r.sub(&s, &b).unwrap(), a.clone());
            for (i, &v) in s.iter().enumerate() {
                prop_assert_eq!(v as u128, (a[i] as u128 + b[i] as u128) % (1u128 << bits));
            }
        }
    }
}
