//! The server's side of the packings by polynomial products
//! ([`crate::Packing::Blocks`], [`crate::Packing::Conv`]): `Enc(r)` in blocks
//! → `Enc(W·r − s)`, each reply a sum of (weight polynomial × input
//! ciphertext) products named by its [`Layout`], only its output
//! coefficients of `c0` sent.
//!
//! A dense layer's matrix is read off its own [`LinearForm`] (applied to
//! unit vectors), so every form gets the dense packing without knowing its
//! shape (bounded by [`crate::packing::MAX_DENSE_WEIGHTS`]); a 2-D
//! convolution hands over its kernel ([`LinearForm::conv_weights`]). The
//! products run in the NTT domain (weights as centred residues: no lifting
//! to `[0, t)`), then each reply is masked, re-randomised, flooded and
//! switched down as the per-coefficient replies are ([`crate::server`]),
//! with `s` on exactly the kept coefficients.

use fhe_math::rq::traits::TryConvertFrom;
use fhe_math::rq::{Poly, Representation};
use fhe_math::zq::Modulus;
use ndarray::Array2;
use rand_chacha09::ChaCha20Rng;
use rand_chacha09::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

use crate::encoding::ScaledEncoder;
use crate::packing::{
    BlockShape, Layout, MAX_DENSE_WEIGHTS, Packing, REPLIES_PER_PART, WEIGHT_CACHE_BYTES,
};
use crate::server::{Privacy, finish};
use crate::{HeError, LinearForm, ServerKey, lib_err, wire};

/// One reply of the block packing, and the server's masks for it.
#[derive(Debug)]
pub struct BlockPart {
    /// reply number (`h·F + f`)
    pub index: usize,
    /// serialised reply
    pub ciphertext: Vec<u8>,
    /// `s`, one per kept coefficient, in [`BlockShape::kept`] order
    pub masks: Vec<u64>,
}

/// `Enc(W·r − s)` for a batch laid out as `packing` (a layout by polynomial
/// products), from the client's input ciphertexts, handed to `emit` a few
/// replies at a time. `s` is drawn uniformly over `Z_2^k` from a CSPRNG for
/// every kept coefficient.
pub fn evaluate_packed(
    key: &ServerKey,
    form: &dyn LinearForm,
    packing: &Packing,
    ciphertexts: Vec<Vec<u8>>,
    emit: &mut dyn FnMut(Vec<BlockPart>) -> Result<(), HeError>,
) -> Result<(), HeError> {
    evaluate_packed_with(key, form, packing, ciphertexts, Privacy::Full, true, emit)
}

/// [`evaluate_packed`] for a dense block layout.
pub fn evaluate_blocks(
    key: &ServerKey,
    form: &dyn LinearForm,
    shape: &BlockShape,
    ciphertexts: Vec<Vec<u8>>,
    emit: &mut dyn FnMut(Vec<BlockPart>) -> Result<(), HeError>,
) -> Result<(), HeError> {
    evaluate_packed(key, form, &Packing::Blocks(*shape), ciphertexts, emit)
}

pub(crate) fn evaluate_packed_with(
    key: &ServerKey,
    form: &dyn LinearForm,
    packing: &Packing,
    ciphertexts: Vec<Vec<u8>>,
    privacy: Privacy,
    shrink: bool,
    emit: &mut dyn FnMut(Vec<BlockPart>) -> Result<(), HeError>,
) -> Result<(), HeError> {
    let params = key.params();
    let n = params.degree();
    let (layout, weights): (&dyn Layout, Vec<i64>) = match packing {
        Packing::PerCoefficient { .. } => {
            return Err(HeError::Shape(
                "the per-coefficient packing is evaluated by `evaluate`".into(),
            ));
        }
        Packing::Blocks(shape) => {
            if shape.input_len != form.input_len() || shape.output_len != form.output_len() {
                return Err(HeError::Shape(format!(
                    "block layout {shape:?} does not fit a {} -> {} layer",
                    form.input_len(),
                    form.output_len()
                )));
            }
            layout_check(shape, n)?;
            let w = match form.dense_weights() {
                Some(w) => w,
                None => dense_matrix(form)?,
            };
            // the flood is sized for centred weights, |w| <= t/2
            let half_t = 1i64 << (params.ring_bits() - 1);
            if let Some(v) = w.iter().find(|v| v.unsigned_abs() > half_t as u64) {
                return Err(HeError::Linear(format!(
                    "a weight {v} outside the centred range |w| <= 2^{}",
                    params.ring_bits() - 1
                )));
            }
            (shape, w)
        }
        Packing::Conv(shape) => {
            if shape.dims.input_len() != form.input_len()
                || shape.dims.output_len() != form.output_len()
            {
                return Err(HeError::Shape(format!(
                    "convolution layout {shape:?} does not fit a {} -> {} layer",
                    form.input_len(),
                    form.output_len()
                )));
            }
            layout_check(shape, n)?;
            let w = form.conv_weights().ok_or_else(|| {
                HeError::Shape(
                    "a convolution layout for a layer that is not a 2-D convolution".into(),
                )
            })?;
            (shape, w)
        }
    };
    if weights.len() != layout.weights_len() {
        return Err(HeError::Shape(format!(
            "{} weights for a layout of {}",
            weights.len(),
            layout.weights_len()
        )));
    }
    if ciphertexts.len() != layout.input_ciphertexts() {
        return Err(HeError::Shape(format!(
            "{} ciphertexts for a layout of {}",
            ciphertexts.len(),
            layout.input_ciphertexts()
        )));
    }
    let plan = params.flood_plan(layout.fan_in_bound())?;
    let par = params.bfv();
    let ctx = par.context_at_level(0).map_err(lib_err)?.clone();
    let moduli: Vec<Modulus> = ctx
        .moduli()
        .iter()
        .map(|&q| Modulus::new(q).map_err(lib_err))
        .collect::<Result<_, _>>()?;
    // [b, a] of an input ciphertext, both in NTT form. Inputs are decoded
    // (393 KiB each) only for the replies being made, so memory follows the
    // replies in flight; the serialised form (184 KiB) is what waits.
    let parse = |bytes: &[u8]| wire::decode_mask_ciphertext(bytes, par);
    let decode = |bytes: &[u8]| -> Result<[Poly; 2], HeError> {
        let (seed, b) = parse(bytes)?;
        let a = Poly::random_from_seed(&ctx, Representation::Ntt, seed);
        let mut b =
            Poly::try_convert_from(b, &ctx, false, Representation::PowerBasis).map_err(lib_err)?;
        b.change_representation(Representation::Ntt);
        Ok([b, a])
    };
    // every input is parsed once up front, so that malformed input is
    // refused before any reply is made
    ciphertexts
        .par_iter()
        .try_for_each(|c| parse(c).map(drop))?;
    let poly_bytes = moduli.len() * n * 8;
    let cache: Option<Vec<Poly>> =
        if layout.weight_polys().saturating_mul(poly_bytes) <= WEIGHT_CACHE_BYTES {
            Some(
                (0..layout.weight_polys())
                    .into_par_iter()
                    .map(|p| weight_poly(layout, &weights, p, &ctx, &moduli, n))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
    let encoder = ScaledEncoder::new(&ctx, n, params.ring_bits())?;
    let t_mask = (1u64 << params.ring_bits()) - 1;
    let replies: Vec<usize> = (0..layout.output_ciphertexts()).collect();
    // `SECINFER_TRACE=1`: where the job's time goes (thread-seconds)
    let trace = Trace::new();
    for chunk in replies.chunks(REPLIES_PER_PART) {
        let t = std::time::Instant::now();
        let mut needed: Vec<usize> = chunk
            .iter()
            .flat_map(|&k| layout.terms(k).into_iter().map(|(input, _)| input))
            .collect();
        needed.sort_unstable();
        needed.dedup();
        let decoded: std::collections::HashMap<usize, [Poly; 2]> = needed
            .into_par_iter()
            .map(|i| {
                let bytes = ciphertexts
                    .get(i)
                    .ok_or_else(|| lib_err("a term names a missing input"))?;
                Ok((i, decode(bytes)?))
            })
            .collect::<Result<_, HeError>>()?;
        trace.add(&trace.decode, t);
        let parts = chunk
            .par_iter()
            .map_init(ChaCha20Rng::from_os_rng, |rng, &k| {
                let t = std::time::Instant::now();
                let mut acc: Option<[Poly; 2]> = None;
                for (input, p) in layout.terms(k) {
                    let built;
                    let w = match &cache {
                        Some(c) => c
                            .get(p)
                            .ok_or_else(|| lib_err("a term names a missing weight polynomial"))?,
                        None => {
                            built = weight_poly(layout, &weights, p, &ctx, &moduli, n)?;
                            &built
                        }
                    };
                    let [b, a] = decoded
                        .get(&input)
                        .ok_or_else(|| lib_err("a term names a missing input"))?;
                    let mut pb = w.clone();
                    pb *= b;
                    let mut pa = w.clone();
                    pa *= a;
                    match &mut acc {
                        None => acc = Some([pb, pa]),
                        Some([c0, c1]) => {
                            *c0 += &pb;
                            *c1 += &pa;
                        }
                    }
                }
                let [mut c0, c1] = acc.ok_or_else(|| lib_err("a reply with no term"))?;
                trace.add(&trace.products, t);
                let t = std::time::Instant::now();
                c0.change_representation(Representation::PowerBasis);
                let kept = layout.kept(k);
                let mut s_full = vec![0u64; n];
                let mut masks = Vec::with_capacity(kept.len());
                for kp in &kept {
                    let s = rng.next_u64() & t_mask;
                    s_full[kp.coefficient] = s;
                    masks.push(s);
                }
                let positions: Vec<usize> = kept.iter().map(|kp| kp.coefficient).collect();
                let ciphertext = finish(
                    key,
                    &encoder,
                    c0,
                    c1,
                    &s_full,
                    &plan,
                    privacy,
                    shrink,
                    // a reply kept at full level (tests only) travels whole
                    shrink.then_some(&positions[..]),
                    rng,
                )?;
                trace.add(&trace.finish, t);
                Ok(BlockPart {
                    index: k,
                    ciphertext,
                    masks,
                })
            })
            .collect::<Result<Vec<_>, HeError>>()?;
        emit(parts)?;
    }
    trace.report(&format!(
        "{} inputs, {} replies, {} products",
        layout.input_ciphertexts(),
        layout.output_ciphertexts(),
        layout.products()
    ));
    Ok(())
}

/// Thread-seconds per part of a block-packed job, printed to stderr when
/// `SECINFER_TRACE` is set (the profile behind docs/offline.md's figures).
struct Trace {
    on: bool,
    start: std::time::Instant,
    decode: std::sync::atomic::AtomicU64,
    products: std::sync::atomic::AtomicU64,
    finish: std::sync::atomic::AtomicU64,
}

impl Trace {
    fn new() -> Trace {
        Trace {
            on: std::env::var_os("SECINFER_TRACE").is_some(),
            start: std::time::Instant::now(),
            decode: Default::default(),
            products: Default::default(),
            finish: Default::default(),
        }
    }

    fn add(&self, to: &std::sync::atomic::AtomicU64, since: std::time::Instant) {
        if self.on {
            to.fetch_add(
                since.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    fn report(&self, what: &str) {
        if self.on {
            let s = |a: &std::sync::atomic::AtomicU64| {
                a.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
            };
            eprintln!(
                "he blocks: {what}: {:.3} s wall; thread-s: decode {:.3}, products {:.3}, finish {:.3}",
                self.start.elapsed().as_secs_f64(),
                s(&self.decode),
                s(&self.products),
                s(&self.finish)
            );
        }
    }
}

fn layout_check(layout: &dyn Layout, degree: usize) -> Result<(), HeError> {
    layout.check(degree)
}

/// `W` as centred integers, row-major `[output_len, input_len]`, read off the
/// form by applying it to unit vectors (in chunks of rows).
fn dense_matrix(form: &dyn LinearForm) -> Result<Vec<i64>, HeError> {
    let (n_i, n_o) = (form.input_len(), form.output_len());
    if n_i.saturating_mul(n_o) > MAX_DENSE_WEIGHTS {
        return Err(HeError::Shape(format!(
            "a {n_i} -> {n_o} layer has more than {MAX_DENSE_WEIGHTS} weights in dense form"
        )));
    }
    let outputs = form.outputs(0..form.blocks());
    if outputs.len() != n_o || outputs.iter().any(|&o| o >= n_o) {
        return Err(HeError::Linear(format!(
            "the layer's blocks compute {} outputs, expected {n_o}",
            outputs.len()
        )));
    }
    let mut w = vec![0i64; n_o * n_i];
    // unit vectors per call: at most 256, and at most 64 MiB of them
    let per_call = (256usize).min(((64 << 20) / (8 * n_i)).max(1));
    for j0 in (0..n_i).step_by(per_call) {
        let rows = per_call.min(n_i - j0);
        let mut x = vec![0f64; rows * n_i];
        for r in 0..rows {
            x[r * n_i + j0 + r] = 1.0;
        }
        let y = form
            .apply_blocks(0..form.blocks(), &x, rows)
            .map_err(HeError::Linear)?;
        if y.len() != rows * n_o {
            return Err(HeError::Linear(format!(
                "the layer returned {} values for {rows} unit vectors, expected {}",
                y.len(),
                rows * n_o
            )));
        }
        for r in 0..rows {
            for (k, &o) in outputs.iter().enumerate() {
                w[o * n_i + j0 + r] = y[r * n_o + k] as i64;
            }
        }
    }
    Ok(w)
}

/// Weight polynomial `p` in NTT form: each weight (centred) at its
/// coefficient, per prime.
fn weight_poly(
    layout: &dyn Layout,
    weights: &[i64],
    p: usize,
    ctx: &std::sync::Arc<fhe_math::rq::Context>,
    moduli: &[Modulus],
    degree: usize,
) -> Result<Poly, HeError> {
    let mut a = Array2::<u64>::zeros((moduli.len(), degree));
    for (pos, w) in layout.weight_positions(p) {
        let v = *weights
            .get(w)
            .ok_or_else(|| lib_err("a weight position beyond the weights"))?;
        if pos >= degree {
            return Err(lib_err("a weight position beyond the degree"));
        }
        for (l, m) in moduli.iter().enumerate() {
            let r = m.reduce(v.unsigned_abs());
            a[[l, pos]] = if v < 0 { m.neg(r) } else { r };
        }
    }
    let mut p =
        Poly::try_convert_from(a, ctx, false, Representation::PowerBasis).map_err(lib_err)?;
    p.change_representation(Representation::Ntt);
    Ok(p)
}
