//! Truncation (division by `2^s` after a linear op) and revealing a result.
//!
//! For `0 ≤ x < 2^(k−1)` held as `x = a + b mod 2^k` the shares wrap
//! (`a + b = x + 2^k`) exactly when `w = msb(a) ∨ msb(b)`. With arithmetic
//! shares of `w = m_C + m_S·(1 − m_C)` (one product from a word OT the
//! client sends, as in [`crate::select`]) each party keeps
//! `(x_P >> s) − w_P·2^(k−s)`; the shares add up to
//! `⌊a/2^s⌋ + ⌊b/2^s⌋ − w·2^(k−s) = ⌊x/2^s⌋ − c`, where
//! `c = [a mod 2^s + b mod 2^s ≥ 2^s]` is the carry out of the dropped low
//! bits. The client adds `2^s − 1` first, so the result is
//! `⌈v/2^s⌉ − c`: never more than one unit from `v/2^s`, exact when `2^s`
//! divides `v`, and (the low bits of a share being uniform) `c = 1` with
//! probability `1 − (v mod 2^s)/2^s`, which makes the result an unbiased
//! stochastic rounding of `v/2^s`. (Adding `2^(s−1)` instead, as for
//! round-to-nearest, would give `round(v/2^s) − c`: up to 1.5 units off and
//! half a unit low on average.) Signed values (`|v| < 2^(k−2)`) are moved
//! into range first: the client adds `B = 2^(k−2) − 2^s` (with the rounding
//! term, `2^(k−2) − 1` in all) and subtracts `B/2^s` after, which is exact
//! because `2^s` divides `B`. Unlike local truncation (each party shifting
//! its own share, SecureML), the error is never large.
//! **Reveal**: the server sends its shares, the client adds.

use crate::select::ot_products;
use crate::wire::{Reader, put_ring, ring_len};
use crate::{MpcError, Party, cost};
use secinfer_ot::Bits;

/// What a truncation may assume about the shared values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sign {
    /// `0 ≤ v ≤ 2^(k−1) − 2^s` (e.g. after a ReLU)
    NonNegative,
    /// `|v| < 2^(k−2)`
    Signed,
}

/// Shares of `r` with `⌈v/2^shift⌉ − 1 ≤ r ≤ ⌈v/2^shift⌉`, so
/// `|r − v/2^shift| ≤ 1`, exact when `2^shift` divides `v` (see the module
/// docs); `0 ≤ shift ≤ k − 2`, `v` in `sign`'s range. Two flights, one word
/// OT the client sends per element; none for `shift = 0`.
pub async fn truncate(
    p: &mut Party,
    x: &[u64],
    shift: u32,
    sign: Sign,
) -> Result<Vec<u64>, MpcError> {
    let ring = p.ring();
    let (k, mask) = (ring.bits(), ring.mask());
    if shift == 0 {
        return Ok(x.iter().map(|&v| v & mask).collect());
    }
    if shift + 2 > k {
        return Err(MpcError::Shape(format!(
            "truncation by {shift} bits in Z_2^{k}: at most {} bits",
            k.saturating_sub(2)
        )));
    }
    cost::ensure(
        p.correlations(),
        &cost::truncate(ring, x.len(), shift).demand,
    )?;
    let client = p.is_client();
    let (offset, unshift) = match (client, sign) {
        (false, _) => (0, 0),
        (true, Sign::NonNegative) => ((1u64 << shift) - 1, 0),
        (true, Sign::Signed) => ((1u64 << (k - 2)) - 1, (1u64 << (k - 2 - shift)) - 1),
    };
    let shifted: Vec<u64> = x.iter().map(|&v| v.wrapping_add(offset) & mask).collect();
    // arithmetic shares of the wrap bit w = m_C + m_S·(1 − m_C): the
    // server's msb times the client's 1 − m_C, one product
    let msb = |v: u64| v >> (k - 1);
    let (chooser, sender) = if client {
        let values: Vec<u64> = shifted.iter().map(|&v| 1 - msb(v)).collect();
        ot_products(p, &Bits::default(), &values).await?
    } else {
        let mut words = vec![0u64; x.len().div_ceil(64)];
        for (i, &v) in shifted.iter().enumerate() {
            words[i / 64] |= msb(v) << (i % 64);
        }
        let bits = Bits::from_words(words, x.len()).expect("one word per 64 elements");
        ot_products(p, &bits, &[]).await?
    };
    let wrap: Vec<u64> = if client {
        shifted
            .iter()
            .zip(&sender)
            .map(|(&v, &s)| msb(v).wrapping_add(s))
            .collect()
    } else {
        chooser
    };
    let wrap_weight = 1u64 << (k - shift);
    Ok(shifted
        .iter()
        .zip(&wrap)
        .map(|(&v, &w)| {
            (v >> shift)
                .wrapping_sub(w.wrapping_mul(wrap_weight))
                .wrapping_sub(unshift)
                & mask
        })
        .collect())
}

/// Reveals shared values to the client: the server sends its shares (one
/// message) and gets `None`; the client gets the values.
pub async fn reveal_to_client(p: &mut Party, x: &[u64]) -> Result<Option<Vec<u64>>, MpcError> {
    let ring = p.ring();
    if p.is_client() {
        if x.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let msg = p.recv(ring_len(ring, x.len())).await?;
        let mut r = Reader::new(&msg, "reveal");
        let theirs = r.ring(ring, x.len())?;
        r.finish()?;
        Ok(Some(
            x.iter()
                .zip(&theirs)
                .map(|(a, b)| a.wrapping_add(*b) & ring.mask())
                .collect(),
        ))
    } else {
        if !x.is_empty() {
            let mut payload = Vec::with_capacity(ring_len(ring, x.len()));
            put_ring(&mut payload, ring, x);
            p.send(payload);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use rand::RngExt;

    /// Runs a truncation and checks `⌈v/2^s⌉ − 1 ≤ r ≤ ⌈v/2^s⌉`; returns `r`.
    fn check_truncate(k: u32, shift: u32, sign: Sign, v: &[i64], rng: &mut Rng) -> Vec<i64> {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::truncate(r, v.len(), shift);
        let out = duo!(r, c.demand, |p| truncate(p, &xc, shift, sign).await, |p| {
            truncate(p, &xs, shift, sign).await
        });
        out.check_cost(&c);
        let got = open_signed(
            r,
            out.client.as_ref().unwrap(),
            out.server.as_ref().unwrap(),
        );
        for (&r, &v) in got.iter().zip(v) {
            let ceil = (v as i128).div_euclid(1 << shift)
                + ((v as i128).rem_euclid(1 << shift) != 0) as i128;
            assert!(
                r as i128 == ceil || r as i128 == ceil - 1,
                "k = {k}, shift = {shift}, {sign:?}: {v} / 2^{shift} gave {r}"
            );
            // the promise the callers rely on
            assert!(((r as i128) << shift).abs_diff(v as i128) <= 1 << shift);
            if shift > 0 && v % (1 << shift) == 0 {
                assert_eq!(r as i128, ceil, "exact on multiples of 2^{shift}");
            }
        }
        got
    }

    #[test]
    fn truncation_is_within_one_unit_on_the_whole_range() {
        let mut rng = rng(51);
        for k in [8u32, 37, 62] {
            for shift in [0, 1, 3, k / 3, k - 2] {
                // non-negative: 0 ..= 2^(k−1) − 2^s
                let top = (1i64 << (k - 1)) - (1i64 << shift);
                let mut v = vec![0, 1, 2, top, top - 1, (1 << shift) - 1, 1 << shift];
                v.retain(|&x| (0..=top).contains(&x));
                v.extend((0..300).map(|_| rng.random_range(0..=top)));
                check_truncate(k, shift, Sign::NonNegative, &v, &mut rng);
                // signed: |v| < 2^(k−2)
                let lim = (1i64 << (k - 2)) - 1;
                let mut v = vec![0, 1, -1, lim, -lim, lim - 1, -lim + 1];
                v.extend((0..300).map(|_| rng.random_range(-lim..=lim)));
                check_truncate(k, shift, Sign::Signed, &v, &mut rng);
            }
        }
        for len in SIZES {
            let v: Vec<i64> = (0..len)
                .map(|_| rng.random_range(-(1i64 << 30)..1 << 30))
                .collect();
            check_truncate(37, 12, Sign::Signed, &v, &mut rng);
        }
    }

    #[test]
    fn truncation_rounds_without_bias() {
        // v/2^s = 12.5 and −12.25: over random share splits the mean is v/2^s
        // (round-half-up before the floor would give 12.0 on average)
        let mut rng = rng(52);
        let n = 1 << 14;
        for (v, sign) in [
            (12 * 256 + 128, Sign::NonNegative),
            (-(12 * 256 + 64), Sign::Signed),
        ] {
            let got = check_truncate(37, 8, sign, &vec![v; n], &mut rng);
            let mean = got.iter().sum::<i64>() as f64 / n as f64;
            let want = v as f64 / 256.0;
            // the standard deviation of the mean is at most 0.5/√n ≈ 0.004
            assert!((mean - want).abs() < 0.05, "{v}: mean {mean}, want {want}");
        }
    }

    #[test]
    fn truncation_refuses_shifts_beyond_the_ring() {
        let x = vec![0u64; 2];
        let out = duo!(
            ring(37),
            Default::default(),
            |p| truncate(p, &x, 36, Sign::Signed).await,
            |p| { truncate(p, &x, 36, Sign::Signed).await }
        );
        assert!(matches!(out.client, Err(MpcError::Shape(_))));
    }

    #[test]
    fn truncation_shares_and_messages_are_uniform_for_a_fixed_input() {
        // The low k − s bits of an output share are the party's own input
        // share shifted (as in any truncation that shifts shares locally),
        // so output shares are uniform when the input sharing is, which is
        // what the linear layers before a truncation deliver; the messages
        // are uniform even for a fixed split.
        let r = ring(40);
        let n = 1 << 13;
        let mut rng = rng(54);
        for (v, sign) in [
            (0i64, Sign::NonNegative),
            (12345, Sign::Signed),
            (-(1 << 37), Sign::Signed),
        ] {
            let (xc, xs) = (vec![r.from_signed(v); n], vec![0u64; n]);
            let c = cost::truncate(r, n, 13);
            let out = duo!(r, c.demand, |p| truncate(p, &xc, 13, sign).await, |p| {
                truncate(p, &xs, 13, sign).await
            });
            out.assert_uniform_messages("truncation, fixed split");
            // the wrap correction alone randomises the top s bits
            for (share, who) in [(&out.client, "client"), (&out.server, "server")] {
                let top = share
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|&x| (x >> (40 - 8)) as usize);
                check_chi2(
                    top,
                    256,
                    &format!("truncation {who} share, top byte, fixed split"),
                );
            }

            let (xc, xs) = split_signed(&mut rng, r, &vec![v; n]);
            let out = duo!(r, c.demand, |p| truncate(p, &xc, 13, sign).await, |p| {
                truncate(p, &xs, 13, sign).await
            });
            assert_uniform_ring(r, out.client.as_ref().unwrap(), "truncation client share");
            assert_uniform_ring(r, out.server.as_ref().unwrap(), "truncation server share");
            out.assert_uniform_messages("truncation");
        }
    }

    #[test]
    fn no_mask_serves_twice_in_a_truncation_view() {
        // The client receives δ, the server w; with a uniform input split
        // (as the linear layers deliver it) each party's message and output
        // share, bit plane by bit plane, XOR to uniform bits (and w and
        // the share differ and add to uniform ring elements).
        let r = ring(40);
        let n = 1 << 13;
        let mut rng = rng(55);
        for (v, sign) in [(0i64, Sign::NonNegative), (-(1 << 37), Sign::Signed)] {
            let (xc, xs) = split_signed(&mut rng, r, &vec![v; n]);
            let c = cost::truncate(r, n, 13);
            let out = duo!(r, c.demand, |p| truncate(p, &xc, 13, sign).await, |p| {
                truncate(p, &xs, 13, sign).await
            });
            let (client, server) = (out.client.as_ref().unwrap(), out.server.as_ref().unwrap());
            let [delta] = &out.to_client[..] else {
                panic!("the client receives δ only");
            };
            let [w] = &out.to_server[..] else {
                panic!("the server receives w only");
            };
            let what = format!("truncation of {v}");
            let mut view = vec![("client's δ".to_string(), delta.clone())];
            view.extend(bit_planes(r, client, "client's share"));
            assert_pairwise_xor_uniform(&view, &format!("{what}, client"));
            let w = ring_values(r, w, n);
            let mut view = bit_planes(r, &w, "server's w");
            view.extend(bit_planes(r, server, "server's share"));
            assert_pairwise_xor_uniform(&view, &format!("{what}, server"));
            let view = [
                ("server's w".to_string(), w),
                ("server's share".to_string(), server.clone()),
            ];
            assert_pairwise_ring_uniform(r, &view, &format!("{what}, server"));
        }
    }

    #[test]
    fn reveal_gives_the_client_the_values_and_the_server_nothing() {
        let mut rng = rng(53);
        for k in [8u32, 37, 62] {
            let r = ring(k);
            for n in SIZES {
                let mut v = random_signed(&mut rng, k, n);
                for (i, e) in signed_edges(k).into_iter().enumerate().take(n) {
                    v[i] = e;
                }
                let (xc, xs) = split_signed(&mut rng, r, &v);
                let c = cost::reveal_to_client(r, n);
                let out = duo!(r, c.demand, |p| reveal_to_client(p, &xc).await, |p| {
                    reveal_to_client(p, &xs).await
                });
                out.check_cost(&c);
                let got = out.client.unwrap().unwrap();
                assert_eq!(got.iter().map(|&x| r.to_signed(x)).collect::<Vec<_>>(), v);
                assert_eq!(out.server.unwrap(), None);
            }
        }
    }
}
