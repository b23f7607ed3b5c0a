//! The plaintext encoding both parties share: a plaintext coefficient `m` of
//! `Z_t` (`t = 2^k`) enters a ciphertext modulo `q` as `floor(q·m / t)` (the
//! encoding `fhe` 0.1.1 uses), and a phase `v` modulo `q` decodes to
//! `round(t·v / q) mod t`. The client encrypts and decrypts with these
//! directly, and the server subtracts its masks with them.

use fhe_math::rq::traits::TryConvertFrom;
use fhe_math::rq::{Poly, Representation};
use fhe_math::zq::Modulus;
use ndarray::Array2;

use crate::{HeError, lib_err};

/// Encodes plaintexts as `floor(q·m / t)` in power basis at one context,
/// computed as `[m·(q mod t)]_t · (−t)^{-1} mod q_l` per prime. The
/// per-prime constants are made once (building a `Modulus` and inverting
/// costs big-integer work that would otherwise dominate small encodings).
pub(crate) struct ScaledEncoder {
    ctx: std::sync::Arc<fhe_math::rq::Context>,
    degree: usize,
    ring_bits: u32,
    q_mod_t: u64,
    /// per prime: the modulus, `(−t)^{-1}` and its Shoup form
    primes: Vec<(Modulus, u64, u64)>,
}

impl ScaledEncoder {
    pub(crate) fn new(
        ctx: &std::sync::Arc<fhe_math::rq::Context>,
        degree: usize,
        ring_bits: u32,
    ) -> Result<ScaledEncoder, HeError> {
        let t_mask = (1u64 << ring_bits) - 1;
        let moduli = ctx.moduli();
        let q_mod_t = moduli.iter().fold(1u64, |acc, &q| acc.wrapping_mul(q)) & t_mask;
        let primes = moduli
            .iter()
            .map(|&q| {
                let md = Modulus::new(q).map_err(lib_err)?;
                let neg_t = md.neg(md.reduce(t_mask + 1));
                let inv = md
                    .inv(neg_t)
                    .ok_or_else(|| HeError::Params("t not invertible".into()))?;
                let inv_shoup = md.shoup(inv);
                Ok((md, inv, inv_shoup))
            })
            .collect::<Result<_, HeError>>()?;
        Ok(ScaledEncoder {
            ctx: ctx.clone(),
            degree,
            ring_bits,
            q_mod_t,
            primes,
        })
    }

    /// `floor(q·m / t)` for plaintext coefficients `m` (at most `N`; the rest
    /// are zero), in power basis.
    pub(crate) fn encode(&self, m: &[u64]) -> Result<Poly, HeError> {
        let t_mask = (1u64 << self.ring_bits) - 1;
        let n = self.degree;
        if m.len() > n {
            return Err(HeError::Shape(format!(
                "{} plaintext coefficients for degree {n}",
                m.len()
            )));
        }
        let mut a = Array2::<u64>::zeros((self.primes.len(), n));
        for (mut row, (md, inv, inv_shoup)) in a.rows_mut().into_iter().zip(&self.primes) {
            for (out, &v) in row.iter_mut().zip(m) {
                // below t, hence below every prime (checked in params.rs)
                let r = v.wrapping_mul(self.q_mod_t) & t_mask;
                *out = md.mul_shoup(r, *inv, *inv_shoup);
            }
        }
        Poly::try_convert_from(a, &self.ctx, false, Representation::PowerBasis).map_err(lib_err)
    }
}

/// `round(t·v / q) mod t` for a phase `v` in `[0, q)` (one prime, `q < 2^64`,
/// `t = 2^ring_bits`).
pub(crate) fn decode_phase(v: u64, q: u64, ring_bits: u32) -> u64 {
    let t = 1u128 << ring_bits;
    let m = ((v as u128) * t + (q as u128) / 2) / q as u128;
    (m % t) as u64
}
