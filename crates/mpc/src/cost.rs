//! What each protocol consumes and sends, exactly, as a function of its
//! element count and parameters: the [`Demand`] of correlations (each used
//! once) and the messages and payload bytes each party sends. The runtime
//! sums these over a program to take a run's material up front; every
//! protocol checks its own cost against the store before its first message,
//! so a short store fails before anything is sent or consumed. A protocol
//! on zero elements sends nothing and consumes nothing. Per element, with
//! `n − 1` merges in the carry tree, each one triple (the generate AND and
//! the propagate AND share an operand): carry on `n` bits takes `n` bit OTs
//! (the server sends) and `n − 1` triples;
//! DReLU on `ℓ` bits is carry on `ℓ − 1`; `b·y` takes one word OT each way;
//! B2A and truncation one word OT the client sends; max and argmax play
//! `g − 1` matches per group of `g`, each a DReLU on `ℓ + 1` bits and one or
//! two selections; a piecewise-linear function with `m'` breakpoints inside
//! the input range takes `m'` DReLUs on `ℓ + 1` bits, `m'` products `b·y`
//! and one truncation.

use secinfer_ot::{CorrelationStore, Demand, OtError, Role};
use secinfer_ring::Ring;

use crate::wire::{bits_len, ring_len};
use crate::{MpcError, Spline};

/// A protocol's cost: correlations and traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// correlations consumed (both parties take the same [`Demand`])
    pub demand: Demand,
    /// messages the client sends
    pub client_messages: u64,
    /// messages the server sends
    pub server_messages: u64,
    /// payload bytes the client sends
    pub client_bytes: u64,
    /// payload bytes the server sends
    pub server_bytes: u64,
}

impl Cost {
    /// Component-wise sum.
    pub fn plus(self, o: Cost) -> Cost {
        Cost {
            demand: self.demand.plus(o.demand),
            client_messages: self.client_messages + o.client_messages,
            server_messages: self.server_messages + o.server_messages,
            client_bytes: self.client_bytes + o.client_bytes,
            server_bytes: self.server_bytes + o.server_bytes,
        }
    }

    /// Messages `role` sends.
    pub fn messages(&self, role: Role) -> u64 {
        match role {
            Role::Client => self.client_messages,
            Role::Server => self.server_messages,
        }
    }

    /// Payload bytes `role` sends.
    pub fn bytes(&self, role: Role) -> u64 {
        match role {
            Role::Client => self.client_bytes,
            Role::Server => self.server_bytes,
        }
    }

    /// One message of `client` bytes from the client and/or one of
    /// `server` bytes from the server (`None`: that party sends nothing).
    fn flight(client: Option<usize>, server: Option<usize>) -> Cost {
        Cost {
            client_messages: client.is_some() as u64,
            server_messages: server.is_some() as u64,
            client_bytes: client.unwrap_or(0) as u64,
            server_bytes: server.unwrap_or(0) as u64,
            ..Cost::default()
        }
    }
}

/// Fails with the first kind of correlation the store has too few of for
/// `demand`, before anything is taken.
pub(crate) fn ensure(store: &CorrelationStore, demand: &Demand) -> Result<(), MpcError> {
    let have = store.available();
    let (bit_sent, bit_recv, word_sent, word_recv) = match store.role() {
        Role::Client => (
            (demand.bit_ots_client_sends, have.bit_ots_client_sends),
            (demand.bit_ots_server_sends, have.bit_ots_server_sends),
            (demand.word_ots_client_sends, have.word_ots_client_sends),
            (demand.word_ots_server_sends, have.word_ots_server_sends),
        ),
        Role::Server => (
            (demand.bit_ots_server_sends, have.bit_ots_server_sends),
            (demand.bit_ots_client_sends, have.bit_ots_client_sends),
            (demand.word_ots_server_sends, have.word_ots_server_sends),
            (demand.word_ots_client_sends, have.word_ots_client_sends),
        ),
    };
    for (kind, (wanted, available)) in [
        ("bit triple", (demand.triples, have.triples)),
        ("bit OT (sent)", bit_sent),
        ("bit OT (received)", bit_recv),
        ("word OT (sent)", word_sent),
        ("word OT (received)", word_recv),
    ] {
        if wanted > available {
            return Err(OtError::Exhausted {
                kind,
                wanted,
                available,
            }
            .into());
        }
    }
    Ok(())
}

/// Beaver AND of `n` bit pairs: one flight each way.
pub fn and(n: usize) -> Cost {
    and_shared(n, 1, 0)
}

/// ANDs of `m` planes of `n` bits with `m` others, and of `m2 ≤ m` more
/// planes with the last `m2` of the second operand, in one flight each way:
/// `m·n` triples (each pair on one triple and its second product), `d`,
/// `e` and `d2`, `(2m + m2)·n` masked bits, from each party.
pub(crate) fn and_shared(n: usize, m: usize, m2: usize) -> Cost {
    if n == 0 || m == 0 {
        return Cost::default();
    }
    let masked = bits_len((2 * m + m2) * n);
    Cost {
        demand: Demand {
            triples: (m * n) as u64,
            ..Demand::default()
        },
        ..Cost::flight(Some(masked), Some(masked))
    }
}

/// Cross-AND of `n` client bits with `n` server bits: one flight each way.
pub fn cross_and(n: usize) -> Cost {
    if n == 0 {
        return Cost::default();
    }
    Cost {
        demand: Demand {
            bit_ots_server_sends: n as u64,
            ..Demand::default()
        },
        ..Cost::flight(Some(bits_len(n)), Some(bits_len(n)))
    }
}

/// The carry tree on `n` bits, level by level: the pairs of ranges that
/// merge, and how many of them also take a propagate AND (per element).
/// Leaf 0 is the bottom range (no propagate bit); adjacent ranges pair up,
/// an odd last range waits for the next level. Each pair takes a generate
/// AND, and a propagate AND unless it holds the bottom range (the first
/// pair of every level does); the two share `P_hi` and so one triple.
pub(crate) fn carry_levels(n: u32) -> Vec<(usize, usize)> {
    let mut ranges = n as usize;
    let mut levels = Vec::new();
    while ranges > 1 {
        let pairs = ranges / 2;
        levels.push((pairs, pairs - 1));
        ranges = pairs + ranges % 2;
    }
    levels
}

/// `[α + β ≥ 2^bits]` for `n` elements: one cross-AND flight, then one AND
/// flight per level of the tree (`1 + ⌈log2 bits⌉` flights).
pub fn carry(n: usize, bits: u32) -> Cost {
    if n == 0 || bits == 0 {
        return Cost::default();
    }
    carry_levels(bits)
        .into_iter()
        .fold(cross_and(n * bits as usize), |c, (pairs, with_p)| {
            c.plus(and_shared(n, pairs, with_p))
        })
}

/// `[v ≥ 0]` on `bits`-bit values: the carry of the low `bits − 1` bits.
pub fn drelu(n: usize, bits: u32) -> Cost {
    carry(n, bits.saturating_sub(1))
}

/// Products of one shared bit vector of `n` bits with `values` shared value
/// vectors, plus its arithmetic form if `b2a`: the client sends
/// `(values + b2a)·n` word OTs, the server `values·n`; two flights.
pub(crate) fn select(ring: Ring, n: usize, values: usize, b2a: bool) -> Cost {
    let client_sends = (values + b2a as usize) * n;
    let server_sends = values * n;
    let some = |count: usize, len: usize| (count > 0).then_some(len);
    // flight 1: each receiver sends its masked choice bits
    let first = Cost::flight(
        some(server_sends, bits_len(server_sends)),
        some(client_sends, bits_len(client_sends)),
    );
    // flight 2: each sender its masked values
    let second = Cost::flight(
        some(client_sends, ring_len(ring, client_sends)),
        some(server_sends, ring_len(ring, server_sends)),
    );
    Cost {
        demand: Demand {
            word_ots_client_sends: client_sends as u64,
            word_ots_server_sends: server_sends as u64,
            ..Demand::default()
        },
        ..first.plus(second)
    }
}

/// Shared bit times shared value, `n` elements.
pub fn mul_bit(ring: Ring, n: usize) -> Cost {
    select(ring, n, 1, false)
}

/// XOR-shared bits to arithmetic shares, `n` elements.
pub fn b2a(ring: Ring, n: usize) -> Cost {
    select(ring, n, 0, true)
}

/// ReLU on `bits`-bit values: DReLU, then `b·v`.
pub fn relu(ring: Ring, n: usize, bits: u32) -> Cost {
    drelu(n, bits).plus(mul_bit(ring, n))
}

/// The tournament's levels for groups of `group`: pairs per group at each
/// level.
pub(crate) fn tournament(group: usize) -> Vec<usize> {
    let mut levels = Vec::new();
    let mut g = group;
    while g > 1 {
        levels.push(g / 2);
        g = g / 2 + g % 2;
    }
    levels
}

/// Max of each group of `group` among `len` values of `bits` bits: per
/// level, DReLU on `bits + 1` bits and `b·(a − b)` for every pair.
pub fn max_groups(ring: Ring, len: usize, group: usize, bits: u32) -> Cost {
    if group == 0 {
        return Cost::default();
    }
    let groups = len / group;
    tournament(group)
        .into_iter()
        .fold(Cost::default(), |c, pairs| {
            c.plus(drelu(groups * pairs, bits + 1))
                .plus(mul_bit(ring, groups * pairs))
        })
}

/// Index of the first maximum of each group: per level, DReLU on
/// `bits + 1` bits, then the selection of the index (B2A on the first
/// level, where the indices are public) and of the value (all levels but
/// the last).
pub fn argmax_groups(ring: Ring, len: usize, group: usize, bits: u32) -> Cost {
    if group == 0 {
        return Cost::default();
    }
    let groups = len / group;
    let levels = tournament(group);
    let last = levels.len().saturating_sub(1);
    levels
        .into_iter()
        .enumerate()
        .fold(Cost::default(), |c, (level, pairs)| {
            let n = groups * pairs;
            let values = (level != last) as usize + (level != 0) as usize;
            c.plus(drelu(n, bits + 1))
                .plus(select(ring, n, values, level == 0))
        })
}

/// Truncation of `n` values by `shift` bits: one word OT the client sends
/// per element, two flights (none for `shift = 0`).
pub fn truncate(ring: Ring, n: usize, shift: u32) -> Cost {
    if shift == 0 {
        return Cost::default();
    }
    select(ring, n, 0, true)
}

/// A public piecewise-linear function ([`Spline`]) of `n` values with
/// `|v| < 2^(bits−1)`: one DReLU over the `n·m'` differences to the `m'`
/// breakpoints inside that range (on [`Spline::comparison_bits`] bits), one
/// `b·y` over the same pairs, and a truncation by the slopes' fractional
/// bits. The flights do not depend on `m'`.
pub fn piecewise(ring: Ring, n: usize, spline: &Spline, bits: u32) -> Cost {
    let pairs = n * spline.comparisons(bits);
    drelu(pairs, spline.comparison_bits(bits))
        .plus(mul_bit(ring, pairs))
        .plus(truncate(ring, n, spline.slope_frac_bits()))
}

/// The server's shares of `n` values to the client: one message.
pub fn reveal_to_client(ring: Ring, n: usize) -> Cost {
    if n == 0 {
        return Cost::default();
    }
    Cost::flight(None, Some(ring_len(ring, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carry_tree_has_log_depth_and_one_triple_per_bit() {
        assert!(carry_levels(1).is_empty());
        assert_eq!(carry_levels(2), vec![(1, 0)]);
        assert_eq!(carry_levels(3), vec![(1, 0), (1, 0)]);
        assert_eq!(carry_levels(4), vec![(2, 1), (1, 0)]);
        for n in 1..=64u32 {
            let levels = carry_levels(n);
            assert_eq!(levels.len() as u32, n.next_power_of_two().trailing_zeros());
            // n − 1 merges, each a generate AND, and a propagate AND for
            // every merge that does not involve the bottom range (one
            // bottom merge per level); a merge takes one triple
            let merges: usize = levels.iter().map(|l| l.0).sum();
            let propagates: usize = levels.iter().map(|l| l.1).sum();
            assert_eq!(merges, n as usize - 1, "n = {n}");
            assert_eq!(propagates, merges - levels.len(), "n = {n}");
            let c = carry(1, n);
            assert_eq!(c.demand.triples, merges as u64);
            assert_eq!(c.demand.bit_ots_server_sends, n as u64);
        }
        // DReLU on 37 bits: 36 bit OTs and 35 triples per element
        let c = drelu(1, 37);
        assert_eq!((c.demand.bit_ots_server_sends, c.demand.triples), (36, 35));
        assert_eq!(c.client_messages, 7);
        // on 1024 elements the leaves send 36 masked bits per element, the
        // levels 2·35 + 29 (d and e of every merge, d2 of every propagate)
        let c = drelu(1024, 37);
        assert_eq!(c.client_bytes, 1024 * (36 + 2 * 35 + 29) / 8);
    }

    #[test]
    fn a_piecewise_function_is_its_comparisons_products_and_truncation() {
        let r = Ring::new(37).expect("ring");
        let sigmoid = Spline::sigmoid(12, 1e-3).expect("sigmoid").spline;
        let m = sigmoid.breaks().len();
        // every breakpoint lies within ±8, inside the 20-bit range
        assert_eq!(sigmoid.comparisons(20), m);
        let c = piecewise(r, 100, &sigmoid, 20);
        let per = |c: Cost| {
            (
                c.demand.bit_ots_server_sends,
                c.demand.triples,
                c.demand.word_ots_client_sends,
                c.demand.word_ots_server_sends,
            )
        };
        let want = drelu(100 * m, 21).plus(mul_bit(r, 100 * m)).plus(truncate(
            r,
            100,
            sigmoid.slope_frac_bits(),
        ));
        assert_eq!(c, want);
        // DReLU on 21 bits: 20 bit OTs per comparison; one word OT each way
        // per comparison, one more the client sends per element
        let a = carry_levels(20).iter().map(|l| l.0).sum::<usize>() as u64;
        let m = m as u64;
        assert_eq!(per(c), (2000 * m, 100 * a * m, 100 * m + 100, 100 * m));
        // 6 + 2 + 2 flights, one message each way in each but the
        // truncation's (one way each)
        assert_eq!((c.client_messages, c.server_messages), (9, 9));
        assert_eq!(piecewise(r, 0, &sigmoid, 20), Cost::default());
        // without fractional slope bits nothing is truncated
        let clip = Spline::clip(0, 6 << 12).expect("clip");
        assert_eq!(
            piecewise(r, 100, &clip, 20),
            drelu(200, 21).plus(mul_bit(r, 200))
        );
    }

    #[test]
    fn tournaments_halve_with_the_odd_one_waiting() {
        assert!(tournament(1).is_empty());
        assert_eq!(tournament(2), vec![1]);
        assert_eq!(tournament(3), vec![1, 1]);
        assert_eq!(tournament(9), vec![4, 2, 1, 1]);
        assert_eq!(tournament(10), vec![5, 2, 1, 1]);
        for g in 1..100 {
            // a tournament of g entrants plays g − 1 matches
            assert_eq!(tournament(g).iter().sum::<usize>(), g - 1);
        }
    }
}
