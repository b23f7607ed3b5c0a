//! Refinement: a batch of 128-bit correlated OTs ([`CotBatch`]) becomes the
//! random OTs and bit triples of a [`Demand`] ([`CorrelationBatch`]).
//!
//! The hash is the tweakable correlation-robust hash of Guo, Katz, Wang and
//! Yu, "Efficient and Secure Multiparty Computation from Fixed-Key Block
//! Ciphers" (S&P 2020), `H(j, x) = π(π(x) ⊕ j) ⊕ π(x)` with `π` AES-128
//! under a fixed public key ([`Tccr`]). The sender's random-OT messages are
//! `m0 = H(j, q_j)`, `m1 = H(j, q_j ⊕ Δ)`, the receiver's
//! `m_ρ = H(j, t_j)`; the tweak `j` is the COT's index in its direction
//! over the whole session (never repeated) with the direction in the high
//! half ([`tweak`]). Bit OTs keep bit 0 of the hash, word OTs the low 64
//! bits. In each direction the COTs of a batch are assigned in one fixed
//! order, the same on both sides: first one per bit triple, then the bit
//! OTs, then the word OTs of that direction. A bit triple combines one bit
//! OT in each direction with no traffic (docs/private-mode.md): with
//! `(s0, s1)` the OT this party sent and `(ρ, r)` the one it received,
//! `a = s0 ⊕ s1`, `b = ρ`, `c = a·b ⊕ r ⊕ s0`, the same formula for both
//! parties. Triples keep bits 0 and 1 of the hashes: two-bit random OTs,
//! which give a second triple with the same `b` (`a2`, `c2` from bit 1) at
//! no extra cost.

use aes::Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};

use crate::correlation::{
    BitOtReceiver, BitOtSender, BitTriples, CorrelationBatch, Demand, WordOtReceiver, WordOtSender,
};
use crate::source::{CotBatch, CotCounts};
use crate::{Bits, OtError, Role};

/// The fixed, public AES key of `π`: the ASCII of `secinfer-ot/tccr`
/// (any public constant does; it is not a secret).
const FIXED_KEY: [u8; 16] = *b"secinfer-ot/tccr";

/// Hashes per `encrypt_blocks` call: a multiple of 64 (one word of packed
/// bits), of 8 (AES-NI's parallel blocks) and of 30 (VAES's).
const CHUNK: usize = 960;

/// The tweakable correlation-robust hash `H(j, x) = π(π(x) ⊕ j) ⊕ π(x)`
/// (Guo, Katz, Wang, Yu, S&P 2020), `π` fixed-key AES-128.
#[derive(Clone)]
pub struct Tccr {
    pi: Aes128,
}

impl std::fmt::Debug for Tccr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tccr")
    }
}

impl Default for Tccr {
    fn default() -> Tccr {
        Tccr::new()
    }
}

fn block(x: u128) -> aes::Block {
    Array::from(x.to_le_bytes())
}

fn word(b: &aes::Block) -> u128 {
    u128::from_le_bytes((*b).into())
}

impl Tccr {
    /// The hash with the fixed key.
    pub fn new() -> Tccr {
        Tccr {
            pi: Aes128::new(&Array::from(FIXED_KEY)),
        }
    }

    /// `H(tweak, x)`.
    pub fn hash(&self, tweak: u128, x: u128) -> u128 {
        let mut b = block(x);
        self.pi.encrypt_block(&mut b);
        let pi_x = word(&b);
        let mut b = block(pi_x ^ tweak);
        self.pi.encrypt_block(&mut b);
        word(&b) ^ pi_x
    }

    /// `H(first_tweak + k, inputs[k] ⊕ mask)` for every `k`, appended to
    /// `out`. Fails if the index in the tweak's low 64 bits would pass
    /// `2^64 − 1` (see [`hash_chunks`](Self::hash_chunks)).
    pub fn hash_many(
        &self,
        first_tweak: u128,
        inputs: &[u128],
        mask: u128,
        out: &mut Vec<u128>,
    ) -> Result<(), OtError> {
        out.reserve(inputs.len());
        self.hash_chunks(first_tweak, inputs, mask, |h| out.extend_from_slice(h))
    }

    /// As [`hash_many`](Self::hash_many), handing the hashes to `each` in
    /// order, in chunks of a multiple of 64 (the last may be shorter), so
    /// that callers keep only the bits they need. The tweak's low 64 bits
    /// (the COT's index, [`tweak`]) count up; if they would pass
    /// `2^64 − 1` nothing is hashed and the call fails, since carrying into
    /// the high half (the direction) or wrapping would repeat a tweak.
    pub fn hash_chunks(
        &self,
        first_tweak: u128,
        inputs: &[u128],
        mask: u128,
        mut each: impl FnMut(&[u128]),
    ) -> Result<(), OtError> {
        let (high, first) = (first_tweak >> 64 << 64, first_tweak as u64);
        let mut indices = match inputs.len().checked_sub(1) {
            None => return Ok(()),
            Some(more) => {
                let last = u64::try_from(more)
                    .ok()
                    .and_then(|m| first.checked_add(m))
                    .ok_or(OtError::CounterOverflow {
                        counter: "the hash tweak's COT index",
                        at: u128::from(first),
                        more: more as u128,
                    })?;
                first..=last
            }
        };
        let size = CHUNK.min(inputs.len());
        let mut pi_x = vec![aes::Block::default(); size];
        let mut second = vec![aes::Block::default(); size];
        let mut hashes = vec![0u128; size];
        for chunk in inputs.chunks(CHUNK) {
            let n = chunk.len();
            let (pi_x, second) = (&mut pi_x[..n], &mut second[..n]);
            for (b, &x) in pi_x.iter_mut().zip(chunk) {
                *b = block(x ^ mask);
            }
            self.pi.encrypt_blocks(pi_x);
            // the range holds exactly one index per input
            for ((s, p), j) in second.iter_mut().zip(pi_x.iter()).zip(&mut indices) {
                *s = block(word(p) ^ high ^ u128::from(j));
            }
            self.pi.encrypt_blocks(second);
            for ((h, s), p) in hashes.iter_mut().zip(second.iter()).zip(pi_x.iter()) {
                *h = word(s) ^ word(p);
            }
            each(&hashes[..n]);
        }
        Ok(())
    }
}

/// The tweak of COT `index` in the direction where `sender` sends: the
/// index in the low 64 bits, the direction above.
pub fn tweak(sender: Role, index: u64) -> u128 {
    let direction: u128 = match sender {
        Role::Client => 0,
        Role::Server => 1,
    };
    (direction << 64) | u128::from(index)
}

/// Where a batch's COTs start in the session's numbering, per direction
/// (this party's view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CotIndex {
    /// index of the first COT this party sends in the batch
    pub sent: u64,
    /// index of the first COT this party receives in the batch
    pub received: u64,
}

/// Random OTs per kind in one direction, in assignment order.
#[derive(Clone, Copy)]
struct Layout {
    triples: usize,
    bits: usize,
    words: usize,
}

impl Layout {
    fn total(&self) -> usize {
        self.triples + self.bits + self.words
    }
}

fn to_usize(n: u64) -> Result<usize, OtError> {
    usize::try_from(n)
        .map_err(|_| OtError::Message(format!("{n} correlations do not fit in memory")))
}

/// (sent, received) layouts of `demand` for `role`.
fn layouts(role: Role, demand: &Demand) -> Result<(Layout, Layout), OtError> {
    let triples = to_usize(demand.triples)?;
    let client = Layout {
        triples,
        bits: to_usize(demand.bit_ots_client_sends)?,
        words: to_usize(demand.word_ots_client_sends)?,
    };
    let server = Layout {
        triples,
        bits: to_usize(demand.bit_ots_server_sends)?,
        words: to_usize(demand.word_ots_server_sends)?,
    };
    for l in [client, server] {
        l.triples
            .checked_add(l.bits)
            .and_then(|s| s.checked_add(l.words))
            .ok_or_else(|| OtError::Message(format!("demand {demand:?} overflows")))?;
    }
    Ok(match role {
        Role::Client => (client, server),
        Role::Server => (server, client),
    })
}

/// The COTs `role` sends and receives for `demand`.
pub fn cot_counts(role: Role, demand: &Demand) -> Result<CotCounts, OtError> {
    let (sent, received) = layouts(role, demand)?;
    Ok(CotCounts {
        sent: sent.total(),
        received: received.total(),
    })
}

/// Bit 0 of `H(first_tweak + k, inputs[k] ⊕ mask)`, packed.
fn hashed_bits(
    tccr: &Tccr,
    first_tweak: u128,
    inputs: &[u128],
    mask: u128,
) -> Result<Bits, OtError> {
    Ok(hashed_bit_columns::<1>(tccr, first_tweak, inputs, mask)?
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// Bits `0..B` of `H(first_tweak + k, inputs[k] ⊕ mask)`, packed, one
/// column per bit: a random OT with `B`-bit messages.
fn hashed_bit_columns<const B: usize>(
    tccr: &Tccr,
    first_tweak: u128,
    inputs: &[u128],
    mask: u128,
) -> Result<[Bits; B], OtError> {
    let mut words: [Vec<u64>; B] =
        std::array::from_fn(|_| Vec::with_capacity(inputs.len().div_ceil(64)));
    tccr.hash_chunks(first_tweak, inputs, mask, |h| {
        for c in h.chunks(64) {
            for (bit, column) in words.iter_mut().enumerate() {
                column.push(
                    c.iter()
                        .enumerate()
                        .fold(0u64, |w, (k, &x)| w | ((((x >> bit) as u64) & 1) << k)),
                );
            }
        }
    })?;
    Ok(words.map(|w| Bits::from_words(w, inputs.len()).unwrap_or_default()))
}

/// The low 64 bits of `H(first_tweak + k, inputs[k] ⊕ mask)`.
fn hashed_words(
    tccr: &Tccr,
    first_tweak: u128,
    inputs: &[u128],
    mask: u128,
) -> Result<Vec<u64>, OtError> {
    let mut words = Vec::with_capacity(inputs.len());
    tccr.hash_chunks(first_tweak, inputs, mask, |h| {
        words.extend(h.iter().map(|&x| x as u64));
    })?;
    Ok(words)
}

/// `first + count`: where the numbering continues after `count` COTs from
/// `first`; fails instead of wrapping.
pub fn advance_index(first: u64, count: usize, direction: &'static str) -> Result<u64, OtError> {
    u64::try_from(count)
        .ok()
        .and_then(|c| first.checked_add(c))
        .ok_or(OtError::CounterOverflow {
            counter: direction,
            at: u128::from(first),
            more: count as u128,
        })
}

/// This party's share of `demand` from its COTs of one batch, which must
/// hold exactly [`cot_counts`]`(role, demand)`; `first` numbers the batch's
/// first COT in each direction.
pub fn refine(
    tccr: &Tccr,
    role: Role,
    demand: &Demand,
    cots: &CotBatch,
    first: CotIndex,
) -> Result<CorrelationBatch, OtError> {
    let (sl, rl) = layouts(role, demand)?;
    let (q, t, choice) = (&cots.sent.q, &cots.received.t, &cots.received.choice);
    if q.len() != sl.total() || t.len() != rl.total() || choice.len() != rl.total() {
        return Err(OtError::Message(format!(
            "the correlation source made {} COTs sent and {} received, {demand:?} needs {} and {}",
            q.len(),
            t.len(),
            sl.total(),
            rl.total()
        )));
    }
    // every index of the batch must fit below 2^64 in its direction
    advance_index(first.sent, sl.total(), "the index of COTs this party sends")?;
    advance_index(
        first.received,
        rl.total(),
        "the index of COTs this party receives",
    )?;
    let delta = cots.sent.delta;
    let (nt, sb, rb) = (sl.triples, sl.triples + sl.bits, rl.triples + rl.bits);
    // tweaks of COT k of the batch in each direction (k ≤ the batch's
    // size, so no sum below overflows after the checks above)
    let sent_tweak = |k: usize| tweak(role, first.sent + k as u64);
    let received_tweak = |k: usize| tweak(role.peer(), first.received + k as u64);
    let sent_bits = |from: usize, to: usize| -> Result<(Bits, Bits), OtError> {
        Ok((
            hashed_bits(tccr, sent_tweak(from), &q[from..to], 0)?,
            hashed_bits(tccr, sent_tweak(from), &q[from..to], delta)?,
        ))
    };
    let received_bits =
        |from: usize, to: usize| hashed_bits(tccr, received_tweak(from), &t[from..to], 0);

    // a triple and its second product: two-bit random OTs, bit 0 for the
    // first triple and bit 1 for the second, with the same choice `b`
    let [s0, s0_2] = hashed_bit_columns::<2>(tccr, sent_tweak(0), &q[..nt], 0)?;
    let [s1, s1_2] = hashed_bit_columns::<2>(tccr, sent_tweak(0), &q[..nt], delta)?;
    let [r, r_2] = hashed_bit_columns::<2>(tccr, received_tweak(0), &t[..nt], 0)?;
    let b = choice.slice(0, nt);
    let a = s0.xor(&s1);
    let c = a.and(&b).xor(&r).xor(&s0);
    let a2 = s0_2.xor(&s1_2);
    let c2 = a2.and(&b).xor(&r_2).xor(&s0_2);
    let (m0, m1) = sent_bits(nt, sb)?;
    Ok(CorrelationBatch {
        triples: BitTriples { a, b, c, a2, c2 },
        bit_sent: BitOtSender { m0, m1 },
        bit_received: BitOtReceiver {
            choice: choice.slice(nt, rl.bits),
            m: received_bits(nt, rb)?,
        },
        word_sent: WordOtSender {
            m0: hashed_words(tccr, sent_tweak(sb), &q[sb..], 0)?,
            m1: hashed_words(tccr, sent_tweak(sb), &q[sb..], delta)?,
        },
        word_received: WordOtReceiver {
            choice: choice.slice(rb, rl.words),
            m: hashed_words(tccr, received_tweak(rb), &t[rb..], 0)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{CotReceiver, CotSender};
    use rand::rngs::ChaCha20Rng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_triple_formulas_hold_for_every_input() {
        // u: the server sends to the client's choice ρ1; v: the client
        // sends to the server's choice ρ2.
        for bits in 0u8..64 {
            let bit = |k: u8| (bits >> k) & 1 == 1;
            let (u0, u1, v0, v1, rho1, rho2) = (bit(0), bit(1), bit(2), bit(3), bit(4), bit(5));
            let u_rho1 = if rho1 { u1 } else { u0 };
            let v_rho2 = if rho2 { v1 } else { v0 };
            let (a_c, b_c) = (v0 ^ v1, rho1);
            let c_c = (a_c & b_c) ^ u_rho1 ^ v0;
            let (a_s, b_s) = (u0 ^ u1, rho2);
            let c_s = (a_s & b_s) ^ u0 ^ v_rho2;
            assert_eq!(c_c ^ c_s, (a_c ^ a_s) & (b_c ^ b_s), "inputs {bits:06b}");
        }
    }

    #[test]
    fn the_hash_is_the_definition_and_depends_on_the_tweak() {
        let h = Tccr::new();
        let pi = Aes128::new(&Array::from(FIXED_KEY));
        let perm = |x: u128| {
            let mut b = block(x);
            pi.encrypt_block(&mut b);
            word(&b)
        };
        let x = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        assert_eq!(h.hash(5, x), perm(perm(x) ^ 5) ^ perm(x));
        assert_ne!(h.hash(5, x), h.hash(6, x));
        assert_ne!(
            h.hash(tweak(Role::Client, 5), x),
            h.hash(tweak(Role::Server, 5), x)
        );
        let inputs: Vec<u128> = (0..200u128).map(|k| k * 0x9e37_79b9_7f4a_7c15).collect();
        let mut out = Vec::new();
        h.hash_many(1000, &inputs, 77, &mut out).unwrap();
        for (k, &x) in inputs.iter().enumerate() {
            assert_eq!(out[k], h.hash(1000 + k as u128, x ^ 77), "{k}");
        }
    }

    /// Ideal COTs for both parties (client, server) for `counts` as the
    /// client counts them.
    fn ideal_cots(rng: &mut ChaCha20Rng, counts: CotCounts) -> (CotBatch, CotBatch) {
        let mut direction = |n: usize| {
            let delta = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
            let q: Vec<u128> = (0..n)
                .map(|_| u128::from(rng.next_u64()) << 64 | 1)
                .collect();
            let choice = Bits::from_bools((0..n).map(|_| rng.next_u64() & 1 == 1));
            let t = (0..n)
                .map(|j| q[j] ^ (u128::from(choice.get(j)) * delta))
                .collect();
            (CotSender { delta, q }, CotReceiver { choice, t })
        };
        let (c_sends, s_receives) = direction(counts.sent);
        let (s_sends, c_receives) = direction(counts.received);
        (
            CotBatch {
                sent: c_sends,
                received: c_receives,
            },
            CotBatch {
                sent: s_sends,
                received: s_receives,
            },
        )
    }

    #[test]
    fn a_refined_batch_satisfies_every_relation() {
        let demand = Demand {
            triples: 1000,
            bit_ots_client_sends: 130,
            bit_ots_server_sends: 7,
            word_ots_client_sends: 65,
            word_ots_server_sends: 200,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let counts = cot_counts(Role::Client, &demand).unwrap();
        assert_eq!(
            counts,
            CotCounts {
                sent: 1195,
                received: 1207
            }
        );
        assert_eq!(
            cot_counts(Role::Server, &demand).unwrap(),
            counts.as_seen_by_peer()
        );
        let (cc, sc) = ideal_cots(&mut rng, counts);
        let h = Tccr::new();
        let first_c = CotIndex {
            sent: 17,
            received: 4,
        };
        let first_s = CotIndex {
            sent: 4,
            received: 17,
        };
        let c = refine(&h, Role::Client, &demand, &cc, first_c).unwrap();
        let s = refine(&h, Role::Server, &demand, &sc, first_s).unwrap();

        let t = (&c.triples, &s.triples);
        assert_eq!(t.0.a.len(), 1000);
        let b = t.0.b.xor(&t.1.b);
        assert_eq!(t.0.c.xor(&t.1.c), t.0.a.xor(&t.1.a).and(&b));
        assert_eq!(t.0.c2.xor(&t.1.c2), t.0.a2.xor(&t.1.a2).and(&b));
        // a, b, c and the second triple's a2, c2 are not degenerate, and
        // the two triples' a are independent
        let (a, a2) = (t.1.a.xor(&t.0.a), t.1.a2.xor(&t.0.a2));
        // and each party's own shares are independent of each other and of b
        let (own_c, own_s) = (t.0.a.xor(&t.0.a2), t.1.a.xor(&t.1.a2));
        for bits in [
            &t.0.a,
            &t.0.b,
            &t.0.c,
            &a,
            &t.0.a2,
            &t.0.c2,
            &a2,
            &a.xor(&a2),
            &a.xor(&a2).xor(&b),
            &own_c,
            &own_s,
            &own_c.xor(&t.0.b),
            &own_s.xor(&t.1.b),
        ] {
            assert!(
                (400..600).contains(&bits.count_ones()),
                "{}",
                bits.count_ones()
            );
        }
        let check_bits = |snd: &BitOtSender, rcv: &BitOtReceiver, n: usize| {
            assert_eq!(snd.m0.len(), n);
            assert_eq!(rcv.m.len(), n);
            for j in 0..n {
                let m = if rcv.choice.get(j) {
                    snd.m1.get(j)
                } else {
                    snd.m0.get(j)
                };
                assert_eq!(rcv.m.get(j), m, "bit OT {j}");
            }
        };
        check_bits(&c.bit_sent, &s.bit_received, 130);
        check_bits(&s.bit_sent, &c.bit_received, 7);
        let check_words = |snd: &WordOtSender, rcv: &WordOtReceiver, n: usize| {
            assert_eq!(snd.m0.len(), n);
            assert_eq!(rcv.m.len(), n);
            for j in 0..n {
                let m = if rcv.choice.get(j) {
                    snd.m1[j]
                } else {
                    snd.m0[j]
                };
                assert_eq!(rcv.m[j], m, "word OT {j}");
                assert_ne!(snd.m0[j], snd.m1[j]);
            }
        };
        check_words(&c.word_sent, &s.word_received, 65);
        check_words(&s.word_sent, &c.word_received, 200);

        // both parties must number the COTs alike: a shifted index changes
        // the sender's messages (and only those of that direction)
        let shifted = CotIndex {
            sent: 5,
            received: 17,
        };
        let wrong = refine(&h, Role::Server, &demand, &sc, shifted).unwrap();
        assert_ne!(wrong.word_sent, s.word_sent);
        assert_eq!(wrong.word_received, s.word_received);
    }

    #[test]
    fn the_tweak_index_fails_at_its_limit_instead_of_spilling_into_the_direction() {
        let h = Tccr::new();
        let inputs = [11u128, 22, 33];
        let near = tweak(Role::Client, u64::MAX - 1);
        // the last two indices of the direction are usable, and hash as
        // the client's direction (no carry into the high half)
        let mut out = Vec::new();
        h.hash_many(near, &inputs[..2], 0, &mut out).unwrap();
        assert_eq!(out[1], h.hash(tweak(Role::Client, u64::MAX), 22));
        assert_ne!(out[1], h.hash(tweak(Role::Server, 0), 22));
        // a third would need index 2^64: refused, nothing hashed
        let mut out = Vec::new();
        let err = h.hash_many(near, &inputs, 0, &mut out).unwrap_err();
        assert!(
            matches!(err, OtError::CounterOverflow { at, more: 2, .. } if at == u128::from(u64::MAX - 1)),
            "{err}"
        );
        assert!(out.is_empty());
        // the server's direction is refused the same way, not wrapped
        let err = h
            .hash_many(tweak(Role::Server, u64::MAX), &inputs[..2], 0, &mut out)
            .unwrap_err();
        assert!(format!("{err}").contains("would overflow"), "{err}");
        h.hash_many(tweak(Role::Server, u64::MAX), &[], 0, &mut out)
            .unwrap();

        // refine: a batch that would number a COT at 2^64 or beyond
        let demand = Demand {
            triples: 3,
            word_ots_client_sends: 7,
            ..Demand::default()
        };
        let counts = cot_counts(Role::Client, &demand).unwrap();
        assert_eq!(counts.sent, 10);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (cc, _) = ideal_cots(&mut rng, counts);
        let fits = CotIndex {
            sent: u64::MAX - 10,
            received: 0,
        };
        refine(&h, Role::Client, &demand, &cc, fits).unwrap();
        for first in [
            CotIndex {
                sent: u64::MAX - 9,
                received: 0,
            },
            CotIndex {
                sent: 0,
                received: u64::MAX - 2,
            },
        ] {
            let err = refine(&h, Role::Client, &demand, &cc, first).unwrap_err();
            assert!(
                matches!(err, OtError::CounterOverflow { .. }),
                "{first:?}: {err}"
            );
        }
    }

    #[test]
    fn the_cot_count_must_match_the_demand() {
        let demand = Demand {
            triples: 3,
            ..Demand::default()
        };
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (cc, _) = ideal_cots(
            &mut rng,
            CotCounts {
                sent: 3,
                received: 2,
            },
        );
        let err = refine(
            &Tccr::new(),
            Role::Client,
            &demand,
            &cc,
            CotIndex::default(),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("needs 3 and 3"), "{err}");
    }
}
