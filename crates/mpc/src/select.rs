//! Shared bit times shared value, and bits to arithmetic shares, from word
//! OTs.
//!
//! The building block is the product of a bit `s` one party holds with a
//! value `y` the other holds, from a random word OT the value holder sends
//! (`p0, p1`; the bit holder has `ρ, p_ρ`): the bit holder sends
//! `δ = s ⊕ ρ`, the value holder sends `w = y + p_δ − p_(1⊕δ)` and keeps
//! `−p_δ`, the bit holder keeps `p_ρ + s·w`; the two add up to `s·y`
//! (for `s = 1`, `ρ = 1 ⊕ δ` and `p_ρ + w = y + p_δ`). `δ` is uniform to
//! the value holder, `w` to the bit holder (it never sees `p_(1⊕δ)`).
//! **`b·y`** for shared `b = b_C ⊕ b_S` and `y = y_C + y_S` splits as
//! `b·y_C = b_C·y_C + b_S·(1 − 2b_C)·y_C` (a product with the server's bit
//! `b_S` and the client's value `(1 − 2b_C)·y_C`) plus the mirror image for
//! `y_S`; both directions run in the same two flights (all `δ`s, then all
//! `w`s). **B2A** is `b = b_C + b_S·(1 − 2b_C)`: one product, the client
//! sending the OT. Several products with the same bit (argmax selects a
//! value and an index) share the flights.

use secinfer_ot::Bits;

use crate::wire::{Reader, bits_len, put_bits, put_ring, ring_len};
use crate::{MpcError, Party, cost};

/// Products with the peer: this party is the bit holder for `choose` and
/// the value holder for `values` (the peer the opposite, with as many).
/// Returns this party's shares of `choose_i · peer's value_i` and of
/// `peer's bit_i · values_i`.
pub(crate) async fn ot_products(
    p: &mut Party,
    choose: &Bits,
    values: &[u64],
) -> Result<(Vec<u64>, Vec<u64>), MpcError> {
    let ring = p.ring();
    let mask = ring.mask();
    let (nr, ns) = (choose.len(), values.len());
    let received = p.correlations().word_ots_received(nr)?;
    let sent = p.correlations().word_ots_sent(ns)?;

    // flight 1: bit holders send δ = s ⊕ ρ
    if nr > 0 {
        let mut payload = Vec::with_capacity(bits_len(nr));
        put_bits(&mut payload, &choose.xor(&received.choice));
        p.send(payload);
    }
    let delta = if ns > 0 {
        let msg = p.recv(bits_len(ns)).await?;
        let mut r = Reader::new(&msg, "product δ");
        let d = r.bits(ns)?;
        r.finish()?;
        d
    } else {
        Bits::default()
    };

    // flight 2: value holders send w = y + p_δ − p_(1⊕δ)
    let mut sender_shares = Vec::with_capacity(ns);
    if ns > 0 {
        let mut w = Vec::with_capacity(ns);
        for (i, ((&y, &p0), &p1)) in values.iter().zip(&sent.m0).zip(&sent.m1).enumerate() {
            let d = 0u64.wrapping_sub((delta.words()[i / 64] >> (i % 64)) & 1);
            let p_d = p0 ^ ((p0 ^ p1) & d);
            let p_nd = p0 ^ p1 ^ p_d;
            w.push(y.wrapping_add(p_d).wrapping_sub(p_nd) & mask);
            sender_shares.push(p_d.wrapping_neg() & mask);
        }
        let mut payload = Vec::with_capacity(ring_len(ring, ns));
        put_ring(&mut payload, ring, &w);
        p.send(payload);
    }
    let mut chooser_shares = Vec::with_capacity(nr);
    if nr > 0 {
        let msg = p.recv(ring_len(ring, nr)).await?;
        let mut r = Reader::new(&msg, "product w");
        let w = r.ring(ring, nr)?;
        r.finish()?;
        for (i, (&w, &m)) in w.iter().zip(&received.m).enumerate() {
            let s = 0u64.wrapping_sub((choose.words()[i / 64] >> (i % 64)) & 1);
            chooser_shares.push(m.wrapping_add(w & s) & mask);
        }
    }
    Ok((chooser_shares, sender_shares))
}

/// Bit `i` of `b` as 0 or all ones.
fn spread(b: &Bits, i: usize) -> u64 {
    0u64.wrapping_sub((b.words()[i / 64] >> (i % 64)) & 1)
}

/// Shares of `b·y` for each of the shared vectors `ys` (each as long as
/// `b`), and of `b` itself if `with_b2a`, in two flights.
pub(crate) async fn select(
    p: &mut Party,
    b: &Bits,
    ys: &[&[u64]],
    with_b2a: bool,
) -> Result<(Vec<Vec<u64>>, Option<Vec<u64>>), MpcError> {
    let n = b.len();
    if let Some(y) = ys.iter().find(|y| y.len() != n) {
        return Err(MpcError::Shape(format!(
            "product of {n} bits with {} values",
            y.len()
        )));
    }
    let mask = p.ring().mask();
    let client = p.is_client();
    // B2A's product has the server's bit and the client's value ±1
    let b2a_sends = with_b2a && client;
    let b2a_chooses = with_b2a && !client;
    let mut values = Vec::with_capacity((ys.len() + b2a_sends as usize) * n);
    for y in ys {
        // (1 − 2b_P)·y_P
        values.extend(y.iter().enumerate().map(|(i, &y)| {
            let s = spread(b, i);
            ((y ^ s).wrapping_sub(s)) & mask
        }));
    }
    if b2a_sends {
        values.extend((0..n).map(|i| (1u64 ^ spread(b, i)).wrapping_sub(spread(b, i)) & mask));
    }
    let repeats = ys.len() + b2a_chooses as usize;
    let choose = Bits::concat(std::iter::repeat_n(b, repeats));
    let (as_chooser, as_sender) = ot_products(p, &choose, &values).await?;
    let products = ys
        .iter()
        .enumerate()
        .map(|(j, y)| {
            let (c, s) = (&as_chooser[j * n..][..n], &as_sender[j * n..][..n]);
            (0..n)
                .map(|i| {
                    // b_P·y_P + both product shares
                    (y[i] & spread(b, i)).wrapping_add(c[i]).wrapping_add(s[i]) & mask
                })
                .collect()
        })
        .collect();
    let arithmetic = with_b2a.then(|| {
        let at = ys.len() * n;
        if client {
            (0..n)
                .map(|i| (spread(b, i) & 1).wrapping_add(as_sender[at + i]) & mask)
                .collect()
        } else {
            as_chooser[at..at + n].to_vec()
        }
    });
    Ok((products, arithmetic))
}

/// Shares of `b·y` for a shared bit `b` and a shared value `y` (two
/// flights, one word OT each way per element).
pub async fn mul_bit(p: &mut Party, b: &Bits, y: &[u64]) -> Result<Vec<u64>, MpcError> {
    let ring = p.ring();
    cost::ensure(p.correlations(), &cost::mul_bit(ring, b.len()).demand)?;
    let (mut products, _) = select(p, b, &[y], false).await?;
    Ok(products.pop().unwrap_or_default())
}

/// Arithmetic shares (mod `2^k`) of a shared bit `b` (two flights, one word
/// OT the client sends per element).
pub async fn b2a(p: &mut Party, b: &Bits) -> Result<Vec<u64>, MpcError> {
    let ring = p.ring();
    cost::ensure(p.correlations(), &cost::b2a(ring, b.len()).demand)?;
    let (_, arithmetic) = select(p, b, &[], true).await?;
    Ok(arithmetic.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn mul_bit_and_b2a_multiply_and_convert() {
        let mut rng = rng(31);
        for k in [8u32, 37, 62] {
            let r = ring(k);
            for n in SIZES {
                let b = random_bits(&mut rng, n);
                let mut y: Vec<i64> = random_signed(&mut rng, k, n);
                for (i, e) in signed_edges(k).into_iter().enumerate().take(n) {
                    y[i] = e;
                }
                let (bc, bs) = split_bits(&mut rng, &b);
                let (yc, ys) = split_signed(&mut rng, r, &y);
                let c = cost::mul_bit(r, n);
                let out = duo!(r, c.demand, |p| mul_bit(p, &bc, &yc).await, |p| mul_bit(
                    p, &bs, &ys
                )
                .await);
                out.check_cost(&c);
                let got = open_signed(
                    r,
                    out.client.as_ref().unwrap(),
                    out.server.as_ref().unwrap(),
                );
                for i in 0..n {
                    assert_eq!(got[i], if b.get(i) { y[i] } else { 0 }, "k = {k}");
                }

                let c = cost::b2a(r, n);
                let out = duo!(r, c.demand, |p| b2a(p, &bc).await, |p| b2a(p, &bs).await);
                out.check_cost(&c);
                let got = open_signed(
                    r,
                    out.client.as_ref().unwrap(),
                    out.server.as_ref().unwrap(),
                );
                assert_eq!(got, b.iter().map(i64::from).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn mul_bit_refuses_mismatched_lengths() {
        let (b, y) = (Bits::zeros(4), vec![0u64; 5]);
        let out = duo!(
            ring(37),
            cost::mul_bit(ring(37), 4).demand,
            |p| mul_bit(p, &b, &y).await,
            |p| mul_bit(p, &b, &y).await
        );
        assert!(matches!(out.client, Err(MpcError::Shape(_))));
    }

    #[test]
    fn product_shares_and_messages_are_uniform_for_a_fixed_input() {
        let r = ring(40);
        let n = 1 << 13;
        // b = 1 and y = −1, each wholly in the client's share
        let (bc, bs) = (Bits::ones(n), Bits::zeros(n));
        let (yc, ys) = (vec![r.mask(); n], vec![0u64; n]);
        let c = cost::mul_bit(r, n);
        let out = duo!(r, c.demand, |p| mul_bit(p, &bc, &yc).await, |p| mul_bit(
            p, &bs, &ys
        )
        .await);
        assert_uniform_ring(r, out.client.as_ref().unwrap(), "b·y client share");
        assert_uniform_ring(r, out.server.as_ref().unwrap(), "b·y server share");
        out.assert_uniform_messages("b·y");

        let c = cost::b2a(r, n);
        let out = duo!(r, c.demand, |p| b2a(p, &bc).await, |p| b2a(p, &bs).await);
        assert_uniform_ring(r, out.client.as_ref().unwrap(), "B2A client share");
        assert_uniform_ring(r, out.server.as_ref().unwrap(), "B2A server share");
        out.assert_uniform_messages("B2A");
    }

    #[test]
    fn no_mask_serves_twice_in_a_product_view() {
        // Each party receives δ (bits) and w (ring elements) for the OTs it
        // sends and keeps an output share: δ and every bit plane of w and
        // of the share XOR pairwise to uniform bits, and w and the share
        // differ and add to uniform ring elements, so no OT message masks
        // two of them.
        let r = ring(40);
        let n = 1 << 13;
        let (bc, bs) = (Bits::ones(n), Bits::zeros(n));
        let (yc, ys) = (vec![r.mask(); n], vec![0u64; n]);
        let c = cost::mul_bit(r, n);
        let out = duo!(r, c.demand, |p| mul_bit(p, &bc, &yc).await, |p| mul_bit(
            p, &bs, &ys
        )
        .await);
        for (who, received, share) in [
            ("client", &out.to_client, out.client.as_ref().unwrap()),
            ("server", &out.to_server, out.server.as_ref().unwrap()),
        ] {
            let [delta, w] = &received[..] else {
                panic!("{who} received {} messages", received.len());
            };
            let mut view = vec![(format!("{who}'s δ"), delta.clone())];
            view.extend(bit_planes(r, &ring_values(r, w, n), &format!("{who}'s w")));
            view.extend(bit_planes(r, share, &format!("{who}'s share")));
            assert_pairwise_xor_uniform(&view, &format!("b·y, {who}"));
            let view = [
                (format!("{who}'s w"), ring_values(r, w, n)),
                (format!("{who}'s share"), share.clone()),
            ];
            assert_pairwise_ring_uniform(r, &view, &format!("b·y, {who}"));
        }

        // B2A: the server receives w, the client δ
        let c = cost::b2a(r, n);
        let out = duo!(r, c.demand, |p| b2a(p, &bc).await, |p| b2a(p, &bs).await);
        let (client, server) = (out.client.as_ref().unwrap(), out.server.as_ref().unwrap());
        let [delta] = &out.to_client[..] else {
            panic!("the client receives δ only");
        };
        let [w] = &out.to_server[..] else {
            panic!("the server receives w only");
        };
        let mut view = vec![("client's δ".to_string(), delta.clone())];
        view.extend(bit_planes(r, client, "client's share"));
        assert_pairwise_xor_uniform(&view, "B2A, client");
        let w = ring_values(r, w, n);
        let mut view = bit_planes(r, &w, "server's w");
        view.extend(bit_planes(r, server, "server's share"));
        assert_pairwise_xor_uniform(&view, "B2A, server");
        let view = [
            ("server's w".to_string(), w),
            ("server's share".to_string(), server.clone()),
        ];
        assert_pairwise_ring_uniform(r, &view, "B2A, server");
    }
}
