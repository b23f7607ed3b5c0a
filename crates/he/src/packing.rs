//! Where each value of a batch sits in the ciphertexts, and which layout a
//! batch of one op takes.
//!
//! Two layouts (docs/offline.md, "Packing"):
//!
//! - [`Packing::PerCoefficient`]: ciphertext `j` holds input feature `j` of
//!   every inference, one inference per coefficient; reply `o` holds output
//!   `o`. A batch costs the same for 1 or `N` inferences.
//! - [`Packing::Blocks`]: the layer's dense matrix applied by polynomial
//!   products (Cheetah's matrix–vector encoding, with each position widened
//!   to `width` inferences). Input ciphertext `(g, h)` holds input block `g`
//!   of inference group `h`; reply `(f, h)` holds output block `f` of group
//!   `h` at known coefficients, and only those travel.
//!
//! Both parties call [`Packing::choose`] with the same public numbers (the
//! op's shape, the batch size, the parameters), so the choice needs no
//! message. The choice minimises bytes on the wire; see [`Packing::choose`].

use crate::conv_packing::{ConvDims, ConvShape};
use crate::{HeError, HeParams};

/// Ops with more weights than this in dense form keep the per-coefficient
/// packing (the server would hold the dense matrix: 2^24 × 8 B = 128 MiB).
pub const MAX_DENSE_WEIGHTS: usize = 1 << 24;

/// A layout may use this many input (or reply) ciphertexts even where the
/// per-coefficient packing would use fewer.
const MIN_CIPHERTEXT_CAP: usize = 64;

/// Working memory one HE job (one op of one batch, on the server) may take,
/// by [`Packing::server_bytes`]. Layouts above it are never chosen, and a
/// batch for which no layout of some op fits is refused before anything is
/// sent or allocated; since both parties choose alike, the client sizes its
/// batches by the same rule ([`Packing::choose`]).
pub const JOB_MEMORY_BYTES: usize = 1 << 30;

/// Output accumulators (2 components × primes × N residues × 8 B per output)
/// the per-coefficient evaluation holds at once; bigger layers are done a
/// group of outputs at a time, each group redoing the input transposes. Up
/// to 2 GiB was faster (the CNN's conv 2 took 54 s per full batch against
/// 67 s at 1 GiB), but a job must fit [`JOB_MEMORY_BYTES`] whole.
pub(crate) const OUTPUT_MEMORY_BUDGET: usize = 256 << 20;

/// Weight polynomials kept in NTT form for a whole block-packed job if they
/// fit this many bytes (otherwise each is rebuilt where it is used).
pub(crate) const WEIGHT_CACHE_BYTES: usize = 512 << 20;

/// Replies a block-packed job finishes (and hands on) at a time.
pub(crate) const REPLIES_PER_PART: usize = 64;

/// Residue positions per kernel call of the per-coefficient products.
pub(crate) const SLOT_CHUNK: usize = 256;

/// How one op's batch is laid out in ciphertexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// one inference per coefficient; ciphertext `j` is input feature `j`
    PerCoefficient {
        /// inputs per inference
        input_len: usize,
        /// outputs per inference
        output_len: usize,
        /// inferences in the batch
        count: usize,
        /// multiply-adds of one inference (`input_len · output_len` for a
        /// dense layer, `fan-in · output_len` for a convolution): public, for
        /// the cost model
        macs: usize,
    },
    /// polynomial products over the dense matrix
    Blocks(BlockShape),
    /// polynomial products over a 2-D convolution's kernels
    Conv(ConvShape),
}

/// A block layout: `in_block · out_block · width ≤ N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    /// inputs per inference (`n_i`)
    pub input_len: usize,
    /// outputs per inference (`n_o`)
    pub output_len: usize,
    /// inferences in the batch (`B`)
    pub count: usize,
    /// inferences per group, side by side in consecutive coefficients (`w`)
    pub width: usize,
    /// inputs per block (`n_i'`)
    pub in_block: usize,
    /// outputs per block (`n_o'`)
    pub out_block: usize,
}

impl BlockShape {
    /// Input blocks `G`.
    pub fn input_blocks(&self) -> usize {
        self.input_len.div_ceil(self.in_block)
    }
    /// Output blocks `F`.
    pub fn output_blocks(&self) -> usize {
        self.output_len.div_ceil(self.out_block)
    }
    /// Inference groups `H`.
    pub fn groups(&self) -> usize {
        self.count.div_ceil(self.width)
    }
    /// Input ciphertexts: number `h·G + g` is input block `g` of group `h`.
    pub fn input_ciphertexts(&self) -> usize {
        self.input_blocks() * self.groups()
    }
    /// Reply ciphertexts: number `h·F + f` is output block `f` of group `h`.
    pub fn output_ciphertexts(&self) -> usize {
        self.output_blocks() * self.groups()
    }
    /// Public bound on the non-zero weight coefficients that reach one output
    /// coefficient, summed over input blocks: it sizes the noise flood.
    pub fn fan_in_bound(&self) -> usize {
        self.input_len * self.out_block
    }

    fn group_len(&self, h: usize) -> usize {
        self.width.min(self.count - h * self.width)
    }

    /// The plaintext of input ciphertext `k` (`N` coefficients): feature
    /// `g·n_i' + j` of inference `h·w + b` at coefficient `j·w + b`; `masks`
    /// holds `count` rows of `input_len`.
    pub fn input_plaintext(
        &self,
        k: usize,
        masks: &[&[u64]],
        degree: usize,
    ) -> Result<Vec<u64>, HeError> {
        let (h, g) = (k / self.input_blocks(), k % self.input_blocks());
        if h >= self.groups() {
            return Err(HeError::Shape(format!(
                "input ciphertext {k} of {}",
                self.input_ciphertexts()
            )));
        }
        if masks.len() != self.count {
            return Err(HeError::Shape(format!(
                "{} masks for a batch of {}",
                masks.len(),
                self.count
            )));
        }
        let mut m = vec![0u64; degree];
        let j0 = g * self.in_block;
        let j1 = (j0 + self.in_block).min(self.input_len);
        for b in 0..self.group_len(h) {
            let row = masks[h * self.width + b];
            if row.len() != self.input_len {
                return Err(HeError::Shape(format!(
                    "a mask of {} elements for a layer of {} inputs",
                    row.len(),
                    self.input_len
                )));
            }
            for j in j0..j1 {
                m[(j - j0) * self.width + b] = row[j];
            }
        }
        Ok(m)
    }

    /// The coefficients of reply `k` that carry outputs, in the order they
    /// travel, each with its (output feature, inference).
    pub fn kept(&self, k: usize) -> Vec<Kept> {
        let (h, f) = (k / self.output_blocks(), k % self.output_blocks());
        if h >= self.groups() {
            return Vec::new();
        }
        let o0 = f * self.out_block;
        let o1 = (o0 + self.out_block).min(self.output_len);
        let mut out = Vec::with_capacity((o1 - o0) * self.group_len(h));
        for o in o0..o1 {
            for b in 0..self.group_len(h) {
                out.push(Kept {
                    coefficient: ((o - o0) * self.in_block + self.in_block - 1) * self.width + b,
                    output: o,
                    inference: h * self.width + b,
                });
            }
        }
        out
    }

    /// The weight polynomial `P_fg`'s non-zero positions: `(coefficient,
    /// output, input)`, holding `W[output][input]`.
    pub fn weight_positions(&self, f: usize, g: usize) -> Vec<(usize, usize, usize)> {
        let o0 = f * self.out_block;
        let o1 = (o0 + self.out_block).min(self.output_len);
        let j0 = g * self.in_block;
        let j1 = (j0 + self.in_block).min(self.input_len);
        let mut out = Vec::with_capacity((o1 - o0) * (j1 - j0));
        for o in o0..o1 {
            for j in j0..j1 {
                let pos = (o - o0) * self.in_block + self.in_block - 1 - (j - j0);
                out.push((pos * self.width, o, j));
            }
        }
        out
    }
}

/// One output-carrying coefficient of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    /// its coefficient in the reply
    pub coefficient: usize,
    /// the output feature
    pub output: usize,
    /// the inference within the batch
    pub inference: usize,
}

/// The cost model's constants: seconds (or nanoseconds) on the reference
/// machine, 2 cores, measured with `cargo bench -p secinfer-benches --bench
/// he` (docs/offline.md).
mod cost {
    /// a 1 Gbit/s link
    pub const NS_PER_BYTE: f64 = 8.0;
    /// per-coefficient products: one weight × one residue limb (2 components
    /// × 3 primes × 2 limbs = 12 per weight and coefficient), exact `f64`
    pub const NS_PER_RESIDUE_MAC: f64 = 12.0 * 0.14;
    /// decoding one input ciphertext (and its NTT or transpose)
    pub const S_PER_INPUT: f64 = 0.1e-3;
    /// re-randomising, flooding, switching down and serialising one reply
    /// (46 s for conv 1's 25,088 replies of a full batch)
    pub const S_PER_REPLY: f64 = 1.8e-3;
    /// one weight polynomial × input ciphertext product, both components,
    /// accumulated (MNIST MLP layer 0, batch 1,000: 12,544 products and 128
    /// replies in 2.97 s)
    pub const S_PER_BLOCK_PRODUCT: f64 = 0.2e-3;
}

/// A layout by polynomial products: which input ciphertexts and weight
/// polynomials make each reply, and where values sit. Implemented by
/// [`BlockShape`] (dense matrices) and [`crate::ConvShape`] (2-D
/// convolutions); the server's evaluation and the client's encryption and
/// decryption are written once against it.
pub trait Layout: Sync + std::fmt::Debug {
    /// Input ciphertexts of the batch.
    fn input_ciphertexts(&self) -> usize;
    /// Reply ciphertexts of the batch.
    fn output_ciphertexts(&self) -> usize;
    /// Public bound on the non-zero weight coefficients that reach one output
    /// coefficient, summed over the terms of a reply: it sizes the flood.
    fn fan_in_bound(&self) -> usize;
    /// The plaintext of input ciphertext `k` (`degree` coefficients), from the
    /// batch's masks (`count` rows of the op's input length).
    fn input_plaintext(
        &self,
        k: usize,
        masks: &[&[u64]],
        degree: usize,
    ) -> Result<Vec<u64>, HeError>;
    /// The coefficients of reply `k` that carry outputs, in the order they
    /// travel.
    fn kept(&self, k: usize) -> Vec<Kept>;
    /// Reply `k` is the sum of these (input ciphertext, weight polynomial)
    /// products.
    fn terms(&self, k: usize) -> Vec<(usize, usize)>;
    /// Distinct weight polynomials.
    fn weight_polys(&self) -> usize;
    /// Products (terms) over all replies.
    fn products(&self) -> usize;
    /// Kept coefficients over all replies (`count · output_len`).
    fn kept_total(&self) -> usize;
    /// Weight polynomial `p`'s non-zero coefficients: (coefficient, index into
    /// the op's flat weights).
    fn weight_positions(&self, p: usize) -> Vec<(usize, usize)>;
    /// Length of the op's flat weights the positions index.
    fn weights_len(&self) -> usize;
    /// Whether the layout fits the degree without two values colliding.
    fn check(&self, degree: usize) -> Result<(), HeError>;
}

impl Layout for BlockShape {
    fn input_ciphertexts(&self) -> usize {
        BlockShape::input_ciphertexts(self)
    }
    fn output_ciphertexts(&self) -> usize {
        BlockShape::output_ciphertexts(self)
    }
    fn fan_in_bound(&self) -> usize {
        BlockShape::fan_in_bound(self)
    }
    fn input_plaintext(
        &self,
        k: usize,
        masks: &[&[u64]],
        degree: usize,
    ) -> Result<Vec<u64>, HeError> {
        BlockShape::input_plaintext(self, k, masks, degree)
    }
    fn kept(&self, k: usize) -> Vec<Kept> {
        BlockShape::kept(self, k)
    }
    fn terms(&self, k: usize) -> Vec<(usize, usize)> {
        let (gs, fs) = (self.input_blocks(), self.output_blocks());
        let (h, f) = (k / fs, k % fs);
        (0..gs).map(|g| (h * gs + g, f * gs + g)).collect()
    }
    fn weight_polys(&self) -> usize {
        self.input_blocks() * self.output_blocks()
    }
    fn products(&self) -> usize {
        self.input_blocks() * self.output_blocks() * self.groups()
    }
    fn kept_total(&self) -> usize {
        self.count * self.output_len
    }
    fn weight_positions(&self, p: usize) -> Vec<(usize, usize)> {
        let gs = self.input_blocks();
        BlockShape::weight_positions(self, p / gs, p % gs)
            .into_iter()
            .map(|(c, o, j)| (c, o * self.input_len + j))
            .collect()
    }
    fn weights_len(&self) -> usize {
        self.input_len * self.output_len
    }
    fn check(&self, degree: usize) -> Result<(), HeError> {
        let fits = self
            .in_block
            .checked_mul(self.out_block)
            .and_then(|v| v.checked_mul(self.width))
            .is_some_and(|v| v <= degree);
        if self.count == 0
            || self.count > degree
            || self.width == 0
            || self.in_block == 0
            || self.out_block == 0
            || !fits
        {
            return Err(HeError::Shape(format!(
                "block layout {self:?} does not fit degree {degree}"
            )));
        }
        Ok(())
    }
}

/// Wire sizes the cost model uses, from the parameters.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// a seeded mask ciphertext at full level
    up: usize,
    /// a reply of both components at the first prime
    down_full: usize,
    /// the `c1` of a reply at the first prime
    down_c1: usize,
}

impl Sizes {
    fn of(params: &HeParams) -> Sizes {
        let n = params.degree();
        let bits = |q: u64| (64 - (q - 1).leading_zeros()) as usize;
        let moduli = params.bfv().moduli();
        let all: usize = moduli.iter().map(|&q| bits(q) * n / 8).sum();
        let first = bits(moduli[0]) * n / 8;
        Sizes {
            up: all + 48,
            down_full: 2 * first + 40,
            down_c1: first + 24,
        }
    }
}

impl Packing {
    /// The layout by polynomial products, or `None` for the per-coefficient
    /// packing.
    pub fn layout(&self) -> Option<&dyn Layout> {
        match self {
            Packing::PerCoefficient { .. } => None,
            Packing::Blocks(s) => Some(s),
            Packing::Conv(s) => Some(s),
        }
    }

    /// Input ciphertexts the client sends for the op.
    pub fn input_ciphertexts(&self) -> usize {
        match (self, self.layout()) {
            (Packing::PerCoefficient { input_len, .. }, _) => *input_len,
            (_, Some(l)) => l.input_ciphertexts(),
            (_, None) => 0,
        }
    }

    /// Reply ciphertexts the server sends back.
    pub fn output_ciphertexts(&self) -> usize {
        match (self, self.layout()) {
            (Packing::PerCoefficient { output_len, .. }, _) => *output_len,
            (_, Some(l)) => l.output_ciphertexts(),
            (_, None) => 0,
        }
    }

    /// A short description for per-layer print-outs.
    pub fn describe(&self) -> String {
        match self {
            Packing::PerCoefficient { .. } => "per coefficient".into(),
            Packing::Blocks(s) => format!(
                "blocks {}x{} of {} inference(s)",
                s.in_block, s.out_block, s.width
            ),
            Packing::Conv(s) => format!(
                "conv blocks {}->{} channels, {} row(s) per tile",
                s.in_block, s.out_block, s.rows
            ),
        }
    }

    /// Estimated bytes on the wire for the op's batch, both ways.
    pub fn wire_bytes(&self, params: &HeParams) -> usize {
        let z = Sizes::of(params);
        match self {
            Packing::PerCoefficient {
                input_len,
                output_len,
                ..
            } => input_len * z.up + output_len * z.down_full,
            Packing::Blocks(l) => layout_bytes(l, &z),
            Packing::Conv(l) => layout_bytes(l, &z),
        }
    }

    /// Estimated peak bytes the server holds for this op's batch: the
    /// serialised input ciphertexts while they arrive, their decoded form
    /// while products use them, the accumulators or cached weight
    /// polynomials, the replies and the masks `s`. An upper estimate
    /// (docs/offline.md, "Memory"); [`JOB_MEMORY_BYTES`] bounds it.
    pub fn server_bytes(&self, params: &HeParams) -> usize {
        let z = Sizes::of(params);
        let poly = params.bfv().moduli().len() * params.degree() * 8;
        match self {
            Packing::PerCoefficient {
                input_len,
                output_len,
                count,
                ..
            } => {
                // one group of outputs at a time: accumulators and replies
                let group = (*output_len).min((OUTPUT_MEMORY_BUDGET / (2 * poly)).max(1));
                // per thread: SLOT_CHUNK rows of up to 3 limbs of every input
                let kernel = 2 * SLOT_CHUNK * 3 * input_len * 8;
                input_len.saturating_mul(z.up + 2 * poly)
                    + group * (2 * poly + z.down_full)
                    + kernel
                    + output_len.saturating_mul(8 * count)
            }
            Packing::Blocks(l) => layout_server_bytes(l, &z, poly),
            Packing::Conv(l) => layout_server_bytes(l, &z, poly),
        }
    }

    /// Estimated seconds for the op's batch on the reference machine (2
    /// cores, 1 Gbit/s): wire bytes plus the server's work (docs/offline.md,
    /// "Choice", has the constants and the measurements behind them).
    pub fn estimated_seconds(&self, params: &HeParams) -> f64 {
        let wire = self.wire_bytes(params) as f64 * cost::NS_PER_BYTE * 1e-9;
        let n = params.degree() as f64;
        let work = match self {
            Packing::PerCoefficient {
                input_len,
                output_len,
                macs,
                ..
            } => {
                let (i, o) = (*input_len as f64, *output_len as f64);
                *macs as f64 * n * cost::NS_PER_RESIDUE_MAC * 1e-9
                    + i * cost::S_PER_INPUT
                    + o * cost::S_PER_REPLY
            }
            Packing::Blocks(l) => layout_work(l),
            Packing::Conv(l) => layout_work(l),
        };
        wire + work
    }

    /// The layout for a batch of `count` inferences of an op with these
    /// dimensions: the one with the least [`Packing::estimated_seconds`],
    /// among the per-coefficient packing and every block shape (`width` a
    /// power of two below `count`, or `count`; every `in_block`; `out_block`
    /// as large as the degree and the noise flood allow). Ops whose dense
    /// matrix exceeds [`MAX_DENSE_WEIGHTS`] always take the per-coefficient
    /// packing.
    pub fn choose(
        params: &HeParams,
        input_len: usize,
        output_len: usize,
        count: usize,
    ) -> Result<Packing, HeError> {
        let macs = input_len.saturating_mul(output_len);
        Packing::choose_among(params, input_len, output_len, count, macs, Vec::new())
    }

    /// [`Packing::choose`] for a 2-D convolution: its own layouts
    /// ([`ConvShape`]) compete with the others.
    pub fn choose_conv(
        params: &HeParams,
        dims: &ConvDims,
        count: usize,
    ) -> Result<Packing, HeError> {
        if !dims.is_valid() {
            return Err(HeError::Shape(format!("an invalid convolution {dims:?}")));
        }
        let max_out = max_flood_fan_in(params)
            / dims.group_channels().max(1)
            / (dims.kernel[0] * dims.kernel[1]).max(1);
        let convs = crate::conv_packing::candidates(dims, count, params.degree(), max_out)
            .into_iter()
            .map(Packing::Conv)
            .collect();
        let fan_in = dims.group_channels() * dims.kernel[0] * dims.kernel[1];
        let macs = fan_in.saturating_mul(dims.output_len());
        Packing::choose_among(
            params,
            dims.input_len(),
            dims.output_len(),
            count,
            macs,
            convs,
        )
    }

    fn choose_among(
        params: &HeParams,
        input_len: usize,
        output_len: usize,
        count: usize,
        macs: usize,
        extra: Vec<Packing>,
    ) -> Result<Packing, HeError> {
        let n = params.degree();
        if count == 0 || count > n || input_len == 0 || output_len == 0 {
            return Err(HeError::Shape(format!(
                "a batch of {count} inferences of a {input_len} -> {output_len} op"
            )));
        }
        // The server holds all of an op's input ciphertexts while it
        // evaluates; a layout never makes it hold more of them (or more
        // replies) than the per-coefficient packing, whose count is fixed by
        // the layer, or than a small batch needs anyway; and its whole
        // working memory must fit JOB_MEMORY_BYTES.
        let max_inputs = input_len.max(MIN_CIPHERTEXT_CAP);
        let max_outputs = output_len.max(MIN_CIPHERTEXT_CAP);
        let mut best: Option<(Packing, f64)> = None;
        let mut least_memory = usize::MAX;
        let mut consider = |p: Packing| {
            if p.input_ciphertexts() > max_inputs || p.output_ciphertexts() > max_outputs {
                return;
            }
            let memory = p.server_bytes(params);
            least_memory = least_memory.min(memory);
            if memory > JOB_MEMORY_BYTES {
                return;
            }
            let cost = p.estimated_seconds(params);
            if best.as_ref().is_none_or(|(_, c)| cost < *c) {
                best = Some((p, cost));
            }
        };
        consider(Packing::PerCoefficient {
            input_len,
            output_len,
            count,
            macs,
        });
        for p in extra {
            consider(p);
        }
        if input_len.saturating_mul(output_len) <= MAX_DENSE_WEIGHTS {
            let max_fan_in = max_flood_fan_in(params);
            let widths = (0..=n.trailing_zeros())
                .map(|e| 1usize << e)
                .filter(|&w| w < count)
                .chain(std::iter::once(count));
            for width in widths {
                let room = n / width;
                for in_block in 1..=room.min(input_len) {
                    let out_block = (room / in_block)
                        .min(output_len)
                        .min(max_fan_in / input_len);
                    if out_block == 0 {
                        continue;
                    }
                    consider(Packing::Blocks(BlockShape {
                        input_len,
                        output_len,
                        count,
                        width,
                        in_block,
                        out_block,
                    }));
                }
            }
        }
        best.map(|(p, _)| p).ok_or_else(|| {
            HeError::Memory(format!(
                "no layout of a batch of {count} inferences of this {input_len} -> {output_len} op \
                 fits the {} MiB an HE job may use on the server (the smallest needs ~{} MiB); \
                 preprocess fewer inferences at once",
                JOB_MEMORY_BYTES >> 20,
                least_memory.div_ceil(1 << 20)
            ))
        })
    }
}

/// Wire bytes of a layout by polynomial products.
fn layout_bytes(l: &dyn Layout, z: &Sizes) -> usize {
    l.input_ciphertexts() * z.up + l.output_ciphertexts() * z.down_c1 + 8 * l.kept_total()
}

/// [`Packing::server_bytes`] of a layout by polynomial products: inputs
/// arrive serialised and are decoded for one group of replies at a time
/// (at most all of them), the weight polynomials are cached if small enough,
/// replies leave [`REPLIES_PER_PART`] at a time, the masks stay.
fn layout_server_bytes(l: &dyn Layout, z: &Sizes, poly: usize) -> usize {
    let inputs = l.input_ciphertexts();
    let weights = l.weight_polys().saturating_mul(poly);
    let cache = if weights <= WEIGHT_CACHE_BYTES {
        weights
    } else {
        0
    };
    inputs.saturating_mul(z.up + 2 * poly)
        + cache
        + l.output_ciphertexts().min(REPLIES_PER_PART) * (z.down_full + 2 * poly)
        + l.kept_total().saturating_mul(8)
}

/// The server's estimated seconds for a layout by polynomial products.
fn layout_work(l: &dyn Layout) -> f64 {
    l.products() as f64 * cost::S_PER_BLOCK_PRODUCT
        + l.input_ciphertexts() as f64 * cost::S_PER_INPUT
        + l.output_ciphertexts() as f64 * cost::S_PER_REPLY
}

/// The largest fan-in whose noise the parameters can flood (0 if none).
pub fn max_flood_fan_in(params: &HeParams) -> usize {
    let (mut lo, mut hi) = (0usize, 1usize << 40);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if params.flood_plan(mid).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}
