//! Random correlations, as one party holds them, and the single-use store
//! they are taken from.
//!
//! Each kind is held column-wise (struct of arrays). A [`CorrelationStore`]
//! is a queue per kind: material is appended at the back (an offline batch)
//! and taken from the front, and the number taken so far (the
//! [`Position`]) only grows, so no correlation is ever handed out twice.
//! [`CorrelationStore::take_at`] lets the two parties check that they take
//! the same correlations: a party that names a position behind the store's
//! gets [`OtError::Reused`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{Bits, OtError, Role};

/// This party's XOR shares of random bit triples: with the peer's shares,
/// `c = a ∧ b` bitwise. Each triple comes with a second one that shares its
/// `b`: `c2 = a2 ∧ b`. The pair costs what one triple costs (two COTs, the
/// second bit of the same hashes; `refine`), and serves two ANDs with a
/// common operand, as the comparison's carry tree needs
/// (`G_hi ⊕ P_hi·G_lo` and `P_hi·P_lo`). A single AND uses `a, b, c` and
/// leaves `a2, c2` unused; the whole entry is taken either way.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BitTriples {
    /// shares of `a`
    pub a: Bits,
    /// shares of `b`, the operand both triples share
    pub b: Bits,
    /// shares of `c = a ∧ b`
    pub c: Bits,
    /// shares of `a2`
    pub a2: Bits,
    /// shares of `c2 = a2 ∧ b`
    pub c2: Bits,
}

/// Random one-bit OTs this party sent: both messages.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BitOtSender {
    /// message 0
    pub m0: Bits,
    /// message 1
    pub m1: Bits,
}

/// Random one-bit OTs this party received: its random choice and the chosen message.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BitOtReceiver {
    /// choice bits `ρ`
    pub choice: Bits,
    /// `m_ρ`
    pub m: Bits,
}

/// Random 64-bit OTs this party sent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WordOtSender {
    /// message 0
    pub m0: Vec<u64>,
    /// message 1
    pub m1: Vec<u64>,
}

/// Random 64-bit OTs this party received.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WordOtReceiver {
    /// choice bits `ρ`
    pub choice: Bits,
    /// `m_ρ`
    pub m: Vec<u64>,
}

/// How many correlations of each kind, for both parties (directions are
/// absolute: "client sends" means the client is the OT sender).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    /// bit triples
    pub triples: u64,
    /// one-bit OTs, client sends
    pub bit_ots_client_sends: u64,
    /// one-bit OTs, server sends
    pub bit_ots_server_sends: u64,
    /// 64-bit OTs, client sends
    pub word_ots_client_sends: u64,
    /// 64-bit OTs, server sends
    pub word_ots_server_sends: u64,
}

impl Demand {
    /// Component-wise sum.
    pub fn plus(self, o: Demand) -> Demand {
        Demand {
            triples: self.triples + o.triples,
            bit_ots_client_sends: self.bit_ots_client_sends + o.bit_ots_client_sends,
            bit_ots_server_sends: self.bit_ots_server_sends + o.bit_ots_server_sends,
            word_ots_client_sends: self.word_ots_client_sends + o.word_ots_client_sends,
            word_ots_server_sends: self.word_ots_server_sends + o.word_ots_server_sends,
        }
    }

    /// Every component times `n`, or `None` on overflow.
    pub fn times(self, n: u64) -> Option<Demand> {
        Some(Demand {
            triples: self.triples.checked_mul(n)?,
            bit_ots_client_sends: self.bit_ots_client_sends.checked_mul(n)?,
            bit_ots_server_sends: self.bit_ots_server_sends.checked_mul(n)?,
            word_ots_client_sends: self.word_ots_client_sends.checked_mul(n)?,
            word_ots_server_sends: self.word_ots_server_sends.checked_mul(n)?,
        })
    }

    /// Whether every component is at most `o`'s.
    pub fn fits_in(&self, o: &Demand) -> bool {
        self.triples <= o.triples
            && self.bit_ots_client_sends <= o.bit_ots_client_sends
            && self.bit_ots_server_sends <= o.bit_ots_server_sends
            && self.word_ots_client_sends <= o.word_ots_client_sends
            && self.word_ots_server_sends <= o.word_ots_server_sends
    }

    /// How many times `per` fits in `self` (`u64::MAX` if `per` is zero):
    /// for how many inferences a store holding `self` is ready.
    pub fn times_in(&self, per: &Demand) -> u64 {
        [
            (self.triples, per.triples),
            (self.bit_ots_client_sends, per.bit_ots_client_sends),
            (self.bit_ots_server_sends, per.bit_ots_server_sends),
            (self.word_ots_client_sends, per.word_ots_client_sends),
            (self.word_ots_server_sends, per.word_ots_server_sends),
        ]
        .into_iter()
        .filter(|&(_, p)| p > 0)
        .map(|(have, p)| have / p)
        .min()
        .unwrap_or(u64::MAX)
    }

    /// What is in `self` and not in `have`, component by component.
    pub fn shortfall(&self, have: &Demand) -> Demand {
        Demand {
            triples: self.triples.saturating_sub(have.triples),
            bit_ots_client_sends: self
                .bit_ots_client_sends
                .saturating_sub(have.bit_ots_client_sends),
            bit_ots_server_sends: self
                .bit_ots_server_sends
                .saturating_sub(have.bit_ots_server_sends),
            word_ots_client_sends: self
                .word_ots_client_sends
                .saturating_sub(have.word_ots_client_sends),
            word_ots_server_sends: self
                .word_ots_server_sends
                .saturating_sub(have.word_ots_server_sends),
        }
    }

    /// Whether nothing is demanded.
    pub fn is_zero(&self) -> bool {
        *self == Demand::default()
    }

    /// Random OTs (one per bit OT and word OT, two per triple) per direction:
    /// (client sends, server sends).
    pub fn random_ots(&self) -> (u64, u64) {
        (
            self.triples + self.bit_ots_client_sends + self.word_ots_client_sends,
            self.triples + self.bit_ots_server_sends + self.word_ots_server_sends,
        )
    }

    /// Bytes `role` stores for this much material, as
    /// [`CorrelationStore::bytes`] counts a batch of it: 5 bits per triple
    /// (with its second product, [`BitTriples`]),
    /// 2 bits per bit OT either way, 16 bytes per word OT `role` sends and
    /// 8 bytes and a choice bit per word OT it receives (each column
    /// rounded up to whole bytes). Saturates at `u64::MAX` for absurd
    /// counts, so a peer's demand cannot wrap around a budget check.
    pub fn stored_bytes_for(&self, role: Role) -> u64 {
        let (bits_sent, bits_received, words_sent, words_received) = match role {
            Role::Client => (
                self.bit_ots_client_sends,
                self.bit_ots_server_sends,
                self.word_ots_client_sends,
                self.word_ots_server_sends,
            ),
            Role::Server => (
                self.bit_ots_server_sends,
                self.bit_ots_client_sends,
                self.word_ots_server_sends,
                self.word_ots_client_sends,
            ),
        };
        let packed = |n: u64, columns: u64| n.div_ceil(8).saturating_mul(columns);
        [
            packed(self.triples, 5),
            packed(bits_sent, 2),
            packed(bits_received, 2),
            words_sent.saturating_mul(16),
            words_received.saturating_mul(8),
            packed(words_received, 1),
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add)
    }

    /// Bytes either party stores for this much material: the larger of
    /// [`stored_bytes_for`](Self::stored_bytes_for) the two roles (for
    /// callers that size runs without asking which side they are on).
    /// Saturates like it.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes_for(Role::Client)
            .max(self.stored_bytes_for(Role::Server))
    }
}

/// How many correlations of each kind a store has handed out since it was
/// made, from this party's point of view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// bit triples
    pub triples: u64,
    /// bit OTs this party sent
    pub bit_ots_sent: u64,
    /// bit OTs this party received
    pub bit_ots_received: u64,
    /// word OTs this party sent
    pub word_ots_sent: u64,
    /// word OTs this party received
    pub word_ots_received: u64,
}

impl Position {
    /// The same position as the peer counts it (sent and received swap).
    pub fn as_seen_by_peer(self) -> Position {
        Position {
            triples: self.triples,
            bit_ots_sent: self.bit_ots_received,
            bit_ots_received: self.bit_ots_sent,
            word_ots_sent: self.word_ots_received,
            word_ots_received: self.word_ots_sent,
        }
    }
}

/// One batch of material for one party: what an offline extension (or the
/// test dealer) produces, appended to a store as a whole.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CorrelationBatch {
    /// bit triples
    pub triples: BitTriples,
    /// bit OTs this party sent
    pub bit_sent: BitOtSender,
    /// bit OTs this party received
    pub bit_received: BitOtReceiver,
    /// word OTs this party sent
    pub word_sent: WordOtSender,
    /// word OTs this party received
    pub word_received: WordOtReceiver,
}

/// Column-wise material that can be cut into pieces.
trait Columns: Default {
    fn count(&self) -> usize;
    /// Appends items `from..from + n` of `src`.
    fn append_range(&mut self, src: &Self, from: usize, n: usize);
    fn bytes(&self) -> usize;
}

impl Columns for BitTriples {
    fn count(&self) -> usize {
        self.a.len()
    }
    fn append_range(&mut self, src: &Self, from: usize, n: usize) {
        self.a.extend_from_range(&src.a, from, n);
        self.b.extend_from_range(&src.b, from, n);
        self.c.extend_from_range(&src.c, from, n);
        self.a2.extend_from_range(&src.a2, from, n);
        self.c2.extend_from_range(&src.c2, from, n);
    }
    fn bytes(&self) -> usize {
        5 * self.a.len().div_ceil(8)
    }
}

impl Columns for BitOtSender {
    fn count(&self) -> usize {
        self.m0.len()
    }
    fn append_range(&mut self, src: &Self, from: usize, n: usize) {
        self.m0.extend_from_range(&src.m0, from, n);
        self.m1.extend_from_range(&src.m1, from, n);
    }
    fn bytes(&self) -> usize {
        2 * self.m0.len().div_ceil(8)
    }
}

impl Columns for BitOtReceiver {
    fn count(&self) -> usize {
        self.choice.len()
    }
    fn append_range(&mut self, src: &Self, from: usize, n: usize) {
        self.choice.extend_from_range(&src.choice, from, n);
        self.m.extend_from_range(&src.m, from, n);
    }
    fn bytes(&self) -> usize {
        2 * self.choice.len().div_ceil(8)
    }
}

impl Columns for WordOtSender {
    fn count(&self) -> usize {
        self.m0.len()
    }
    fn append_range(&mut self, src: &Self, from: usize, n: usize) {
        self.m0.extend_from_slice(&src.m0[from..from + n]);
        self.m1.extend_from_slice(&src.m1[from..from + n]);
    }
    fn bytes(&self) -> usize {
        16 * self.m0.len()
    }
}

impl Columns for WordOtReceiver {
    fn count(&self) -> usize {
        self.m.len()
    }
    fn append_range(&mut self, src: &Self, from: usize, n: usize) {
        self.choice.extend_from_range(&src.choice, from, n);
        self.m.extend_from_slice(&src.m[from..from + n]);
    }
    fn bytes(&self) -> usize {
        8 * self.m.len() + self.choice.len().div_ceil(8)
    }
}

// Correlations are secrets: `Debug` shows how many, never their bits or
// words (the derived one would print every OT message into a log).
impl std::fmt::Debug for BitTriples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitTriples({} triples)", self.count())
    }
}

impl std::fmt::Debug for BitOtSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitOtSender({} OTs)", self.count())
    }
}

impl std::fmt::Debug for BitOtReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitOtReceiver({} OTs)", self.count())
    }
}

impl std::fmt::Debug for WordOtSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WordOtSender({} OTs)", self.count())
    }
}

impl std::fmt::Debug for WordOtReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WordOtReceiver({} OTs)", self.count())
    }
}

impl std::fmt::Debug for CorrelationBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorrelationBatch")
            .field("triples", &self.triples.count())
            .field("bit_sent", &self.bit_sent.count())
            .field("bit_received", &self.bit_received.count())
            .field("word_sent", &self.word_sent.count())
            .field("word_received", &self.word_received.count())
            .finish()
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("chunks", &self.chunks.len())
            .field("offset", &self.offset)
            .field("taken", &self.taken)
            .field("available", &self.available)
            .finish()
    }
}

impl std::fmt::Debug for CorrelationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CorrelationStore({:?}, available {:?}, position {:?})",
            self.role,
            self.available(),
            self.position()
        )
    }
}

/// A queue of one kind: chunks, an offset into the first, and how many
/// items were taken in all.
#[derive(Default)]
struct Queue<T> {
    chunks: VecDeque<T>,
    offset: usize,
    taken: u64,
    available: u64,
}

impl<T: Columns> Queue<T> {
    fn push(&mut self, chunk: T) {
        if chunk.count() > 0 {
            self.available += chunk.count() as u64;
            self.chunks.push_back(chunk);
        }
    }

    /// The next `n` items, copied out of the chunks. A chunk is dropped
    /// (its memory freed) as soon as its last item is taken; a chunk that is
    /// only partly used stays allocated whole until the rest of it is taken,
    /// so a queue holds up to one batch of already-used material (counted
    /// by [`bytes`](Self::bytes), and so by the engine's budget).
    fn take(&mut self, n: usize, kind: &'static str) -> Result<T, OtError> {
        if n as u64 > self.available {
            return Err(OtError::Exhausted {
                kind,
                wanted: n as u64,
                available: self.available,
            });
        }
        let mut out = T::default();
        let mut need = n;
        while need > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let k = need.min(front.count() - self.offset);
            out.append_range(front, self.offset, k);
            self.offset += k;
            need -= k;
            if self.offset == front.count() {
                self.chunks.pop_front();
                self.offset = 0;
            }
        }
        self.available -= n as u64;
        self.taken += n as u64;
        Ok(out)
    }

    /// Bytes of the chunks held, used parts of the first one included.
    fn bytes(&self) -> usize {
        self.chunks.iter().map(Columns::bytes).sum()
    }
}

/// One party's correlations, each usable once. See the module docs.
pub struct CorrelationStore {
    role: Role,
    triples: Queue<BitTriples>,
    bit_sent: Queue<BitOtSender>,
    bit_received: Queue<BitOtReceiver>,
    word_sent: Queue<WordOtSender>,
    word_received: Queue<WordOtReceiver>,
}

impl CorrelationStore {
    /// An empty store for `role`.
    pub fn new(role: Role) -> CorrelationStore {
        CorrelationStore {
            role,
            triples: Queue::default(),
            bit_sent: Queue::default(),
            bit_received: Queue::default(),
            word_sent: Queue::default(),
            word_received: Queue::default(),
        }
    }

    /// A store holding exactly `batch`.
    pub fn from_batch(role: Role, batch: CorrelationBatch) -> CorrelationStore {
        let mut s = CorrelationStore::new(role);
        s.append(batch);
        s
    }

    /// Whose store this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Appends a batch at the back of every queue.
    pub fn append(&mut self, batch: CorrelationBatch) {
        self.triples.push(batch.triples);
        self.bit_sent.push(batch.bit_sent);
        self.bit_received.push(batch.bit_received);
        self.word_sent.push(batch.word_sent);
        self.word_received.push(batch.word_received);
    }

    /// Correlations handed out so far, per kind.
    pub fn position(&self) -> Position {
        Position {
            triples: self.triples.taken,
            bit_ots_sent: self.bit_sent.taken,
            bit_ots_received: self.bit_received.taken,
            word_ots_sent: self.word_sent.taken,
            word_ots_received: self.word_received.taken,
        }
    }

    /// What is left, as a demand in absolute directions.
    pub fn available(&self) -> Demand {
        self.demand_from(
            self.triples.available,
            (self.bit_sent.available, self.bit_received.available),
            (self.word_sent.available, self.word_received.available),
        )
    }

    fn demand_from(&self, triples: u64, bits: (u64, u64), words: (u64, u64)) -> Demand {
        let ((bc, bs), (wc, ws)) = match self.role {
            Role::Client => (bits, words),
            Role::Server => ((bits.1, bits.0), (words.1, words.0)),
        };
        Demand {
            triples,
            bit_ots_client_sends: bc,
            bit_ots_server_sends: bs,
            word_ots_client_sends: wc,
            word_ots_server_sends: ws,
        }
    }

    /// (sent, received) counts of a demand from this party's point of view.
    fn mine(&self, d: &Demand) -> ((u64, u64), (u64, u64)) {
        match self.role {
            Role::Client => (
                (d.bit_ots_client_sends, d.bit_ots_server_sends),
                (d.word_ots_client_sends, d.word_ots_server_sends),
            ),
            Role::Server => (
                (d.bit_ots_server_sends, d.bit_ots_client_sends),
                (d.word_ots_server_sends, d.word_ots_client_sends),
            ),
        }
    }

    /// Bytes of material held: every chunk still in a queue, including the
    /// used part of a partly used one (see [`Demand::stored_bytes_for`]
    /// for the count per batch).
    pub fn bytes(&self) -> usize {
        self.triples.bytes()
            + self.bit_sent.bytes()
            + self.bit_received.bytes()
            + self.word_sent.bytes()
            + self.word_received.bytes()
    }

    /// Moves exactly `demand` from the front of this store into a new one
    /// (a run's material). Nothing is taken unless all of it is there.
    pub fn split_off(&mut self, demand: &Demand) -> Result<CorrelationStore, OtError> {
        let available = self.available();
        if !demand.fits_in(&available) {
            return Err(OtError::Short {
                wanted: *demand,
                available,
            });
        }
        let ((bs, br), (ws, wr)) = self.mine(demand);
        let batch = CorrelationBatch {
            triples: self.triples.take(demand.triples as usize, "bit triple")?,
            bit_sent: self.bit_sent.take(bs as usize, "bit OT (sent)")?,
            bit_received: self.bit_received.take(br as usize, "bit OT (received)")?,
            word_sent: self.word_sent.take(ws as usize, "word OT (sent)")?,
            word_received: self.word_received.take(wr as usize, "word OT (received)")?,
        };
        Ok(CorrelationStore::from_batch(self.role, batch))
    }

    /// As [`split_off`](Self::split_off), but only if the store is at
    /// `expected` (the position the peer reports, translated to this party's
    /// view): a position behind the store means the peer would reuse
    /// correlations, one ahead that it skipped some; both are refused and
    /// nothing is taken.
    pub fn take_at(
        &mut self,
        expected: Position,
        demand: &Demand,
    ) -> Result<CorrelationStore, OtError> {
        let here = self.position();
        if expected != here {
            let behind = expected.triples < here.triples
                || expected.bit_ots_sent < here.bit_ots_sent
                || expected.bit_ots_received < here.bit_ots_received
                || expected.word_ots_sent < here.word_ots_sent
                || expected.word_ots_received < here.word_ots_received;
            return Err(if behind {
                OtError::Reused {
                    claimed: expected,
                    store: here,
                }
            } else {
                OtError::Skipped {
                    claimed: expected,
                    store: here,
                }
            });
        }
        self.split_off(demand)
    }

    /// The next `n` bit triples.
    pub fn triples(&mut self, n: usize) -> Result<BitTriples, OtError> {
        self.triples.take(n, "bit triple")
    }

    /// The next `n` bit OTs this party sends.
    pub fn bit_ots_sent(&mut self, n: usize) -> Result<BitOtSender, OtError> {
        self.bit_sent.take(n, "bit OT (sent)")
    }

    /// The next `n` bit OTs this party receives.
    pub fn bit_ots_received(&mut self, n: usize) -> Result<BitOtReceiver, OtError> {
        self.bit_received.take(n, "bit OT (received)")
    }

    /// The next `n` word OTs this party sends.
    pub fn word_ots_sent(&mut self, n: usize) -> Result<WordOtSender, OtError> {
        self.word_sent.take(n, "word OT (sent)")
    }

    /// The next `n` word OTs this party receives.
    pub fn word_ots_received(&mut self, n: usize) -> Result<WordOtReceiver, OtError> {
        self.word_received.take(n, "word OT (received)")
    }
}

/// Correlations dealt in the clear by one party that sees both sides.
/// **Insecure by construction**: for tests of the protocols built on
/// correlations only; the feature that exposes it outside this crate's own
/// tests is named `insecure-test-dealer` and no binary enables it.
#[cfg(any(test, feature = "insecure-test-dealer"))]
pub mod insecure_test_dealer {
    use rand::Rng;

    use super::*;

    fn random_bits(rng: &mut impl Rng, n: usize) -> Bits {
        let words = (0..n.div_ceil(64)).map(|_| rng.next_u64()).collect();
        Bits::from_words(words, n).unwrap_or_default()
    }

    fn random_words(rng: &mut impl Rng, n: usize) -> Vec<u64> {
        (0..n).map(|_| rng.next_u64()).collect()
    }

    fn bit_ots(rng: &mut impl Rng, n: usize) -> (BitOtSender, BitOtReceiver) {
        let (m0, m1, choice) = (
            random_bits(rng, n),
            random_bits(rng, n),
            random_bits(rng, n),
        );
        // m = choice ? m1 : m0 = m0 ⊕ choice ∧ (m0 ⊕ m1)
        let m = m0.xor(&choice.and(&m0.xor(&m1)));
        (BitOtSender { m0, m1 }, BitOtReceiver { choice, m })
    }

    fn word_ots(rng: &mut impl Rng, n: usize) -> (WordOtSender, WordOtReceiver) {
        let (m0, m1, choice) = (
            random_words(rng, n),
            random_words(rng, n),
            random_bits(rng, n),
        );
        let m = (0..n)
            .map(|i| if choice.get(i) { m1[i] } else { m0[i] })
            .collect();
        (WordOtSender { m0, m1 }, WordOtReceiver { choice, m })
    }

    /// Material for `demand`: (client's batch, server's batch).
    pub fn deal(rng: &mut impl Rng, demand: &Demand) -> (CorrelationBatch, CorrelationBatch) {
        let n = demand.triples as usize;
        let (a_c, a_s, b_c, b_s, c_c) = (
            random_bits(rng, n),
            random_bits(rng, n),
            random_bits(rng, n),
            random_bits(rng, n),
            random_bits(rng, n),
        );
        let b = b_c.xor(&b_s);
        let c_s = c_c.xor(&a_c.xor(&a_s).and(&b));
        let (a2_c, a2_s, c2_c) = (
            random_bits(rng, n),
            random_bits(rng, n),
            random_bits(rng, n),
        );
        let c2_s = c2_c.xor(&a2_c.xor(&a2_s).and(&b));
        let (bc_send, bc_recv) = bit_ots(rng, demand.bit_ots_client_sends as usize);
        let (bs_send, bs_recv) = bit_ots(rng, demand.bit_ots_server_sends as usize);
        let (wc_send, wc_recv) = word_ots(rng, demand.word_ots_client_sends as usize);
        let (ws_send, ws_recv) = word_ots(rng, demand.word_ots_server_sends as usize);
        (
            CorrelationBatch {
                triples: BitTriples {
                    a: a_c,
                    b: b_c,
                    c: c_c,
                    a2: a2_c,
                    c2: c2_c,
                },
                bit_sent: bc_send,
                bit_received: bs_recv,
                word_sent: wc_send,
                word_received: ws_recv,
            },
            CorrelationBatch {
                triples: BitTriples {
                    a: a_s,
                    b: b_s,
                    c: c_s,
                    a2: a2_s,
                    c2: c2_s,
                },
                bit_sent: bs_send,
                bit_received: bc_recv,
                word_sent: ws_send,
                word_received: wc_recv,
            },
        )
    }

    /// Two stores (client, server) holding `demand`.
    pub fn stores(rng: &mut impl Rng, demand: &Demand) -> (CorrelationStore, CorrelationStore) {
        let (c, s) = deal(rng, demand);
        (
            CorrelationStore::from_batch(Role::Client, c),
            CorrelationStore::from_batch(Role::Server, s),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::insecure_test_dealer::stores;
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha20Rng;

    #[test]
    fn shortfall_is_what_is_missing_per_component() {
        let want = demand();
        assert_eq!(want.shortfall(&Demand::default()), want);
        assert!(want.shortfall(&want).is_zero());
        let half = Demand {
            triples: 65,
            bit_ots_client_sends: 100,
            ..Demand::default()
        };
        let short = want.shortfall(&half);
        assert_eq!(short.triples, 65);
        assert_eq!(
            short.bit_ots_client_sends, 0,
            "more than enough is not negative"
        );
        assert_eq!(short.bit_ots_server_sends, want.bit_ots_server_sends);
        assert!(want.fits_in(&half.plus_for_test(&short)));
    }

    #[test]
    fn times_in_counts_whole_inferences_by_the_scarcest_component() {
        let per = demand();
        assert_eq!(Demand::default().times_in(&per), 0);
        assert_eq!(per.times(7).unwrap().times_in(&per), 7);
        // one component short of the eighth inference: still 7
        let mut have = per.times(8).unwrap();
        have.word_ots_server_sends -= 1;
        assert_eq!(have.times_in(&per), 7);
        // components nobody needs do not count
        let words_only = Demand {
            word_ots_client_sends: 3,
            ..Demand::default()
        };
        assert_eq!(have.times_in(&words_only), have.word_ots_client_sends / 3);
        assert_eq!(have.times_in(&Demand::default()), u64::MAX);
    }

    impl Demand {
        fn plus_for_test(&self, o: &Demand) -> Demand {
            Demand {
                triples: self.triples + o.triples,
                bit_ots_client_sends: self.bit_ots_client_sends + o.bit_ots_client_sends,
                bit_ots_server_sends: self.bit_ots_server_sends + o.bit_ots_server_sends,
                word_ots_client_sends: self.word_ots_client_sends + o.word_ots_client_sends,
                word_ots_server_sends: self.word_ots_server_sends + o.word_ots_server_sends,
            }
        }
    }

    fn demand() -> Demand {
        Demand {
            triples: 130,
            bit_ots_client_sends: 70,
            bit_ots_server_sends: 65,
            word_ots_client_sends: 9,
            word_ots_server_sends: 11,
        }
    }

    #[test]
    fn taking_in_pieces_equals_taking_at_once() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (mut c, _) = stores(&mut rng, &demand());
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (mut whole, _) = stores(&mut rng, &demand());
        let all = whole.triples(130).unwrap();
        let first = c.triples(60).unwrap();
        let second = c.triples(70).unwrap();
        assert_eq!(Bits::concat([&first.a, &second.a]), all.a);
        assert_eq!(Bits::concat([&first.c, &second.c]), all.c);
        assert_eq!(c.position().triples, 130);
        assert!(matches!(
            c.triples(1),
            Err(OtError::Exhausted { available: 0, .. })
        ));
    }

    #[test]
    fn split_off_takes_all_or_nothing_and_advances_both_views() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (mut c, mut s) = stores(&mut rng, &demand());
        let part = Demand {
            triples: 100,
            bit_ots_client_sends: 70,
            bit_ots_server_sends: 1,
            word_ots_client_sends: 9,
            word_ots_server_sends: 2,
        };
        let too_much = Demand {
            triples: 131,
            ..part
        };
        assert!(matches!(c.split_off(&too_much), Err(OtError::Short { .. })));
        assert_eq!(c.position(), Position::default());
        let run_c = c.split_off(&part).unwrap();
        let run_s = s.take_at(c.position().as_seen_by_peer(), &Demand::default());
        // the server is still at zero: the client's position is ahead of it
        assert!(matches!(run_s, Err(OtError::Skipped { .. })));
        let run_s = s
            .take_at(Position::default().as_seen_by_peer(), &part)
            .unwrap();
        assert_eq!(run_c.available(), part);
        assert_eq!(run_s.available(), part);
        assert_eq!(c.position().as_seen_by_peer(), s.position());
        // replaying the same position is reuse, on either side
        assert!(matches!(
            s.take_at(Position::default(), &part),
            Err(OtError::Reused { .. })
        ));
        assert!(matches!(
            c.take_at(Position::default(), &part),
            Err(OtError::Reused { .. })
        ));
    }

    #[test]
    fn debug_shows_counts_never_secrets() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (client, server) = insecure_test_dealer::deal(&mut rng, &demand());
        assert_eq!(
            format!("{client:?}"),
            "CorrelationBatch { triples: 130, bit_sent: 70, bit_received: 65, word_sent: 9, word_received: 11 }"
        );
        assert_eq!(format!("{:?}", server.triples), "BitTriples(130 triples)");
        assert_eq!(format!("{:?}", server.bit_sent), "BitOtSender(65 OTs)");
        assert_eq!(
            format!("{:?}", server.bit_received),
            "BitOtReceiver(70 OTs)"
        );
        assert_eq!(format!("{:?}", server.word_sent), "WordOtSender(11 OTs)");
        assert_eq!(
            format!("{:?}", server.word_received),
            "WordOtReceiver(9 OTs)"
        );
        let words: Vec<u64> = server.word_sent.m0.clone();
        let mut store = CorrelationStore::from_batch(Role::Server, server);
        store.triples(60).unwrap();
        let shown = format!("{store:?}");
        assert!(
            shown.starts_with("CorrelationStore(Server, available Demand { triples: 70,"),
            "{shown}"
        );
        assert!(
            shown.contains("position Position { triples: 60,"),
            "{shown}"
        );
        for w in words {
            assert!(!shown.contains(&w.to_string()), "{shown}");
        }
        let queue = format!("{:?}", store.triples);
        assert_eq!(
            queue,
            "Queue { chunks: 1, offset: 60, taken: 60, available: 70 }"
        );
    }

    #[test]
    fn stored_bytes_count_what_each_side_stores() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let d = Demand {
            word_ots_client_sends: 1000,
            word_ots_server_sends: 3,
            ..demand()
        };
        let (c, s) = insecure_test_dealer::deal(&mut rng, &d);
        let c = CorrelationStore::from_batch(Role::Client, c);
        let s = CorrelationStore::from_batch(Role::Server, s);
        // the client sends 1000 word OTs (16 bytes each) and receives 3,
        // the server the other way round (8 bytes and a choice bit each)
        assert_eq!(c.bytes() as u64, d.stored_bytes_for(Role::Client));
        assert_eq!(s.bytes() as u64, d.stored_bytes_for(Role::Server));
        assert!(d.stored_bytes_for(Role::Client) > d.stored_bytes_for(Role::Server) + 7000);
        assert_eq!(d.stored_bytes(), d.stored_bytes_for(Role::Client));
        let mirrored = Demand {
            word_ots_client_sends: 3,
            word_ots_server_sends: 1000,
            ..d
        };
        assert_eq!(
            mirrored.stored_bytes_for(Role::Server),
            d.stored_bytes_for(Role::Client)
        );
        assert_eq!(mirrored.stored_bytes(), d.stored_bytes());
        // absurd counts saturate instead of wrapping below a budget
        for absurd in [
            // no single term overflows, their sum does
            Demand {
                triples: u64::MAX,
                bit_ots_client_sends: u64::MAX,
                bit_ots_server_sends: u64::MAX,
                word_ots_client_sends: 0,
                word_ots_server_sends: 1 << 60,
            },
            Demand {
                word_ots_client_sends: u64::MAX / 8,
                ..Demand::default()
            },
            Demand {
                word_ots_server_sends: u64::MAX / 9,
                bit_ots_client_sends: u64::MAX,
                ..Demand::default()
            },
        ] {
            assert_eq!(
                absurd.stored_bytes_for(Role::Client),
                u64::MAX,
                "{absurd:?}"
            );
            assert_eq!(
                absurd.stored_bytes_for(Role::Server),
                u64::MAX,
                "{absurd:?}"
            );
            assert_eq!(absurd.stored_bytes(), u64::MAX, "{absurd:?}");
        }
    }

    #[test]
    fn a_chunk_is_freed_once_used_up_and_not_before() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (mut c, _) = stores(&mut rng, &demand());
        let (more, _) = insecure_test_dealer::deal(&mut rng, &demand());
        c.append(more);
        let one = demand().stored_bytes_for(Role::Client) as usize;
        assert_eq!(c.bytes(), 2 * one);
        // a partly used chunk stays allocated whole
        c.triples(129).unwrap();
        assert_eq!(c.bytes(), 2 * one);
        // its last triple frees the first batch's triples (5 · 17 bytes)
        c.triples(2).unwrap();
        assert_eq!(c.bytes(), 2 * one - 5 * 130usize.div_ceil(8));
        assert_eq!(c.triples.chunks.len(), 1);
    }

    #[test]
    fn dealt_material_satisfies_its_relations() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (mut c, mut s) = stores(&mut rng, &demand());
        let (tc, ts) = (c.triples(130).unwrap(), s.triples(130).unwrap());
        let b = tc.b.xor(&ts.b);
        assert_eq!(tc.c.xor(&ts.c), tc.a.xor(&ts.a).and(&b));
        assert_eq!(tc.c2.xor(&ts.c2), tc.a2.xor(&ts.a2).and(&b));
        let (snd, rcv) = (c.bit_ots_sent(70).unwrap(), s.bit_ots_received(70).unwrap());
        for i in 0..70 {
            let m = if rcv.choice.get(i) {
                snd.m1.get(i)
            } else {
                snd.m0.get(i)
            };
            assert_eq!(rcv.m.get(i), m);
        }
        let (snd, rcv) = (
            s.word_ots_sent(11).unwrap(),
            c.word_ots_received(11).unwrap(),
        );
        for i in 0..11 {
            let m = if rcv.choice.get(i) {
                snd.m1[i]
            } else {
                snd.m0[i]
            };
            assert_eq!(rcv.m[i], m);
        }
    }
}
