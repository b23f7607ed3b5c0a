//! The offline phase, sans IO: how a batch of inferences' material is made
//! with HE (crate `secinfer-he`), without a trusted party.
//!
//! 1. Once per session the client sends its BFV public key ([`OfflineHello`]).
//! 2. For a batch of `count` inferences with ids `first_id ..
//!    first_id + count`, the client draws every op's masks `r` (CSPRNG,
//!    uniform over Z_2^k) and sends them encrypted, op by op, in chunks of
//!    ciphertexts ([`MaskRequest`]). How a batch is laid out in ciphertexts
//!    depends on the op's shape and `count` ([`packing_for`]: one inference
//!    per coefficient for big batches, polynomial products by blocks for
//!    small ones); both sides compute it the same way.
//! 3. When the server has all of an op's ciphertexts it answers `Enc(W·r − s)`
//!    in parts ([`ProductReply`]) and keeps `s`.
//! 4. When a batch is complete on a side, that side files one material per id
//!    in its single-use store: the client its `(r, c)` via
//!    [`crate::ClientSession::accept_preprocessing`], the server its `s`
//!    inside [`crate::ServerSession`].
//!
//! Ids are never reused: the server refuses a batch that names any id it has
//! seen in this session (pending, live or spent), and the client's store
//! refuses duplicates as well. Material lives only in memory.

use std::collections::HashMap;

use rand::rngs::{ChaCha20Rng, SysRng};
use rand::{Rng, SeedableRng};
use secinfer_he::{ClientKey, ConvDims, HeParams, Packing};
use secinfer_model::{LayerSpec, LinearKind};
use serde::{Deserialize, Serialize};

use crate::ProtocolError;
use crate::messages::{ClientMaterial, OpId, PreprocessingId};

/// Ciphertexts per [`MaskRequest`] / [`ProductReply`] (about 180 KiB each up,
/// 120 KiB down), so that one message stays around 10 MiB.
pub const CIPHERTEXTS_PER_MESSAGE: usize = 64;

/// Offline, client to server, once per session: the client's public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineHello {
    /// ring degree of the parameter set the key belongs to
    pub degree: u32,
    /// plaintext bits (the model's ring)
    pub ring_bits: u32,
    /// serialised BFV public key (a byte string on the wire)
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
}

/// Offline, client to server: some of one op's encrypted masks for a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskRequest {
    /// first id of the batch
    pub first_id: PreprocessingId,
    /// inferences in the batch (ids `first_id .. first_id + count`)
    pub count: u32,
    /// the op
    pub op: OpId,
    /// index of the first ciphertext here among the op's input ciphertexts
    /// (as many as the batch's [`Packing`] says)
    pub offset: u32,
    /// [`layout_tag`] of the packing the client chose for this op and batch;
    /// the server refuses a request whose tag differs from its own choice
    /// (both choose from the same public numbers, so a difference means
    /// different versions)
    pub layout: u64,
    /// serialised ciphertexts, numbers `offset ..`: at most
    /// [`CIPHERTEXTS_PER_MESSAGE`], refused while decoding beyond that
    /// (each empty one would otherwise cost 24 bytes of memory for 1 byte on
    /// the wire); per-coefficient packing,
    /// number `j` holds input feature `j` of every inference; block packing,
    /// [`secinfer_he::BlockShape::input_plaintext`] says what each holds
    #[serde(
        serialize_with = "ciphertexts_as_bytes",
        deserialize_with = "at_most_a_message_of_ciphertexts"
    )]
    pub ciphertexts: Vec<Vec<u8>>,
}

/// Offline, server to client: some of one op's `Enc(W·r − s)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductReply {
    /// first id of the batch
    pub first_id: PreprocessingId,
    /// the op
    pub op: OpId,
    /// which reply ciphertexts these are: per-coefficient packing, output
    /// features; block packing, reply numbers
    /// ([`secinfer_he::BlockShape::kept`] says what each holds)
    pub outputs: Vec<u32>,
    /// serialised ciphertexts, one per entry of `outputs` (at most
    /// [`CIPHERTEXTS_PER_MESSAGE`], refused while decoding beyond that)
    #[serde(
        serialize_with = "ciphertexts_as_bytes",
        deserialize_with = "at_most_a_message_of_ciphertexts"
    )]
    pub ciphertexts: Vec<Vec<u8>>,
}

/// Encodes a list of ciphertexts as byte strings: one copy each instead of
/// a visit per byte, and the same encoding as sequences of `u8`.
fn ciphertexts_as_bytes<S: serde::Serializer>(cts: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(cts.iter().map(|ct| serde_bytes::Bytes::new(ct)))
}

/// Decodes a list of ciphertexts (each a byte string), refusing the element after
/// [`CIPHERTEXTS_PER_MESSAGE`] as soon as it is reached: the decoder builds
/// a message's vectors before anything else checks them, so a frame of
/// empty byte strings would otherwise become ~24× its size in memory.
fn at_most_a_message_of_ciphertexts<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<Vec<u8>>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {CIPHERTEXTS_PER_MESSAGE} ciphertexts")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out =
                Vec::with_capacity(seq.size_hint().unwrap_or(0).min(CIPHERTEXTS_PER_MESSAGE));
            while let Some(ct) = seq.next_element::<serde_bytes::ByteBuf>()? {
                if out.len() == CIPHERTEXTS_PER_MESSAGE {
                    return Err(serde::de::Error::custom(format!(
                        "more than {CIPHERTEXTS_PER_MESSAGE} ciphertexts in one message"
                    )));
                }
                out.push(ct.into_vec());
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

impl MaskRequest {
    /// Bytes of ciphertext carried.
    pub fn payload_bytes(&self) -> usize {
        self.ciphertexts.iter().map(Vec::len).sum()
    }
}

impl ProductReply {
    /// Bytes of ciphertext carried.
    pub fn payload_bytes(&self) -> usize {
        self.ciphertexts.iter().map(Vec::len).sum::<usize>() + 4 * self.outputs.len()
    }
}

/// A batch the client has started and not finished.
struct ClientBatch {
    count: usize,
    /// per op: how the batch is laid out in ciphertexts
    packing: Vec<Packing>,
    /// per op: the masks, `count` rows of `input_len`
    masks: Vec<Vec<Vec<u64>>>,
    /// per op: `c`, `count` rows of `output_len`, filled as replies arrive
    products: Vec<Vec<Vec<u64>>>,
    /// per op: reply ciphertexts received (each at most once)
    received: Vec<Vec<bool>>,
    /// per op: number of reply ciphertexts received
    done: Vec<usize>,
    /// next (op, offset) to encrypt and send
    cursor: (usize, usize),
}

/// The client's offline engine: its key, and the batches in flight.
pub struct Preprocessor {
    key: ClientKey,
    layers: Vec<LayerSpec>,
    rng: ChaCha20Rng,
    next_id: u64,
    batches: HashMap<PreprocessingId, ClientBatch>,
    /// the most inferences one batch may hold ([`max_batch`])
    max_batch: usize,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Preprocessor({} batches in flight)", self.batches.len())
    }
}

impl Preprocessor {
    /// A fresh key for a model's ops; all ops must share one ring.
    pub fn new(layers: Vec<LayerSpec>) -> Result<Preprocessor, ProtocolError> {
        let params = params_for(&layers)?;
        let max_batch = max_batch(&params, &layers)?;
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng)
            .map_err(|e| ProtocolError::Model(format!("OS randomness unavailable: {e}")))?;
        Ok(Preprocessor {
            key: ClientKey::generate(&params),
            layers,
            rng,
            next_id: 0,
            batches: HashMap::new(),
            max_batch,
        })
    }

    /// The most inferences one batch may hold: at most the ring degree, and
    /// as many as the memory bounds allow ([`max_batch`]).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The session's first offline message.
    pub fn hello(&self) -> OfflineHello {
        OfflineHello {
            degree: self.key.params().degree() as u32,
            ring_bits: self.key.params().ring_bits(),
            public_key: self.key.public_key_bytes(),
        }
    }

    /// Starts a batch of `count` inferences: draws the masks and returns the
    /// batch's first id. Its requests come from [`Preprocessor::next_request`].
    pub fn start(&mut self, count: usize) -> Result<PreprocessingId, ProtocolError> {
        if count == 0 || count > self.max_batch() {
            return Err(ProtocolError::Model(format!(
                "a preprocessing batch holds 1..={} inferences, not {count}",
                self.max_batch()
            )));
        }
        let first = PreprocessingId(self.next_id);
        self.next_id = self
            .next_id
            .checked_add(count as u64)
            .ok_or_else(|| ProtocolError::Model("preprocessing ids exhausted".into()))?;
        let packing: Vec<Packing> = self
            .layers
            .iter()
            .map(|spec| packing_for(self.key.params(), spec, count))
            .collect::<Result<_, _>>()?;
        let mut masks = Vec::with_capacity(self.layers.len());
        for spec in &self.layers {
            let mask = (1u64 << spec.ring_bits) - 1;
            masks.push(
                (0..count)
                    .map(|_| {
                        (0..spec.input_len())
                            .map(|_| self.rng.next_u64() & mask)
                            .collect()
                    })
                    .collect(),
            );
        }
        self.batches.insert(
            first,
            ClientBatch {
                count,
                masks,
                products: self
                    .layers
                    .iter()
                    .map(|s| vec![vec![0; s.output_len()]; count])
                    .collect(),
                received: packing
                    .iter()
                    .map(|p| vec![false; p.output_ciphertexts()])
                    .collect(),
                packing,
                done: vec![0; self.layers.len()],
                cursor: (0, 0),
            },
        );
        Ok(first)
    }

    /// The next chunk of encrypted masks of batch `first`, or `None` when all
    /// have been produced (or the batch is already complete). Encrypting is
    /// the client's main offline cost; each call does one chunk.
    pub fn next_request(
        &mut self,
        first: PreprocessingId,
    ) -> Result<Option<MaskRequest>, ProtocolError> {
        if first.0 >= self.next_id {
            return Err(ProtocolError::UnknownId(first));
        }
        let Some(batch) = self.batches.get_mut(&first) else {
            return Ok(None);
        };
        let (mut op, mut offset) = batch.cursor;
        while op < self.layers.len() && offset >= batch.packing[op].input_ciphertexts() {
            op += 1;
            offset = 0;
        }
        if op >= self.layers.len() {
            batch.cursor = (op, 0);
            return Ok(None);
        }
        let end = (offset + CIPHERTEXTS_PER_MESSAGE).min(batch.packing[op].input_ciphertexts());
        let ciphertexts = match batch.packing[op] {
            Packing::PerCoefficient { .. } => {
                let cols: Vec<Vec<u64>> = batch.masks[op]
                    .iter()
                    .map(|m| m[offset..end].to_vec())
                    .collect();
                let views: Vec<&[u64]> = cols.iter().map(|c| &c[..]).collect();
                self.key.encrypt(&views, end - offset)
            }
            ref packed => {
                let layout = packed.layout().ok_or_else(|| {
                    he_err(op as OpId, secinfer_he::HeError::Shape("no layout".into()))
                })?;
                let views: Vec<&[u64]> = batch.masks[op].iter().map(|m| &m[..]).collect();
                self.key.encrypt_blocks(layout, &views, offset..end)
            }
        }
        .map_err(|e| he_err(op as OpId, e))?;
        batch.cursor = (op, end);
        Ok(Some(MaskRequest {
            first_id: first,
            count: batch.count as u32,
            op: op as OpId,
            offset: offset as u32,
            layout: layout_tag(&batch.packing[op]),
            ciphertexts,
        }))
    }

    /// Takes a reply part; when it completes its batch, returns the batch's
    /// material (one per id, in id order) for the client session.
    pub fn accept(&mut self, reply: ProductReply) -> Result<Vec<ClientMaterial>, ProtocolError> {
        let op = reply.op;
        let first = reply.first_id;
        if op as usize >= self.layers.len() {
            return Err(ProtocolError::UnknownOp(op));
        }
        let batch = self
            .batches
            .get_mut(&first)
            .ok_or_else(|| ProtocolError::Unexpected {
                op,
                problem: format!("reply for batch {first}, which is not in flight"),
            })?;
        if reply.outputs.len() != reply.ciphertexts.len() {
            return Err(ProtocolError::Shape {
                op,
                problem: format!(
                    "{} output indices for {} ciphertexts",
                    reply.outputs.len(),
                    reply.ciphertexts.len()
                ),
            });
        }
        let packing = batch.packing[op as usize];
        let replies = packing.output_ciphertexts();
        let mut in_reply = std::collections::HashSet::with_capacity(reply.outputs.len());
        for &o in &reply.outputs {
            let o = o as usize;
            if o >= replies || batch.received[op as usize][o] || !in_reply.insert(o) {
                return Err(ProtocolError::Unexpected {
                    op,
                    problem: format!("reply ciphertext {o} is out of range or arrived twice"),
                });
            }
        }
        let products = &mut batch.products[op as usize];
        match packing {
            Packing::PerCoefficient { .. } => {
                let c = self
                    .key
                    .decrypt(&reply.ciphertexts, batch.count, reply.ciphertexts.len())
                    .map_err(|e| he_err(op, e))?;
                for (&o, col) in reply.outputs.iter().zip(&c) {
                    for (row, &v) in products.iter_mut().zip(col) {
                        row[o as usize] = v;
                    }
                }
            }
            ref packed => {
                let layout = packed
                    .layout()
                    .ok_or_else(|| he_err(op, secinfer_he::HeError::Shape("no layout".into())))?;
                let indices: Vec<usize> = reply.outputs.iter().map(|&k| k as usize).collect();
                let decrypted = self
                    .key
                    .decrypt_blocks(layout, &indices, &reply.ciphertexts)
                    .map_err(|e| he_err(op, e))?;
                for (&k, values) in reply.outputs.iter().zip(decrypted) {
                    for (kept, v) in layout.kept(k as usize).into_iter().zip(values) {
                        products[kept.inference][kept.output] = v;
                    }
                }
            }
        }
        for &o in &reply.outputs {
            batch.received[op as usize][o as usize] = true;
        }
        batch.done[op as usize] += reply.outputs.len();
        let complete = batch
            .done
            .iter()
            .zip(&batch.packing)
            .all(|(&d, p)| d == p.output_ciphertexts());
        if !complete {
            return Ok(Vec::new());
        }
        let batch = self
            .batches
            .remove(&first)
            .ok_or(ProtocolError::UnknownId(first))?;
        let mut per_op: Vec<_> = batch
            .masks
            .into_iter()
            .zip(batch.products)
            .map(|(r, c)| r.into_iter().zip(c))
            .collect();
        Ok((0..batch.count)
            .map(|b| ClientMaterial {
                id: PreprocessingId(first.0 + b as u64),
                ops: per_op
                    .iter_mut()
                    .map(|it| it.next().unwrap_or_default())
                    .collect(),
            })
            .collect())
    }

    /// Batches started and not yet complete.
    pub fn in_flight(&self) -> usize {
        self.batches.len()
    }

    /// Drops an unfinished batch (e.g. after the connection broke). Its ids
    /// are never handed out again.
    pub fn abandon(&mut self, first: PreprocessingId) {
        self.batches.remove(&first);
    }
}

/// How a batch of `count` inferences of op `spec` is laid out in
/// ciphertexts; both parties call this with the same public numbers.
pub fn packing_for(
    params: &HeParams,
    spec: &LayerSpec,
    count: usize,
) -> Result<Packing, ProtocolError> {
    match conv_dims(spec) {
        Some(dims) => Packing::choose_conv(params, &dims, count),
        None => Packing::choose(params, spec.input_len(), spec.output_len(), count),
    }
    .map_err(|e| he_err(spec.op_id, e))
}

/// The geometry of a 2-D convolution on one `[1, C, H, W]` sample, the form
/// the convolution packing takes; `None` for every other op.
fn conv_dims(spec: &LayerSpec) -> Option<ConvDims> {
    let LinearKind::Conv(g) = &spec.kind else {
        return None;
    };
    let (&[1, c, h, w], &[m, _, kh, kw]) = (&spec.input_shape[..], &spec.weight_shape[..]) else {
        return None;
    };
    if !spec.batched || g.strides.len() != 2 {
        return None;
    }
    let dims = ConvDims {
        channels: c,
        height: h,
        width: w,
        out_channels: m,
        kernel: [kh, kw],
        strides: [g.strides[0], g.strides[1]],
        dilations: [g.dilations[0], g.dilations[1]],
        pads: [
            g.pads_begin[0],
            g.pads_begin[1],
            g.pads_end[0],
            g.pads_end[1],
        ],
        group: g.group,
    };
    // the packing's output must be the op's output, element for element
    (dims.output_len() == spec.output_len() && dims.input_len() == spec.input_len()).then_some(dims)
}

/// Bytes of offline material (`r` and `c` of every op) one client batch may
/// hold; with [`secinfer_he::JOB_MEMORY_BYTES`] on the server's side it sets
/// [`max_batch`], so that memory on both sides follows the inferences in
/// flight, not the model's size times the ring degree.
pub const CLIENT_BATCH_BYTES: usize = 1 << 30;

/// The most inferences one offline batch of these ops may hold: at most the
/// ring degree, the client's material for it within [`CLIENT_BATCH_BYTES`],
/// and every op with a layout whose server job fits
/// [`secinfer_he::JOB_MEMORY_BYTES`]. An error (naming the op and the
/// estimate) if not even one inference fits.
pub fn max_batch(params: &HeParams, layers: &[LayerSpec]) -> Result<usize, ProtocolError> {
    let per: usize = layers
        .iter()
        .map(|l| 8 * (l.input_len() + l.output_len()))
        .sum();
    let fits = |count: usize| -> Result<(), ProtocolError> {
        layers
            .iter()
            .try_for_each(|spec| packing_for(params, spec, count).map(drop))
    };
    fits(1)?;
    // Larger batches need more of both, so the largest that fits is found by
    // bisection.
    let (mut lo, mut hi) = (
        1,
        params
            .degree()
            .min((CLIENT_BATCH_BYTES / per.max(1)).max(1)),
    );
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

/// The cost model's seconds for an offline batch of `count` inferences of
/// these ops (the sum of each op's [`Packing::estimated_seconds`]).
pub fn estimated_seconds(
    params: &HeParams,
    layers: &[LayerSpec],
    count: usize,
) -> Result<f64, ProtocolError> {
    layers.iter().try_fold(0.0, |sum, spec| {
        Ok(sum + packing_for(params, spec, count)?.estimated_seconds(params))
    })
}

/// The smallest offline batch (a power of two, at most [`max_batch`]) whose
/// estimated cost per inference is within 10 % of the best any batch size
/// reaches: larger batches buy almost nothing and only delay the first
/// answers and hold memory. Pools and `bench` refill in batches of this
/// size.
pub fn efficient_batch(params: &HeParams, layers: &[LayerSpec]) -> Result<usize, ProtocolError> {
    let max = max_batch(params, layers)?;
    let sizes: Vec<usize> = (0..=max.ilog2())
        .map(|e| 1usize << e)
        .chain((!max.is_power_of_two()).then_some(max))
        .collect();
    let per: Vec<(usize, f64)> = sizes
        .iter()
        .map(|&b| Ok((b, estimated_seconds(params, layers, b)? / b as f64)))
        .collect::<Result<_, ProtocolError>>()?;
    let best = per.iter().map(|&(_, c)| c).fold(f64::INFINITY, f64::min);
    Ok(per
        .iter()
        .find(|&&(_, c)| c <= 1.1 * best)
        .map_or(max, |&(b, _)| b))
}

/// A stable 64-bit tag of a packing (FNV-1a of its description), carried in
/// every [`MaskRequest`] so that both parties are known to lay the batch out
/// alike.
pub fn layout_tag(packing: &Packing) -> u64 {
    format!("{packing:?}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The HE parameters for a model: one ring for all ops.
pub fn params_for(layers: &[LayerSpec]) -> Result<HeParams, ProtocolError> {
    let bits = layers
        .first()
        .map(|s| s.ring_bits)
        .ok_or_else(|| ProtocolError::Model("the model has no SecureLinear op".into()))?;
    if let Some(s) = layers.iter().find(|s| s.ring_bits != bits) {
        return Err(ProtocolError::Model(format!(
            "op {} uses Z_2^{}, op 0 uses Z_2^{bits}; one ring per model",
            s.op_id, s.ring_bits
        )));
    }
    let params = HeParams::for_ring(bits).map_err(|e| ProtocolError::Model(e.to_string()))?;
    Ok(params)
}

pub(crate) fn he_err(op: OpId, e: secinfer_he::HeError) -> ProtocolError {
    ProtocolError::Offline {
        op,
        problem: e.to_string(),
    }
}

/// A policy for keeping a pool of ready material: start a batch of
/// `batch` inferences whenever fewer than `low_water` are ready and none is
/// in flight. The driver (bench, transport) asks it and runs the batches in
/// the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    /// inferences per preprocessing batch (at most the ring degree)
    pub batch: usize,
    /// refill when fewer than this many inferences are ready
    pub low_water: usize,
}

impl PoolPolicy {
    /// How many inferences to preprocess next, if any.
    pub fn next_batch(&self, ready: usize, in_flight: usize) -> Option<usize> {
        (in_flight == 0 && ready < self.low_water && self.batch > 0).then_some(self.batch)
    }
}
