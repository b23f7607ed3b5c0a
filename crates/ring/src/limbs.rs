//! Exact ring products on `f64` limbs: the online server's `W·x mod 2^k`
//! with the speed of a floating-point GEMM.
//!
//! A masked input `x` is uniform in `Z_{2^k}`, so its products with the
//! weights do not fit a `f64` mantissa. Cut into limbs of `b` bits,
//! `x = Σ_t x_t·2^{tb}`, each limb's product `W·x_t` is an integer of
//! magnitude at most `(2^b − 1)·S`, where `S` is the largest sum of absolute
//! weights feeding one output; with `b` chosen so that this stays below
//! `2^53`, the `f64` kernel computes it exactly, and
//! `W·x = Σ_t 2^{tb}·(W·x_t) mod 2^k` is rebuilt in wrapping `u64`. The
//! limbs are stacked on the batch axis, so one kernel call does them all.
//! For weights of 8–16 bits and fan-ins of a few thousand a 37-bit ring
//! takes two limbs: twice the multiply-adds of the `u64` kernel at four
//! times its rate ([`crate::Scalar`]).

use ndarray::{ArrayD, ArrayViewD, Axis};

use crate::{Ring, RingError, RingTensor};

/// Integers up to this many bits are exact in an `f64`.
const F64_EXACT_BITS: u32 = 53;

/// The most limbs for which the `f64` path is used; beyond, the `u64`
/// kernel is as fast.
pub const MAX_LIMBS: usize = 3;

/// How ring elements are cut for exact `f64` products with given weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limbs {
    ring: Ring,
    /// bits per limb
    bits: u32,
    /// limbs per ring element
    count: usize,
}

impl Limbs {
    /// The cut for weights whose largest per-output sum of absolute values
    /// is `row_sum`, or `None` if more than [`MAX_LIMBS`] limbs would be
    /// needed (the caller keeps the `u64` kernel).
    pub fn plan(ring: Ring, row_sum: u128) -> Option<Limbs> {
        // (2^b − 1)·S < 2^53 holds for b = 53 − ⌈log2(S + 1)⌉
        let sum_bits = 128 - row_sum.leading_zeros();
        let bits = F64_EXACT_BITS.checked_sub(sum_bits)?.min(ring.bits());
        if bits == 0 {
            return None;
        }
        let count = ring.bits().div_ceil(bits) as usize;
        (count <= MAX_LIMBS).then_some(Limbs { ring, bits, count })
    }

    /// Limbs per element.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bits per limb.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// `x` (reduced or not: only its low `k` bits count) as `count` stacked
    /// copies along axis 0, copy `t` holding limb `t` of every element.
    pub fn split(&self, x: ArrayViewD<u64>) -> Result<ArrayD<f64>, RingError> {
        let mut shape = x.shape().to_vec();
        let rows = *shape
            .first()
            .ok_or_else(|| RingError::Internal("a scalar has no batch axis to stack on".into()))?;
        shape[0] = rows * self.count;
        let per = x.len();
        let mask = (1u64 << self.bits) - 1;
        let x = crate::matmul::contiguous(&x);
        let x = self.ring_bits_of(&x);
        let mut out = vec![0f64; per * self.count];
        for (t, chunk) in out.chunks_mut(per.max(1)).enumerate() {
            let shift = t as u32 * self.bits;
            for (d, &v) in chunk.iter_mut().zip(x.iter()) {
                *d = ((v >> shift) & mask) as f64;
            }
        }
        crate::matmul::shaped(ndarray::IxDyn(&shape), out)
    }

    fn ring_bits_of<'a>(&self, x: &'a [u64]) -> std::borrow::Cow<'a, [u64]> {
        let m = self.ring.mask();
        if x.iter().all(|&v| v <= m) {
            std::borrow::Cow::Borrowed(x)
        } else {
            std::borrow::Cow::Owned(x.iter().map(|&v| v & m).collect())
        }
    }

    /// The inverse of the product's stacking: `Σ_t 2^{tb}·y_t mod 2^k`,
    /// where `y` holds the `count` limb products along axis 0. Every value
    /// must be an integer below `2^53` in magnitude, which [`Limbs::plan`]
    /// guarantees for products with its weights.
    pub fn join(&self, y: ArrayD<f64>) -> Result<RingTensor, RingError> {
        let rows = y.len_of(Axis(0));
        if rows % self.count != 0 {
            return Err(RingError::Internal(format!(
                "{rows} rows do not hold {} limbs each",
                self.count
            )));
        }
        let mut shape = y.shape().to_vec();
        shape[0] = rows / self.count;
        let per = y.len() / self.count;
        let y = crate::matmul::contiguous(&y.view());
        let mut out = vec![0u64; per];
        for (t, chunk) in y.chunks(per.max(1)).enumerate() {
            let shift = t as u32 * self.bits;
            for (o, &v) in out.iter_mut().zip(chunk) {
                *o = o.wrapping_add((v as i64 as u64).wrapping_shl(shift));
            }
        }
        let ring = self.ring;
        out.iter_mut().for_each(|v| *v = ring.reduce(*v));
        crate::matmul::shaped(ndarray::IxDyn(&shape), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConvGeometry, conv, matmul};
    use ndarray::{Array2, ArrayD, IxDyn};
    use rand::{Rng, SeedableRng};

    fn weights(rng: &mut impl Rng, n: usize, max: i64) -> Vec<i64> {
        (0..n)
            .map(|i| match i % 7 {
                0 => max,
                1 => -max,
                _ => (rng.next_u64() % (2 * max as u64 + 1)) as i64 - max,
            })
            .collect()
    }

    fn inputs(rng: &mut impl Rng, ring: Ring, n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| match i % 5 {
                0 => ring.mask(),
                1 => 0,
                _ => rng.next_u64() & ring.mask(),
            })
            .collect()
    }

    fn row_sum(w: &[i64]) -> u128 {
        w.iter().map(|v| u128::from(v.unsigned_abs())).sum()
    }

    #[test]
    fn limb_products_equal_the_wrapping_ones() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        for (bits, max) in [(37u32, 1i64 << 12), (64, 1 << 15), (20, 3), (50, 1 << 20)] {
            let ring = Ring::new(bits).unwrap();
            let (m, k, n) = (5, 300, 7);
            let w = weights(&mut rng, k * n, max);
            let limbs = Limbs::plan(ring, row_sum(&w)).expect("a cut exists");
            let x = inputs(&mut rng, ring, m * k);
            let xa = Array2::from_shape_vec((m, k), x).unwrap();
            let wu = Array2::from_shape_vec((k, n), w.iter().map(|&v| v as u64).collect()).unwrap();
            let wf = wu.mapv(|v| v as i64 as f64);
            let mut want = matmul(xa.view(), wu.view()).unwrap().into_dyn();
            ring.reduce_tensor(&mut want);
            let xs = limbs.split(xa.view().into_dyn()).unwrap();
            let xs = xs.into_dimensionality::<ndarray::Ix2>().unwrap();
            let y = matmul(xs.view(), wf.view()).unwrap().into_dyn();
            assert_eq!(limbs.join(y).unwrap(), want, "ring {bits}, |w| <= {max}");
        }
    }

    #[test]
    fn limb_convolutions_equal_the_wrapping_ones() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(2);
        let ring = Ring::new(37).unwrap();
        let (xs, ws) = ([3usize, 4, 9, 9], [6usize, 2, 3, 3]);
        let g = ConvGeometry {
            strides: vec![2, 1],
            pads_begin: vec![1, 0],
            pads_end: vec![0, 1],
            group: 2,
            ..ConvGeometry::identity(2)
        };
        let w = weights(&mut rng, ws.iter().product(), 1 << 10);
        let limbs = Limbs::plan(ring, row_sum(&w)).unwrap();
        assert_eq!(limbs.count(), 2);
        let x = ArrayD::from_shape_vec(IxDyn(&xs), inputs(&mut rng, ring, xs.iter().product()))
            .unwrap();
        let wu = ArrayD::from_shape_vec(IxDyn(&ws), w.iter().map(|&v| v as u64).collect()).unwrap();
        let mut want = conv(x.view(), wu.view(), &g).unwrap();
        ring.reduce_tensor(&mut want);
        let y = conv(
            limbs.split(x.view()).unwrap().view(),
            wu.mapv(|v| v as i64 as f64).view(),
            &g,
        )
        .unwrap();
        assert_eq!(limbs.join(y).unwrap(), want);
    }

    #[test]
    fn plans_keep_every_limb_product_exact_or_decline() {
        let ring = Ring::new(37).unwrap();
        let p = Limbs::plan(ring, 1 << 20).unwrap();
        // (2^b − 1)·S < 2^53
        assert!(((1u128 << p.bits()) - 1) * (1 << 20) < 1 << 53);
        assert_eq!(p.count(), 2);
        // the widest sum that still fits one bit per limb would need 37
        // limbs: declined, as is a sum no limb fits
        assert_eq!(Limbs::plan(ring, 1 << 50), None);
        assert_eq!(Limbs::plan(ring, 1 << 60), None);
        // a 64-bit ring with small weights: 2 limbs of 32 bits... at most
        let r64 = Ring::new(64).unwrap();
        let p = Limbs::plan(r64, 100).unwrap();
        assert!(p.count() <= 2 && u32::try_from(p.count()).unwrap() * p.bits() >= 64);
    }
}
