//! Ciphertexts on the wire: `fhe` 0.1.1's protobuf format, packed and
//! unpacked here.
//!
//! The format: a ciphertext message holds its polynomials (`c`), the seed of
//! the last one if that one is uniform and left out (`seed`), and its level;
//! a polynomial message holds its degree, a representation tag, and its
//! power-basis (coefficient) residues, prime after prime, each residue in
//! `bits(q_i − 1)` bits, least significant first. The tag only says which
//! form the sender held; the bytes are coefficients whatever it says.
//!
//! `fhe`'s own (de)serialiser produces the same bytes, but it converts NTT
//! polynomials to coefficients and back on the way, and packs one byte at a
//! time through iterator adapters; on the offline phase's thousands of
//! 184 KB ciphertexts that was a third of the client's encryption time. The
//! tests check that `fhe` reads what this module writes and the reverse.
//! Every decoded residue is checked to be below its prime, so hostile bytes
//! cannot smuggle unreduced values into the arithmetic.

use fhe::bfv::BfvParameters;
use ndarray::{Array2, ArrayView2};
use prost::Message;

use crate::HeError;

/// `fhe_math`'s polynomial message (same tags), written and read here.
#[derive(Clone, PartialEq, prost::Message)]
struct Rq {
    #[prost(int32, tag = "1")]
    representation: i32,
    #[prost(uint32, tag = "2")]
    degree: u32,
    #[prost(bytes = "vec", tag = "3")]
    coefficients: Vec<u8>,
    #[prost(bool, tag = "4")]
    allow_variable_time: bool,
}

/// The representation tag of coefficients (`POWERBASIS`); 2 and 3 are NTT
/// forms, 0 is unknown.
const TAG_POWER_BASIS: i32 = 1;
const SEED_BYTES: usize = 32;

/// A ciphertext as received: its polynomials' coefficient residues
/// (`[primes, N]` each) and the seed of a left-out last polynomial.
#[derive(Debug)]
pub(crate) struct WireCiphertext {
    pub polys: Vec<Array2<u64>>,
    pub seed: Option<[u8; SEED_BYTES]>,
    pub level: usize,
}

fn bits_of(q: u64) -> usize {
    64 - (q - 1).leading_zeros() as usize
}

/// Packs `values` (each below `2^bits`) least significant bit first.
fn pack_into(out: &mut Vec<u8>, values: &[u64], bits: usize) {
    let mut acc: u128 = 0;
    let mut have = 0usize;
    for &v in values {
        acc |= (v as u128) << have;
        have += bits;
        if have >= 64 {
            out.extend_from_slice(&(acc as u64).to_le_bytes());
            acc >>= 64;
            have -= 64;
        }
    }
    let tail = have.div_ceil(8);
    out.extend_from_slice(&(acc as u64).to_le_bytes()[..tail]);
}

/// Unpacks `out.len()` values of `bits` bits; false if `bytes` is short.
fn unpack_into(bytes: &[u8], bits: usize, out: &mut [u64]) -> bool {
    if bytes.len() * 8 < out.len() * bits {
        return false;
    }
    let mask = (1u128 << bits) - 1;
    let mut acc: u128 = 0;
    let mut have = 0usize;
    let mut pos = 0usize;
    for o in out.iter_mut() {
        while have < bits {
            let mut word = [0u8; 8];
            let take = (bytes.len() - pos).min(8);
            word[..take].copy_from_slice(&bytes[pos..pos + take]);
            pos += take;
            acc |= (u64::from_le_bytes(word) as u128) << have;
            have += 8 * take;
        }
        *o = (acc & mask) as u64;
        acc >>= bits;
        have -= bits;
    }
    true
}

/// One polynomial message from coefficient residues `[primes, N]`.
pub(crate) fn encode_poly(residues: ArrayView2<u64>, moduli: &[u64]) -> Vec<u8> {
    let n = residues.ncols();
    let total: usize = moduli.iter().map(|&q| bits_of(q) * n / 8).sum();
    let mut coefficients = Vec::with_capacity(total + 8);
    for (row, &q) in residues.rows().into_iter().zip(moduli) {
        match row.as_slice() {
            Some(r) => pack_into(&mut coefficients, r, bits_of(q)),
            None => pack_into(&mut coefficients, &row.to_vec(), bits_of(q)),
        }
    }
    Rq {
        representation: TAG_POWER_BASIS,
        degree: n as u32,
        coefficients,
        allow_variable_time: false,
    }
    .encode_to_vec()
}

/// A ciphertext message from polynomial messages (and a seed for a left-out
/// last polynomial).
pub(crate) fn encode_ciphertext(
    polys: Vec<Vec<u8>>,
    seed: Option<[u8; SEED_BYTES]>,
    level: usize,
) -> Vec<u8> {
    fhe::proto::bfv::Ciphertext {
        c: polys,
        seed: seed.map(|s| s.to_vec()).unwrap_or_default(),
        level: level as u32,
    }
    .encode_to_vec()
}

fn malformed(what: &'static str, problem: impl Into<String>) -> HeError {
    HeError::Malformed {
        what,
        problem: problem.into(),
    }
}

/// Coefficient residues of one polynomial message at the given moduli.
fn decode_poly(
    what: &'static str,
    bytes: &[u8],
    moduli: &[u64],
    degree: usize,
) -> Result<Array2<u64>, HeError> {
    let rq = Rq::decode(bytes).map_err(|e| malformed(what, format!("polynomial: {e}")))?;
    if rq.degree as usize != degree {
        return Err(malformed(
            what,
            format!("degree {}, expected {degree}", rq.degree),
        ));
    }
    if !(1..=3).contains(&rq.representation) {
        return Err(malformed(
            what,
            format!("unknown representation tag {}", rq.representation),
        ));
    }
    let want: usize = moduli.iter().map(|&q| bits_of(q) * degree / 8).sum();
    if rq.coefficients.len() != want {
        return Err(malformed(
            what,
            format!(
                "{} coefficient bytes, expected {want}",
                rq.coefficients.len()
            ),
        ));
    }
    let mut out = Array2::<u64>::zeros((moduli.len(), degree));
    let mut at = 0;
    for (l, &q) in moduli.iter().enumerate() {
        let len = bits_of(q) * degree / 8;
        let mut row = out.row_mut(l);
        let row = row
            .as_slice_mut()
            .ok_or_else(|| malformed(what, "internal: row not contiguous"))?;
        if !unpack_into(&rq.coefficients[at..at + len], bits_of(q), row) {
            return Err(malformed(what, "truncated coefficients"));
        }
        if let Some(v) = row.iter().find(|&&v| v >= q) {
            return Err(malformed(
                what,
                format!("residue {v} is not below its prime {q}"),
            ));
        }
        at += len;
    }
    Ok(out)
}

/// Reads a ciphertext message: its polynomials' residues at its level's
/// primes, and its seed if it has one.
pub(crate) fn decode_ciphertext(
    what: &'static str,
    bytes: &[u8],
    par: &BfvParameters,
) -> Result<WireCiphertext, HeError> {
    let ct = fhe::proto::bfv::Ciphertext::decode(bytes)
        .map_err(|e| malformed(what, format!("ciphertext: {e}")))?;
    let level = ct.level as usize;
    if level > par.max_level() {
        return Err(malformed(
            what,
            format!("level {level}, the parameters have 0..={}", par.max_level()),
        ));
    }
    let ctx = par
        .context_at_level(level)
        .map_err(|e| malformed(what, e.to_string()))?;
    let seed = match ct.seed.len() {
        0 => None,
        SEED_BYTES => {
            let mut s = [0u8; SEED_BYTES];
            s.copy_from_slice(&ct.seed);
            Some(s)
        }
        n => return Err(malformed(what, format!("a seed of {n} bytes"))),
    };
    let polys =
        ct.c.iter()
            .map(|p| decode_poly(what, p, ctx.moduli(), par.degree()))
            .collect::<Result<Vec<_>, _>>()?;
    Ok(WireCiphertext { polys, seed, level })
}

/// Reads a client's mask ciphertext: exactly one polynomial (`b`, its
/// coefficient residues at full level) and the 32-byte seed of `a`.
pub(crate) fn decode_mask_ciphertext(
    bytes: &[u8],
    par: &BfvParameters,
) -> Result<([u8; SEED_BYTES], Array2<u64>), HeError> {
    let what = "mask ciphertext";
    let ct = decode_ciphertext(what, bytes, par)?;
    let (polys, seeded, level) = (ct.polys.len(), ct.seed.is_some(), ct.level);
    let (Some(seed), Ok([b]), 0) = (ct.seed, <[Array2<u64>; 1]>::try_from(ct.polys), level) else {
        return Err(malformed(
            what,
            format!(
                "{polys} polynomials{} at level {level}, expected one and a seed at level 0",
                if seeded { " and a seed" } else { "" }
            ),
        ));
    };
    Ok((seed, b))
}

/// A reply of the block packing: the kept coefficients of `c0` (residues at
/// the one prime of `level`, packed like a polynomial's) and `c1` whole:
/// `u32` count (little endian), the packed residues, then a ciphertext
/// message holding `c1` alone.
pub(crate) fn encode_sparse_reply(
    c0_kept: &[u64],
    c1: ArrayView2<u64>,
    moduli: &[u64],
    level: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + c0_kept.len() * 8 + c1.len() * 8);
    out.extend_from_slice(&(c0_kept.len() as u32).to_le_bytes());
    pack_into(&mut out, c0_kept, bits_of(moduli[0]));
    out.extend_from_slice(&encode_ciphertext(
        vec![encode_poly(c1, moduli)],
        None,
        level,
    ));
    out
}

/// Reads a block-packing reply that must carry `kept` coefficients at the
/// last level (one prime): `(c0 kept residues, c1 residues [1, N])`.
pub(crate) fn decode_sparse_reply(
    bytes: &[u8],
    kept: usize,
    par: &BfvParameters,
) -> Result<(Vec<u64>, Array2<u64>), HeError> {
    let what = "reply ciphertext";
    let (head, rest) = bytes
        .split_at_checked(4)
        .ok_or_else(|| malformed(what, "shorter than its header"))?;
    let declared = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if declared != kept {
        return Err(malformed(
            what,
            format!("{declared} kept coefficients, the layout has {kept}"),
        ));
    }
    let level = par.max_level();
    let ctx = par
        .context_at_level(level)
        .map_err(|e| malformed(what, e.to_string()))?;
    let &[q] = ctx.moduli() else {
        return Err(malformed(what, "the last level has more than one prime"));
    };
    let len = (kept * bits_of(q)).div_ceil(8);
    let (packed, ct) = rest
        .split_at_checked(len)
        .ok_or_else(|| malformed(what, "truncated kept coefficients"))?;
    let mut c0 = vec![0u64; kept];
    if !unpack_into(packed, bits_of(q), &mut c0) {
        return Err(malformed(what, "truncated kept coefficients"));
    }
    if let Some(v) = c0.iter().find(|&&v| v >= q) {
        return Err(malformed(
            what,
            format!("residue {v} is not below its prime {q}"),
        ));
    }
    let ct = decode_ciphertext(what, ct, par)?;
    let (polys, seeded, at) = (ct.polys.len(), ct.seed.is_some(), ct.level);
    let (None, Ok([c1]), true) = (ct.seed, <[Array2<u64>; 1]>::try_from(ct.polys), at == level)
    else {
        return Err(malformed(
            what,
            format!(
                "{polys} polynomials{} at level {at}, expected c1 alone at level {level}",
                if seeded { " and a seed" } else { "" }
            ),
        ));
    };
    Ok((c0, c1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhe_math::rq::{Context, Poly, Representation};
    use fhe_traits::{DeserializeWithContext, Serialize};
    use std::sync::Arc;

    #[test]
    fn packing_round_trips_every_width() {
        for bits in [1, 7, 8, 13, 37, 59, 60, 61, 63, 64] {
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let vals: Vec<u64> = (0..64u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & mask)
                .collect();
            let mut bytes = Vec::new();
            pack_into(&mut bytes, &vals, bits);
            assert_eq!(bytes.len(), 64 * bits / 8, "{bits} bits");
            let mut back = vec![0; 64];
            assert!(unpack_into(&bytes, bits, &mut back));
            assert_eq!(back, vals, "{bits} bits");
            assert!(!unpack_into(&bytes[1..], bits, &mut back));
        }
    }

    #[test]
    fn same_bytes_as_fhe_both_ways() {
        let p = crate::HeParams::for_ring(37).unwrap();
        let moduli = p.bfv().moduli().to_vec();
        let ctx = Arc::new(Context::new(&moduli, p.degree()).unwrap());
        let mut rng = rand09::rng();
        let poly = Poly::random(&ctx, Representation::PowerBasis, &mut rng);
        let ours = encode_poly(poly.coefficients(), &moduli);
        assert_eq!(ours, poly.to_bytes(), "identical to fhe's serialisation");
        // fhe reads ours; ours reads fhe's, also when fhe tagged it NTT.
        assert_eq!(Poly::from_bytes(&ours, &ctx).unwrap(), poly);
        let mut ntt = poly.clone();
        ntt.change_representation(Representation::Ntt);
        let back = decode_poly("test", &ntt.to_bytes(), &moduli, p.degree()).unwrap();
        assert_eq!(back, poly.coefficients());
    }

    #[test]
    fn hostile_polynomials_are_named() {
        let p = crate::HeParams::for_ring(37).unwrap();
        let moduli = p.bfv().moduli().to_vec();
        let n = p.degree();
        let good = Array2::<u64>::zeros((moduli.len(), n));
        let bytes = encode_poly(good.view(), &moduli);
        let err = |b: &[u8]| decode_poly("mask ciphertext", b, &moduli, n).unwrap_err();
        assert!(
            err(&bytes[..bytes.len() - 3])
                .to_string()
                .contains("mask ciphertext")
        );
        let mut wrong_degree = Rq::decode(&bytes[..]).unwrap();
        wrong_degree.degree = 16;
        assert!(
            err(&wrong_degree.encode_to_vec())
                .to_string()
                .contains("degree 16")
        );
        let mut unreduced = Array2::<u64>::zeros((moduli.len(), n));
        unreduced[[0, 5]] = moduli[0]; // fits the bit width, not below q
        let bytes = encode_poly(unreduced.view(), &moduli);
        assert!(err(&bytes).to_string().contains("not below its prime"));
        let mut bad_tag = Rq::decode(&bytes[..]).unwrap();
        bad_tag.representation = 9;
        assert!(
            err(&bad_tag.encode_to_vec())
                .to_string()
                .contains("representation tag 9")
        );
    }
}
