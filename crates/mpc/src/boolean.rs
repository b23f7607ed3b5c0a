//! AND gates on XOR-shared bits, one flight each, bit-sliced.
//!
//! **Beaver AND** of shared `x` and `y` with a triple `(a, b, c = a∧b)`:
//! each party sends `d_P = x_P ⊕ a_P`, `e_P = y_P ⊕ b_P`; with
//! `d = d_C ⊕ d_S`, `e = e_C ⊕ e_S` it keeps
//! `z_P = c_P ⊕ d·b_P ⊕ e·a_P ⊕ [P = C]·d·e`, so `z_C ⊕ z_S = x ∧ y`
//! (Beaver, CRYPTO 1991). **Cross-AND** of a bit `a` only the client knows
//! and a bit `c` only the server knows, from one random bit OT the server
//! sends (`m0, m1`; the client holds `ρ, m_ρ`; `u = m0 ⊕ m1`): the client
//! sends `e = a ⊕ ρ`, the server `g = c ⊕ u`, in the same flight;
//! `z_C = a·g ⊕ m_ρ`, `z_S = e·u ⊕ m0`, and
//! `z_C ⊕ z_S = a·c ⊕ (m_ρ ⊕ m0 ⊕ ρ·u) = a·c`. Every message is masked by a
//! fresh uniform correlation bit. Both work on whole batches of bit planes
//! ([`Planes`]) so that one flight serves every gate of a circuit level.

use secinfer_ot::Bits;

use crate::planes::{Planes, words_per_plane};
use crate::wire::{Reader, bits_len};
use crate::{MpcError, Party, cost};

/// Shares of `x ∧ y` for every plane of `x` and `y` (same shape), from
/// `planes · len` triples, in one flight.
pub(crate) async fn and_planes(p: &mut Party, x: &Planes, y: &Planes) -> Result<Planes, MpcError> {
    let none = Planes::zeros(0, x.len());
    Ok(and_shared_planes(p, x, y, &none).await?.0)
}

/// Shares of `x_i ∧ y_i` for every plane `i` of `x` and `y` (same shape,
/// `m` planes), and of `x2_j ∧ y_(m−m2+j)` for every plane `j` of `x2`
/// (`m2 ≤ m` planes, paired with the last `m2` planes of `y`), from
/// `m · len` triples in one flight. The second AND of a pair uses the
/// triple's second product (`c2 = a2 ∧ b`, the same `b`), so `y`'s masked
/// plane `e` serves both: a pair sends three masked bits per party instead
/// of four and takes one triple instead of two. `x2`'s plane is masked
/// with `a2`, independent of `a`, so the peer sees three independent
/// uniform planes.
pub(crate) async fn and_shared_planes(
    p: &mut Party,
    x: &Planes,
    y: &Planes,
    x2: &Planes,
) -> Result<(Planes, Planes), MpcError> {
    let (m, n, m2) = (x.planes(), x.len(), x2.planes());
    debug_assert_eq!((m, n), (y.planes(), y.len()));
    debug_assert!(m2 <= m && (m2 == 0 || x2.len() == n));
    let total = m * n;
    if total == 0 {
        return Ok((Planes::zeros(m, n), Planes::zeros(m2, n)));
    }
    let t = p.correlations().triples(total)?;
    let a = Planes::stream_view(&t.a, m, n);
    let b = Planes::stream_view(&t.b, m, n);
    let c = Planes::stream_view(&t.c, m, n);
    let a2_all = Planes::stream_view(&t.a2, m, n);
    let c2_all = Planes::stream_view(&t.c2, m, n);
    // the pairs sit on the last m2 planes
    let paired = (m - m2) * words_per_plane(n);
    let (a2, c2, b_paired) = (&a2_all[paired..], &c2_all[paired..], &b[paired..]);
    // d, e and d2 travel in one message, in that order
    let (half, extra) = (a.len(), a2.len());
    let mut masked = Vec::with_capacity(2 * half + extra);
    masked.extend(x.words().iter().zip(a.iter()).map(|(x, a)| x ^ a));
    masked.extend(y.words().iter().zip(b.iter()).map(|(y, b)| y ^ b));
    masked.extend(x2.words().iter().zip(a2).map(|(x, a)| x ^ a));
    let planes = 2 * m + m2;
    let masked = Planes::from_words(masked, planes, n);
    let reply = p
        .exchange(masked.to_payload(), bits_len(planes * n))
        .await?;
    let mut r = Reader::new(&reply, "AND");
    let theirs = Planes::from_stream_words(r.bit_words(planes * n)?, planes, n);
    r.finish()?;
    let client = p.is_client();
    let open = |i: usize| masked.words()[i] ^ theirs.words()[i];
    let product = |d: u64, e: u64, a: u64, b: u64, c: u64| {
        let de = if client { d & e } else { 0 };
        c ^ (d & b) ^ (e & a) ^ de
    };
    let z = (0..half)
        .map(|i| product(open(i), open(half + i), a[i], b[i], c[i]))
        .collect();
    let z2 = (0..extra)
        .map(|i| {
            let (d2, e) = (open(2 * half + i), open(half + paired + i));
            product(d2, e, a2[i], b_paired[i], c2[i])
        })
        .collect();
    Ok((Planes::from_words(z, m, n), Planes::from_words(z2, m2, n)))
}

/// Shares of `a ∧ c` for every bit of `mine` (the client's `a`, the
/// server's `c`), from `planes · len` bit OTs the server sends, in one flight.
pub(crate) async fn cross_and_planes(p: &mut Party, mine: &Planes) -> Result<Planes, MpcError> {
    let (m, n) = (mine.planes(), mine.len());
    let total = m * n;
    if total == 0 {
        return Ok(Planes::zeros(m, n));
    }
    let z = if p.is_client() {
        let ot = p.correlations().bit_ots_received(total)?;
        let rho = Planes::stream_view(&ot.choice, m, n);
        let m_rho = Planes::stream_view(&ot.m, m, n);
        let e = mine
            .words()
            .iter()
            .zip(rho.iter())
            .map(|(a, r)| a ^ r)
            .collect();
        let g = send_and_receive(p, Planes::from_words(e, m, n), "cross-AND").await?;
        (mine.words().iter().zip(g.words()).zip(m_rho.iter()))
            .map(|((a, g), m)| (a & g) ^ m)
            .collect()
    } else {
        let ot = p.correlations().bit_ots_sent(total)?;
        let m0 = Planes::stream_view(&ot.m0, m, n);
        let m1 = Planes::stream_view(&ot.m1, m, n);
        let g = (mine.words().iter().zip(m0.iter()).zip(m1.iter()))
            .map(|((c, m0), m1)| c ^ m0 ^ m1)
            .collect();
        let e = send_and_receive(p, Planes::from_words(g, m, n), "cross-AND").await?;
        (e.words().iter().zip(m0.iter()).zip(m1.iter()))
            .map(|((e, m0), m1)| (e & (m0 ^ m1)) ^ m0)
            .collect()
    };
    Ok(Planes::from_words(z, m, n))
}

/// Sends `mine` and receives the peer's planes of the same shape.
async fn send_and_receive(
    p: &mut Party,
    mine: Planes,
    what: &'static str,
) -> Result<Planes, MpcError> {
    let (m, n) = (mine.planes(), mine.len());
    let reply = p.exchange(mine.to_payload(), bits_len(m * n)).await?;
    let mut r = Reader::new(&reply, what);
    let theirs = Planes::from_stream_words(r.bit_words(m * n)?, m, n);
    r.finish()?;
    Ok(theirs)
}

/// XOR shares of `x ∧ y` (Beaver, one flight, `x.len()` triples).
pub async fn and(p: &mut Party, x: &Bits, y: &Bits) -> Result<Bits, MpcError> {
    if x.len() != y.len() {
        return Err(MpcError::Shape(format!(
            "AND of {} bits with {} bits",
            x.len(),
            y.len()
        )));
    }
    cost::ensure(p.correlations(), &cost::and(x.len()).demand)?;
    let z = and_planes(p, &Planes::from_bits(x), &Planes::from_bits(y)).await?;
    Ok(z.plane_bits(0))
}

/// XOR shares of `a ∧ c` where the client passes its private bits `a` and
/// the server its private bits `c` (one flight, `mine.len()` bit OTs the
/// server sends).
pub async fn cross_and(p: &mut Party, mine: &Bits) -> Result<Bits, MpcError> {
    cost::ensure(p.correlations(), &cost::cross_and(mine.len()).demand)?;
    let z = cross_and_planes(p, &Planes::from_bits(mine)).await?;
    Ok(z.plane_bits(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn and_and_cross_and_compute_the_and() {
        let mut rng = rng(11);
        for n in SIZES {
            let (x, y) = (random_bits(&mut rng, n), random_bits(&mut rng, n));
            let (xc, xs) = split_bits(&mut rng, &x);
            let (yc, ys) = split_bits(&mut rng, &y);
            let c = cost::and(n);
            let out = duo!(ring(37), c.demand, |p| and(p, &xc, &yc).await, |p| and(
                p, &xs, &ys
            )
            .await);
            out.check_cost(&c);
            assert_eq!(
                open_bits(out.client.as_ref().unwrap(), out.server.as_ref().unwrap()),
                x.and(&y)
            );

            let c = cost::cross_and(n);
            let (a, g) = (x.clone(), y.clone());
            let out = duo!(ring(37), c.demand, |p| cross_and(p, &a).await, |p| {
                cross_and(p, &g).await
            });
            out.check_cost(&c);
            assert_eq!(
                open_bits(out.client.as_ref().unwrap(), out.server.as_ref().unwrap()),
                x.and(&y)
            );
        }
    }

    /// `and_shared_planes` on planes given as bit vectors of `n` bits.
    async fn and_shared_bits(
        p: &mut Party,
        x: &[Bits],
        y: &[Bits],
        x2: &[Bits],
    ) -> Result<(Vec<Bits>, Vec<Bits>), MpcError> {
        let n = x.first().map_or(0, Bits::len);
        let planes = |v: &[Bits]| {
            let mut out = Planes::with_capacity(v.len(), n);
            for b in v {
                out.append(Planes::from_bits(b).words());
            }
            out
        };
        let (z, z2) = and_shared_planes(p, &planes(x), &planes(y), &planes(x2)).await?;
        let bits = |z: &Planes| (0..z.planes()).map(|i| z.plane_bits(i)).collect();
        Ok((bits(&z), bits(&z2)))
    }

    #[test]
    fn shared_ands_compute_both_products() {
        let mut rng = rng(12);
        for n in [1, 63, 64, 65, 1000] {
            for (m, m2) in [(1, 0), (1, 1), (3, 0), (3, 2), (4, 4)] {
                let vectors = |rng: &mut Rng, k: usize| -> Vec<Bits> {
                    // the first vector all ones, for the edge where every
                    // product is one
                    (0..k)
                        .map(|i| {
                            if i == 0 {
                                Bits::ones(n)
                            } else {
                                random_bits(rng, n)
                            }
                        })
                        .collect()
                };
                let (x, y, x2) = (
                    vectors(&mut rng, m),
                    vectors(&mut rng, m),
                    vectors(&mut rng, m2),
                );
                let split = |rng: &mut Rng, v: &[Bits]| -> (Vec<Bits>, Vec<Bits>) {
                    v.iter().map(|b| split_bits(rng, b)).unzip()
                };
                let ((xc, xs), (yc, ys), (x2c, x2s)) = (
                    split(&mut rng, &x),
                    split(&mut rng, &y),
                    split(&mut rng, &x2),
                );
                let c = cost::and_shared(n, m, m2);
                let out = duo!(
                    ring(37),
                    c.demand,
                    |p| and_shared_bits(p, &xc, &yc, &x2c).await,
                    |p| and_shared_bits(p, &xs, &ys, &x2s).await
                );
                out.check_cost(&c);
                let (zc, z2c) = out.client.as_ref().unwrap();
                let (zs, z2s) = out.server.as_ref().unwrap();
                for i in 0..m {
                    assert_eq!(
                        open_bits(&zc[i], &zs[i]),
                        x[i].and(&y[i]),
                        "{n}, {m}, {m2}: {i}"
                    );
                }
                for j in 0..m2 {
                    assert_eq!(
                        open_bits(&z2c[j], &z2s[j]),
                        x2[j].and(&y[m - m2 + j]),
                        "{n}, {m}, {m2}: second {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn no_mask_serves_twice_in_a_shared_and_view() {
        // x, y and x2 all ones in the client's share: if a2 were a, d and
        // d2 would cancel; if the second product reused c, the two output
        // shares would. Every plane a party receives (d, e, d2) and both
        // its output shares must be pairwise independent and uniform.
        let n = 1 << 14;
        let (ones, zeros) = (vec![Bits::ones(n)], vec![Bits::zeros(n)]);
        let c = cost::and_shared(n, 1, 1);
        let out = duo!(
            ring(37),
            c.demand,
            |p| and_shared_bits(p, &ones, &ones, &ones).await,
            |p| and_shared_bits(p, &zeros, &zeros, &zeros).await
        );
        for (who, received, shares) in [
            ("client", &out.to_client, out.client.as_ref().unwrap()),
            ("server", &out.to_server, out.server.as_ref().unwrap()),
        ] {
            let mut view = cut(received, bits_len(n), who);
            assert_eq!(view.len(), 3, "d, e and d2");
            // all three together too: a2 = a ⊕ b would leave every pair
            // uniform and make d ⊕ e ⊕ d2 constant
            let all: Vec<u8> = (view[0].1.iter().zip(&view[1].1).zip(&view[2].1))
                .map(|((d, e), d2)| d ^ e ^ d2)
                .collect();
            assert_uniform_bytes(&all, &format!("d ⊕ e ⊕ d2 received by the {who}"));
            view.push((format!("{who}'s first share"), shares.0[0].to_bytes()));
            view.push((format!("{who}'s second share"), shares.1[0].to_bytes()));
            assert_pairwise_xor_uniform(&view, &format!("shared AND, {who}"));
        }
        out.assert_uniform_messages("shared AND");
    }

    #[test]
    fn and_refuses_vectors_of_different_lengths() {
        let (a, b) = (Bits::zeros(3), Bits::zeros(4));
        let out = duo!(
            ring(37),
            Default::default(),
            |p| and(p, &a, &b).await,
            |p| and(p, &a, &b).await
        );
        assert!(matches!(out.client, Err(MpcError::Shape(_))));
    }

    #[test]
    fn shares_and_messages_are_uniform_for_a_fixed_input() {
        // x = y = 1 held as (1, 0): the worst case for a leak
        let n = 1 << 14;
        let ones = Bits::ones(n);
        let zeros = Bits::zeros(n);
        let c = cost::and(n);
        let out = duo!(ring(37), c.demand, |p| and(p, &ones, &ones).await, |p| and(
            p, &zeros, &zeros
        )
        .await);
        assert_uniform_bits(out.client.as_ref().unwrap(), "AND client share");
        assert_uniform_bits(out.server.as_ref().unwrap(), "AND server share");
        out.assert_uniform_messages("AND");

        let c = cost::cross_and(n);
        let out = duo!(ring(37), c.demand, |p| cross_and(p, &ones).await, |p| {
            cross_and(p, &ones).await
        });
        assert_uniform_bits(out.client.as_ref().unwrap(), "cross-AND client share");
        assert_uniform_bits(out.server.as_ref().unwrap(), "cross-AND server share");
        out.assert_uniform_messages("cross-AND");
    }

    #[test]
    fn no_mask_serves_twice_in_an_and_view() {
        // Each party's view: the peer's masked bits (for AND, d and e
        // apart) and its own output share; every two of them XOR to
        // uniform bits, so no triple or OT bit masks two of them. The
        // input is fixed and the same in both operands, so a = b would
        // cancel in d ⊕ e.
        let n = 1 << 14;
        let (ones, zeros) = (Bits::ones(n), Bits::zeros(n));
        let c = cost::and(n);
        let out = duo!(ring(37), c.demand, |p| and(p, &ones, &ones).await, |p| and(
            p, &zeros, &zeros
        )
        .await);
        for (who, received, share) in [
            ("client", &out.to_client, out.client.as_ref().unwrap()),
            ("server", &out.to_server, out.server.as_ref().unwrap()),
        ] {
            let mut view = cut(received, bits_len(n), who);
            assert_eq!(view.len(), 2, "d and e");
            view.push((format!("{who}'s share"), share.to_bytes()));
            assert_pairwise_xor_uniform(&view, &format!("AND, {who}"));
        }

        let c = cost::cross_and(n);
        let out = duo!(ring(37), c.demand, |p| cross_and(p, &ones).await, |p| {
            cross_and(p, &ones).await
        });
        for (who, received, share) in [
            ("client", &out.to_client, out.client.as_ref().unwrap()),
            ("server", &out.to_server, out.server.as_ref().unwrap()),
        ] {
            let mut view = cut(received, bits_len(n), who);
            assert_eq!(view.len(), 1);
            view.push((format!("{who}'s share"), share.to_bytes()));
            assert_pairwise_xor_uniform(&view, &format!("cross-AND, {who}"));
        }
    }
}
