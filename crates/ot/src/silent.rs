//! Silent OT: correlated OTs from a short exchange and local expansion,
//! after Ferret (Yang, Weng, Lan, Zhang, Wang, "Ferret: Fast Extension for
//! coRRElated OT with small communication", CCS 2020), semi-honest, in the
//! primal-LPN form with regular noise; [`SilentSource`] is the
//! [`CorrelationSource`] that runs it in both directions.
//!
//! One *iteration* in one direction turns `k + t·h` correlated OTs that
//! both parties already hold (with the sender's global `Δ`) into `n` new
//! ones, `n = t·2^h`:
//!
//! 1. **Noise** (single-point COTs, one per bin of `2^h`): the sender grows
//!    a GGM tree from a fresh seed with a length-doubling PRG (two
//!    fixed-key AES permutations, `x ↦ (π₀(x) ⊕ x, π₁(x) ⊕ x)`), whose
//!    leaves are its vector `v`. For each level it sends the XOR of all left
//!    children and of all right children, each masked with the tweakable
//!    hash of one of the `h` tree COTs (`H(q)` and `H(q ⊕ Δ)`): the
//!    receiver, holding `t = q ⊕ b·Δ`, unmasks the side `b` only. Its punctured
//!    leaf `α` is the path that turns away from `b` at every level, so it is
//!    as random as the COTs' choices and nothing about it is sent. It then
//!    rebuilds every leaf but `α`; the sender's `ψ = Δ ⊕ ⊕ⱼ vⱼ` gives it
//!    `w_α = v_α ⊕ Δ`. Per bin, `w = v ⊕ e_α·Δ`.
//! 2. **Expansion** (LPN): with `A` the public `n × k` local code (ten
//!    pseudorandom ones per row), the sender's new COTs are `A·q + v` and the
//!    receiver's `A·t + w` with choices `A·ρ + e`: again `t = q ⊕ ρ·Δ`, and the
//!    choices are pseudorandom under regular-noise LPN.
//! 3. **Bootstrap**: the first `k + t·h` outputs become the next iteration's
//!    COTs; the rest go to a pool that batches are served from.
//!
//! The only traffic is the sender's `h` pairs of masked sums and `ψ` per
//! bin: `t·(32·h + 16)` bytes per iteration (~200 KB for ~532,000 COTs with
//! the default parameters, 3 bits per COT; IKNP sends 128). The receiver
//! sends nothing, so a batch is one message each way: the client's
//! iterations as sender with its request, the server's in its answer. The
//! first `k + t·h` COTs of each direction come from the setup: IKNP
//! ([`crate::iknp`], one batch) makes the small set's base ([`BOOT_LPN`],
//! ~209 KB each way), and one iteration of the small set each way makes the
//! default set's (~142 KB each way), ~0.35 MB each way in all instead of
//! IKNP's 1.2 MB. Setup flights: 0 (client) IKNP's base-OT offer; 1
//! (server) its answer; 2 (client) a `u32` length, IKNP's last flight and
//! the bootstrap matrix; 3 (server) a `u32` length, its matrix and its
//! small-set iterations; 4 (client) its small-set iterations, which the
//! server does not answer (when the set is the small one itself, flight 3
//! is the matrix alone and there is no flight 4).
//!
//! The LPN parameters are checked against a cited table
//! ([`LpnParams::check`]); nothing else is accepted.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use aes::Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use rand::rngs::{ChaCha20Rng, SysRng};
use rand::{Rng, SeedableRng};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::iknp::IknpSource;
use crate::refine::Tccr;
use crate::source::{CorrelationSource, CotBatch, CotCounts, CotReceiver, CotSender};
use crate::{Bits, OtError, Role};

/// One regular-noise LPN parameter set: `n = t·2^h` outputs per iteration,
/// secret dimension `k`, noise weight `t` (one per bin of `2^h`), and the
/// local code's `d = 10` nonzeros per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpnParams {
    /// COTs one iteration makes
    pub n: usize,
    /// LPN dimension: base COTs multiplied by the code
    pub k: usize,
    /// noise weight: bins, one GGM tree each
    pub t: usize,
    /// `h`: tree depth, `2^h` leaves per bin
    pub log_bin: u32,
}

/// Nonzeros per row of the local linear code the table's estimates assume.
pub const CODE_WEIGHT: usize = 10;

/// The parameter sets accepted, each estimated at 128-bit security for
/// regular-noise LPN with a local code of weight 10: the sets that the
/// Ferret authors' implementation, EMP-OT, ships (`emp-ot/ferret/constants.h`;
/// the large one is Ferret's). See docs/silent-ot.md.
pub const LPN_TABLE: [(&str, LpnParams); 3] = [
    (
        "large",
        LpnParams {
            n: 10_608_640,
            k: 589_824,
            t: 1_295,
            log_bin: 13,
        },
    ),
    (
        "medium",
        LpnParams {
            n: 607_232,
            k: 69_454,
            t: 593,
            log_bin: 10,
        },
    ),
    (
        "small",
        LpnParams {
            n: 75_520,
            k: 8_911,
            t: 590,
            log_bin: 7,
        },
    ),
];

/// The default set: ~9.7 MB of COTs per iteration and direction keeps a
/// session's memory small; 3 bits of traffic per COT.
pub const DEFAULT_LPN: LpnParams = LPN_TABLE[1].1;

/// The set that bootstraps the others: IKNP makes its few base COTs
/// (~13,000 each way, 209 KB) and its iterations make the main set's base
/// (one for the default set), instead of IKNP making all ~75,000 (1.2 MB),
/// as EMP-OT chains its sets.
pub const BOOT_LPN: LpnParams = LPN_TABLE[2].1;

impl LpnParams {
    /// Base COTs an iteration consumes: `k` for the code, `h` per tree.
    pub fn reserve(&self) -> usize {
        self.k + self.t * self.log_bin as usize
    }

    /// COTs an iteration adds to the pool.
    pub fn usable(&self) -> usize {
        self.n - self.reserve()
    }

    /// Bytes the sender sends per iteration: per tree, two masked sums per
    /// level and `ψ`.
    pub fn message_bytes(&self) -> usize {
        self.t * (32 * self.log_bin as usize + 16)
    }

    /// Checks that this set is one of [`LPN_TABLE`] (and consistent); any
    /// other set, weaker or merely unestimated, is refused by name.
    pub fn check(&self) -> Result<&'static str, OtError> {
        if self.log_bin == 0 || self.log_bin > 20 || self.t << self.log_bin != self.n {
            return Err(OtError::Message(format!(
                "LPN parameters {self:?} are inconsistent: n must be t·2^h"
            )));
        }
        LPN_TABLE
            .iter()
            .find(|(_, p)| p == self)
            .map(|(name, _)| *name)
            .ok_or_else(|| {
                OtError::Message(format!(
                    "LPN parameters {self:?} are not in the table of sets estimated at 128-bit security (docs/silent-ot.md); refused"
                ))
            })
    }
}

/// The fixed keys of the GGM tree's PRG and of the code's index generator
/// (arbitrary public constants: the first digits of π and e, and √2).
const GGM_LEFT_KEY: [u8; 16] = *b"\x31\x41\x59\x26\x53\x58\x97\x93\x23\x84\x62\x64\x33\x83\x27\x95";
const GGM_RIGHT_KEY: [u8; 16] =
    *b"\x27\x18\x28\x18\x28\x45\x90\x45\x23\x53\x60\x28\x74\x71\x35\x26";
const CODE_KEY: [u8; 16] = *b"\x14\x14\x21\x35\x62\x37\x30\x95\x04\x88\x01\x68\x87\x24\x20\x96";

fn block(x: u128) -> aes::Block {
    Array::from(x.to_le_bytes())
}

fn word(b: &aes::Block) -> u128 {
    u128::from_le_bytes((*b).into())
}

/// The tweak of tree COT `index` of iteration `iteration` in the direction
/// where `sender` sends: bit 127 set, so it never meets the refinement's
/// tweaks ([`crate::refine::tweak`], whose top bits are zero).
fn tree_tweak(sender: Role, iteration: u64, index: usize) -> u128 {
    let direction: u128 = match sender {
        Role::Client => 0,
        Role::Server => 1,
    };
    (1 << 127) | (direction << 120) | (u128::from(iteration) << 32) | index as u128
}

/// The length-doubling PRG of the GGM trees.
struct Ggm {
    left: Aes128,
    right: Aes128,
}

impl Ggm {
    fn new() -> Ggm {
        Ggm {
            left: Aes128::new(&Array::from(GGM_LEFT_KEY)),
            right: Aes128::new(&Array::from(GGM_RIGHT_KEY)),
        }
    }

    /// The children of `nodes` into `out[..2·nodes.len()]`: node `i`'s are
    /// `2i` (left) and `2i + 1` (right).
    fn expand(&self, nodes: &[u128], out: &mut [u128], scratch: &mut Vec<aes::Block>) {
        scratch.clear();
        scratch.extend(nodes.iter().map(|&x| block(x)));
        scratch.extend(nodes.iter().map(|&x| block(x)));
        let (l, r) = scratch.split_at_mut(nodes.len());
        self.left.encrypt_blocks(l);
        self.right.encrypt_blocks(r);
        for (i, &x) in nodes.iter().enumerate() {
            out[2 * i] = word(&l[i]) ^ x;
            out[2 * i + 1] = word(&r[i]) ^ x;
        }
    }

    /// The sender's tree from `seed`: its `2^h` leaves into `leaves`, and
    /// per level (top first) the XOR of the left and of the right children.
    fn grow(
        &self,
        seed: u128,
        leaves: &mut [u128],
        scratch: &mut Vec<aes::Block>,
    ) -> Vec<[u128; 2]> {
        let h = leaves.len().trailing_zeros() as usize;
        let mut sums = Vec::with_capacity(h);
        let mut level = vec![seed];
        for _ in 0..h {
            let next = &mut leaves[..2 * level.len()];
            self.expand(&level, next, scratch);
            let (mut l, mut r) = (0, 0);
            for pair in next.chunks_exact(2) {
                l ^= pair[0];
                r ^= pair[1];
            }
            sums.push([l, r]);
            level.clear();
            level.extend_from_slice(next);
        }
        sums
    }

    /// The receiver's tree: `off[l]` is the XOR of the level-`l` children on
    /// side `side[l]` (the side away from its path, top level first). Fills
    /// every leaf but the punctured one (left 0) and returns its index.
    ///
    /// The path is secret (it is the receiver's choice bits), so nothing
    /// here branches on it or indexes memory with it: every node is read and
    /// every node of a level is written, with masks choosing which count
    /// ([`subtle`]).
    fn rebuild(
        &self,
        side: &[Choice],
        off: &[u128],
        leaves: &mut [u128],
        scratch: &mut Vec<aes::Block>,
    ) -> usize {
        let mut level: Vec<u128> = vec![0];
        let mut path = 0usize;
        for (&away, &sum) in side.iter().zip(off) {
            let next = &mut leaves[..2 * level.len()];
            self.expand(&level, next, scratch);
            // the path node's child on the away side is the level's sum
            // less the other nodes' children on that side
            let mut known = sum;
            for (i, pair) in next.chunks_exact(2).enumerate() {
                let child = u128::conditional_select(&pair[0], &pair[1], away);
                known ^= u128::conditional_select(&child, &0, i.ct_eq(&path));
            }
            // the path node's children: `known` on the away side, 0 (the
            // punctured node) on the other
            let left = u128::conditional_select(&known, &0, away);
            let right = u128::conditional_select(&0, &known, away);
            for (i, pair) in next.chunks_exact_mut(2).enumerate() {
                let on_path = i.ct_eq(&path);
                pair[0].conditional_assign(&left, on_path);
                pair[1].conditional_assign(&right, on_path);
            }
            path = 2 * path + (1 - usize::from(away.unwrap_u8()));
            level.clear();
            level.extend_from_slice(next);
        }
        path
    }
}

/// `dst[at] = value`, written as one masked pass over all of `dst`, so that
/// the memory accesses do not show the secret `at` (nothing is written
/// when `at` is out of range).
fn write_at(dst: &mut [u128], at: usize, value: u128) {
    for (j, x) in dst.iter_mut().enumerate() {
        x.conditional_assign(&value, j.ct_eq(&at));
    }
}

/// The noise vector: one set bit per bin of `bin` bits, at `alphas[b]` in
/// bin `b` (`n` bits in all), built word by word with masks: which word
/// holds a bin's bit depends on the secret `alphas[b]`, so every word the
/// bin spans is written.
fn noise_bits(alphas: &[usize], bin: usize, n: usize) -> Bits {
    let mut words = vec![0u64; n.div_ceil(64)];
    for (b, &alpha) in alphas.iter().enumerate() {
        let at = b * bin + alpha;
        let first = b * bin / 64;
        let last = ((b + 1) * bin - 1) / 64;
        let bit = 1u64 << (at % 64);
        for (w, word) in words[first..=last].iter_mut().enumerate() {
            *word |= u64::conditional_select(&0, &bit, (at / 64).ct_eq(&(first + w)));
        }
    }
    Bits::from_words(words, n).expect("one word per 64 bits of the noise")
}

/// The public local linear code `A` (`n × k`, [`CODE_WEIGHT`] pseudorandom
/// ones per row, from fixed-key AES of the row number). The same for every
/// iteration and session, so a set's indices are drawn once per process
/// and shared ([`code_table`]) where they fit in [`MAX_CODE_TABLE_BYTES`].
struct Code {
    pi: Aes128,
    k: usize,
    /// row `i`'s indices at `i·CODE_WEIGHT..`, for the first rows
    table: Option<Arc<Vec<u32>>>,
}

/// Rows whose indices are drawn at once.
const CODE_CHUNK: usize = 256;

/// The largest index table kept (the default set's is 24 MB; the large
/// set's 424 MB is drawn row by row instead).
pub const MAX_CODE_TABLE_BYTES: usize = 32 << 20;

/// The index table of the code for `n` rows over `k`, drawn on first use
/// and kept for the life of the process; `None` when it would exceed
/// [`MAX_CODE_TABLE_BYTES`].
fn code_table(n: usize, k: usize) -> Option<Arc<Vec<u32>>> {
    if n.saturating_mul(CODE_WEIGHT * 4) > MAX_CODE_TABLE_BYTES || u32::try_from(k).is_err() {
        return None;
    }
    static TABLES: Mutex<Vec<(usize, usize, Arc<Vec<u32>>)>> = Mutex::new(Vec::new());
    let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, t)) = tables.iter().find(|(tn, tk, _)| (*tn, *tk) == (n, k)) {
        return Some(t.clone());
    }
    let mut table = Vec::with_capacity(n * CODE_WEIGHT);
    Code::drawn(k, None).rows(0..n, |_, idx| {
        table.extend(idx.iter().map(|&i| i as u32));
    });
    // kept as it was drawn: no second copy of 24 MB
    let table = Arc::new(table);
    tables.push((n, k, table.clone()));
    Some(table)
}

/// Draws the shared index table of `params`'s code now rather than in the
/// first session that needs it: a server does so at start, so that the
/// table is part of its own memory, which its budget's pools leave room for.
pub fn prepare_code(params: &LpnParams) -> Result<(), OtError> {
    params.check()?;
    code_table(params.n, params.k);
    // the small set that bootstraps it
    code_table(BOOT_LPN.n, BOOT_LPN.k);
    Ok(())
}

impl Code {
    /// The code for `params`, with its shared index table if it fits.
    fn new(params: &LpnParams) -> Code {
        Code::drawn(params.k, code_table(params.n, params.k))
    }

    fn drawn(k: usize, table: Option<Arc<Vec<u32>>>) -> Code {
        Code {
            pi: Aes128::new(&Array::from(CODE_KEY)),
            k,
            table,
        }
    }

    /// Calls `each(row, indices)` for each row in `rows` (whose start is a
    /// multiple of [`CODE_CHUNK`]): from the table if it holds them, else
    /// drawn.
    fn rows(&self, rows: Range<usize>, mut each: impl FnMut(usize, &[usize; CODE_WEIGHT])) {
        if let Some(table) = &self.table
            && rows.end * CODE_WEIGHT <= table.len()
        {
            for (row, idx) in rows.clone().zip(
                table[rows.start * CODE_WEIGHT..rows.end * CODE_WEIGHT].chunks_exact(CODE_WEIGHT),
            ) {
                each(row, &std::array::from_fn(|i| idx[i] as usize));
            }
            return;
        }
        self.draw(rows, each);
    }

    /// As [`Code::rows`], drawing the indices with AES.
    fn draw(&self, rows: Range<usize>, mut each: impl FnMut(usize, &[usize; CODE_WEIGHT])) {
        debug_assert!(rows.start.is_multiple_of(CODE_CHUNK));
        let mut blocks = vec![aes::Block::default(); 3 * CODE_CHUNK];
        let k = self.k as u64;
        for first in rows.clone().step_by(CODE_CHUNK) {
            let count = CODE_CHUNK.min(rows.end - first);
            for (j, b) in blocks[..3 * count].iter_mut().enumerate() {
                *b = block(((first * 3 + j) as u128) | (0xC0DE << 64));
            }
            self.pi.encrypt_blocks(&mut blocks[..3 * count]);
            for r in 0..count {
                let mut idx = [0usize; CODE_WEIGHT];
                let mut words = [0u32; 12];
                for (c, b) in blocks[3 * r..3 * r + 3].iter().enumerate() {
                    let w = word(b);
                    for q in 0..4 {
                        words[4 * c + q] = (w >> (32 * q)) as u32;
                    }
                }
                for (i, w) in idx.iter_mut().zip(words) {
                    // a multiply-shift maps 32 uniform bits onto 0..k
                    *i = ((u64::from(w) * k) >> 32) as usize;
                }
                each(first + r, &idx);
            }
        }
    }

    /// `out[i] ^= ⊕ base[A_i]` for every row, spread over the cores.
    fn encode(&self, base: &[u128], out: &mut [u128]) {
        in_parallel(out, CODE_CHUNK, |first, part| {
            self.rows(first..first + part.len(), |i, idx| {
                part[i - first] ^= idx.iter().fold(0, |acc, &j| acc ^ base[j]);
            });
        });
    }

    /// `out[i] ^= ⊕ base[A_i]` and `bits[i] ^= ⊕ base_bits[A_i]`, spread
    /// over the cores.
    fn encode_with_bits(&self, base: &[u128], base_bits: &Bits, out: &mut [u128], bits: &mut Bits) {
        let flips = in_parallel(out, CODE_CHUNK, |first, part| {
            let mut flips = vec![0u64; part.len().div_ceil(64)];
            self.rows(first..first + part.len(), |i, idx| {
                part[i - first] ^= idx.iter().fold(0, |acc, &j| acc ^ base[j]);
                let b = idx.iter().fold(false, |acc, &j| acc ^ base_bits.get(j));
                flips[(i - first) / 64] |= u64::from(b) << ((i - first) % 64);
            });
            flips
        });
        // parts start at multiples of CODE_CHUNK, so their words line up
        let flips = Bits::from_words(flips.concat(), bits.len())
            .expect("one flip word per 64 rows of the code");
        bits.xor_assign(&flips);
    }
}

/// Threads the expansion spreads over: the machine's cores, at most 8.
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

/// Runs `f(start, part)` on consecutive parts of `data`, one per thread
/// ([`threads`]), each starting at a multiple of `align`; returns the
/// results in order. Scoped threads of its own rather than a shared pool, so
/// that an expansion never waits behind another session's HE job.
fn in_parallel<T: Send, R: Send>(
    data: &mut [T],
    align: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let units = data.len().div_ceil(align);
    let per = units.div_ceil(threads()).max(1) * align;
    if per >= data.len() {
        return vec![f(0, data)];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = data
            .chunks_mut(per)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || f(i * per, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// This party's state in the direction where it sends.
struct Sending {
    delta: u128,
    /// the next iteration's COTs (`reserve` of them)
    base: Vec<u128>,
    /// made and not yet handed out
    pool: Vec<u128>,
    iteration: u64,
}

/// This party's state in the direction where it receives.
struct Receiving {
    base_t: Vec<u128>,
    base_choice: Bits,
    pool_t: Vec<u128>,
    pool_choice: Bits,
    iteration: u64,
}

/// What both directions share: parameters and the fixed-key primitives.
struct Expander {
    params: LpnParams,
    ggm: Ggm,
    code: Code,
    tccr: Tccr,
}

impl Expander {
    fn new(params: LpnParams) -> Expander {
        Expander {
            params,
            ggm: Ggm::new(),
            code: Code::new(&params),
            tccr: Tccr::new(),
        }
    }

    /// Iterations needed before `want` COTs are in a pool of `have`.
    fn iterations(&self, have: usize, want: usize) -> usize {
        want.saturating_sub(have).div_ceil(self.params.usable())
    }

    /// One iteration as sender (`me` sends): appends its message to `out`.
    fn send_once(&self, me: Role, s: &mut Sending, rng: &mut ChaCha20Rng, out: &mut Vec<u8>) {
        let p = self.params;
        let (h, bin) = (p.log_bin as usize, 1usize << p.log_bin);
        let seeds: Vec<u128> = (0..p.t)
            .map(|_| u128::from(rng.next_u64()) | (u128::from(rng.next_u64()) << 64))
            .collect();
        let mut v = vec![0u128; p.n];
        // each tree's level sums and ψ, trees grown on all cores
        let trees = in_parallel(&mut v, bin, |first, part| {
            let mut scratch = Vec::new();
            part.chunks_exact_mut(bin)
                .enumerate()
                .map(|(j, leaves)| {
                    let sums = self.ggm.grow(seeds[first / bin + j], leaves, &mut scratch);
                    let psi = leaves.iter().fold(s.delta, |acc, &x| acc ^ x);
                    (sums, psi)
                })
                .collect::<Vec<_>>()
        });
        for (b, (sums, psi)) in trees.into_iter().flatten().enumerate() {
            for (l, [k0, k1]) in sums.into_iter().enumerate() {
                let index = b * h + l;
                let q = s.base[p.k + index];
                let tweak = tree_tweak(me, s.iteration, index);
                out.extend_from_slice(&(k0 ^ self.tccr.hash(tweak, q)).to_le_bytes());
                out.extend_from_slice(&(k1 ^ self.tccr.hash(tweak, q ^ s.delta)).to_le_bytes());
            }
            out.extend_from_slice(&psi.to_le_bytes());
        }
        self.code.encode(&s.base[..p.k], &mut v);
        s.pool.extend_from_slice(&v[p.reserve()..]);
        v.truncate(p.reserve());
        s.base = v;
        s.iteration += 1;
    }

    /// One iteration as receiver from the peer's message for it.
    fn receive_once(&self, peer: Role, r: &mut Receiving, message: &[u8]) {
        let p = self.params;
        let (h, bin) = (p.log_bin as usize, 1usize << p.log_bin);
        let mut w = vec![0u128; p.n];
        let per_tree = 32 * h + 16;
        let read = |at: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&message[at..at + 16]);
            u128::from_le_bytes(b)
        };
        // each tree rebuilt on all cores: its punctured leaf's index
        let (base_t, base_choice, iteration) = (&r.base_t, &r.base_choice, r.iteration);
        let alphas = in_parallel(&mut w, bin, |first, part| {
            let mut scratch = Vec::new();
            let (mut side, mut off) = (vec![Choice::from(0); h], vec![0u128; h]);
            part.chunks_exact_mut(bin)
                .enumerate()
                .map(|(j, leaves)| {
                    let b = first / bin + j;
                    let at = b * per_tree;
                    for l in 0..h {
                        let index = b * h + l;
                        let choice = Choice::from(u8::from(base_choice.get(p.k + index)));
                        let tweak = tree_tweak(peer, iteration, index);
                        // both sums are read, the choice's kept by a mask
                        let (m0, m1) = (read(at + 32 * l), read(at + 32 * l + 16));
                        side[l] = choice;
                        off[l] = u128::conditional_select(&m0, &m1, choice)
                            ^ self.tccr.hash(tweak, base_t[p.k + index]);
                    }
                    let alpha = self.ggm.rebuild(&side, &off, leaves, &mut scratch);
                    let psi = read(at + 32 * h);
                    // the punctured leaf is 0, so the fold leaves it out
                    let punctured = leaves.iter().fold(psi, |acc, &x| acc ^ x);
                    write_at(leaves, alpha, punctured);
                    alpha
                })
                .collect::<Vec<_>>()
        });
        let alphas: Vec<usize> = alphas.into_iter().flatten().collect();
        let mut e = noise_bits(&alphas, bin, p.n);
        self.code
            .encode_with_bits(&r.base_t[..p.k], &r.base_choice, &mut w, &mut e);
        let reserve = p.reserve();
        r.pool_t.extend_from_slice(&w[reserve..]);
        r.pool_choice.extend_from_range(&e, reserve, p.n - reserve);
        w.truncate(reserve);
        r.base_t = w;
        r.base_choice = e.slice(0, reserve);
        r.iteration += 1;
    }
}

enum State {
    Fresh,
    /// IKNP's setup (and, from flight 2, its one bootstrap batch) runs;
    /// the number of the flight expected next from the peer
    Bootstrapping(Box<IknpSource>, u32),
    Ready(Box<(Sending, Receiving)>),
    /// the server sent its bootstrap iterations of the small set (flight 3)
    /// and waits for the client's (flight 4)
    Chaining(Box<(Sending, Receiving)>),
    /// the client sent its iterations for the batch; waits for the server's
    ClientBatch(Box<(Sending, Receiving)>, CotCounts),
    /// the server waits for the client's iterations
    ServerBatch(Box<(Sending, Receiving)>, CotCounts),
    Failed(OtError),
}

/// The silent-OT [`CorrelationSource`]: IKNP for the first COTs, then
/// LPN expansion (see the module docs).
pub struct SilentSource {
    role: Role,
    rng: ChaCha20Rng,
    expander: Expander,
    /// the small set, which turns IKNP's few COTs into the first
    /// iteration's base COTs (`None` when the set is the small one)
    boot: Option<Expander>,
    state: State,
    output: Option<CotBatch>,
}

impl std::fmt::Debug for SilentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SilentSource")
            .field("role", &self.role)
            .field("params", &self.expander.params)
            .finish_non_exhaustive()
    }
}

impl SilentSource {
    /// A source for `role` with the default parameters, seeded from the
    /// operating system.
    pub fn new(role: Role) -> Result<SilentSource, OtError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng)
            .map_err(|e| OtError::Randomness(e.to_string()))?;
        SilentSource::with_rng(role, DEFAULT_LPN, rng)
    }

    /// A source for `role` with `params` (checked against the table),
    /// drawing from `rng` (tests seed it).
    pub fn with_rng(
        role: Role,
        params: LpnParams,
        rng: ChaCha20Rng,
    ) -> Result<SilentSource, OtError> {
        params.check()?;
        Ok(SilentSource {
            role,
            rng,
            expander: Expander::new(params),
            boot: (params != BOOT_LPN).then(|| Expander::new(BOOT_LPN)),
            state: State::Fresh,
            output: None,
        })
    }

    fn fail(&mut self, e: OtError) -> OtError {
        self.state = State::Failed(e.clone());
        e
    }

    fn take_state(&mut self) -> Result<State, OtError> {
        if let State::Failed(first) = &self.state {
            return Err(failed_earlier(first));
        }
        let placeholder = OtError::Message("silent OT: a step was interrupted".into());
        Ok(std::mem::replace(
            &mut self.state,
            State::Failed(placeholder),
        ))
    }

    /// Both directions' state from IKNP's bootstrap batch.
    fn install(&self, batch: CotBatch) -> Result<Box<(Sending, Receiving)>, OtError> {
        let reserve = self.first_set().reserve();
        if batch.sent.q.len() < reserve || batch.received.t.len() < reserve {
            return Err(OtError::Message(
                "silent OT: the bootstrap batch is short".into(),
            ));
        }
        let mut q = batch.sent.q;
        q.truncate(reserve);
        let mut t = batch.received.t;
        t.truncate(reserve);
        Ok(Box::new((
            Sending {
                delta: batch.sent.delta,
                base: q,
                pool: Vec::new(),
                iteration: 0,
            },
            Receiving {
                base_t: t,
                base_choice: batch.received.choice.slice(0, reserve),
                pool_t: Vec::new(),
                pool_choice: Bits::zeros(0),
                iteration: 0,
            },
        )))
    }

    /// The set IKNP's batch is the base of: the small set when it chains.
    fn first_set(&self) -> LpnParams {
        self.boot.as_ref().unwrap_or(&self.expander).params
    }

    /// The chaining iterations as sender (the small set's, enough for the
    /// main set's base): their message. The main set's base is then taken
    /// from the pool; the rest of the pool is handed out later.
    fn chain_send(&mut self, s: &mut Sending) -> Vec<u8> {
        let Some(boot) = &self.boot else {
            return Vec::new();
        };
        let reserve = self.expander.params.reserve();
        let n = chain_iterations(boot.params, reserve);
        let mut out = Vec::with_capacity(n * boot.params.message_bytes());
        for _ in 0..n {
            boot.send_once(self.role, s, &mut self.rng, &mut out);
        }
        // the last iteration's whole output, its next base included, then
        // the earlier iterations' pool: the main set's base first, the few
        // left over to be handed out
        let mut all = std::mem::take(&mut s.base);
        all.append(&mut s.pool);
        s.pool = all.split_off(reserve);
        s.base = all;
        out
    }

    /// The peer's chaining iterations: the main set's base as receiver.
    fn chain_receive(&self, r: &mut Receiving, message: &[u8]) -> Result<(), OtError> {
        let Some(boot) = &self.boot else {
            return Ok(());
        };
        let reserve = self.expander.params.reserve();
        let n = chain_iterations(boot.params, reserve);
        let per = boot.params.message_bytes();
        if message.len() != n * per {
            return Err(OtError::Message(format!(
                "silent OT setup: the bootstrap needs {n} iteration(s) of {per} bytes of the small set from the peer, got {} bytes",
                message.len()
            )));
        }
        for chunk in message.chunks_exact(per) {
            boot.receive_once(self.role.peer(), r, chunk);
        }
        // in the sender's order: the last iteration's whole output, then
        // the pool
        let mut all = std::mem::take(&mut r.base_t);
        all.append(&mut r.pool_t);
        r.pool_t = all.split_off(reserve);
        r.base_t = all;
        let mut choices = std::mem::take(&mut r.base_choice);
        choices.extend(&r.pool_choice);
        r.base_choice = choices.slice(0, reserve);
        r.pool_choice = choices.slice(reserve, choices.len() - reserve);
        Ok(())
    }

    /// The bootstrap batch's counts: one iteration's base COTs each way.
    fn bootstrap_counts(&self) -> CotCounts {
        let r = self.first_set().reserve();
        CotCounts {
            sent: r,
            received: r,
        }
    }

    /// Runs the iterations this party sends for `want` COTs: the message.
    fn send(&mut self, dirs: &mut (Sending, Receiving), want: usize) -> Vec<u8> {
        let e = &self.expander;
        let n = e.iterations(dirs.0.pool.len(), want);
        // the pool grows once, to its exact size (no doubling, no old copy)
        dirs.0.pool.reserve_exact(n * e.params.usable());
        let mut out = Vec::with_capacity(n * e.params.message_bytes());
        for _ in 0..n {
            e.send_once(self.role, &mut dirs.0, &mut self.rng, &mut out);
        }
        out
    }

    /// Takes the peer's iterations for `want` COTs this party receives.
    fn receive(
        &self,
        dirs: &mut (Sending, Receiving),
        want: usize,
        message: &[u8],
    ) -> Result<(), OtError> {
        let e = &self.expander;
        let n = e.iterations(dirs.1.pool_t.len(), want);
        let per = e.params.message_bytes();
        if message.len() != n * per {
            return Err(OtError::Message(format!(
                "silent OT: a batch of {want} COTs needs {n} iteration(s) of {per} bytes from the peer, got {} bytes",
                message.len()
            )));
        }
        dirs.1.pool_t.reserve_exact(n * e.params.usable());
        for chunk in message.chunks_exact(per) {
            e.receive_once(self.role.peer(), &mut dirs.1, chunk);
        }
        Ok(())
    }

    /// Hands `counts` out of the pools.
    fn take(dirs: &mut (Sending, Receiving), counts: CotCounts) -> CotBatch {
        let (s, r) = dirs;
        // handed out at their exact size; the rest stays in the pools
        let q = s.pool.drain(..counts.sent).collect();
        let t = r.pool_t.drain(..counts.received).collect();
        let choice = r.pool_choice.slice(0, counts.received);
        r.pool_choice = r
            .pool_choice
            .slice(counts.received, r.pool_choice.len() - counts.received);
        CotBatch {
            sent: CotSender { delta: s.delta, q },
            received: CotReceiver { choice, t },
        }
    }

    fn step(&mut self, state: State, message: &[u8]) -> Result<(State, Option<Vec<u8>>), OtError> {
        match state {
            State::Bootstrapping(mut iknp, flight) => match (self.role, flight) {
                (Role::Client, 1) => {
                    // IKNP's answer: send its flight 2 with the bootstrap
                    // batch's first message
                    let flight2 = iknp.handle(message)?.unwrap_or_default();
                    let matrix = iknp
                        .start_batch(self.bootstrap_counts())?
                        .ok_or_else(|| OtError::Message("IKNP: no batch message".into()))?;
                    let mut out = Vec::with_capacity(4 + flight2.len() + matrix.len());
                    out.extend_from_slice(&(flight2.len() as u32).to_le_bytes());
                    out.extend_from_slice(&flight2);
                    out.extend_from_slice(&matrix);
                    Ok((State::Bootstrapping(iknp, 3), Some(out)))
                }
                (Role::Client, _) => {
                    // the server's bootstrap matrix, and when the small set
                    // chains, the server's iterations of it
                    let (matrix, iterations) = match self.boot {
                        Some(_) => split_prefixed(message, 3)?,
                        None => (message, &[][..]),
                    };
                    iknp.handle(matrix)?;
                    let batch = iknp.poll_batch().ok_or_else(|| {
                        OtError::Message("silent OT: the bootstrap batch did not finish".into())
                    })?;
                    let mut dirs = self.install(batch)?;
                    if self.boot.is_none() {
                        return Ok((State::Ready(dirs), None));
                    }
                    self.chain_receive(&mut dirs.1, iterations)?;
                    let flight4 = self.chain_send(&mut dirs.0);
                    Ok((State::Ready(dirs), Some(flight4)))
                }
                (Role::Server, 0) => {
                    let reply = iknp.handle(message)?;
                    Ok((State::Bootstrapping(iknp, 2), reply))
                }
                (Role::Server, _) => {
                    let (flight2, matrix) = split_prefixed(message, 2)?;
                    if iknp.handle(flight2)?.is_some() || !iknp.is_ready() {
                        return Err(OtError::Message(
                            "silent OT setup flight 2: IKNP's setup did not finish".into(),
                        ));
                    }
                    iknp.start_batch(self.bootstrap_counts())?;
                    let reply = iknp.handle(matrix)?;
                    let batch = iknp.poll_batch().ok_or_else(|| {
                        OtError::Message("silent OT: the bootstrap batch did not finish".into())
                    })?;
                    let mut dirs = self.install(batch)?;
                    if self.boot.is_none() {
                        return Ok((State::Ready(dirs), reply));
                    }
                    // flight 3: IKNP's matrix, then this party's iterations
                    // of the small set as sender
                    let matrix = reply.unwrap_or_default();
                    let iterations = self.chain_send(&mut dirs.0);
                    let mut out = Vec::with_capacity(4 + matrix.len() + iterations.len());
                    out.extend_from_slice(&(matrix.len() as u32).to_le_bytes());
                    out.extend_from_slice(&matrix);
                    out.extend_from_slice(&iterations);
                    Ok((State::Chaining(dirs), Some(out)))
                }
            },
            State::Chaining(mut dirs) => {
                // flight 4: the client's iterations of the small set
                self.chain_receive(&mut dirs.1, message)?;
                Ok((State::Ready(dirs), None))
            }
            State::ClientBatch(mut dirs, counts) => {
                self.receive(&mut dirs, counts.received, message)?;
                self.output = Some(Self::take(&mut dirs, counts));
                Ok((State::Ready(dirs), None))
            }
            State::ServerBatch(mut dirs, counts) => {
                self.receive(&mut dirs, counts.received, message)?;
                let reply = self.send(&mut dirs, counts.sent);
                self.output = Some(Self::take(&mut dirs, counts));
                Ok((State::Ready(dirs), Some(reply)))
            }
            State::Fresh => Err(OtError::Message(
                "silent OT: a message before the setup started".into(),
            )),
            State::Ready(_) => Err(OtError::Message(
                "silent OT: a message while no setup step or batch is running".into(),
            )),
            State::Failed(first) => Err(failed_earlier(&first)),
        }
    }
}

/// What a source of `params` may hold at any point of its setup, at 17
/// bytes per COT (a block and its choice bit), each term summed over both
/// directions though they are not all held at once: IKNP's base OTs and
/// its bootstrap batch of the first set's base (IKNP holds about four
/// blocks per COT while it runs); one iteration's vectors of the small set;
/// the chaining iterations' output and messages; the main set's base.
pub(crate) fn setup_buffer_bytes(params: LpnParams) -> u64 {
    let cot = 17u64;
    let boot = BOOT_LPN;
    let chain = if params == boot {
        0
    } else {
        chain_iterations(boot, params.reserve()) as u64
    };
    let iknp = (1u64 << 20) + 2 * boot.reserve() as u64 * 64;
    let iteration = 2 * boot.n as u64 * cot;
    let chained = 2 * chain * (boot.usable() as u64 * cot + boot.message_bytes() as u64);
    let base = 2 * params.reserve() as u64 * cot;
    iknp + iteration + chained + base
}

/// Iterations of the small set `boot` that make `reserve` COTs: all of the
/// last one's output counts, its next base included, as in EMP-OT (one
/// iteration for the default set, whose base of 75,384 fits the small
/// set's 75,520 outputs).
fn chain_iterations(boot: LpnParams, reserve: usize) -> usize {
    reserve
        .saturating_sub(boot.reserve())
        .div_ceil(boot.usable())
        .max(1)
}

/// A setup flight of a `u32` length, that many bytes and the rest.
fn split_prefixed(message: &[u8], flight: u32) -> Result<(&[u8], &[u8]), OtError> {
    let Some((len, body)) = message.split_first_chunk::<4>() else {
        return Err(OtError::Message(format!(
            "silent OT setup flight {flight}: shorter than its length prefix"
        )));
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len == 0 || len > body.len() {
        return Err(OtError::Message(format!(
            "silent OT setup flight {flight}: a {len}-byte IKNP part in a {}-byte message",
            body.len()
        )));
    }
    Ok(body.split_at(len))
}

fn failed_earlier(first: &OtError) -> OtError {
    OtError::Message(format!("silent OT: the source failed earlier: {first}"))
}

impl CorrelationSource for SilentSource {
    fn role(&self) -> Role {
        self.role
    }

    fn start_setup(&mut self) -> Result<Option<Vec<u8>>, OtError> {
        let State::Fresh = self.take_state()? else {
            return Err(self.fail(OtError::Message("silent OT: setup started twice".into())));
        };
        let mut iknp = Box::new(IknpSource::with_rng(
            self.role,
            ChaCha20Rng::from_rng(&mut self.rng),
        ));
        let first = iknp.start_setup().map_err(|e| self.fail(e))?;
        let next = match self.role {
            Role::Client => 1,
            Role::Server => 0,
        };
        self.state = State::Bootstrapping(iknp, next);
        Ok(first)
    }

    fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    fn start_batch(&mut self, counts: CotCounts) -> Result<Option<Vec<u8>>, OtError> {
        let State::Ready(mut dirs) = self.take_state()? else {
            return Err(self.fail(OtError::Message(
                "silent OT: a batch started before the setup finished or during another batch"
                    .into(),
            )));
        };
        match self.role {
            Role::Client => {
                let message = self.send(&mut dirs, counts.sent);
                self.state = State::ClientBatch(dirs, counts);
                Ok(Some(message))
            }
            Role::Server => {
                self.state = State::ServerBatch(dirs, counts);
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

    fn setup_buffer_bytes(&self) -> u64 {
        setup_buffer_bytes(self.expander.params)
    }

    /// The pools of COTs made ahead and the next iterations' base COTs.
    fn retained_bytes(&self) -> u64 {
        let dirs = match &self.state {
            State::Ready(d)
            | State::Chaining(d)
            | State::ClientBatch(d, _)
            | State::ServerBatch(d, _) => d,
            _ => return 0,
        };
        let (s, r) = &**dirs;
        ((s.base.capacity() + s.pool.capacity() + r.base_t.capacity() + r.pool_t.capacity()) as u64)
            * 16
            + ((r.base_choice.len() + r.pool_choice.len()) as u64).div_ceil(8)
    }

    /// The batch's COTs as handed out, one iteration's vectors per
    /// direction while it runs, both directions' messages, and what the
    /// pools and next iterations' COTs keep (at most one iteration's worth
    /// each way).
    fn batch_buffer_bytes(&self, counts: CotCounts) -> u64 {
        let p = &self.expander.params;
        let iterations = |m: usize| self.expander.iterations(0, m) as u64;
        let messages = (iterations(counts.sent) + iterations(counts.received))
            .saturating_mul(p.message_bytes() as u64);
        let handed = (counts.sent as u64 + counts.received as u64).saturating_mul(17);
        let running = 2 * (p.n as u64) * 17;
        // the pools at their largest: what is handed out plus less than one
        // iteration left over, each way
        let kept = handed.saturating_add(2 * (p.usable() as u64) * 17);
        [messages, handed, running, kept]
            .into_iter()
            .fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    const SMALL: LpnParams = LPN_TABLE[2].1;

    /// A client and a server source through their setup.
    fn sources(seed: u64, params: LpnParams) -> (SilentSource, SilentSource) {
        let (client, server, _) = set_up(seed, params);
        (client, server)
    }

    /// As [`sources`], with the setup's flights in order.
    fn set_up(seed: u64, params: LpnParams) -> (SilentSource, SilentSource, Vec<Vec<u8>>) {
        let mut client = SilentSource::with_rng(Role::Client, params, rng(seed)).unwrap();
        let mut server = SilentSource::with_rng(Role::Server, params, rng(seed + 1000)).unwrap();
        let f0 = client.start_setup().unwrap().unwrap();
        assert_eq!(server.start_setup().unwrap(), None);
        let f1 = server.handle(&f0).unwrap().unwrap();
        let f2 = client.handle(&f1).unwrap().unwrap();
        assert!(!client.is_ready());
        let f3 = server.handle(&f2).unwrap().unwrap();
        let mut flights = vec![f0, f1, f2, f3];
        if params == BOOT_LPN {
            assert!(server.is_ready());
            assert_eq!(client.handle(&flights[3]).unwrap(), None);
        } else {
            // the small set chains: the client's iterations of it follow
            assert!(!server.is_ready());
            let f4 = client.handle(&flights[3]).unwrap().unwrap();
            assert!(client.is_ready());
            assert_eq!(server.handle(&f4).unwrap(), None);
            flights.push(f4);
        }
        assert!(client.is_ready() && server.is_ready());
        (client, server, flights)
    }

    /// The default set starts from the small set's iterations, not from
    /// IKNP alone: the setup sends under half of what IKNP would for its
    /// base, and its COTs satisfy the correlation both ways, including
    /// those left over from the chaining iterations and those of the
    /// default set's first iterations.
    #[test]
    fn the_default_set_is_bootstrapped_through_the_small_set() {
        let (mut client, mut server, flights) = set_up(21, DEFAULT_LPN);
        assert_eq!(flights.len(), 5);
        let boot = BOOT_LPN.message_bytes();
        assert_eq!(
            flights[4].len(),
            boot,
            "flight 4 is the client's one iteration"
        );
        let sent: usize = flights.iter().map(Vec::len).sum();
        let iknp_alone = 2 * 16 * DEFAULT_LPN.reserve();
        assert!(
            sent < 760_000,
            "{sent} bytes of setup, IKNP alone {iknp_alone}"
        );
        for n in [40_000, 700_000] {
            let counts = CotCounts {
                sent: n,
                received: n,
            };
            let (c, s, ..) = batch(&mut client, &mut server, counts);
            for (snd, rcv) in [(&c.sent, &s.received), (&s.sent, &c.received)] {
                assert_eq!(rcv.t.len(), n);
                for j in 0..n {
                    let rho = u128::from(rcv.choice.get(j));
                    assert_eq!(rcv.t[j], snd.q[j] ^ (rho * snd.delta), "COT {j} of {n}");
                }
            }
        }
    }

    /// Chaining flights of the wrong shape are refused by name.
    #[test]
    fn malformed_chaining_flights_are_refused() {
        // a client and a server of the default set, up to the server's
        // flight 3 (not yet handled by the client)
        let to_flight3 = || {
            let mut client = SilentSource::with_rng(Role::Client, DEFAULT_LPN, rng(22)).unwrap();
            let mut server = SilentSource::with_rng(Role::Server, DEFAULT_LPN, rng(1022)).unwrap();
            let f0 = client.start_setup().unwrap().unwrap();
            server.start_setup().unwrap();
            let f1 = server.handle(&f0).unwrap().unwrap();
            let f2 = client.handle(&f1).unwrap().unwrap();
            let f3 = server.handle(&f2).unwrap().unwrap();
            (client, server, f3)
        };
        // flight 4 one byte short, to a server that waits for it
        let (mut client, mut server, f3) = to_flight3();
        let mut f4 = client.handle(&f3).unwrap().unwrap();
        f4.pop();
        let e = server.handle(&f4).unwrap_err().to_string();
        assert!(e.contains("the bootstrap needs 1 iteration(s)"), "{e}");
        // flight 3 cut inside its iterations, to a client that waits for it
        let (mut client, _, mut f3) = to_flight3();
        f3.truncate(f3.len() - 16);
        let e = client.handle(&f3).unwrap_err().to_string();
        assert!(e.contains("small set"), "{e}");
        let e = client.handle(&[1, 0]).unwrap_err().to_string();
        assert!(e.contains("failed earlier"), "{e}");
    }

    /// Runs one batch; returns both parties' COTs and the two messages.
    fn batch(
        client: &mut SilentSource,
        server: &mut SilentSource,
        counts: CotCounts,
    ) -> (CotBatch, CotBatch, Vec<u8>, Vec<u8>) {
        let req = client.start_batch(counts).unwrap().unwrap();
        assert_eq!(server.start_batch(counts.as_seen_by_peer()).unwrap(), None);
        let resp = server.handle(&req).unwrap().unwrap();
        assert_eq!(client.handle(&resp).unwrap(), None);
        let c = client.poll_batch().unwrap();
        let s = server.poll_batch().unwrap();
        (c, s, req, resp)
    }

    /// The ideal functionality of correlated OT: in every batch and both
    /// directions, `t_j = q_j ⊕ ρ_j·Δ` with the sender's one `Δ`; batches
    /// of zero, of less than one iteration and of several iterations; the
    /// pools carry over between batches.
    #[test]
    fn silent_cots_satisfy_the_correlation_in_both_directions() {
        let (mut client, mut server) = sources(3, SMALL);
        let usable = SMALL.usable();
        let mut deltas = None;
        for (n_c, n_s) in [
            (1000, 70),
            (0, 5),
            (2 * usable + 17, 0),
            (usable, usable),
            (1, 1),
        ] {
            let counts = CotCounts {
                sent: n_c,
                received: n_s,
            };
            let (c, s, ..) = batch(&mut client, &mut server, counts);
            for (snd, rcv, n) in [(&c.sent, &s.received, n_c), (&s.sent, &c.received, n_s)] {
                assert_eq!((snd.q.len(), rcv.t.len(), rcv.choice.len()), (n, n, n));
                for j in 0..n {
                    let rho = u128::from(rcv.choice.get(j));
                    assert_eq!(rcv.t[j], snd.q[j] ^ (rho * snd.delta), "COT {j} of {n}");
                }
            }
            let d = (c.sent.delta, s.sent.delta);
            assert_eq!(*deltas.get_or_insert(d), d, "Δ changed between batches");
            assert_ne!(d.0, d.1);
        }
    }

    /// What each party ends up with is spread as it must be: the
    /// receiver's choices are balanced, the sender's `q` and the receiver's
    /// `t` never repeat, and no COT comes out twice across batches.
    #[test]
    fn outputs_are_balanced_and_never_repeat() {
        let (mut client, mut server) = sources(4, SMALL);
        let n = 3 * SMALL.usable() / 2;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2 {
            let counts = CotCounts {
                sent: n,
                received: n,
            };
            let (c, s, ..) = batch(&mut client, &mut server, counts);
            for rcv in [&c.received, &s.received] {
                let ones = rcv.choice.count_ones() as f64 / n as f64;
                assert!((0.49..0.51).contains(&ones), "choices {ones}");
            }
            for q in c.sent.q.iter().chain(&s.sent.q) {
                assert!(seen.insert(*q), "a COT came out twice");
            }
        }
    }

    /// The only traffic after the setup is the senders' messages, which
    /// are one iteration's [`LpnParams::message_bytes`] each, and look
    /// uniform to the receiver (masked sums and `ψ`: about half the bits
    /// set); a batch the pool already covers sends nothing.
    #[test]
    fn messages_are_as_long_as_the_iterations_and_look_uniform() {
        let (mut client, mut server) = sources(5, SMALL);
        let counts = CotCounts {
            sent: SMALL.usable() + 1,
            received: 10,
        };
        let (_, _, req, resp) = batch(&mut client, &mut server, counts);
        assert_eq!(req.len(), 2 * SMALL.message_bytes());
        assert_eq!(resp.len(), SMALL.message_bytes());
        let ones: u32 = req.iter().map(|b| b.count_ones()).sum();
        let fraction = f64::from(ones) / (8 * req.len()) as f64;
        assert!((0.495..0.505).contains(&fraction), "{fraction}");
        let (_, _, req, resp) = batch(
            &mut client,
            &mut server,
            CotCounts {
                sent: 5,
                received: 5,
            },
        );
        assert!(req.is_empty() && resp.is_empty());
        // traffic per COT: ~3 bits with the default set
        let bits = 8.0 * DEFAULT_LPN.message_bytes() as f64 / DEFAULT_LPN.usable() as f64;
        assert!(bits < 3.1, "{bits}");
    }

    /// The GGM tree: a receiver given the off-path sums of its choice bits
    /// rebuilds every leaf but one, the one on the path that turns away from
    /// its choices at every level; different choices puncture different
    /// leaves.
    #[test]
    fn the_tree_is_rebuilt_but_for_the_leaf_the_choices_point_away_from() {
        let ggm = Ggm::new();
        let mut scratch = Vec::new();
        let mut r = rng(8);
        let mut punctured = std::collections::HashSet::new();
        for _ in 0..32 {
            let h = 7;
            let mut leaves = vec![0u128; 1 << h];
            let seed = u128::from(r.next_u64()) << 64 | u128::from(r.next_u64());
            let sums = ggm.grow(seed, &mut leaves, &mut scratch);
            let side: Vec<bool> = (0..h).map(|_| r.next_u64() & 1 == 1).collect();
            let off: Vec<u128> = side
                .iter()
                .zip(&sums)
                .map(|(&b, s)| s[usize::from(b)])
                .collect();
            let choices: Vec<Choice> = side.iter().map(|&b| Choice::from(u8::from(b))).collect();
            let mut rebuilt = vec![0u128; 1 << h];
            let alpha = ggm.rebuild(&choices, &off, &mut rebuilt, &mut scratch);
            let expected = side.iter().fold(0, |a, &b| 2 * a + usize::from(!b));
            assert_eq!(alpha, expected);
            for j in 0..1 << h {
                if j != alpha {
                    assert_eq!(rebuilt[j], leaves[j], "leaf {j}");
                }
            }
            assert_eq!(rebuilt[alpha], 0, "the punctured leaf is left 0");
            assert_ne!(rebuilt[alpha], leaves[alpha]);
            punctured.insert(alpha);
        }
        assert!(punctured.len() > 20, "{}", punctured.len());
    }

    /// The masked writes that keep the receiver's secret indices out of its
    /// memory accesses write exactly where an indexed write would: every
    /// position of a slice (the ends included) and nowhere when out of
    /// range; the noise vector has exactly bin `b`'s bit `alphas[b]` set,
    /// for bins smaller than, equal to and larger than a word.
    #[test]
    fn masked_writes_equal_indexed_writes() {
        let base: Vec<u128> = (0..70u128).map(|i| i * 0x1_0000_0001 + 5).collect();
        for at in 0..=base.len() {
            let mut masked = base.clone();
            write_at(&mut masked, at, u128::MAX);
            let mut indexed = base.clone();
            if let Some(x) = indexed.get_mut(at) {
                *x = u128::MAX;
            }
            assert_eq!(masked, indexed, "at {at}");
        }
        let mut r = rng(9);
        for bin in [16usize, 64, 128, 1024] {
            for trial in 0..20 {
                let bins = 6;
                let alphas: Vec<usize> = (0..bins)
                    .map(|b| match (trial, b) {
                        (0, _) => 0,
                        (1, _) => bin - 1,
                        _ => (r.next_u64() % bin as u64) as usize,
                    })
                    .collect();
                let n = bins * bin;
                let e = noise_bits(&alphas, bin, n);
                let mut want = Bits::zeros(n);
                for (b, &a) in alphas.iter().enumerate() {
                    want.set(b * bin + a, true);
                }
                assert_eq!(e, want, "bin {bin}, alphas {alphas:?}");
            }
        }
    }

    /// The code's indices cover `0..k` evenly enough (no index collapsed
    /// into a sub-range): every index is drawn, within a few per cent of
    /// its share over many rows.
    #[test]
    fn the_codes_indices_cover_the_secret() {
        let k = SMALL.k;
        let code = Code::drawn(k, None);
        let mut hits = vec![0u32; k];
        code.rows(0..SMALL.n, |_, idx| {
            for &i in idx {
                hits[i] += 1;
            }
        });
        let mean = (SMALL.n * CODE_WEIGHT) as f64 / k as f64;
        assert!(hits.iter().all(|&h| h > 0));
        let (lo, hi) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(f64::from(*lo) > mean / 3.0 && f64::from(*hi) < mean * 3.0);
        let first_half: u64 = hits[..k / 2].iter().map(|&h| u64::from(h)).sum();
        let share = first_half as f64 / (SMALL.n * CODE_WEIGHT) as f64;
        assert!((0.49..0.51).contains(&share), "{share}");
    }

    /// The shared table holds exactly the rows the code draws, and is
    /// kept only for the sets that fit it.
    #[test]
    fn the_codes_table_holds_the_drawn_rows() {
        let cached = Code::new(&SMALL);
        assert!(cached.table.is_some());
        let drawn = Code::drawn(SMALL.k, None);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        cached.rows(0..SMALL.n, |i, idx| a.push((i, *idx)));
        drawn.rows(0..SMALL.n, |i, idx| b.push((i, *idx)));
        assert_eq!(a.len(), SMALL.n);
        assert!(a == b, "the table differs from the drawn code");
        assert!(code_table(LPN_TABLE[0].1.n, LPN_TABLE[0].1.k).is_none());
    }

    /// Encoding split over threads equals encoding row by row in one
    /// range, and rows drawn from the middle equal the same rows of a
    /// whole draw (the large set's path): the split never changes `A`.
    #[test]
    fn the_split_encoding_equals_a_sequential_one() {
        let code = Code::drawn(SMALL.k, None);
        let mut r = rng(31);
        let mut word = || u128::from(r.next_u64()) | (u128::from(r.next_u64()) << 64);
        let base: Vec<u128> = (0..SMALL.k).map(|_| word()).collect();
        let bits = Bits::from_bools((0..SMALL.k).map(|_| word() & 1 == 1));
        let start: Vec<u128> = (0..SMALL.n).map(|_| word()).collect();
        let (mut split, mut split_bits) = (start.clone(), Bits::zeros(SMALL.n));
        code.encode_with_bits(&base, &bits, &mut split, &mut split_bits);
        let (mut one, mut one_bits) = (start.clone(), Bits::zeros(SMALL.n));
        code.draw(0..SMALL.n, |i, idx| {
            one[i] ^= idx.iter().fold(0, |acc, &j| acc ^ base[j]);
            if idx.iter().fold(false, |acc, &j| acc ^ bits.get(j)) {
                one_bits.set(i, true);
            }
        });
        assert!(split == one, "the split encoding differs");
        assert_eq!(split_bits, one_bits);
        let mut plain = start;
        code.encode(&base, &mut plain);
        assert!(plain == one, "the split encoding without bits differs");
        let (mut middle, mut whole) = (Vec::new(), Vec::new());
        code.draw(2 * CODE_CHUNK..3000, |i, idx| middle.push((i, *idx)));
        code.draw(0..3000, |i, idx| whole.push((i, *idx)));
        assert!(
            middle[..] == whole[2 * CODE_CHUNK..],
            "rows depend on where a draw starts"
        );
    }

    /// No COT handed out is also kept as a base COT for the next
    /// iteration.
    #[test]
    fn handed_out_cots_are_never_kept_as_base_cots() {
        // the small set alone, and the default set after its chained setup
        // (a first batch from the chaining's leftovers, then iterations)
        for (params, sizes) in [
            (SMALL, vec![SMALL.usable() + 5]),
            (DEFAULT_LPN, vec![100, DEFAULT_LPN.usable() + 5]),
        ] {
            let (mut client, mut server) = sources(9, params);
            let mut seen = std::collections::HashSet::new();
            for n in sizes {
                let counts = CotCounts {
                    sent: n,
                    received: n,
                };
                let (c, s, ..) = batch(&mut client, &mut server, counts);
                let (State::Ready(cd), State::Ready(sd)) = (&client.state, &server.state) else {
                    panic!("not ready");
                };
                for (handed, dirs) in [(&c.sent.q, cd), (&s.sent.q, sd)] {
                    let kept: std::collections::HashSet<u128> =
                        dirs.0.base.iter().chain(&dirs.0.pool).copied().collect();
                    assert!(handed.iter().all(|q| !kept.contains(q)), "{params:?}");
                    assert!(
                        handed.iter().all(|&q| seen.insert(q)),
                        "a COT came out twice"
                    );
                }
            }
        }
    }

    /// Malformed setup messages are refused by name: a flight 2 whose
    /// length prefix is 0, longer than the message, or missing.
    #[test]
    fn malformed_setup_flights_are_refused() {
        for bad in [
            vec![0u8, 0, 0, 0, 1, 2],
            vec![255, 255, 0, 0, 1],
            vec![1, 2],
        ] {
            let mut client = SilentSource::with_rng(Role::Client, SMALL, rng(10)).unwrap();
            let mut server = SilentSource::with_rng(Role::Server, SMALL, rng(11)).unwrap();
            let f0 = client.start_setup().unwrap().unwrap();
            server.start_setup().unwrap();
            server.handle(&f0).unwrap();
            let e = server.handle(&bad).unwrap_err().to_string();
            assert!(e.contains("setup flight 2"), "{e}");
        }
    }

    /// Only the table's parameter sets are accepted; a weaker or merely
    /// different set is refused by name.
    #[test]
    fn lpn_parameters_outside_the_table_are_refused() {
        for (name, p) in LPN_TABLE {
            assert_eq!(p.check().unwrap(), name);
            assert!(p.usable() > p.n / 2, "{name}");
        }
        let weaker = [
            LpnParams {
                k: SMALL.k - 1,
                ..SMALL
            },
            LpnParams {
                t: SMALL.t - 1,
                n: (SMALL.t - 1) << SMALL.log_bin,
                ..SMALL
            },
            LpnParams {
                n: SMALL.n - 1,
                ..SMALL
            },
        ];
        for p in weaker {
            let e = p.check().unwrap_err().to_string();
            assert!(e.contains("refused") || e.contains("inconsistent"), "{e}");
            assert!(SilentSource::with_rng(Role::Client, p, rng(1)).is_err());
        }
    }

    /// A sender message of the wrong length is refused by name, and the
    /// source stays failed.
    #[test]
    fn a_batch_message_of_the_wrong_length_is_refused() {
        let (mut client, mut server) = sources(6, SMALL);
        let counts = CotCounts {
            sent: 10,
            received: 10,
        };
        let mut req = client.start_batch(counts).unwrap().unwrap();
        server.start_batch(counts.as_seen_by_peer()).unwrap();
        req.pop();
        let e = server.handle(&req).unwrap_err().to_string();
        assert!(e.contains("needs 1 iteration(s)"), "{e}");
        let again = server.handle(&req).unwrap_err().to_string();
        assert!(again.contains("failed earlier"), "{again}");
    }

    /// A receiver whose tree sums were tampered with gets COTs that break
    /// the correlation in that tree's bin: the check above would catch a
    /// wrong rebuild. (Bin 200 lies past the COTs kept for the next
    /// iteration, so its COTs are handed out.)
    #[test]
    fn a_tampered_sender_message_breaks_the_correlation() {
        let (mut client, mut server) = sources(7, SMALL);
        let counts = CotCounts {
            sent: 20_000,
            received: 0,
        };
        let mut req = client.start_batch(counts).unwrap().unwrap();
        server.start_batch(counts.as_seen_by_peer()).unwrap();
        let tree = 200 * (32 * SMALL.log_bin as usize + 16);
        for b in &mut req[tree..tree + 32] {
            *b ^= 0xff;
        }
        let resp = server.handle(&req).unwrap().unwrap();
        client.handle(&resp).unwrap();
        let (c, s) = (client.poll_batch().unwrap(), server.poll_batch().unwrap());
        let broken = (0..20_000)
            .filter(|&j| {
                let rho = u128::from(s.received.choice.get(j));
                s.received.t[j] != c.sent.q[j] ^ (rho * c.sent.delta)
            })
            .count();
        assert!(broken > 0);
    }
}
