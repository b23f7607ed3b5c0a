//! A trusted dealer that computes the offline material in the clear.
//!
//! **Insecure by construction**: it sees the client's masks `r` and the
//! server's weights and shares at once. It exists only in this crate's unit
//! tests (`cfg(test)`), to test the online protocol apart from the HE phase.

use ndarray::{ArrayD, Axis, IxDyn};
use rand::rngs::{ChaCha20Rng, SysRng};
use rand::{Rng, SeedableRng};

use crate::ProtocolError;
use crate::messages::{ClientMaterial, PreprocessingId, ServerMaterial};
use crate::server::MaskedLinear;

/// One inference's material for one op: (r, c = W·r − s, s).
type Triple = (Vec<u64>, Vec<u64>, Vec<u64>);

/// Computes `(r, W·r − s)` for the client and `s` for the server, in one
/// process that sees everything. Not for production; see the module docs.
pub struct InsecureLocalDealer {
    rng: ChaCha20Rng,
    next_id: u64,
}

impl InsecureLocalDealer {
    /// A dealer seeded from the operating system's CSPRNG.
    pub fn new() -> Result<Self, ProtocolError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng)
            .map_err(|e| ProtocolError::Model(format!("OS randomness unavailable: {e}")))?;
        Ok(InsecureLocalDealer { rng, next_id: 0 })
    }

    /// Material for `count` inferences of the model `linear`, ids fresh.
    pub fn deal<L: MaskedLinear + ?Sized>(
        &mut self,
        linear: &L,
        count: usize,
    ) -> Result<Vec<(ClientMaterial, ServerMaterial)>, ProtocolError> {
        let layers = linear.layers();
        // Per op, per inference: (r, c, s).
        let mut per_op: Vec<Vec<Triple>> = Vec::with_capacity(layers.len());
        for spec in layers {
            let op = spec.op_id;
            let ring = spec
                .ring()
                .map_err(|e| ProtocolError::Model(e.to_string()))?;
            let eval = |x: ArrayD<u64>| {
                linear
                    .evaluate(op, x)
                    .map_err(|problem| ProtocolError::Evaluation { op, problem })
            };
            // W·r = (W·r + b) − (W·0 + b): the evaluator only offers the affine map.
            let bias_only = eval(ArrayD::zeros(IxDyn(&spec.input_shape)))?;
            let batch = if spec.batched { count } else { 1 };
            let mut items = Vec::with_capacity(count);
            let mut done = 0;
            while done < count {
                let n = batch.min(count - done);
                let shape = spec.batch_input_shape(n);
                let r: Vec<u64> = (0..shape.iter().product::<usize>())
                    .map(|_| ring.reduce(self.rng.next_u64()))
                    .collect();
                let rt = ArrayD::from_shape_vec(IxDyn(&shape), r.clone()).map_err(|e| {
                    ProtocolError::Shape {
                        op,
                        problem: e.to_string(),
                    }
                })?;
                let wr_b = eval(rt)?;
                for (i, wr_b) in wr_b
                    .axis_chunks_iter(Axis(0), wr_b.len_of(Axis(0)) / n)
                    .enumerate()
                {
                    let s: Vec<u64> = (0..spec.output_len())
                        .map(|_| ring.reduce(self.rng.next_u64()))
                        .collect();
                    let c: Vec<u64> = wr_b
                        .iter()
                        .zip(bias_only.iter())
                        .zip(&s)
                        .map(|((v, b), s)| ring.reduce(v.wrapping_sub(*b).wrapping_sub(*s)))
                        .collect();
                    let len = spec.input_len();
                    items.push((r[i * len..(i + 1) * len].to_vec(), c, s));
                }
                done += n;
            }
            per_op.push(items);
        }
        let mut out = Vec::with_capacity(count);
        let mut iters: Vec<_> = per_op.into_iter().map(Vec::into_iter).collect();
        for _ in 0..count {
            let id = PreprocessingId(self.next_id);
            self.next_id += 1;
            let mut client = Vec::with_capacity(iters.len());
            let mut server = Vec::with_capacity(iters.len());
            for it in iters.iter_mut() {
                let (r, c, s) = it.next().ok_or_else(|| {
                    ProtocolError::Model("dealer produced too little material".into())
                })?;
                client.push((r, c));
                server.push(s);
            }
            out.push((
                ClientMaterial { id, ops: client },
                ServerMaterial { id, ops: server },
            ));
        }
        Ok(out)
    }
}
