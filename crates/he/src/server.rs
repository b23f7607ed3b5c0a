//! The server's side: `Enc(r) -> Enc(W·r − s)`, re-randomised, flooded,
//! shrunk.
//!
//! The product runs on the ciphertexts' residues. Residue slot `(component,
//! prime l, coefficient i)` of input ciphertext `j` is a number below `q_l`;
//! across `j` these numbers form one input vector of the layer, and the layer's
//! linear map of it, reduced mod `q_l`, is the same slot of every output
//! ciphertext (the map is linear and the representation, NTT or not, is too).
//! Residues are cut into limbs of `limb_bits` so that `Σ_j |W_oj| · 2^limb_bits`
//! stays below `2^53`: then the ring kernels, run on integer-valued `f64`,
//! give the exact signed result (every partial sum is an integer below
//! `2^53`), which is reduced mod `q_l` and recombined. `f64` rather than
//! wrapping `u64` because the kernels run 3-4x faster on it (see
//! `secinfer_ring::Scalar`); for the bundled models the limb count is the
//! same (two per 60-bit residue).

use std::ops::Range;

use fhe::bfv::{Ciphertext, PublicKey};
use fhe_math::rq::traits::TryConvertFrom;
use fhe_math::rq::{Poly, Representation};
use fhe_math::zq::Modulus;
use fhe_traits::DeserializeParametrized;
use ndarray::Array2;
use prost::Message;
use rand_chacha09::ChaCha20Rng;
use rand_chacha09::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

use crate::encoding::ScaledEncoder;
use crate::packing::{OUTPUT_MEMORY_BUDGET, SLOT_CHUNK};
use crate::wire;
use crate::{FloodPlan, HeError, HeParams, decode_guarded, lib_err};

/// A layer's weights as the server applies them: `y = W·x` over the integers
/// (centred weights, no bias), one sample per row.
pub trait LinearForm: Sync {
    /// Elements of one sample's input.
    fn input_len(&self) -> usize;
    /// Elements of one sample's output.
    fn output_len(&self) -> usize;
    /// Public bound: no output depends on more than this many weights. It
    /// sizes the noise flood, so it must hold for any weights of this shape.
    fn fan_in(&self) -> usize;
    /// `max_o Σ_j |W_oj|` for the actual weights (server-private; sizes limbs).
    fn max_abs_row_sum(&self) -> u128;
    /// Outputs come in this many blocks that can be computed on their own
    /// (output channels, column ranges), so that a big layer is evaluated a
    /// few blocks at a time in bounded memory.
    fn blocks(&self) -> usize;
    /// Outputs of one sample in block `block`.
    fn block_len(&self, block: usize) -> usize;
    /// The per-sample output indices that blocks `blocks` compute, in the
    /// order [`LinearForm::apply_blocks`] returns them.
    fn outputs(&self, blocks: Range<usize>) -> Vec<usize>;
    /// Blocks `blocks` of `W·x` for `rows` samples, `x` row-major
    /// `[rows, input_len]` of non-negative integers in `f64`; the result is
    /// row-major `[rows, outputs(blocks).len()]`. The caller keeps
    /// `max_abs_row_sum() · max(x) < 2^53`, so an implementation that sums
    /// `W_oj · x_j` in `f64`, in any order, is exact.
    fn apply_blocks(
        &self,
        blocks: Range<usize>,
        x: &[f64],
        rows: usize,
    ) -> Result<Vec<f64>, String>;
    /// For a 2-D convolution, its kernel `[M, C/group, kh, kw]` as centred
    /// integers (the convolution packing needs it); `None` otherwise.
    fn conv_weights(&self) -> Option<Vec<i64>> {
        None
    }
    /// The layer as a dense matrix `[output_len, input_len]` of centred
    /// integers, if the form has it at hand; otherwise the block packing reads
    /// it off [`LinearForm::apply_blocks`] with unit vectors.
    fn dense_weights(&self) -> Option<Vec<i64>> {
        None
    }
}

/// The client's public key, as the server holds it.
#[derive(Clone)]
pub struct ServerKey {
    params: HeParams,
    /// the public key `(p0, p1)`, `p0 + p1·s = e`, in NTT-Shoup form
    p0: Poly,
    p1: Poly,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl ServerKey {
    /// Bytes the key holds: two polynomials of the full level, each with
    /// its Shoup companion.
    pub fn memory_bytes(&self) -> usize {
        4 * self.params.degree() * self.params.bfv().moduli().len() * 8
    }

    /// Reads a client's public key.
    pub fn from_bytes(params: &HeParams, bytes: &[u8]) -> Result<ServerKey, HeError> {
        let par = params.bfv();
        // Parsed by fhe first (its checks), then its two polynomials taken out.
        decode_guarded("public key", || PublicKey::from_bytes(bytes, par))?;
        let proto = fhe::proto::bfv::PublicKey::decode(bytes).map_err(|e| HeError::Malformed {
            what: "public key",
            problem: e.to_string(),
        })?;
        let ct_proto = proto.c.ok_or_else(|| HeError::Malformed {
            what: "public key",
            problem: "no ciphertext".into(),
        })?;
        // The second component must be expanded from a seed (as `fhe` writes
        // an honest key): sent explicitly, it could be small or structured,
        // and then re-randomising with it would hide nothing.
        if ct_proto.c.len() != 1 || ct_proto.seed.len() != 32 {
            return Err(HeError::Malformed {
                what: "public key",
                problem: format!(
                    "{} polynomial(s) and a {}-byte seed; the second component must come from a 32-byte seed",
                    ct_proto.c.len(),
                    ct_proto.seed.len()
                ),
            });
        }
        let ct = decode_guarded("public key", || {
            Ciphertext::from_bytes(&ct_proto.encode_to_vec(), par)
        })?;
        if ct.len() != 2 || par.level_of_context(ct[0].ctx()).ok() != Some(0) {
            return Err(HeError::Malformed {
                what: "public key",
                problem: "not two polynomials at the full level".into(),
            });
        }
        let (mut p0, mut p1) = (ct[0].clone(), ct[1].clone());
        // A sanity check on top (p1 comes from the seed): a real key's
        // components are uniform, nearly all N coefficients distinct. It does
        // not prove p0 = −p1·s + e with a small e; see docs/threat-model.md.
        for (name, p) in [("first", &p0), ("second", &p1)] {
            let distinct = distinct_coefficients(p);
            if distinct < par.degree() / 2 {
                return Err(HeError::Malformed {
                    what: "public key",
                    problem: format!(
                        "its {name} component has {distinct} distinct coefficients of {}: \
                         a real key's is uniform",
                        par.degree()
                    ),
                });
            }
        }
        for p in [&mut p0, &mut p1] {
            if *p.representation() != Representation::Ntt {
                p.change_representation(Representation::Ntt);
            }
            p.change_representation(Representation::NttShoup);
        }
        Ok(ServerKey {
            params: params.clone(),
            p0,
            p1,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &HeParams {
        &self.params
    }
}

/// Distinct residues at the first prime among a polynomial's coefficients.
fn distinct_coefficients(p: &Poly) -> usize {
    let mut c = p.clone();
    if *c.representation() != Representation::PowerBasis {
        c.change_representation(Representation::PowerBasis);
    }
    let mut row: Vec<u64> = c.coefficients().row(0).to_vec();
    row.sort_unstable();
    row.dedup();
    row.len()
}

/// Part of the server's answer for one layer and one batch: the reply
/// ciphertexts of some output features, and the server's own masks `s` for
/// them. [`evaluate`] produces a layer's parts one group of blocks at a time.
#[derive(Debug)]
pub struct Part {
    /// per-sample output indices, one per ciphertext
    pub outputs: Vec<usize>,
    /// serialised `Enc(W·r − s)`, one per output in `outputs`
    pub ciphertexts: Vec<Vec<u8>>,
    /// `s`: `count` rows, each with one value per output in `outputs`
    pub masks: Vec<Vec<u64>>,
}

/// A whole layer's answer, outputs in order (see [`evaluate_all`]).
#[derive(Debug)]
pub struct Reply {
    /// serialised `Enc(W·r − s)`, one per output feature
    pub ciphertexts: Vec<Vec<u8>>,
    /// `s`, `count` rows of `output_len`
    pub masks: Vec<Vec<u64>>,
}

/// Input ciphertexts per tile of the residue transpose.
const TRANSPOSE_TILE: usize = 32;

/// Whether the reply hides the weights. Only `Full` is reachable outside this
/// crate; the other exists so a test can show the attack it prevents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Privacy {
    /// re-randomise with the public key and flood the noise
    Full,
    /// return `Σ_j W_oj·ct_j − s` as computed: the client can recover `W`
    #[cfg(test)]
    NoneInsecure,
}

/// `Enc(W·r − s)` for a batch of `count` inferences whose masks the client
/// encrypted with [`crate::ClientKey::encrypt`] (`input_len` ciphertexts),
/// handed to `emit` in parts as they are done (so memory stays bounded for
/// big layers). Draws `s` uniformly over `Z_2^k` for every coefficient (the
/// unused ones too) from a CSPRNG.
pub fn evaluate(
    key: &ServerKey,
    form: &dyn LinearForm,
    ciphertexts: Vec<Vec<u8>>,
    count: usize,
    emit: &mut dyn FnMut(Part) -> Result<(), HeError>,
) -> Result<(), HeError> {
    evaluate_with(key, form, ciphertexts, count, Privacy::Full, true, emit)
}

/// [`evaluate`], collected into one [`Reply`] (for small layers and tests).
pub fn evaluate_all(
    key: &ServerKey,
    form: &dyn LinearForm,
    ciphertexts: Vec<Vec<u8>>,
    count: usize,
) -> Result<Reply, HeError> {
    collect(form, count, move |emit| {
        evaluate_with(key, form, ciphertexts, count, Privacy::Full, true, emit)
    })
}

pub(crate) fn collect(
    form: &dyn LinearForm,
    count: usize,
    run: impl FnOnce(&mut dyn FnMut(Part) -> Result<(), HeError>) -> Result<(), HeError>,
) -> Result<Reply, HeError> {
    let out_len = form.output_len();
    let mut cts: Vec<Option<Vec<u8>>> = vec![None; out_len];
    let mut masks = vec![vec![0u64; out_len]; count];
    run(&mut |part: Part| {
        for (k, (o, ct)) in part.outputs.iter().zip(part.ciphertexts).enumerate() {
            cts[*o] = Some(ct);
            for (b, row) in masks.iter_mut().enumerate() {
                row[*o] = part.masks[b][k];
            }
        }
        Ok(())
    })?;
    let ciphertexts = cts
        .into_iter()
        .enumerate()
        .map(|(o, r)| r.ok_or_else(|| HeError::Linear(format!("no block computes output {o}"))))
        .collect::<Result<_, _>>()?;
    Ok(Reply { ciphertexts, masks })
}

pub(crate) fn evaluate_with(
    key: &ServerKey,
    form: &dyn LinearForm,
    ciphertexts: Vec<Vec<u8>>,
    count: usize,
    privacy: Privacy,
    shrink: bool,
    emit: &mut dyn FnMut(Part) -> Result<(), HeError>,
) -> Result<(), HeError> {
    let params = &key.params;
    let n = params.degree();
    if count == 0 || count > n {
        return Err(HeError::Shape(format!(
            "{count} inferences; a batch holds 1..={n}"
        )));
    }
    if ciphertexts.len() != form.input_len() {
        return Err(HeError::Shape(format!(
            "{} ciphertexts for a layer with {} inputs",
            ciphertexts.len(),
            form.input_len()
        )));
    }
    let plan = params.flood_plan(form.fan_in())?;
    let par = params.bfv();
    let ctx = par.context_at_level(0).map_err(lib_err)?.clone();
    // Decoded one by one, each serialised form dropped as soon as it is read:
    // `[b, a]`, b's coefficients as sent, a expanded from its seed (NTT).
    let inputs: Vec<[Array2<u64>; 2]> = ciphertexts
        .into_par_iter()
        .map(|bytes| {
            let (seed, b) = wire::decode_mask_ciphertext(&bytes, par)?;
            let a = Poly::random_from_seed(&ctx, Representation::Ntt, seed);
            Ok([b, a.coefficients().to_owned()])
        })
        .collect::<Result<_, _>>()?;
    let limb_bits = limb_bits(form.max_abs_row_sum())?;
    let moduli = par.moduli().to_vec();
    let encoder = ScaledEncoder::new(&ctx, n, params.ring_bits())?;
    let t_mask = (1u64 << params.ring_bits()) - 1;

    let per_output = 2 * moduli.len() * n * 8;
    let max_outputs = (OUTPUT_MEMORY_BUDGET / per_output).max(1);
    let trace = std::env::var_os("SECINFER_TRACE").is_some();
    for group in block_groups(form, max_outputs) {
        let outputs = form.outputs(group.clone());
        // rows[comp * L + l] is [outputs.len(), N]: that residue row of every output.
        let t0 = std::time::Instant::now();
        let rows = products(form, group, &outputs, &inputs, &moduli, n, limb_bits)?;
        let t1 = std::time::Instant::now();
        let finished: Vec<(Vec<u8>, Vec<u64>)> = (0..outputs.len())
            .into_par_iter()
            .map_init(ChaCha20Rng::from_os_rng, |rng, k| {
                let gather = |comp: usize, repr: Representation| {
                    let mut a = Array2::<u64>::zeros((moduli.len(), n));
                    for l in 0..moduli.len() {
                        a.row_mut(l).assign(&rows[comp * moduli.len() + l].row(k));
                    }
                    Poly::try_convert_from(a, &ctx, false, repr).map_err(lib_err)
                };
                // the representations of the inputs: b as sent, a from its seed
                let c0 = gather(0, Representation::PowerBasis)?;
                let c1 = gather(1, Representation::Ntt)?;
                let s: Vec<u64> = (0..n).map(|_| rng.next_u64() & t_mask).collect();
                let ct = finish(key, &encoder, c0, c1, &s, &plan, privacy, shrink, None, rng)?;
                Ok((ct, s))
            })
            .collect::<Result<_, HeError>>()?;
        drop(rows);
        if trace {
            eprintln!(
                "he: {} inputs -> {} outputs, limbs of {limb_bits} bits: products {:?}, finish {:?}",
                inputs.len(),
                outputs.len(),
                t1 - t0,
                t1.elapsed()
            );
        }
        let masks = (0..count)
            .map(|b| finished.iter().map(|(_, s)| s[b]).collect())
            .collect();
        let ciphertexts = finished.into_iter().map(|(ct, _)| ct).collect();
        emit(Part {
            outputs,
            ciphertexts,
            masks,
        })?;
    }
    Ok(())
}

/// Integers up to this many bits are exact in `f64`.
const F64_EXACT_BITS: u32 = 53;

/// Limb width such that `max_row_sum · (2^bits − 1) < 2^53`.
fn limb_bits(max_row_sum: u128) -> Result<u32, HeError> {
    let need = 128 - max_row_sum.max(1).leading_zeros(); // bits of the row sum
    let bits = F64_EXACT_BITS.saturating_sub(need);
    if bits == 0 {
        return Err(HeError::Linear(format!(
            "weights too large: a row's absolute sum is {max_row_sum}, \
             at least 2^{} (the exact f64 products need it below 2^52)",
            need - 1
        )));
    }
    Ok(bits)
}

/// Consecutive blocks whose outputs fit `max_outputs` together (a block
/// larger than that is a group of its own).
fn block_groups(form: &dyn LinearForm, max_outputs: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for b in 0..form.blocks() {
        let len = form.block_len(b);
        if b > start && size + len > max_outputs {
            groups.push(start..b);
            start = b;
            size = 0;
        }
        size += len;
    }
    if start < form.blocks() {
        groups.push(start..form.blocks());
    }
    groups
}

/// `Σ_j W_oj · ct_j` for the outputs of `group`, residue row by residue row.
fn products(
    form: &dyn LinearForm,
    group: Range<usize>,
    outputs: &[usize],
    inputs: &[[Array2<u64>; 2]],
    moduli: &[u64],
    n: usize,
    limb_bits: u32,
) -> Result<Vec<Array2<u64>>, HeError> {
    let in_len = inputs.len();
    let q_bits = 64 - moduli.iter().max().copied().unwrap_or(1).leading_zeros();
    let limbs = q_bits.div_ceil(limb_bits) as usize;
    let limb_mask = (1u64 << limb_bits) - 1;
    let row_ids: Vec<(usize, usize)> = (0..2)
        .flat_map(|comp| (0..moduli.len()).map(move |l| (comp, l)))
        .collect();
    row_ids
        .par_iter()
        .map(|&(comp, l)| {
            let q = moduli[l];
            let m = Modulus::new(q).map_err(lib_err)?;
            let pow: Vec<u64> = (0..limbs)
                .map(|t| pow2_mod(t as u32 * limb_bits, q))
                .collect();
            let pow_shoup: Vec<u64> = pow.iter().map(|&p| m.shoup(p)).collect();
            let mut out = Array2::<u64>::zeros((outputs.len(), n));
            // row l of component comp of every input ciphertext
            let residues: Vec<&[u64]> = inputs
                .iter()
                .map(|ct| {
                    ct[comp]
                        .row(l)
                        .to_slice()
                        .ok_or_else(|| lib_err("residue rows are contiguous"))
                })
                .collect::<Result<_, _>>()?;
            let mut x = vec![0f64; SLOT_CHUNK * limbs * in_len];
            for i0 in (0..n).step_by(SLOT_CHUNK) {
                let width = SLOT_CHUNK.min(n - i0);
                let rows = width * limbs;
                // x[s * limbs + t][j] = limb t of slot i0 + s of input j: a
                // transpose, done in tiles of inputs so that reads and writes
                // both stay in cache.
                for j0 in (0..in_len).step_by(TRANSPOSE_TILE) {
                    let tile = &residues[j0..(j0 + TRANSPOSE_TILE).min(in_len)];
                    for s in 0..width {
                        for t in 0..limbs {
                            let dst = &mut x[(s * limbs + t) * in_len + j0..][..tile.len()];
                            for (d, res) in dst.iter_mut().zip(tile) {
                                let v = m.reduce(res[i0 + s]);
                                *d = ((v >> (t as u32 * limb_bits)) & limb_mask) as f64;
                            }
                        }
                    }
                }
                let width_o = outputs.len();
                let y = form
                    .apply_blocks(group.clone(), &x[..rows * in_len], rows)
                    .map_err(HeError::Linear)?;
                if y.len() != rows * width_o {
                    return Err(HeError::Linear(format!(
                        "blocks {group:?} returned {} values, expected {}",
                        y.len(),
                        rows * width_o
                    )));
                }
                for s in 0..width {
                    for k in 0..width_o {
                        let mut acc = 0u64;
                        for t in 0..limbs {
                            // exact: an integer below 2^53 in magnitude
                            let v = y[(s * limbs + t) * width_o + k] as i64;
                            let r = if v >= 0 {
                                m.reduce(v as u64)
                            } else {
                                m.neg(m.reduce(v.unsigned_abs()))
                            };
                            acc = m.add(acc, m.mul_shoup(r, pow[t], pow_shoup[t]));
                        }
                        out[[k, i0 + s]] = acc;
                    }
                }
            }
            Ok(out)
        })
        .collect()
}

/// Subtracts `s`, re-randomises, floods and (if `shrink`) drops to the last
/// prime; returns the serialised reply. `c0` comes in coefficient form, `c1`
/// in NTT form (as the inputs were); the reply travels as coefficients:
/// whole, or with `kept` given (block packing) only those coefficients of
/// `c0` and all of `c1` (then it must be shrunk).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    key: &ServerKey,
    encoder: &ScaledEncoder,
    mut c0: Poly,
    mut c1: Poly,
    s: &[u64],
    plan: &FloodPlan,
    privacy: Privacy,
    shrink: bool,
    kept: Option<&[usize]>,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<u8>, HeError> {
    let par = key.params.bfv();
    let t = 1u64 << key.params.ring_bits();
    let neg_s: Vec<u64> = s.iter().map(|&v| (t - v) & (t - 1)).collect();
    let ctx = c0.ctx().clone();
    if privacy == Privacy::Full {
        // Re-randomise with a fresh encryption of zero under the client's key,
        // (u·p0 + e1, u·p1 + e2), so the second component no longer reveals
        // Σ_j W_oj·a_j. u is multiplied in the NTT domain; e1, e2 are added to
        // the coefficients below. Same distributions as `fhe`'s own public-key
        // encryption (centred binomial, variance ERROR_VARIANCE), which the
        // flooding bound assumes.
        let u =
            Poly::small(&ctx, Representation::Ntt, crate::ERROR_VARIANCE, rng).map_err(lib_err)?;
        let mut r0 = u.clone();
        r0 *= &key.p0;
        r0.change_representation(Representation::PowerBasis);
        let mut r1 = u;
        r1 *= &key.p1;
        c0 += &r0;
        c1 += &r1;
    }
    // The rest is done on coefficients (flooding and dropping primes need
    // them, and the reply travels that way).
    c1.change_representation(Representation::PowerBasis);
    c0 += &encoder.encode(&neg_s)?;
    if privacy == Privacy::Full {
        let e1 = Poly::small(&ctx, Representation::PowerBasis, crate::ERROR_VARIANCE, rng)
            .map_err(lib_err)?;
        let e2 = Poly::small(&ctx, Representation::PowerBasis, crate::ERROR_VARIANCE, rng)
            .map_err(lib_err)?;
        c0 += &e1;
        c1 += &e2;
        add_flood(&mut c0, plan, rng)?;
    }
    let mut level = 0;
    if shrink {
        while level < par.max_level() {
            c0.switch_down().map_err(lib_err)?;
            c1.switch_down().map_err(lib_err)?;
            level += 1;
        }
    }
    let moduli = c0.ctx().moduli();
    if let Some(kept) = kept {
        if moduli.len() != 1 {
            return Err(lib_err("a sparse reply is switched down to one prime"));
        }
        let row = c0.coefficients();
        let values: Vec<u64> = kept.iter().map(|&i| row[[0, i]]).collect();
        return Ok(wire::encode_sparse_reply(
            &values,
            c1.coefficients(),
            moduli,
            level,
        ));
    }
    Ok(wire::encode_ciphertext(
        vec![
            wire::encode_poly(c0.coefficients(), moduli),
            wire::encode_poly(c1.coefficients(), moduli),
        ],
        None,
        level,
    ))
}

/// Widest flood [`add_flood`] draws: `β + 1 ≤ 192` bits from three words.
pub(crate) const MAX_FLOOD_BITS: u32 = 190;

/// Adds to every coefficient of `p` (power basis, full level) an independent
/// value uniform in `[−2^β, 2^β)`.
pub(crate) fn add_flood(
    p: &mut Poly,
    plan: &FloodPlan,
    rng: &mut ChaCha20Rng,
) -> Result<(), HeError> {
    let beta = plan.flood_bits;
    if beta > MAX_FLOOD_BITS {
        return Err(HeError::Params(format!(
            "flood of 2^{beta} is wider than the sampler's 2^{MAX_FLOOD_BITS}"
        )));
    }
    let ctx = p.ctx().clone();
    let moduli: Vec<Modulus> = ctx
        .moduli()
        .iter()
        .map(|&q| Modulus::new(q).map_err(lib_err))
        .collect::<Result<_, _>>()?;
    let n = p.coefficients().ncols();
    // u uniform in [0, 2^(β+1)) as three 64-bit words, most significant first
    let bits = beta + 1;
    let top_mask = |w: u32| -> u64 {
        // bits of word w (0 = least significant) that u may use
        let lo = 64 * w;
        if bits >= lo + 64 {
            u64::MAX
        } else if bits <= lo {
            0
        } else {
            (1u64 << (bits - lo)) - 1
        }
    };
    let masks = [top_mask(2), top_mask(1), top_mask(0)];
    // words that are always zero are skipped (two words for β < 127)
    let first = masks.iter().position(|&m| m != 0).unwrap_or(2);
    let offsets: Vec<u64> = ctx.moduli().iter().map(|&q| pow2_mod(beta, q)).collect();
    let mut a = p.coefficients().to_owned();
    for i in 0..n {
        let words = [
            rng.next_u64() & masks[0],
            rng.next_u64() & masks[1],
            rng.next_u64() & masks[2],
        ];
        for (l, m) in moduli.iter().enumerate() {
            // Horner on 64-bit words: every step reduces a value below 2^128
            let mut r = 0u64;
            for &w in &words[first..] {
                r = m.reduce_u128(((r as u128) << 64) | w as u128);
            }
            let f = m.sub(r, offsets[l]);
            a[[l, i]] = m.add(a[[l, i]], f);
        }
    }
    *p = Poly::try_convert_from(a, &ctx, false, Representation::PowerBasis).map_err(lib_err)?;
    Ok(())
}

fn add_mod(a: u64, b: u64, q: u64) -> u64 {
    let s = a + b;
    if s >= q { s - q } else { s }
}

fn pow2_mod(e: u32, q: u64) -> u64 {
    let mut r = 1u64 % q;
    for _ in 0..e {
        r = add_mod(r, r, q);
    }
    r
}

/// A layer restricted to its first few blocks of outputs (the others are not
/// computed), for tests and benchmarks that look at part of a big layer
/// through the same code path as the whole.
pub struct FirstBlocks<'a> {
    inner: &'a dyn LinearForm,
    blocks: usize,
}

impl<'a> FirstBlocks<'a> {
    /// The first blocks of `inner` whose outputs total at most `max_outputs`
    /// (at least one block).
    pub fn up_to_outputs(inner: &'a dyn LinearForm, max_outputs: usize) -> Self {
        let mut blocks = 0;
        let mut outputs = 0;
        while blocks < inner.blocks()
            && (blocks == 0 || outputs + inner.block_len(blocks) <= max_outputs)
        {
            outputs += inner.block_len(blocks);
            blocks += 1;
        }
        FirstBlocks { inner, blocks }
    }

    /// Outputs computed.
    pub fn computed_outputs(&self) -> usize {
        (0..self.blocks).map(|b| self.inner.block_len(b)).sum()
    }
}

impl LinearForm for FirstBlocks<'_> {
    fn input_len(&self) -> usize {
        self.inner.input_len()
    }
    fn output_len(&self) -> usize {
        self.inner.output_len()
    }
    fn fan_in(&self) -> usize {
        self.inner.fan_in()
    }
    fn max_abs_row_sum(&self) -> u128 {
        self.inner.max_abs_row_sum()
    }
    fn blocks(&self) -> usize {
        self.blocks
    }
    fn block_len(&self, b: usize) -> usize {
        self.inner.block_len(b)
    }
    fn outputs(&self, b: Range<usize>) -> Vec<usize> {
        self.inner.outputs(b)
    }
    fn apply_blocks(&self, b: Range<usize>, x: &[f64], rows: usize) -> Result<Vec<f64>, String> {
        if b.end > self.blocks {
            return Err(format!("blocks {b:?} beyond the first {}", self.blocks));
        }
        self.inner.apply_blocks(b, x, rows)
    }
}
