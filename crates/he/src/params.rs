//! BFV parameter sets, and the checks that make them safe to use.
//!
//! Three things are checked in code, never assumed:
//!
//! 1. **Security.** The ciphertext modulus `q` (the product of the primes) must
//!    fit the HomomorphicEncryption.org standard's 128-bit classical table for
//!    the ring degree `N` (Albrecht et al., "Homomorphic Encryption Security
//!    Standard", 2018, Table 1, ternary-secret column, the smallest of its
//!    three columns): `log2 q ≤ 27, 54, 109, 218, 438, 881` for
//!    `N = 1024 … 32768`.
//! 2. **Decryptability.** The plaintext modulus `t = 2^k` is the ring of the
//!    converted model, and must be below every ciphertext prime; with a larger
//!    `t` the library decrypts to wrong values without complaint.
//! 3. **Noise.** For each layer, the server's reply must still decrypt after it
//!    is flooded (see [`FloodPlan`]); a layer whose worst case does not fit is
//!    refused before any work.
//!
//! The noise bounds use the worst case, not a heuristic. They rest on two
//! facts about `fhe` 0.1.1, which `Cargo.toml` pins: every error and secret
//! coefficient is drawn from a centred binomial distribution with variance
//! `v`, so its absolute value is at most `2v` (= [`ERROR_BOUND`]); and the
//! plaintext `m` is encoded as `floor(q·m / t)`, which is off from `q·m/t` by
//! less than 1.

use std::sync::Arc;

use fhe::bfv::{BfvParameters, BfvParametersBuilder};

use crate::HeError;

/// The error variance `fhe` uses (its default; we set it explicitly).
pub const ERROR_VARIANCE: usize = 10;
/// Largest absolute value of an error or secret-key coefficient: a centred
/// binomial with variance `v` is a difference of two sums of `2v` bits.
pub const ERROR_BOUND: u64 = 2 * ERROR_VARIANCE as u64;
/// Statistical security of the noise flooding, in bits: the client's view of
/// one reply ciphertext is within statistical distance `2^-40` of a view that
/// does not depend on the weights ...
pub const STAT_SECURITY_BITS: u32 = 40;
/// ... for all of up to `2^30` reply ciphertexts computed with one model's
/// weights, across every client, key and session (the flood is widened by
/// this many bits so that the bound holds for all of them together: the
/// distance adds up over every reply made with the same weights, whatever key
/// it was under). The server counts them (`secinfer_protocol`).
pub const MAX_REPLIES_BITS: u32 = 30;

/// Maximum `log2 q` for 128-bit classical security, by ring degree
/// (HomomorphicEncryption.org standard, Table 1, ternary secret).
pub const HE_STANDARD_128: [(usize, u32); 6] = [
    (1024, 27),
    (2048, 54),
    (4096, 109),
    (8192, 218),
    (16384, 438),
    (32768, 881),
];

/// The HE standard's 128-bit bound on `log2 q` for ring degree `degree`.
fn max_log_q(degree: usize) -> Result<u32, HeError> {
    HE_STANDARD_128
        .iter()
        .find(|(n, _)| *n == degree)
        .map(|(_, b)| *b)
        .ok_or_else(|| {
            HeError::Params(format!(
                "ring degree {degree} is not in the HE-standard 128-bit table (1024 … 32768)"
            ))
        })
}

/// A checked BFV parameter set for a ring `Z_2^k`.
#[derive(Clone)]
pub struct HeParams {
    ring_bits: u32,
    bfv: Arc<BfvParameters>,
    log2_q: f64,
}

impl std::fmt::Debug for HeParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeParams")
            .field("degree", &self.degree())
            .field("moduli", &self.bfv.moduli())
            .field("plaintext_bits", &self.ring_bits)
            .finish()
    }
}

impl HeParams {
    /// The parameter set secinfer uses for the ring `Z_2^ring_bits`: `N = 8192`
    /// and three 60-bit primes (`log2 q` ≈ 180 of the 218 allowed), which leaves
    /// room to flood the noise of layers with fan-in up to millions.
    ///
    /// Built once per ring and shared: the BFV context (NTT tables, RNS
    /// bases) is tens of megabytes, and a server used to build one per
    /// session and per request it priced.
    pub fn for_ring(ring_bits: u32) -> Result<HeParams, HeError> {
        static BUILT: std::sync::Mutex<Vec<HeParams>> = std::sync::Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = built.iter().find(|p| p.ring_bits == ring_bits) {
            return Ok(p.clone());
        }
        let params = HeParams::new(8192, &[60, 60, 60], ring_bits)?;
        built.push(params.clone());
        Ok(params)
    }

    /// A parameter set with ring degree `degree`, primes of the given bit
    /// sizes (generated, NTT-friendly) and plaintext modulus `2^ring_bits`;
    /// refused unless it passes the security and decryptability checks.
    pub fn new(degree: usize, moduli_bits: &[usize], ring_bits: u32) -> Result<HeParams, HeError> {
        let max_bits = max_log_q(degree)?;
        if moduli_bits.len() < 2 {
            return Err(HeError::Params(
                "need at least two ciphertext primes (one is dropped before the reply is sent)"
                    .into(),
            ));
        }
        if let Some(b) = moduli_bits.iter().find(|&&b| !(20..=62).contains(&b)) {
            return Err(HeError::Params(format!(
                "ciphertext prime of {b} bits: sizes must be 20..=62"
            )));
        }
        let declared: usize = moduli_bits.iter().sum();
        if declared as u32 > max_bits {
            return Err(HeError::Params(format!(
                "log2 q = {declared} exceeds {max_bits}, the 128-bit bound for N = {degree}"
            )));
        }
        if !(2..=62).contains(&ring_bits) {
            return Err(HeError::Params(format!(
                "plaintext modulus 2^{ring_bits}: ring bits must be 2..=62"
            )));
        }
        let bfv = BfvParametersBuilder::new()
            .set_degree(degree)
            .set_plaintext_modulus(1u64 << ring_bits)
            .set_moduli_sizes(moduli_bits)
            .set_variance(ERROR_VARIANCE)
            .build_arc()
            .map_err(|e| HeError::Params(format!("fhe refused the parameters: {e}")))?;
        HeParams::check(ring_bits, bfv)
    }

    /// Checks a built parameter set; every set was built with [`ERROR_VARIANCE`].
    fn check(ring_bits: u32, bfv: Arc<BfvParameters>) -> Result<HeParams, HeError> {
        let degree = bfv.degree();
        let max_bits = max_log_q(degree)?;
        if bfv.plaintext() != 1u64 << ring_bits {
            return Err(HeError::Params(format!(
                "plaintext modulus {} is not 2^{ring_bits}, the model's ring",
                bfv.plaintext()
            )));
        }
        let log2_q: f64 = bfv.moduli().iter().map(|&q| (q as f64).log2()).sum();
        if log2_q > max_bits as f64 {
            return Err(HeError::Params(format!(
                "log2 q = {log2_q:.1} exceeds {max_bits}, the 128-bit bound for N = {degree}"
            )));
        }
        let t = bfv.plaintext();
        if let Some(&q) = bfv.moduli().iter().find(|&&q| q <= t) {
            return Err(HeError::Params(format!(
                "plaintext modulus 2^{ring_bits} is not below ciphertext prime {q}: \
                 decryption would be silently wrong"
            )));
        }
        if bfv.moduli().len() < 2 {
            return Err(HeError::Params(
                "need at least two ciphertext primes".into(),
            ));
        }
        Ok(HeParams {
            ring_bits,
            bfv,
            log2_q,
        })
    }

    /// The `fhe` parameters.
    pub fn bfv(&self) -> &Arc<BfvParameters> {
        &self.bfv
    }

    /// Ring degree `N`: inferences per ciphertext.
    pub fn degree(&self) -> usize {
        self.bfv.degree()
    }

    /// `k` in `t = 2^k`.
    pub fn ring_bits(&self) -> u32 {
        self.ring_bits
    }

    /// An upper bound on a serialised ciphertext of these parameters (two
    /// polynomials, every modulus, 8 bytes per coefficient, plus framing);
    /// anything larger is not a ciphertext and is refused before buffering.
    pub fn max_ciphertext_bytes(&self) -> usize {
        2 * self.degree() * self.bfv.moduli().len() * 8 + 4096
    }

    /// `log2 q` at full level.
    pub fn log2_q(&self) -> f64 {
        self.log2_q
    }

    /// The flooding plan for a layer in which every output depends on at most
    /// `fan_in` weights, or an error if its worst-case noise cannot be flooded
    /// and still decrypt.
    pub fn flood_plan(&self, fan_in: usize) -> Result<FloodPlan, HeError> {
        FloodPlan::new(self, fan_in)
    }
}

/// How wide the server's flooding noise is for one layer, and why it is safe.
///
/// With `t = 2^k`, `N` the degree, `η` = [`ERROR_BOUND`], the phase noise of a
/// reply before flooding is at most
///
/// ```text
/// b = fan_in · (t/2) · (η + 1)      Σ_j w_j (e_j − φ_j): centred weights |w_j| ≤ t/2,
///                                   fresh errors |e_j| ≤ η, encoding offsets φ_j < 1
///   + 2·N·η² + η + 1                re-randomisation u·e_pk + e1 + e2·s, and
///                                   the encoding offset of s
/// ```
///
/// for *any* weights (only the public fan-in enters). The server adds a
/// uniform `F ∈ [−2^β, 2^β]` to every coefficient, with
/// `β = ⌈log2 b⌉ + 40 + log2 N + 30`; the statistical distance between
/// `noise + F` and `F` is at most `b / 2^β` per coefficient, so at most `2^-40`
/// over all `N` coefficients of `2^30` replies. The reply still decrypts if
/// `2^β + b < q / (2t)`; after the server drops to the last prime `q_0` (to
/// shrink the reply), the noise is at most `(2^β + b)·q_0/q + (levels)·(1 +
/// N·η)/2`, which must stay below `q_0 / (2t)`. Both are checked here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloodPlan {
    /// `β`: the flood is uniform in `[−2^β, 2^β]`
    pub flood_bits: u32,
    /// `log2 b`, the worst-case noise flooded
    pub log2_noise: f64,
    /// bits of headroom left at full level (`log2 (q/2t) − log2 (2^β + b)`)
    pub headroom_bits: f64,
}

impl FloodPlan {
    fn new(p: &HeParams, fan_in: usize) -> Result<FloodPlan, HeError> {
        if fan_in == 0 {
            return Err(HeError::Params("a layer with fan-in 0".into()));
        }
        let n = p.degree() as f64;
        let eta = ERROR_BOUND as f64;
        let half_t = 2f64.powi(p.ring_bits as i32 - 1);
        // f64 sums of positive terms: relative error ~1e-16, far inside the 1-bit
        // slack taken by rounding log2 b up.
        let b = fan_in as f64 * half_t * (eta + 1.0) + 2.0 * n * eta * eta + eta + 1.0;
        let log2_b = b.log2();
        let flood_bits = log2_b.ceil() as u32
            + STAT_SECURITY_BITS
            + p.degree().trailing_zeros()
            + MAX_REPLIES_BITS;
        if flood_bits > crate::server::MAX_FLOOD_BITS {
            return Err(HeError::Params(format!(
                "a layer with fan-in {fan_in} needs a flood of 2^{flood_bits}, wider than the \
                 sampler's 2^{}",
                crate::server::MAX_FLOOD_BITS
            )));
        }
        let total = 2f64.powi(flood_bits as i32) + b;
        let budget = p.log2_q - 1.0 - p.ring_bits as f64;
        let headroom_bits = budget - total.log2();
        if headroom_bits < 1.0 {
            return Err(HeError::Params(format!(
                "a layer with fan-in {fan_in} needs a flood of 2^{flood_bits}, which does not fit \
                 the noise budget 2^{budget:.1} of log2 q = {:.1}, t = 2^{}: use a larger modulus",
                p.log2_q, p.ring_bits
            )));
        }
        // After switching down to the first prime q_0.
        let moduli = p.bfv.moduli();
        let log2_q0 = (moduli[0] as f64).log2();
        let levels = (moduli.len() - 1) as f64;
        let scaled = total.log2() - (p.log2_q - log2_q0);
        let rounding = levels * (1.0 + n * eta) / 2.0 * 2.0;
        let after = (2f64.powf(scaled) + rounding).log2();
        let budget0 = log2_q0 - 1.0 - p.ring_bits as f64;
        if budget0 - after < 1.0 {
            return Err(HeError::Params(format!(
                "after dropping to the last prime ({log2_q0:.1} bits) the noise 2^{after:.1} \
                 exceeds the budget 2^{budget0:.1}: t = 2^{} is too large for it",
                p.ring_bits
            )));
        }
        Ok(FloodPlan {
            flood_bits,
            log2_noise: log2_b,
            headroom_bits,
        })
    }
}
