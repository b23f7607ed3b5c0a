//! The server's session: holds `s` per (id, op) and answers masked inputs.

use std::sync::Arc;

use secinfer_model::LayerSpec;
use secinfer_ring::RingTensor;

use crate::ProtocolError;
use crate::messages::{MaskedInput, MaskedOutput, OpId, ServerMaterial, WireTensor};
use crate::store::SingleUseStore;

/// The server's linear layers: `W·x + b` in Z_2^k for a batch of samples.
/// Implemented by the tract plugin (`secinfer-tract-ext`), which runs the
/// SecureLinear ops of `server.onnx`.
pub trait MaskedLinear: Send + Sync {
    /// The ops, indexed by op id.
    fn layers(&self) -> &[LayerSpec];
    /// `W·x + b mod 2^k`; `x` has the op's input shape with any batch size.
    fn evaluate(&self, op: OpId, x: RingTensor) -> Result<RingTensor, String>;
}

/// One client's session on the server. Not thread-safe by itself: the
/// transport gives each connection its own session.
pub struct ServerSession<L: MaskedLinear + ?Sized> {
    linear: Arc<L>,
    store: SingleUseStore<Vec<u64>>,
}

impl<L: MaskedLinear + ?Sized> ServerSession<L> {
    /// A session with no material.
    pub fn new(linear: Arc<L>) -> Self {
        ServerSession {
            linear,
            store: SingleUseStore::new(),
        }
    }

    /// Files the server's share `s` of one inference's material.
    pub fn accept_preprocessing(&mut self, m: ServerMaterial) -> Result<(), ProtocolError> {
        let layers = self.linear.layers();
        if m.ops.len() != layers.len() {
            return Err(ProtocolError::Model(format!(
                "material {} has {} ops, model has {}",
                m.id,
                m.ops.len(),
                layers.len()
            )));
        }
        for (spec, s) in layers.iter().zip(&m.ops) {
            if s.len() != spec.output_len() {
                return Err(ProtocolError::Shape {
                    op: spec.op_id,
                    problem: format!(
                        "share has {} elements, output has {}",
                        s.len(),
                        spec.output_len()
                    ),
                });
            }
        }
        self.store.insert(m.id, m.ops)
    }

    /// Number of inferences whose material is (at least partly) unused.
    pub fn pending_material(&self) -> usize {
        self.store.live()
    }

    /// Answers `x − r` with `W·(x − r) + b + s`. The request is checked whole
    /// (op, ids, shape, ring) before any material is consumed.
    pub fn handle(&mut self, req: MaskedInput) -> Result<MaskedOutput, ProtocolError> {
        let op = req.op;
        let (spec, ring) = crate::op_spec(self.linear.layers(), op)?;
        let x = req.masked.into_tensor(op)?;
        let n = spec
            .samples_in_input(x.shape())
            .map_err(|problem| ProtocolError::Shape { op, problem })?;
        if n != req.ids.len() {
            return Err(ProtocolError::Shape {
                op,
                problem: format!("{n} samples but {} preprocessing ids", req.ids.len()),
            });
        }
        check_ring(op, ring.bits(), x.iter())?;
        self.store.check(&req.ids, op)?;
        let expected = spec.batch_output_shape(n);
        let mut y = self
            .linear
            .evaluate(op, x)
            .map_err(|problem| ProtocolError::Evaluation { op, problem })?;
        if y.shape() != expected.as_slice() {
            return Err(ProtocolError::Evaluation {
                op,
                problem: format!("produced shape {:?}, expected {:?}", y.shape(), expected),
            });
        }
        let shares = self.store.take(&req.ids, op)?;
        let out_len = spec.output_len();
        let flat = y.as_slice_mut().ok_or_else(|| ProtocolError::Evaluation {
            op,
            problem: "output not contiguous".into(),
        })?;
        for (chunk, s) in flat.chunks_mut(out_len).zip(&shares) {
            for (v, s) in chunk.iter_mut().zip(s) {
                *v = ring.reduce(v.wrapping_add(*s));
            }
        }
        Ok(MaskedOutput {
            op,
            ids: req.ids,
            masked: WireTensor::from_tensor(y),
        })
    }
}

pub(crate) fn check_ring<'a>(
    op: OpId,
    bits: u32,
    values: impl Iterator<Item = &'a u64>,
) -> Result<(), ProtocolError> {
    if bits >= 64 {
        return Ok(());
    }
    for (index, &value) in values.enumerate() {
        if value >> bits != 0 {
            return Err(ProtocolError::NotInRing {
                op,
                index,
                value,
                bits,
            });
        }
    }
    Ok(())
}
