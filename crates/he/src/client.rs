//! The client's side: its own BFV key, encryption of masks, decryption of
//! replies.
//!
//! `fhe` makes the key pair; encryption and decryption are done here with its
//! polynomial arithmetic, because its own `try_encrypt`/`try_decrypt` redo
//! per call what is fixed per key (the secret key's NTT, at every prime), encode
//! each plaintext twice, and decrypt through a multi-prime scaler where the
//! replies have one prime. Same distributions and encoding as `fhe`
//! (`tests.rs` checks both ways against it): secret-key encryption
//! `(b, a) = (−a·s + e + ⌊q·m/t⌋, a)` with `a` sent as its seed, and
//! decryption `round(t·(b + a·s)/q) mod t`.

use fhe::bfv::{PublicKey, SecretKey};
use fhe_math::rq::traits::TryConvertFrom;
use fhe_math::rq::{Poly, Representation};
use fhe_traits::Serialize;
use ndarray::Array2;
use rand_chacha09::ChaCha20Rng;
use rand_chacha09::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;
use zeroize::Zeroizing;

use crate::encoding::{ScaledEncoder, decode_phase};
use crate::packing::Layout;
use crate::{ERROR_VARIANCE, HeError, HeParams, lib_err, wire};

/// A client's key pair; the secret key never leaves this struct (its NTT
/// forms are zeroed on drop, and `fhe` zeroes its own copy).
pub struct ClientKey {
    params: HeParams,
    /// `fhe`'s key, for tests that play a curious client (`s_ntt` is all the
    /// client itself needs).
    #[cfg(test)]
    sk: SecretKey,
    pk: PublicKey,
    /// `s` in NTT form at each level's context (index = level), made once.
    s_ntt: Vec<Zeroizing<Poly>>,
    /// plaintext encoding at the full level, where masks are encrypted
    encoder: ScaledEncoder,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// A fresh key pair from the operating system's CSPRNG.
    pub fn generate(params: &HeParams) -> ClientKey {
        let mut rng = ChaCha20Rng::from_os_rng();
        let sk = SecretKey::random(params.bfv(), &mut rng);
        let pk = PublicKey::new(&sk, &mut rng);
        let s_ntt = secret_ntt(params, &sk);
        let ctx = params
            .bfv()
            .context_at_level(0)
            .expect("level 0 always has a context");
        let encoder = ScaledEncoder::new(ctx, params.degree(), params.ring_bits())
            .expect("checked parameters have t invertible modulo every prime");
        ClientKey {
            params: params.clone(),
            #[cfg(test)]
            sk,
            pk,
            s_ntt,
            encoder,
        }
    }

    /// The parameters the key belongs to.
    pub fn params(&self) -> &HeParams {
        &self.params
    }

    /// The public key, serialised for the server (it re-randomises replies
    /// with it).
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.pk.to_bytes()
    }

    /// Encrypts one layer's masks for `masks.len()` inferences (at most `N`),
    /// each of `input_len` ring elements: ciphertext `j` holds feature `j` of
    /// inference `b` in coefficient `b`.
    pub fn encrypt(&self, masks: &[&[u64]], input_len: usize) -> Result<Vec<Vec<u8>>, HeError> {
        let n = self.params.degree();
        if masks.is_empty() || masks.len() > n {
            return Err(HeError::Shape(format!(
                "{} inferences in one batch; a ciphertext holds 1..={n}",
                masks.len()
            )));
        }
        let t_mask = (1u64 << self.params.ring_bits()) - 1;
        if let Some((b, m)) = masks.iter().enumerate().find(|(_, m)| m.len() != input_len) {
            return Err(HeError::Shape(format!(
                "mask {b} has {} elements, the layer takes {input_len}",
                m.len()
            )));
        }
        (0..input_len)
            .into_par_iter()
            .map_init(ChaCha20Rng::from_os_rng, |rng, j| {
                let column: Vec<u64> = masks.iter().map(|m| m[j] & t_mask).collect();
                self.encrypt_plaintext(&column, rng)
            })
            .collect()
    }

    /// Encrypts input ciphertexts `range` of a batch laid out as `shape`
    /// (a packing by polynomial products); `masks` holds the batch's `count`
    /// rows.
    pub fn encrypt_blocks(
        &self,
        shape: &dyn Layout,
        masks: &[&[u64]],
        range: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<u8>>, HeError> {
        let n = self.params.degree();
        shape.check(n)?;
        if range.end > shape.input_ciphertexts() {
            return Err(HeError::Shape(format!(
                "input ciphertexts {range:?} of layout {shape:?}"
            )));
        }
        let t_mask = (1u64 << self.params.ring_bits()) - 1;
        range
            .into_par_iter()
            .map_init(ChaCha20Rng::from_os_rng, |rng, k| {
                let mut m = shape.input_plaintext(k, masks, n)?;
                m.iter_mut().for_each(|v| *v &= t_mask);
                self.encrypt_plaintext(&m, rng)
            })
            .collect()
    }

    /// One seeded secret-key encryption of plaintext coefficients `m`.
    fn encrypt_plaintext(&self, m: &[u64], rng: &mut ChaCha20Rng) -> Result<Vec<u8>, HeError> {
        let ctx = self.params.bfv().context_at_level(0).map_err(lib_err)?;
        let s = self.s_ntt.first().ok_or_else(|| lib_err("no secret key"))?;
        // a: uniform, expanded from a seed, which is what travels
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let mut a = Poly::random_from_seed(ctx, Representation::Ntt, seed);
        a *= s.as_ref();
        a.change_representation(Representation::PowerBasis);
        // b = e + ⌊q·m/t⌋ − a·s, on coefficients (how it travels)
        let mut b =
            Poly::small(ctx, Representation::PowerBasis, ERROR_VARIANCE, rng).map_err(lib_err)?;
        b += &self.encoder.encode(m)?;
        b -= &a;
        let b = wire::encode_poly(b.coefficients(), ctx.moduli());
        Ok(wire::encode_ciphertext(vec![b], Some(seed), 0))
    }

    /// [`ClientKey::decrypt_block`] for several replies at once (in parallel).
    pub fn decrypt_blocks(
        &self,
        shape: &dyn Layout,
        indices: &[usize],
        replies: &[Vec<u8>],
    ) -> Result<Vec<Vec<u64>>, HeError> {
        if indices.len() != replies.len() {
            return Err(HeError::Shape(format!(
                "{} reply indices for {} ciphertexts",
                indices.len(),
                replies.len()
            )));
        }
        indices
            .par_iter()
            .zip(replies)
            .map(|(&k, ct)| self.decrypt_block(shape, k, ct))
            .collect()
    }

    /// Decrypts reply `index` of a batch laid out as `shape`: `c = W·r − s`
    /// at each kept coefficient, in [`Layout::kept`] order.
    pub fn decrypt_block(
        &self,
        shape: &dyn Layout,
        index: usize,
        reply: &[u8],
    ) -> Result<Vec<u64>, HeError> {
        if index >= shape.output_ciphertexts() {
            return Err(HeError::Shape(format!(
                "reply {index} of a layout with {}",
                shape.output_ciphertexts()
            )));
        }
        let kept = shape.kept(index);
        let par = self.params.bfv();
        let (c0, c1) = wire::decode_sparse_reply(reply, kept.len(), par)?;
        let level = par.max_level();
        let ctx = par.context_at_level(level).map_err(lib_err)?;
        let q = ctx.moduli()[0];
        let s = self
            .s_ntt
            .get(level)
            .ok_or_else(|| lib_err("no secret key at this level"))?;
        let mut phase =
            Poly::try_convert_from(c1, ctx, false, Representation::PowerBasis).map_err(lib_err)?;
        phase.change_representation(Representation::Ntt);
        phase *= s.as_ref();
        phase.change_representation(Representation::PowerBasis);
        let row = phase.coefficients();
        let bits = self.params.ring_bits();
        Ok(kept
            .iter()
            .zip(c0)
            .map(|(kp, b)| decode_phase((row[[0, kp.coefficient]] + b) % q, q, bits))
            .collect())
    }

    /// Decrypts reply ciphertexts: for each, `c = W·r − s` in `Z_2^k` of its
    /// output feature, for the batch's `count` inferences (one row per
    /// ciphertext).
    pub fn decrypt(
        &self,
        replies: &[Vec<u8>],
        count: usize,
        output_len: usize,
    ) -> Result<Vec<Vec<u64>>, HeError> {
        let n = self.params.degree();
        if count == 0 || count > n {
            return Err(HeError::Shape(format!(
                "{count} inferences; a batch holds 1..={n}"
            )));
        }
        if replies.len() != output_len {
            return Err(HeError::Shape(format!(
                "reply has {} ciphertexts, the layer has {output_len} outputs",
                replies.len()
            )));
        }
        let par = self.params.bfv();
        let bits = self.params.ring_bits();
        replies
            .par_iter()
            .map(|bytes| {
                let ct = wire::decode_ciphertext("reply ciphertext", bytes, par)?;
                let ctx = par.context_at_level(ct.level).map_err(lib_err)?;
                let (polys, seeded) = (ct.polys.len(), ct.seed.is_some());
                // moved out, not copied: both polynomials are used once
                let (None, Ok([b, a])) = (ct.seed, <[Array2<u64>; 2]>::try_from(ct.polys)) else {
                    return Err(HeError::Malformed {
                        what: "reply ciphertext",
                        problem: format!(
                            "{polys} polynomials{}, expected 2 and no seed",
                            if seeded { " and a seed" } else { "" }
                        ),
                    });
                };
                let &[q] = ctx.moduli() else {
                    return Err(HeError::Malformed {
                        what: "reply ciphertext",
                        problem: format!(
                            "{} primes; replies are switched down to one",
                            ctx.moduli().len()
                        ),
                    });
                };
                let s = self
                    .s_ntt
                    .get(ct.level)
                    .ok_or_else(|| lib_err("no secret key at this level"))?;
                // phase = b + a·s, on coefficients
                let mut phase = Poly::try_convert_from(a, ctx, false, Representation::PowerBasis)
                    .map_err(lib_err)?;
                phase.change_representation(Representation::Ntt);
                phase *= s.as_ref();
                phase.change_representation(Representation::PowerBasis);
                Ok(phase
                    .coefficients()
                    .row(0)
                    .iter()
                    .zip(b.row(0))
                    .take(count)
                    .map(|(&as_, &b)| decode_phase((as_ + b) % q, q, bits))
                    .collect())
            })
            .collect()
    }

    /// The secret key, for tests that play a curious client.
    #[cfg(test)]
    pub(crate) fn secret(&self) -> &SecretKey {
        &self.sk
    }
}

/// `s` in NTT form at the context of every level.
fn secret_ntt(params: &HeParams, sk: &SecretKey) -> Vec<Zeroizing<Poly>> {
    let par = params.bfv();
    let coeffs = Zeroizing::new(fhe::proto::bfv::SecretKey::from(sk).coeffs);
    (0..=par.max_level())
        .map(|level| {
            let ctx = par
                .context_at_level(level)
                .expect("every level up to max_level has a context");
            let mut s =
                Poly::try_convert_from(coeffs.as_slice(), ctx, false, Representation::PowerBasis)
                    .expect("a secret key of the parameters' degree converts");
            s.change_representation(Representation::Ntt);
            Zeroizing::new(s)
        })
        .collect()
}
