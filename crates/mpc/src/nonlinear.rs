//! ReLU, max and argmax on shared values, from DReLU and `b·y`.
//!
//! **ReLU** is `DReLU(v)·v`. **Max** of a group is a tournament over
//! adjacent pairs: `max(a, b) = b + DReLU(a − b)·(a − b)`, the difference
//! compared on `bits + 1` bits; an odd last entrant waits for the next
//! level, so a group of `g` takes `⌈log2 g⌉` levels and `g − 1`
//! comparisons, every group and pair of a level in the same flights.
//! **ArgMax** plays the same tournament carrying the index: the pair
//! `(lo, hi)` keeps `lo` unless `hi > lo`, with `t = DReLU(lo − hi)`,
//! `value = hi + t·(lo − hi)`, `index = hi_index + t·(lo_index − hi_index)`.
//! `lo` always holds the smaller indices, so ties keep the first index, as
//! ONNX ArgMax does. On the first level the indices are public (`2j` and
//! `2j + 1`), so the index is `2j + 1 − t` from a B2A of `t`; on the last
//! level the value is not needed.

use secinfer_ot::Bits;

use crate::compare::{check_comparison_width, drelu};
use crate::select::{mul_bit, select};
use crate::{MpcError, Party, cost};

/// Shares of `max(v, 0)` for shared `v` (this party's shares `x`) with
/// `−2^(bits−1) ≤ v < 2^(bits−1)`, `2 ≤ bits ≤ k`.
pub async fn relu(p: &mut Party, x: &[u64], bits: u32) -> Result<Vec<u64>, MpcError> {
    check_comparison_width(p, bits)?;
    let ring = p.ring();
    cost::ensure(p.correlations(), &cost::relu(ring, x.len(), bits).demand)?;
    let b = drelu(p, x, bits).await?;
    mul_bit(p, &b, x).await
}

/// Checks the shape and width of a group-wise reduction; returns the
/// number of groups.
fn check_groups(
    p: &Party,
    what: &str,
    len: usize,
    group: usize,
    bits: u32,
) -> Result<usize, MpcError> {
    let k = p.ring().bits();
    if group == 0 || !len.is_multiple_of(group) {
        return Err(MpcError::Shape(format!(
            "{what}: {len} values do not split into groups of {group}"
        )));
    }
    if bits == 0 || bits + 1 > k {
        return Err(MpcError::Shape(format!(
            "{what} of {bits}-bit values in Z_2^{k}: the differences need 1 ≤ bits ≤ {}",
            k - 1
        )));
    }
    Ok(len / group)
}

/// Checks that every index of a group of `group` (at most `group − 1`) is
/// non-negative in the signed ring, `group ≤ 2^(k−1)`: the revealed index
/// is read as a signed value, and a larger one would come out negative.
fn check_index_width(p: &Party, group: usize) -> Result<(), MpcError> {
    let k = p.ring().bits();
    let limit = 1u128 << (k - 1);
    if group as u128 > limit {
        return Err(MpcError::Shape(format!(
            "argmax over groups of {group} in Z_2^{k}: the index needs groups of at most 2^{} = {limit}",
            k - 1
        )));
    }
    Ok(())
}

/// One level's pairs: for every group of `g` entrants in `values`, entrant
/// `2j` (lo) and `2j + 1` (hi) for `j < g/2`, group after group.
fn pairs(values: &[u64], groups: usize, g: usize) -> (Vec<u64>, Vec<u64>) {
    let half = g / 2;
    let mut lo = Vec::with_capacity(groups * half);
    let mut hi = Vec::with_capacity(groups * half);
    for group in values.chunks_exact(g) {
        for pair in group.chunks_exact(2) {
            lo.push(pair[0]);
            hi.push(pair[1]);
        }
    }
    (lo, hi)
}

/// The next level's entrants: each group's winners, then its odd entrant.
fn advance(winners: &[u64], values: &[u64], groups: usize, g: usize) -> Vec<u64> {
    let half = g / 2;
    let mut next = Vec::with_capacity(groups * (half + g % 2));
    for (w, group) in winners
        .chunks_exact(half.max(1))
        .zip(values.chunks_exact(g))
    {
        next.extend_from_slice(&w[..half]);
        if g % 2 == 1 {
            next.push(group[g - 1]);
        }
    }
    next
}

/// Shares of the maximum of each group of `group` consecutive values
/// (`x` is `groups × group`, each value in the signed `bits` range,
/// `bits + 1 ≤ k`).
pub async fn max_groups(
    p: &mut Party,
    x: &[u64],
    group: usize,
    bits: u32,
) -> Result<Vec<u64>, MpcError> {
    let groups = check_groups(p, "max", x.len(), group, bits)?;
    let ring = p.ring();
    cost::ensure(
        p.correlations(),
        &cost::max_groups(ring, x.len(), group, bits).demand,
    )?;
    let mask = ring.mask();
    let mut values = x.iter().map(|&v| v & mask).collect::<Vec<_>>();
    let mut g = group;
    while g > 1 && groups > 0 {
        let (lo, hi) = pairs(&values, groups, g);
        let diff: Vec<u64> = lo
            .iter()
            .zip(&hi)
            .map(|(a, b)| a.wrapping_sub(*b) & mask)
            .collect();
        let t = drelu(p, &diff, bits + 1).await?;
        let picked = mul_bit(p, &t, &diff).await?;
        let winners: Vec<u64> = hi
            .iter()
            .zip(&picked)
            .map(|(h, d)| h.wrapping_add(*d) & mask)
            .collect();
        values = advance(&winners, &values, groups, g);
        g = g / 2 + g % 2;
    }
    Ok(values)
}

/// Shares of the index of the first maximum of each group of `group`
/// consecutive values (ONNX ArgMax with `select_last_index = 0`); `x` as
/// for [`max_groups`], and `group ≤ 2^(k−1)` so that every index is a
/// non-negative signed ring element.
pub async fn argmax_groups(
    p: &mut Party,
    x: &[u64],
    group: usize,
    bits: u32,
) -> Result<Vec<u64>, MpcError> {
    let groups = check_groups(p, "argmax", x.len(), group, bits)?;
    check_index_width(p, group)?;
    let ring = p.ring();
    cost::ensure(
        p.correlations(),
        &cost::argmax_groups(ring, x.len(), group, bits).demand,
    )?;
    let mask = ring.mask();
    let client = p.is_client();
    let mut values = x.iter().map(|&v| v & mask).collect::<Vec<_>>();
    // public indices: the client's share is the index, the server's zero
    let mut index: Vec<u64> = (0..x.len())
        .map(|i| if client { (i % group) as u64 } else { 0 })
        .collect();
    let mut g = group;
    let mut first = true;
    while g > 1 && groups > 0 {
        let last = g == 2;
        let (lo, hi) = pairs(&values, groups, g);
        let diff: Vec<u64> = lo
            .iter()
            .zip(&hi)
            .map(|(a, b)| a.wrapping_sub(*b) & mask)
            .collect();
        let t: Bits = drelu(p, &diff, bits + 1).await?;
        let (lo_index, hi_index) = pairs(&index, groups, g);
        let index_diff: Vec<u64> = lo_index
            .iter()
            .zip(&hi_index)
            .map(|(a, b)| a.wrapping_sub(*b) & mask)
            .collect();
        let mut ys: Vec<&[u64]> = Vec::with_capacity(2);
        if !last {
            ys.push(&diff);
        }
        if !first {
            ys.push(&index_diff);
        }
        let (products, t_arith) = select(p, &t, &ys, first).await?;
        let mut products = products.into_iter();
        if !last {
            let picked = products.next().unwrap_or_default();
            let winners: Vec<u64> = hi
                .iter()
                .zip(&picked)
                .map(|(h, d)| h.wrapping_add(*d) & mask)
                .collect();
            values = advance(&winners, &values, groups, g);
        }
        // index = hi_index + t·(lo_index − hi_index); on the first level
        // lo_index − hi_index = −1 publicly
        let index_step = if first {
            t_arith
                .unwrap_or_default()
                .iter()
                .map(|t| t.wrapping_neg())
                .collect()
        } else {
            products.next().unwrap_or_default()
        };
        let winners: Vec<u64> = hi_index
            .iter()
            .zip(&index_step)
            .map(|(h, d)| h.wrapping_add(*d) & mask)
            .collect();
        index = advance(&winners, &index, groups, g);
        g = g / 2 + g % 2;
        first = false;
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use rand::RngExt;

    fn check_relu(k: u32, bits: u32, v: &[i64], rng: &mut Rng) {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::relu(r, v.len(), bits);
        let out = duo!(r, c.demand, |p| relu(p, &xc, bits).await, |p| relu(
            p, &xs, bits
        )
        .await);
        out.check_cost(&c);
        let got = open_signed(
            r,
            out.client.as_ref().unwrap(),
            out.server.as_ref().unwrap(),
        );
        for (g, &v) in got.iter().zip(v) {
            assert_eq!(*g, v.max(0), "k = {k}, bits = {bits}");
        }
    }

    #[test]
    fn relu_is_max_with_zero_on_the_whole_range() {
        let mut rng = rng(41);
        for k in [8u32, 37, 62] {
            for bits in [2, k / 2, k] {
                let mut v = signed_edges(bits);
                v.extend(random_signed(&mut rng, bits, 200));
                check_relu(k, bits, &v, &mut rng);
            }
        }
        for len in SIZES {
            let v = random_signed(&mut rng, 20, len);
            check_relu(37, 20, &v, &mut rng);
        }
    }

    /// Values for `groups` groups of `group` in the signed `bits` range,
    /// with the range's extremes and many ties.
    fn group_values(rng: &mut Rng, groups: usize, group: usize, bits: u32) -> Vec<i64> {
        let edges = signed_edges(bits);
        (0..groups * group)
            .map(|_| match rng.random_range(0..4) {
                0 => edges[rng.random_range(0..edges.len())],
                1 => rng.random_range(-2..=2),
                _ => random_signed(rng, bits, 1)[0],
            })
            .collect()
    }

    fn check_max_and_argmax(
        k: u32,
        bits: u32,
        groups: usize,
        group: usize,
        v: &[i64],
        rng: &mut Rng,
    ) {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::max_groups(r, v.len(), group, bits);
        let (ac, as_) = (xc.clone(), xs.clone());
        let out = duo!(
            r,
            c.demand,
            |p| max_groups(p, &ac, group, bits).await,
            |p| { max_groups(p, &as_, group, bits).await }
        );
        out.check_cost(&c);
        let got = open_signed(
            r,
            out.client.as_ref().unwrap(),
            out.server.as_ref().unwrap(),
        );
        assert_eq!(got.len(), groups);
        for (g, chunk) in got.iter().zip(v.chunks(group)) {
            assert_eq!(*g, *chunk.iter().max().unwrap_or(&0), "group {chunk:?}");
        }

        let c = cost::argmax_groups(r, v.len(), group, bits);
        let out = duo!(
            r,
            c.demand,
            |p| argmax_groups(p, &xc, group, bits).await,
            |p| { argmax_groups(p, &xs, group, bits).await }
        );
        out.check_cost(&c);
        let got = open_signed(
            r,
            out.client.as_ref().unwrap(),
            out.server.as_ref().unwrap(),
        );
        assert_eq!(got.len(), groups);
        for (g, chunk) in got.iter().zip(v.chunks(group)) {
            let max = chunk.iter().max().copied().unwrap_or(0);
            let first = chunk.iter().position(|&x| x == max).unwrap_or(0);
            assert_eq!(*g, first as i64, "group {chunk:?}");
        }
    }

    #[test]
    fn max_and_argmax_of_groups_with_first_index_on_ties() {
        let mut rng = rng(42);
        for group in [1usize, 2, 3, 4, 9, 10] {
            for (k, bits) in [(37u32, 36u32), (37, 12), (8, 7), (62, 61)] {
                for groups in [0usize, 1, 7, 70] {
                    let v = group_values(&mut rng, groups, group, bits);
                    check_max_and_argmax(k, bits, groups, group, &v, &mut rng);
                }
            }
        }
        // all equal, and the maximum twice at either end
        for v in [
            vec![5i64; 10],
            vec![9, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![-3, -3, -7, -3],
        ] {
            let group = v.len();
            check_max_and_argmax(37, 20, 1, group, &v, &mut rng);
        }
        // many groups, not a multiple of 64 comparisons per level
        let v = group_values(&mut rng, 1000, 9, 20);
        check_max_and_argmax(37, 20, 1000, 9, &v, &mut rng);
    }

    #[test]
    fn argmax_indices_must_fit_the_signed_ring() {
        let mut rng = rng(43);
        // k = 8: groups of up to 2^7 = 128, the last index 127 the largest
        // non-negative signed value; the maximum at index 127
        let mut v = group_values(&mut rng, 3, 128, 7);
        for x in &mut v[..127] {
            *x = (*x).min(62);
        }
        v[127] = 63;
        check_max_and_argmax(8, 7, 3, 128, &v, &mut rng);
        // groups of 129 would reveal index 128 as −128: refused by both
        // parties before anything is taken or sent, however many
        // correlations there are
        let x = vec![0u64; 2 * 129];
        let c = cost::argmax_groups(ring(8), x.len(), 129, 7);
        let out = duo!(
            ring(8),
            c.demand,
            |p| argmax_groups(p, &x, 129, 7).await,
            |p| argmax_groups(p, &x, 129, 7).await
        );
        for result in [&out.client, &out.server] {
            let e = result.as_ref().unwrap_err();
            assert!(
                matches!(e, MpcError::Shape(m) if m.contains("groups of at most 2^7 = 128")),
                "{e}"
            );
        }
        assert_eq!(
            (
                out.client_stats.messages_sent,
                out.server_stats.messages_sent
            ),
            (0, 0)
        );
        assert_eq!(out.client_left, c.demand);
        // the limit is the ring's: at k = 9 the same groups are fine
        let mut v = group_values(&mut rng, 2, 129, 7);
        for x in &mut v[..128] {
            *x = (*x).min(62);
        }
        v[128] = 63;
        check_max_and_argmax(9, 7, 2, 129, &v, &mut rng);
    }

    #[test]
    fn group_reductions_refuse_bad_shapes() {
        let v = vec![0u64; 6];
        for (group, bits) in [(4usize, 10u32), (0, 10), (3, 37), (3, 0)] {
            let out = duo!(
                ring(37),
                Default::default(),
                |p| max_groups(p, &v, group, bits).await,
                |p| { argmax_groups(p, &v, group, bits).await }
            );
            assert!(
                matches!(out.client, Err(MpcError::Shape(_))),
                "{group} {bits}"
            );
            assert!(
                matches!(out.server, Err(MpcError::Shape(_))),
                "{group} {bits}"
            );
        }
    }

    #[test]
    fn relu_max_and_argmax_shares_and_messages_are_uniform() {
        let r = ring(40);
        let n = 1 << 12;
        let v = (1i64 << 38) - 5;
        let (xc, xs) = (vec![r.from_signed(v); n], vec![0u64; n]);
        let c = cost::relu(r, n, 40);
        let out = duo!(r, c.demand, |p| relu(p, &xc, 40).await, |p| relu(
            p, &xs, 40
        )
        .await);
        assert_uniform_ring(r, out.client.as_ref().unwrap(), "ReLU client share");
        assert_uniform_ring(r, out.server.as_ref().unwrap(), "ReLU server share");
        out.assert_uniform_messages("ReLU");

        // groups of 3 (a waiting entrant) with a tie for the maximum
        let pattern = [7i64, -2, 7];
        let x: Vec<i64> = pattern.iter().copied().cycle().take(3 * n).collect();
        let xc: Vec<u64> = x.iter().map(|&v| r.from_signed(v)).collect();
        let xs = vec![0u64; 3 * n];
        let c = cost::max_groups(r, 3 * n, 3, 20);
        let (ac, as_) = (xc.clone(), xs.clone());
        let out = duo!(r, c.demand, |p| max_groups(p, &ac, 3, 20).await, |p| {
            max_groups(p, &as_, 3, 20).await
        });
        assert_uniform_ring(r, out.client.as_ref().unwrap(), "max client share");
        assert_uniform_ring(r, out.server.as_ref().unwrap(), "max server share");
        out.assert_uniform_messages("max");

        let c = cost::argmax_groups(r, 3 * n, 3, 20);
        let out = duo!(r, c.demand, |p| argmax_groups(p, &xc, 3, 20).await, |p| {
            argmax_groups(p, &xs, 3, 20).await
        });
        assert_uniform_ring(r, out.client.as_ref().unwrap(), "argmax client share");
        assert_uniform_ring(r, out.server.as_ref().unwrap(), "argmax server share");
        out.assert_uniform_messages("argmax");
    }
}
