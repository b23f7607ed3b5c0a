//! The comparison: XOR shares of the carry `[α + β ≥ 2^n]` of a client's
//! `α` and a server's `β`, and DReLU built on it.
//!
//! Leaves are one bit wide: the generate bit `g_i = α_i ∧ β_i` comes from a
//! cross-AND, the propagate bit `p_i = α_i ⊕ β_i` is already shared (the
//! client holds `α_i`, the server `β_i`). A log-depth tree combines
//! adjacent ranges, high over low: `G = G_hi ⊕ P_hi·G_lo`,
//! `P = P_hi·P_lo`; the range starting at bit 0 needs no `P`, since nothing
//! carries into bit 0. The two ANDs of a pair share `P_hi`, so they take
//! one triple and its second product (`c2 = a2 ∧ b`, `BitTriples`), and
//! `P_hi`'s masked bit is sent once. One flight for the leaves and one per
//! tree level (`1 + ⌈log2 n⌉`), `n` bit OTs and `n − 1` triples per element.
//! All bits of a level, over all elements, go in one flight, bit plane by
//! bit plane. The leaves are deliberately one bit wide: comparing
//! multi-bit leaves by 1-out-of-2^m OT is the construction US12346830B2
//! claims. **DReLU** on `ℓ` bits (`−2^(ℓ−1) ≤ v < 2^(ℓ−1)`): with
//! `x_P = v_P mod 2^ℓ`, the sign bit of `v` is
//! `msb(x_C) ⊕ msb(x_S) ⊕ carry(low ℓ − 1 bits)`, so
//! `DReLU_C = 1 ⊕ msb(x_C) ⊕ carry_C` and `DReLU_S = msb(x_S) ⊕ carry_S`.

use secinfer_ot::Bits;

use crate::boolean::{and_shared_planes, cross_and_planes};
use crate::planes::{Planes, words_per_plane};
use crate::{MpcError, Party, cost};

/// One range of bits in the carry tree: its generate bits and, unless it
/// starts at bit 0, its propagate bits (one padded plane each).
struct Range {
    generate: Vec<u64>,
    propagate: Option<Vec<u64>>,
}

/// Shares of the carry out of the top of `bits` (plane `i` = bit `i` of
/// this party's integers), as one padded plane. Follows the schedule of
/// [`cost::carry_levels`].
pub(crate) async fn carry_planes(p: &mut Party, bits: &Planes) -> Result<Vec<u64>, MpcError> {
    let (nbits, n) = (bits.planes(), bits.len());
    let w = words_per_plane(n);
    if nbits == 0 || n == 0 {
        return Ok(vec![0; w]);
    }
    let generate = cross_and_planes(p, bits).await?;
    let mut ranges: Vec<Range> = (0..nbits)
        .map(|i| Range {
            generate: generate.plane(i).to_vec(),
            propagate: (i > 0).then(|| bits.plane(i).to_vec()),
        })
        .collect();
    while ranges.len() > 1 {
        // adjacent ranges pair up, low then high; an odd last one waits
        let mut old = std::mem::take(&mut ranges).into_iter();
        let mut pairs = Vec::new();
        let leftover = loop {
            match (old.next(), old.next()) {
                (Some(lo), Some(hi)) => pairs.push((lo, hi)),
                (last, _) => break last,
            }
        };
        // G = G_hi ⊕ P_hi·G_lo for every pair, and P = P_hi·P_lo for those
        // whose low range has a propagate bit: every pair but the bottom
        // one, which comes first, so these are the last planes
        let with_p = pairs
            .iter()
            .filter(|(lo, _)| lo.propagate.is_some())
            .count();
        let first_with_p = pairs.len() - with_p;
        if pairs[first_with_p..]
            .iter()
            .any(|(lo, _)| lo.propagate.is_none())
        {
            return Err(MpcError::Shape(
                "carry tree: a range without a propagate bit above the bottom".into(),
            ));
        }
        let mut g_lo = Planes::with_capacity(pairs.len(), n);
        let mut p_hi = Planes::with_capacity(pairs.len(), n);
        let mut p_lo = Planes::with_capacity(with_p, n);
        for (lo, hi) in &pairs {
            let Some(hi_p) = &hi.propagate else {
                return Err(MpcError::Shape(
                    "carry tree: a high range without a propagate bit".into(),
                ));
            };
            g_lo.append(&lo.generate);
            p_hi.append(hi_p);
            if let Some(lo_p) = &lo.propagate {
                p_lo.append(lo_p);
            }
        }
        let (g, p_new) = and_shared_planes(p, &g_lo, &p_hi, &p_lo).await?;
        for (j, (lo, hi)) in pairs.into_iter().enumerate() {
            let mut generate = hi.generate;
            for (x, t) in generate.iter_mut().zip(g.plane(j)) {
                *x ^= t;
            }
            let propagate = lo.propagate.map(|_| p_new.plane(j - first_with_p).to_vec());
            ranges.push(Range {
                generate,
                propagate,
            });
        }
        ranges.extend(leftover);
    }
    Ok(ranges
        .pop()
        .map(|r| r.generate)
        .unwrap_or_else(|| vec![0; w]))
}

fn check_width(values: &[u64], n: u32) -> Result<(), MpcError> {
    if n > 64 {
        return Err(MpcError::Shape(format!(
            "carry of {n}-bit integers: at most 64 bits"
        )));
    }
    let limit = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    if let Some(i) = values.iter().position(|&v| v > limit) {
        return Err(MpcError::Shape(format!(
            "carry of {n}-bit integers: element {i} = {} has more bits",
            values[i]
        )));
    }
    Ok(())
}

/// Checks `2 ≤ bits ≤ k` for a comparison on `bits` bits.
pub(crate) fn check_comparison_width(p: &Party, bits: u32) -> Result<(), MpcError> {
    let k = p.ring().bits();
    if (2..=k).contains(&bits) {
        Ok(())
    } else {
        Err(MpcError::Shape(format!(
            "comparison on {bits} bits in Z_2^{k}: needs 2 ≤ bits ≤ {k}"
        )))
    }
}

/// XOR shares of `[α + β ≥ 2^n]`, where the client passes its integers `α`
/// and the server its `β`, all in `[0, 2^n)`, `n ≤ 64`.
pub async fn carry(p: &mut Party, mine: &[u64], n: u32) -> Result<Bits, MpcError> {
    check_width(mine, n)?;
    cost::ensure(p.correlations(), &cost::carry(mine.len(), n).demand)?;
    let planes = Planes::from_values(mine, n as usize);
    let words = carry_planes(p, &planes).await?;
    Bits::from_words(words, mine.len())
        .ok_or_else(|| MpcError::Shape("the carry returned fewer words than one plane".into()))
}

/// XOR shares of `[v ≥ 0]` for shared `v` (this party's shares `x`) with
/// `−2^(bits−1) ≤ v < 2^(bits−1)`, `2 ≤ bits ≤ k`. Exact on that whole
/// range; outside it the result is meaningless.
pub async fn drelu(p: &mut Party, x: &[u64], bits: u32) -> Result<Bits, MpcError> {
    check_comparison_width(p, bits)?;
    cost::ensure(p.correlations(), &cost::drelu(x.len(), bits).demand)?;
    let planes = Planes::from_values(x, bits as usize);
    let low = planes.range(0, bits as usize - 1);
    let mut out = carry_planes(p, &low).await?;
    let msb = planes.plane(bits as usize - 1);
    let flip = if p.is_client() { u64::MAX } else { 0 };
    for (o, m) in out.iter_mut().zip(msb) {
        *o ^= m ^ flip;
    }
    // from_words clears the padding the flip set
    Bits::from_words(out, x.len())
        .ok_or_else(|| MpcError::Shape("the carry returned fewer words than one plane".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::wire::bits_len;
    use rand::RngExt;

    fn check_carry(alpha: &[u64], beta: &[u64], n: u32) {
        let c = cost::carry(alpha.len(), n);
        let (a, b) = (alpha.to_vec(), beta.to_vec());
        let out = duo!(ring(37), c.demand, |p| carry(p, &a, n).await, |p| carry(
            p, &b, n
        )
        .await);
        out.check_cost(&c);
        let got = open_bits(out.client.as_ref().unwrap(), out.server.as_ref().unwrap());
        for i in 0..alpha.len() {
            let want = (alpha[i] as u128 + beta[i] as u128) >> n == 1;
            assert_eq!(got.get(i), want, "n = {n}: {} + {}", alpha[i], beta[i]);
        }
    }

    #[test]
    fn carry_is_the_carry_out_of_the_sum() {
        let mut rng = rng(21);
        for n in [1u32, 2, 3, 5, 8, 13, 36, 61, 64] {
            let top = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            // edges: sums just below, at and above 2^n, zeros, extremes
            let edges = [
                (0, 0),
                (top, 0),
                (0, top),
                (top, 1),
                (1, top),
                (top, top),
                (top / 2, top / 2 + 1),
                (top / 2 + 1, top / 2 + 1),
                (top / 2, top / 2),
            ];
            let (mut alpha, mut beta): (Vec<u64>, Vec<u64>) = edges.into_iter().unzip();
            for _ in 0..200 {
                let a = rng.random::<u64>() & top;
                // half the time a sum close to 2^n
                let b = if rng.random::<bool>() {
                    (top - a).wrapping_add(rng.random_range(0..3)) & top
                } else {
                    rng.random::<u64>() & top
                };
                alpha.push(a);
                beta.push(b);
            }
            check_carry(&alpha, &beta, n);
        }
        for len in SIZES {
            let alpha: Vec<u64> = (0..len).map(|_| rng.random::<u64>() >> 28).collect();
            let beta: Vec<u64> = (0..len).map(|_| rng.random::<u64>() >> 28).collect();
            check_carry(&alpha, &beta, 36);
        }
    }

    #[test]
    fn carry_refuses_wider_integers() {
        let v = vec![1u64 << 5];
        let out = duo!(
            ring(37),
            cost::carry(1, 5).demand,
            |p| carry(p, &v, 5).await,
            |p| { carry(p, &v, 5).await }
        );
        let e = out.client.unwrap_err().to_string();
        assert!(e.contains("element 0"), "{e}");
    }

    fn check_drelu(k: u32, bits: u32, v: &[i64], rng: &mut Rng) {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::drelu(v.len(), bits);
        let out = duo!(r, c.demand, |p| drelu(p, &xc, bits).await, |p| drelu(
            p, &xs, bits
        )
        .await);
        out.check_cost(&c);
        let got = open_bits(out.client.as_ref().unwrap(), out.server.as_ref().unwrap());
        for (i, &v) in v.iter().enumerate() {
            assert_eq!(got.get(i), v >= 0, "k = {k}, bits = {bits}, v = {v}");
        }
    }

    #[test]
    fn drelu_is_the_sign_on_the_whole_range() {
        let mut rng = rng(22);
        for k in [8u32, 20, 37, 62] {
            for bits in [2, 3, k / 2, k - 1, k] {
                let mut v = signed_edges(bits);
                v.extend(random_signed(&mut rng, bits, 300));
                check_drelu(k, bits, &v, &mut rng);
            }
        }
        for len in SIZES {
            let v = random_signed(&mut rng, 37, len);
            check_drelu(37, 37, &v, &mut rng);
        }
    }

    #[test]
    fn drelu_refuses_widths_outside_the_ring() {
        let v = vec![0u64; 3];
        for bits in [0, 1, 38] {
            let out = duo!(
                ring(37),
                Default::default(),
                |p| drelu(p, &v, bits).await,
                |p| { drelu(p, &v, bits).await }
            );
            assert!(matches!(out.client, Err(MpcError::Shape(_))), "{bits}");
        }
    }

    #[test]
    fn drelu_shares_and_messages_are_uniform_for_a_fixed_input() {
        let r = ring(40);
        for v in [0i64, -1, (1 << 39) - 1, -(1 << 39)] {
            let n = 1 << 13;
            // the whole value in the client's share, none in the server's
            let xc = vec![r.from_signed(v); n];
            let xs = vec![0u64; n];
            let c = cost::drelu(n, 40);
            let out = duo!(r, c.demand, |p| drelu(p, &xc, 40).await, |p| drelu(
                p, &xs, 40
            )
            .await);
            assert_uniform_bits(out.client.as_ref().unwrap(), "DReLU client share");
            assert_uniform_bits(out.server.as_ref().unwrap(), "DReLU server share");
            out.assert_uniform_messages("DReLU");
        }
    }

    #[test]
    fn no_mask_serves_twice_in_a_drelu_view() {
        // Every message is bit planes of n bits, each masked on its own
        // (the leaves' cross-AND, then d and e of every AND of every
        // level): every two planes a party receives, and each plane with
        // its output share, XOR to uniform bits.
        let r = ring(40);
        let n = 1 << 13;
        for v in [-1i64, (1 << 39) - 1] {
            let xc = vec![r.from_signed(v); n];
            let xs = vec![0u64; n];
            let c = cost::drelu(n, 40);
            let out = duo!(r, c.demand, |p| drelu(p, &xc, 40).await, |p| drelu(
                p, &xs, 40
            )
            .await);
            for (who, received, share) in [
                ("client", &out.to_client, out.client.as_ref().unwrap()),
                ("server", &out.to_server, out.server.as_ref().unwrap()),
            ] {
                let mut view = cut(received, bits_len(n), who);
                // 39 leaf planes, d and e of every merge, d2 of every
                // propagate AND (which shares the merge's e)
                let planes: usize = cost::carry_levels(39)
                    .iter()
                    .map(|(merges, propagates)| 2 * merges + propagates)
                    .sum();
                assert_eq!(view.len(), 39 + planes);
                view.push((format!("{who}'s share"), share.to_bytes()));
                assert_pairwise_xor_uniform(&view, &format!("DReLU of {v}, {who}"));
            }
        }
    }
}
