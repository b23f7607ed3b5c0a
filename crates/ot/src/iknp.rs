//! OT extension: Ishai, Kilian, Nissim and Petrank, "Extending Oblivious
//! Transfers Efficiently" (CRYPTO 2003), semi-honest, κ = 128, producing
//! 128-bit correlated OTs; and [`IknpSource`], the [`CorrelationSource`]
//! that runs it in both directions on top of the base OTs of
//! [`crate::base`].
//!
//! Roles are reversed with respect to the base OTs: the extension receiver
//! was the base-OT sender and holds both seeds `k0_i, k1_i` of each of the
//! 128 rows; the extension sender was the base-OT receiver with choice bits
//! `Δ` and holds `k_{Δ_i}`. For a batch of `m` COTs (padded to a multiple
//! of 128) the receiver draws random choices `r`, sets the rows
//! `t_i = G(k0_i)` and sends `u_i = G(k0_i) ⊕ G(k1_i) ⊕ r`; the sender
//! computes `q_i = G(k_{Δ_i}) ⊕ Δ_i·u_i = t_i ⊕ Δ_i·r`. Column `j` of the
//! two 128 × m matrices gives `q_j = t_j ⊕ r_j·Δ`. Each row's PRG `G` is
//! AES-128 in counter mode keyed with the row's seed, the counter running
//! on across batches so no output is used twice. We chose AES over ChaCha20
//! because the refinement's hash ([`crate::refine`]) is fixed-key AES
//! anyway, so one primitive serves both, and the `aes` crate uses AES-NI
//! (or the ARMv8 instructions) when the CPU has them, with a constant-time
//! bitsliced fallback: expanding 128 seeds per direction costs less than
//! the hashing after it. The 128 × m transposes are done by 64 × 64 block
//! transposes with masked swaps, in safe Rust.

use aes::Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use rand::CryptoRng;
use rand::rngs::{ChaCha20Rng, SysRng};
use rand::{Rng, SeedableRng};

use crate::base::{self, BaseOtSender, POINT_BYTES};
use crate::source::{CorrelationSource, CotBatch, CotCounts, CotReceiver, CotSender};
use crate::{Bits, OtError, Role};

/// The security parameter: base OTs per direction, bits per COT.
pub const KAPPA: usize = 128;

/// COTs are made in multiples of this: one AES block of every row.
const COLUMN_BLOCK: usize = 128;

/// Column blocks per tile: the rows of a tile (128 × 32 blocks, 64 KiB) are
/// expanded, combined and transposed while they sit in the cache. Each
/// row's PRG encrypts 32 blocks per call: the `aes` crate encrypts 8
/// blocks at a time with AES-NI and 30 with VAES, and handles the rest one
/// by one, so short calls leave most of the hardware idle.
const TILE: usize = 32;

/// Blocks of 128 columns for `m` COTs.
fn column_blocks(m: usize) -> Result<usize, OtError> {
    let blocks = m.div_ceil(COLUMN_BLOCK);
    blocks
        .checked_mul(KAPPA * 16)
        .map(|_| blocks)
        .ok_or_else(|| OtError::Message(format!("{m} COTs are too many for one batch")))
}

/// Bytes of the extension matrix `u` for `m` COTs: 2 KiB per 128 COTs.
///
/// Layout on the wire: column block by column block (128 COTs), and within
/// one, row `i` of the block as 16 little-endian bytes (bit `c` is COT
/// `128·b + c`), rows 0 to 127. Block-major rather than row-major, so that
/// both sides read and write it tile by tile.
pub fn matrix_bytes(m: usize) -> Result<usize, OtError> {
    Ok(column_blocks(m)? * KAPPA * 16)
}

/// AES-128 in counter mode: the PRG of one matrix row.
struct RowPrg(Aes128);

impl RowPrg {
    fn new(seed: u128) -> RowPrg {
        RowPrg(Aes128::new(&Array::from(seed.to_le_bytes())))
    }

    /// Fills `out` (at most [`TILE`] blocks) with the stream from block
    /// `first_block` on.
    fn fill(&self, first_block: u64, out: &mut [u128]) {
        let mut buf = [aes::Block::default(); TILE];
        let blocks = &mut buf[..out.len()];
        for (k, b) in blocks.iter_mut().enumerate() {
            *b = Array::from((u128::from(first_block) + k as u128).to_le_bytes());
        }
        self.0.encrypt_blocks(blocks);
        for (o, b) in out.iter_mut().zip(blocks.iter()) {
            *o = u128::from_le_bytes((*b).into());
        }
    }
}

/// Transposes a 64 × 64 bit matrix in place: bit `c` of word `r` goes to
/// bit `r` of word `c`. Six rounds of masked swaps, each exchanging the
/// off-diagonal quarters of every 2j × 2j block (Hacker's Delight §7-3).
fn transpose64(a: &mut [u64; 64]) {
    let mut j = 32;
    let mut mask: u64 = 0x0000_0000_ffff_ffff;
    while j != 0 {
        for base in (0..64).step_by(2 * j) {
            for k in base..base + j {
                let t = ((a[k] >> j) ^ a[k + j]) & mask;
                a[k] ^= t << j;
                a[k + j] ^= t;
            }
        }
        j >>= 1;
        mask ^= mask << j;
    }
}

/// Transposes one 128 × 128 block: `rows(i)` is row `i` (bit `c` for
/// column `c`); the result's entry `c` is column `c` (bit `i` for row `i`).
/// Four 64 × 64 transposes.
fn transpose128(rows: impl Fn(usize) -> u128) -> [u128; 128] {
    let mut out = [0u128; 128];
    let mut a = [0u64; 64];
    for col_half in 0..2 {
        for row_half in 0..2 {
            for (r, word) in a.iter_mut().enumerate() {
                *word = (rows(64 * row_half + r) >> (64 * col_half)) as u64;
            }
            transpose64(&mut a);
            for (col, &word) in out[64 * col_half..64 * (col_half + 1)].iter_mut().zip(&a) {
                *col |= u128::from(word) << (64 * row_half);
            }
        }
    }
    out
}

/// Reserves `blocks` blocks of every row's stream from `first` on; the
/// next batch's first block.
fn advance(first: u64, blocks: usize) -> Result<u64, OtError> {
    u64::try_from(blocks)
        .ok()
        .and_then(|b| first.checked_add(b))
        .ok_or_else(|| OtError::Message("the IKNP PRG counter is exhausted".into()))
}

fn read_block(bytes: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(bytes);
    u128::from_le_bytes(b)
}

/// The extension receiver of one direction: both seeds of every row.
pub struct IknpReceiver {
    prgs: Vec<[RowPrg; 2]>,
    next_block: u64,
}

impl std::fmt::Debug for IknpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IknpReceiver")
            .field("next_block", &self.next_block)
            .finish_non_exhaustive()
    }
}

impl IknpReceiver {
    /// From the base-OT sender's keys `[k0_i, k1_i]`, exactly [`KAPPA`].
    pub fn new(seeds: &[[u128; 2]]) -> Result<IknpReceiver, OtError> {
        if seeds.len() != KAPPA {
            return Err(OtError::Message(format!(
                "IKNP needs {KAPPA} base OTs, got {}",
                seeds.len()
            )));
        }
        Ok(IknpReceiver {
            prgs: seeds
                .iter()
                .map(|[k0, k1]| [RowPrg::new(*k0), RowPrg::new(*k1)])
                .collect(),
            next_block: 0,
        })
    }

    /// `m` COTs with fresh random choices: the matrix `u` to send to the
    /// extension sender ([`matrix_bytes`]`(m)` bytes) and this side's COTs.
    pub fn extend(
        &mut self,
        rng: &mut impl CryptoRng,
        m: usize,
    ) -> Result<(Vec<u8>, CotReceiver), OtError> {
        self.extend_into(rng, m, Vec::new())
    }

    /// As [`extend`](Self::extend), writing the COTs into `columns`'
    /// memory (its contents are discarded): a batch reuses the last one's.
    pub fn extend_into(
        &mut self,
        rng: &mut impl CryptoRng,
        m: usize,
        mut columns: Vec<u128>,
    ) -> Result<(Vec<u8>, CotReceiver), OtError> {
        let nb = column_blocks(m)?;
        let first = self.next_block;
        self.next_block = advance(first, nb)?;
        let r: Vec<u128> = (0..nb)
            .map(|_| u128::from(rng.next_u64()) | (u128::from(rng.next_u64()) << 64))
            .collect();
        // Both outputs are appended in order, never zero-filled first.
        let mut matrix = Vec::with_capacity(matrix_bytes(m)?);
        columns.clear();
        columns.reserve(nb * COLUMN_BLOCK);
        let mut t = vec![0u128; KAPPA * TILE];
        let mut u = vec![0u128; KAPPA * TILE];
        for tile in (0..nb).step_by(TILE) {
            let n = TILE.min(nb - tile);
            let block0 = first + tile as u64;
            for (i, [p0, p1]) in self.prgs.iter().enumerate() {
                let (t_row, u_row) = (
                    &mut t[i * TILE..i * TILE + n],
                    &mut u[i * TILE..i * TILE + n],
                );
                p0.fill(block0, t_row);
                p1.fill(block0, u_row);
                for ((u, t), r) in u_row.iter_mut().zip(t_row.iter()).zip(&r[tile..tile + n]) {
                    *u ^= t ^ r;
                }
            }
            for k in 0..n {
                for i in 0..KAPPA {
                    matrix.extend_from_slice(&u[i * TILE + k].to_le_bytes());
                }
                columns.extend_from_slice(&transpose128(|i| t[i * TILE + k]));
            }
        }
        columns.truncate(m);
        let words = r
            .iter()
            .flat_map(|&b| [b as u64, (b >> 64) as u64])
            .collect();
        let choice = Bits::from_words(words, m)
            .ok_or_else(|| OtError::Message("choice bits shorter than the batch".into()))?;
        Ok((matrix, CotReceiver { choice, t: columns }))
    }
}

/// The extension sender of one direction: `Δ` and the chosen seed of every
/// row.
pub struct IknpSender {
    delta: u128,
    prgs: Vec<RowPrg>,
    next_block: u64,
}

impl std::fmt::Debug for IknpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IknpSender")
            .field("next_block", &self.next_block)
            .finish_non_exhaustive()
    }
}

impl IknpSender {
    /// From the base-OT receiver's choices `Δ` (bit `i` for OT `i`) and its
    /// keys `k_{Δ_i}`, exactly [`KAPPA`].
    pub fn new(delta: u128, seeds: &[u128]) -> Result<IknpSender, OtError> {
        if seeds.len() != KAPPA {
            return Err(OtError::Message(format!(
                "IKNP needs {KAPPA} base OTs, got {}",
                seeds.len()
            )));
        }
        Ok(IknpSender {
            delta,
            prgs: seeds.iter().map(|k| RowPrg::new(*k)).collect(),
            next_block: 0,
        })
    }

    /// `Δ`.
    pub fn delta(&self) -> u128 {
        self.delta
    }

    /// `m` COTs from the receiver's matrix `u` (exactly
    /// [`matrix_bytes`]`(m)` bytes, checked before any work).
    pub fn extend(&mut self, m: usize, matrix: &[u8]) -> Result<CotSender, OtError> {
        self.extend_into(m, matrix, Vec::new())
    }

    /// As [`extend`](Self::extend), writing the COTs into `columns`'
    /// memory (its contents are discarded): a batch reuses the last one's.
    pub fn extend_into(
        &mut self,
        m: usize,
        matrix: &[u8],
        mut columns: Vec<u128>,
    ) -> Result<CotSender, OtError> {
        let expected = matrix_bytes(m)?;
        if matrix.len() != expected {
            return Err(OtError::Message(format!(
                "IKNP matrix for {m} COTs must have {expected} bytes, got {}",
                matrix.len()
            )));
        }
        let nb = column_blocks(m)?;
        let first = self.next_block;
        self.next_block = advance(first, nb)?;
        columns.clear();
        columns.reserve(nb * COLUMN_BLOCK);
        let mut q = vec![0u128; KAPPA * TILE];
        for tile in (0..nb).step_by(TILE) {
            let n = TILE.min(nb - tile);
            for (i, prg) in self.prgs.iter().enumerate() {
                let q_row = &mut q[i * TILE..i * TILE + n];
                prg.fill(first + tile as u64, q_row);
                // a mask, not a branch, on the secret bit Δ_i
                let take = 0u128.wrapping_sub((self.delta >> i) & 1);
                for (k, q) in q_row.iter_mut().enumerate() {
                    let at = ((tile + k) * KAPPA + i) * 16;
                    *q ^= read_block(&matrix[at..at + 16]) & take;
                }
            }
            for k in 0..n {
                columns.extend_from_slice(&transpose128(|i| q[i * TILE + k]));
            }
        }
        columns.truncate(m);
        Ok(CotSender {
            delta: self.delta,
            q: columns,
        })
    }
}

/// Setup flights of [`IknpSource`]: the client's `A_C`; the server's `A_S`
/// and its `B` points for `A_C`; the client's `B` points for `A_S`.
const SETUP_FLIGHT_0: usize = POINT_BYTES;
const SETUP_FLIGHT_1: usize = POINT_BYTES + KAPPA * POINT_BYTES;
const SETUP_FLIGHT_2: usize = KAPPA * POINT_BYTES;

enum State {
    Fresh,
    /// server: `start_setup` called, waits for the client's `A_C`
    AwaitOffer,
    /// client: sent `A_C`, waits for the server's `A_S` and `B` points
    Offered(BaseOtSender),
    /// server: answered, waits for the client's `B` points for `A_S`
    Answered(BaseOtSender, IknpSender),
    Ready(Box<Extension>),
    /// client: sent its matrix, waits for the server's
    ClientBatch(Box<Extension>, CotCounts, CotReceiver),
    /// server: knows the counts, waits for the client's matrix
    ServerBatch(Box<Extension>, CotCounts),
    /// a step failed: the first error, repeated by every later call
    Failed(OtError),
}

/// Both directions once set up: this party sends in one, receives in the
/// other.
struct Extension {
    sender: IknpSender,
    receiver: IknpReceiver,
}

/// IKNP in both directions, as a [`CorrelationSource`]. Setup (base OTs
/// both ways, three flights, the client waits for one):
///
/// 1. client → server: `A_C` (the client is base-OT sender for the
///    direction where the server sends COTs);
/// 2. server → client: `A_S` and `B_i` for `A_C` with the server's `Δ_S`;
/// 3. client → server: `B_i` for `A_S` with the client's `Δ_C`. The client
///    is ready once it sends this; it needs no answer, so the first batch
///    can follow at once.
///
/// A batch is one round trip: the client sends its matrix `u` (it receives
/// COTs from the server), the server answers with its own (it receives
/// from the client).
pub struct IknpSource {
    role: Role,
    rng: ChaCha20Rng,
    state: State,
    output: Option<CotBatch>,
    /// the memory of a finished batch, for the next (see `recycle`)
    spare: CotBatch,
}

impl std::fmt::Debug for IknpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IknpSource")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl IknpSource {
    /// A source for `role` seeded from the operating system.
    pub fn new(role: Role) -> Result<IknpSource, OtError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng)
            .map_err(|e| OtError::Randomness(e.to_string()))?;
        Ok(IknpSource::with_rng(role, rng))
    }

    /// A source for `role` drawing from `rng` (tests seed it).
    pub fn with_rng(role: Role, rng: ChaCha20Rng) -> IknpSource {
        IknpSource {
            role,
            rng,
            state: State::Fresh,
            output: None,
            spare: CotBatch::default(),
        }
    }

    fn random_delta(&mut self) -> (u128, Bits) {
        let words = vec![self.rng.next_u64(), self.rng.next_u64()];
        let delta = u128::from(words[0]) | (u128::from(words[1]) << 64);
        (delta, Bits::from_words(words, KAPPA).unwrap_or_default())
    }

    fn step(&mut self, state: State, message: &[u8]) -> Result<(State, Option<Vec<u8>>), OtError> {
        let expect = |len: usize, what: &str| {
            if message.len() == len {
                Ok(())
            } else {
                Err(OtError::Message(format!(
                    "{what} must have {len} bytes, got {}",
                    message.len()
                )))
            }
        };
        match state {
            State::AwaitOffer => {
                expect(SETUP_FLIGHT_0, "IKNP setup flight 0 (the client's A)")?;
                let (delta, choices) = self.random_delta();
                let received = base::receive(&mut self.rng, message, &choices)?;
                let sender = IknpSender::new(delta, &received.keys)?;
                let offer = BaseOtSender::new(&mut self.rng);
                let mut reply = Vec::with_capacity(SETUP_FLIGHT_1);
                reply.extend_from_slice(&offer.message());
                reply.extend_from_slice(&received.message);
                Ok((State::Answered(offer, sender), Some(reply)))
            }
            State::Offered(offer) => {
                expect(
                    SETUP_FLIGHT_1,
                    "IKNP setup flight 1 (the server's A and B points)",
                )?;
                let (their_offer, their_answer) = message.split_at(POINT_BYTES);
                let receiver = IknpReceiver::new(&offer.keys(their_answer, KAPPA)?)?;
                let (delta, choices) = self.random_delta();
                let received = base::receive(&mut self.rng, their_offer, &choices)?;
                let sender = IknpSender::new(delta, &received.keys)?;
                let ext = Box::new(Extension { sender, receiver });
                Ok((State::Ready(ext), Some(received.message)))
            }
            State::Answered(offer, sender) => {
                expect(
                    SETUP_FLIGHT_2,
                    "IKNP setup flight 2 (the client's B points)",
                )?;
                let receiver = IknpReceiver::new(&offer.keys(message, KAPPA)?)?;
                Ok((State::Ready(Box::new(Extension { sender, receiver })), None))
            }
            State::ClientBatch(mut ext, counts, received) => {
                let spare = std::mem::take(&mut self.spare.sent.q);
                let sent = ext.sender.extend_into(counts.sent, message, spare)?;
                self.output = Some(CotBatch { sent, received });
                Ok((State::Ready(ext), None))
            }
            State::ServerBatch(mut ext, counts) => {
                let spare = std::mem::take(&mut self.spare);
                let sent = ext.sender.extend_into(counts.sent, message, spare.sent.q)?;
                let (matrix, received) =
                    ext.receiver
                        .extend_into(&mut self.rng, counts.received, spare.received.t)?;
                self.output = Some(CotBatch { sent, received });
                Ok((State::Ready(ext), Some(matrix)))
            }
            State::Fresh => Err(OtError::Message(
                "IKNP: a message before the setup started".into(),
            )),
            State::Ready(_) => Err(OtError::Message(
                "IKNP: a message while no setup step or batch is running".into(),
            )),
            State::Failed(first) => Err(failed_earlier(&first)),
        }
    }

    /// Takes the state out for a step that consumes it; a failed source
    /// stays failed with its first error.
    fn take_state(&mut self) -> Result<State, OtError> {
        if let State::Failed(first) = &self.state {
            return Err(failed_earlier(first));
        }
        let placeholder = OtError::Message("IKNP: a step was interrupted".into());
        Ok(std::mem::replace(
            &mut self.state,
            State::Failed(placeholder),
        ))
    }

    /// Records the first error of the session and returns it.
    fn fail(&mut self, e: OtError) -> OtError {
        self.state = State::Failed(e.clone());
        e
    }
}

/// The error every call repeats after the source failed: the first one's
/// text, so that a log of the later call still names the cause.
fn failed_earlier(first: &OtError) -> OtError {
    OtError::Message(format!("IKNP: the source failed earlier: {first}"))
}

impl CorrelationSource for IknpSource {
    fn role(&self) -> Role {
        self.role
    }

    fn start_setup(&mut self) -> Result<Option<Vec<u8>>, OtError> {
        if let State::Failed(first) = &self.state {
            return Err(failed_earlier(first));
        }
        if !matches!(self.state, State::Fresh) {
            return Err(OtError::Message("IKNP: setup started twice".into()));
        }
        match self.role {
            Role::Client => {
                let offer = BaseOtSender::new(&mut self.rng);
                let message = offer.message().to_vec();
                self.state = State::Offered(offer);
                Ok(Some(message))
            }
            Role::Server => {
                self.state = State::AwaitOffer;
                Ok(None)
            }
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    fn start_batch(&mut self, counts: CotCounts) -> Result<Option<Vec<u8>>, OtError> {
        let State::Ready(mut ext) = self.take_state()? else {
            return Err(self.fail(OtError::Message(
                "IKNP: a batch started before the setup finished or during another batch".into(),
            )));
        };
        match self.role {
            Role::Client => {
                let spare = std::mem::take(&mut self.spare.received.t);
                let (matrix, received) = ext
                    .receiver
                    .extend_into(&mut self.rng, counts.received, spare)
                    .map_err(|e| self.fail(e))?;
                self.state = State::ClientBatch(ext, counts, received);
                Ok(Some(matrix))
            }
            Role::Server => {
                self.state = State::ServerBatch(ext, counts);
                Ok(None)
            }
        }
    }

    fn handle(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, OtError> {
        let state = self.take_state()?;
        let (next, reply) = self.step(state, message).map_err(|e| self.fail(e))?;
        self.state = next;
        Ok(reply)
    }

    fn poll_batch(&mut self) -> Option<CotBatch> {
        self.output.take()
    }

    /// Both matrices of the batch (the peer's, read while it is held, and
    /// this side's), the COT columns `q` and `t` (or the recycled buffers
    /// they reuse, if larger), the receiver's choices twice (its random
    /// `r` and the packed choice bits) and the tiles.
    fn batch_buffer_bytes(&self, counts: CotCounts) -> u64 {
        let matrix = |m: usize| matrix_bytes(m).map_or(u64::MAX, |b| b as u64);
        let kept = |len: usize| (len as u64).saturating_mul(16);
        let columns = |m: usize, spare: usize| matrix(m).max(kept(spare));
        let choices = (counts.received as u64).div_ceil(128).saturating_mul(32);
        let tiles = (2 * KAPPA * TILE * 16) as u64;
        [
            matrix(counts.sent),
            matrix(counts.received),
            columns(counts.sent, self.spare.sent.q.capacity()),
            columns(counts.received, self.spare.received.t.capacity()),
            choices,
            tiles,
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add)
    }

    fn recycle(&mut self, batch: CotBatch) {
        self.spare = batch;
    }

    /// The recycled batch's buffers.
    fn retained_bytes(&self) -> u64 {
        let s = &self.spare;
        ((s.sent.q.capacity() + s.received.t.capacity()) as u64) * 16
            + s.received.choice.words().len() as u64 * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refine::{Tccr, tweak};

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn transposes_match_the_definition() {
        let mut r = rng(1);
        let mut a = [0u64; 64];
        for w in &mut a {
            *w = r.next_u64();
        }
        let mut t = a;
        transpose64(&mut t);
        for (row, a_row) in a.iter().enumerate() {
            for (col, t_row) in t.iter().enumerate() {
                assert_eq!((t_row >> row) & 1, (a_row >> col) & 1, "{row},{col}");
            }
        }
        let rows: Vec<u128> = (0..KAPPA)
            .map(|_| u128::from(r.next_u64()) | (u128::from(r.next_u64()) << 64))
            .collect();
        let cols = transpose128(|i| rows[i]);
        for (c, col) in cols.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                assert_eq!((col >> i) & 1, (row >> c) & 1, "row {i} column {c}");
            }
        }
    }

    fn random_words(rng: &mut impl CryptoRng, n: usize) -> Vec<u64> {
        (0..n).map(|_| rng.next_u64()).collect()
    }

    /// An extension pair for one direction, through real base OTs.
    fn pair(seed: u64) -> (IknpSender, IknpReceiver, ChaCha20Rng) {
        let mut r = rng(seed);
        let delta = u128::from(r.next_u64()) | (u128::from(r.next_u64()) << 64);
        let choices = Bits::from_words(vec![delta as u64, (delta >> 64) as u64], KAPPA).unwrap();
        let offer = BaseOtSender::new(&mut r);
        let received = base::receive(&mut r, &offer.message(), &choices).unwrap();
        let seeds = offer.keys(&received.message, KAPPA).unwrap();
        (
            IknpSender::new(delta, &received.keys).unwrap(),
            IknpReceiver::new(&seeds).unwrap(),
            r,
        )
    }

    #[test]
    fn correlated_ots_satisfy_t_equals_q_xor_choice_delta_in_every_batch() {
        let (mut sender, mut receiver, mut r) = pair(2);
        // Δ is not all zeros or ones
        assert!(sender.delta().count_ones() > 32 && sender.delta().count_ones() < 96);
        let mut seen = std::collections::HashSet::new();
        for m in [1000, 0, 1, 128, 129, 64 * 5 + 3, 1000] {
            let (matrix, cots_r) = receiver.extend(&mut r, m).unwrap();
            assert_eq!(matrix.len(), matrix_bytes(m).unwrap());
            let cots_s = sender.extend(m, &matrix).unwrap();
            assert_eq!(
                (cots_s.q.len(), cots_r.t.len(), cots_r.choice.len()),
                (m, m, m)
            );
            for j in 0..m {
                let rho = u128::from(cots_r.choice.get(j));
                assert_eq!(
                    cots_r.t[j],
                    cots_s.q[j] ^ (rho * sender.delta()),
                    "batch of {m}, COT {j}"
                );
                // the receiver's t is q exactly where it chose 0: with Δ ≠ 0
                // a choice of 1 never leaves t = q
                assert_eq!(cots_r.t[j] == cots_s.q[j], rho == 0, "COT {j}");
            }
            // fresh PRG output in every batch: no q (nor t) of any batch
            // repeats one of this or an earlier batch (a PRG restarted
            // at block 0 would repeat the first batch's whole columns)
            for (j, &q) in cots_s.q.iter().enumerate() {
                assert!(seen.insert(q), "batch of {m}: q of COT {j} repeats");
            }
            if m >= 1000 {
                let ones = cots_r.choice.count_ones();
                assert!((400..600).contains(&ones), "choices look random: {ones}");
                let same = (0..m).filter(|&j| cots_r.t[j] == cots_s.q[j]).count();
                assert_eq!(same, m - ones, "t = q for the zero choices only");
            }
        }
    }

    #[test]
    fn random_ots_from_the_hash_match_the_choices() {
        let (mut sender, mut receiver, mut r) = pair(3);
        let (matrix, cr) = receiver.extend(&mut r, 500).unwrap();
        let cs = sender.extend(500, &matrix).unwrap();
        let h = Tccr::new();
        for j in 0..500 {
            let tw = tweak(Role::Client, j as u64);
            let m0 = h.hash(tw, cs.q[j]);
            let m1 = h.hash(tw, cs.q[j] ^ cs.delta);
            let mine = h.hash(tw, cr.t[j]);
            assert_ne!(m0, m1);
            assert_eq!(mine, if cr.choice.get(j) { m1 } else { m0 }, "OT {j}");
        }
    }

    #[test]
    fn chosen_message_and_chosen_correlation_ots_derived_from_cots() {
        let (mut sender, mut receiver, mut r) = pair(4);
        let n = 300;
        let (matrix, cr) = receiver.extend(&mut r, n).unwrap();
        let cs = sender.extend(n, &matrix).unwrap();
        let h = Tccr::new();
        let x: Vec<[u128; 2]> = (0..n)
            .map(|_| [u128::from(r.next_u64()), u128::from(r.next_u64())])
            .collect();
        let wanted = Bits::from_words(random_words(&mut r, n.div_ceil(64)), n).unwrap();
        for (j, msgs) in x.iter().enumerate() {
            let tw = tweak(Role::Server, j as u64);
            // chosen message (derandomised, as in Beaver 1995): the receiver
            // sends d = c ⊕ ρ; the sender y_b = x_b ⊕ H(q ⊕ (b ⊕ d)·Δ)
            let c = wanted.get(j);
            let d = u128::from(c ^ cr.choice.get(j));
            let y = [
                msgs[0] ^ h.hash(tw, cs.q[j] ^ (d * cs.delta)),
                msgs[1] ^ h.hash(tw, cs.q[j] ^ ((1 ^ d) * cs.delta)),
            ];
            assert_eq!(
                y[usize::from(c)] ^ h.hash(tw, cr.t[j]),
                msgs[usize::from(c)]
            );
            // chosen correlation f (Asharov, Lindell, Schneider, Zohner,
            // CCS 2013): x0 = H(q), the sender sends
            // y = x0 ⊕ f ⊕ H(q ⊕ Δ); the receiver gets x0 ⊕ ρ·f
            let f = msgs[0];
            let x0 = h.hash(tw, cs.q[j]);
            let y = x0 ^ f ^ h.hash(tw, cs.q[j] ^ cs.delta);
            let rho = u128::from(cr.choice.get(j));
            let got = h.hash(tw, cr.t[j]) ^ (rho * y);
            assert_eq!(got, x0 ^ (rho * f));
        }
    }

    #[test]
    fn a_matrix_of_the_wrong_length_is_refused_before_any_work() {
        let (mut sender, mut receiver, mut r) = pair(5);
        let (matrix, _) = receiver.extend(&mut r, 200).unwrap();
        let err = sender.extend(200, &matrix[1..]).unwrap_err();
        assert!(
            format!("{err}").contains("must have 4096 bytes, got 4095"),
            "{err}"
        );
        let err = sender.extend(usize::MAX, &matrix).unwrap_err();
        assert!(format!("{err}").contains("too many"), "{err}");
        // the failed calls consumed no PRG output: the pair still agrees
        let cs = sender.extend(200, &matrix).unwrap();
        assert_eq!(cs.q.len(), 200);
        assert!(IknpSender::new(0, &[0; 127]).is_err());
        assert!(IknpReceiver::new(&[[0; 2]; 129]).is_err());
    }

    /// Drives a client and a server source through setup and batches.
    fn sources(seed: u64) -> (IknpSource, IknpSource) {
        let mut client = IknpSource::with_rng(Role::Client, rng(seed));
        let mut server = IknpSource::with_rng(Role::Server, rng(seed + 1000));
        let f0 = client.start_setup().unwrap().unwrap();
        assert_eq!(server.start_setup().unwrap(), None);
        let f1 = server.handle(&f0).unwrap().unwrap();
        assert!(!server.is_ready());
        let f2 = client.handle(&f1).unwrap().unwrap();
        assert!(client.is_ready());
        assert_eq!(server.handle(&f2).unwrap(), None);
        assert!(server.is_ready());
        (client, server)
    }

    #[test]
    fn the_source_makes_cots_in_both_directions() {
        let (mut client, mut server) = sources(6);
        for (n_c, n_s) in [(300, 70), (0, 5), (129, 0)] {
            let counts = CotCounts {
                sent: n_c,
                received: n_s,
            };
            let req = client.start_batch(counts).unwrap().unwrap();
            assert_eq!(server.start_batch(counts.as_seen_by_peer()).unwrap(), None);
            let resp = server.handle(&req).unwrap().unwrap();
            assert_eq!(client.handle(&resp).unwrap(), None);
            let c = client.poll_batch().unwrap();
            let s = server.poll_batch().unwrap();
            assert!(client.is_ready() && server.is_ready());
            for (snd, rcv, n) in [(&c.sent, &s.received, n_c), (&s.sent, &c.received, n_s)] {
                assert_eq!(snd.q.len(), n);
                for j in 0..n {
                    let rho = u128::from(rcv.choice.get(j));
                    assert_eq!(rcv.t[j], snd.q[j] ^ (rho * snd.delta));
                }
            }
            assert_ne!(c.sent.delta, s.sent.delta);
        }
    }

    #[test]
    fn a_failed_source_repeats_its_first_error() {
        let mut server = IknpSource::with_rng(Role::Server, rng(11));
        server.start_setup().unwrap();
        let first = server.handle(&[0xff; 32]).unwrap_err().to_string();
        assert!(first.contains("not a ristretto255 point"), "{first}");
        for later in [
            server.handle(&[0; 32]).unwrap_err(),
            server
                .start_batch(CotCounts {
                    sent: 1,
                    received: 1,
                })
                .unwrap_err(),
            server.start_setup().unwrap_err(),
        ] {
            let later = later.to_string();
            assert!(later.contains("failed earlier"), "{later}");
            assert!(later.contains(&first), "{later} does not repeat {first}");
        }
        // an error inside a batch is kept the same way
        let (mut client, mut server) = sources(12);
        let counts = CotCounts {
            sent: 10,
            received: 20,
        };
        let matrix = client.start_batch(counts).unwrap().unwrap();
        server.start_batch(counts.as_seen_by_peer()).unwrap();
        let first = server.handle(&matrix[1..]).unwrap_err().to_string();
        assert!(first.contains("got 2047"), "{first}");
        let later = server.handle(&matrix).unwrap_err().to_string();
        assert!(later.contains(&first), "{later}");
    }

    #[test]
    fn the_source_reports_its_batch_buffers() {
        let (client, _) = sources(13);
        let counts = CotCounts {
            sent: 1000,
            received: 129,
        };
        // both matrices, both column buffers (a multiple of 128 COTs each),
        // the receiver's choices twice and the tiles
        let want = 2 * (8 * 2048 + 2 * 2048) + 2 * 16 * 2 + 2 * 128 * 32 * 16;
        assert_eq!(client.batch_buffer_bytes(counts), want);
        assert_eq!(
            client.batch_buffer_bytes(CotCounts {
                sent: usize::MAX,
                received: 0
            }),
            u64::MAX
        );
    }

    #[test]
    fn the_source_refuses_messages_out_of_phase() {
        let mut server = IknpSource::with_rng(Role::Server, rng(7));
        let err = server.handle(&[0; 32]).unwrap_err();
        assert!(
            format!("{err}").contains("before the setup started"),
            "{err}"
        );
        let mut client = IknpSource::with_rng(Role::Client, rng(8));
        let f0 = client.start_setup().unwrap().unwrap();
        assert!(client.start_setup().is_err());
        let mut server = IknpSource::with_rng(Role::Server, rng(9));
        server.start_setup().unwrap();
        let err = server.handle(&f0[..31]).unwrap_err();
        assert!(format!("{err}").contains("flight 0"), "{err}");
        let (mut client, mut server) = sources(10);
        let err = client.handle(&[]).unwrap_err();
        assert!(format!("{err}").contains("no setup step or batch"), "{err}");
        let counts = CotCounts {
            sent: 1,
            received: 1,
        };
        server.start_batch(counts).unwrap();
        assert!(server.start_batch(counts).is_err());
    }
}
