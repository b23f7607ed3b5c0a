//! A SecureLinear op's weights as the HE offline phase applies them
//! ([`secinfer_he::LinearForm`]): centred signed weights, no bias, on any
//! number of independent samples stacked along axis 0, through the same ring
//! kernels the online op uses, here in exact integer `f64` arithmetic (the HE
//! side keeps every sum below `2^53`). Outputs are split into blocks (output columns,
//! channels or groups) so that the HE side can evaluate a big layer in parts.

use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD, Axis, CowArray, IxDyn, Slice};
use secinfer_he::LinearForm;
use secinfer_model::{LayerSpec, LinearKind};
use secinfer_ring::ConvGeometry;

/// Output columns (MatMul) or rows (LeftMatMul) per block.
const MATMUL_BLOCK: usize = 32;

/// One layer, ready for [`secinfer_he::evaluate`].
#[derive(Debug, Clone)]
pub struct HeLayer {
    spec: LayerSpec,
    /// the signed weights, exact in `f64` (each below `2^53`)
    w: ArrayD<f64>,
    fan_in: usize,
    max_row_sum: u128,
}

/// How the outputs of a layer split into blocks.
enum Blocking {
    /// block b = `unit` consecutive indices of `axis` of W
    Units { units: usize, per_block: usize },
    /// block b = group b of a grouped convolution
    Groups { groups: usize },
}

impl HeLayer {
    /// From the spec and the signed quantised weights (in `weight_shape`).
    pub fn new(spec: &LayerSpec, weights: &[i64]) -> Result<HeLayer, String> {
        let w = ArrayD::from_shape_vec(
            IxDyn(&spec.weight_shape),
            weights.iter().map(|&v| v as f64).collect(),
        )
        .map_err(|e| {
            format!(
                "op {}: weights do not match {:?}: {e}",
                spec.op_id, spec.weight_shape
            )
        })?;
        // The noise flooding's bound assumes centred weights, |w| <= t/2 with
        // t = 2^k (docs/offline.md); a model with larger ones is refused when
        // it is loaded, not flooded too little.
        let half_t = 1u64 << spec.ring_bits.clamp(1, 52).saturating_sub(1);
        if let Some(v) = weights.iter().find(|v| v.unsigned_abs() > half_t) {
            return Err(format!(
                "op {}: weight {v} is outside the centred range |w| <= 2^{} of Z_2^{} \
                 that the offline phase's noise flooding assumes",
                spec.op_id,
                spec.ring_bits.saturating_sub(1),
                spec.ring_bits
            ));
        }
        let abs = |v: f64| v.abs() as u128;
        let ws = &spec.weight_shape;
        let (fan_in, max_row_sum) = match &spec.kind {
            LinearKind::MatMul => (
                ws[0],
                w.axis_iter(Axis(1))
                    .map(|c| c.iter().map(|&v| abs(v)).sum::<u128>())
                    .max()
                    .unwrap_or(0),
            ),
            LinearKind::LeftMatMul => (
                ws[1],
                w.axis_iter(Axis(0))
                    .map(|r| r.iter().map(|&v| abs(v)).sum::<u128>())
                    .max()
                    .unwrap_or(0),
            ),
            LinearKind::Conv(_) => (
                ws[1..].iter().product(),
                w.axis_iter(Axis(0))
                    .map(|r| r.iter().map(|&v| abs(v)).sum::<u128>())
                    .max()
                    .unwrap_or(0),
            ),
            // Output channel m (within its group) sums over W[c, m, taps]; an
            // output cell sees at most C/group · Π k of them.
            LinearKind::ConvTranspose { .. } => (
                ws[0] * ws[2..].iter().product::<usize>(),
                w.axis_iter(Axis(1))
                    .map(|r| r.iter().map(|&v| abs(v)).sum::<u128>())
                    .max()
                    .unwrap_or(0),
            ),
        };
        Ok(HeLayer {
            spec: spec.clone(),
            w,
            fan_in: fan_in.max(1),
            max_row_sum,
        })
    }

    fn blocking(&self) -> Blocking {
        let ws = &self.spec.weight_shape;
        match &self.spec.kind {
            LinearKind::MatMul => Blocking::Units {
                units: ws[1],
                per_block: MATMUL_BLOCK,
            },
            LinearKind::LeftMatMul => Blocking::Units {
                units: ws[0],
                per_block: MATMUL_BLOCK,
            },
            LinearKind::Conv(g) if g.group == 1 => Blocking::Units {
                units: ws[0],
                per_block: 1,
            },
            LinearKind::ConvTranspose { geometry, .. } if geometry.group == 1 => Blocking::Units {
                units: ws[1],
                per_block: 1,
            },
            LinearKind::Conv(g) => Blocking::Groups { groups: g.group },
            LinearKind::ConvTranspose { geometry, .. } => Blocking::Groups {
                groups: geometry.group,
            },
        }
    }

    /// The units (columns, rows, output channels) blocks `r` cover.
    fn unit_range(&self, r: &Range<usize>) -> Range<usize> {
        match self.blocking() {
            Blocking::Units { units, per_block } => {
                (r.start * per_block).min(units)..(r.end * per_block).min(units)
            }
            Blocking::Groups { .. } => r.clone(),
        }
    }

    /// Per-sample output shape's leading part and the length of one unit's
    /// run: outputs are laid out `[outer, units, inner]`.
    fn output_layout(&self) -> (usize, usize, usize) {
        let out = &self.spec.output_shape;
        let total: usize = out.iter().product();
        match &self.spec.kind {
            LinearKind::MatMul => {
                let m = self.spec.weight_shape[1];
                (total / m.max(1), m, 1)
            }
            LinearKind::LeftMatMul => {
                let m = self.spec.weight_shape[0];
                let cols = *out.last().unwrap_or(&1);
                (total / (m * cols).max(1), m, cols)
            }
            LinearKind::Conv(_) | LinearKind::ConvTranspose { .. } => {
                let m = out[1];
                let inner: usize = out[2..].iter().product();
                (total / (m * inner).max(1), m, inner)
            }
        }
    }

    fn stacked_input_shape(&self, rows: usize) -> Vec<usize> {
        let mut s = self.spec.input_shape.clone();
        if s.is_empty() {
            s.push(rows);
        } else {
            s[0] *= rows;
        }
        s
    }

    fn apply(&self, blocks: Range<usize>, x: &[f64], rows: usize) -> Result<ArrayD<f64>, String> {
        let shape = self.stacked_input_shape(rows);
        let x = ArrayViewD::from_shape(IxDyn(&shape), x).map_err(|e| e.to_string())?;
        let err = |e: secinfer_ring::RingError| e.to_string();
        let units = self.unit_range(&blocks);
        match &self.spec.kind {
            LinearKind::MatMul => {
                let k = self.spec.weight_shape[0];
                let len = x.len();
                let x2 = x
                    .into_shape_with_order((len / k.max(1), k))
                    .map_err(|e| e.to_string())?;
                let w = self.w.slice_axis(Axis(1), Slice::from(units));
                let w2 = w
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| e.to_string())?;
                Ok(secinfer_ring::matmul(x2, w2).map_err(err)?.into_dyn())
            }
            LinearKind::LeftMatMul => {
                let k = self.spec.weight_shape[1];
                let cols = *self.spec.input_shape.last().unwrap_or(&1);
                let batches = x.len() / (k * cols).max(1);
                let x = x.to_owned();
                let x3 = x
                    .into_shape_with_order((batches, k, cols))
                    .map_err(|e| e.to_string())?;
                let w = self.w.slice_axis(Axis(0), Slice::from(units));
                let w2 = w
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| e.to_string())?;
                let mut out = Vec::with_capacity(batches * w2.nrows() * cols);
                for b in 0..batches {
                    let y =
                        secinfer_ring::matmul(w2.view(), x3.index_axis(Axis(0), b)).map_err(err)?;
                    out.extend(y.iter());
                }
                ArrayD::from_shape_vec(IxDyn(&[out.len()]), out).map_err(|e| e.to_string())
            }
            LinearKind::Conv(g) => {
                let (x, w, g) = self.group_slice(x, 0, g, &blocks, &units);
                secinfer_ring::conv(x.view(), w.view(), &g).map_err(err)
            }
            LinearKind::ConvTranspose {
                geometry,
                output_padding,
            } => {
                let (x, w, g) = self.group_slice(x, 1, geometry, &blocks, &units);
                secinfer_ring::conv_transpose(x.view(), w.view(), &g, output_padding).map_err(err)
            }
        }
    }

    /// Input channels, weights and geometry for a range of blocks of a
    /// convolution: output channels `units` (group 1; `out_axis` of W), or
    /// whole groups.
    fn group_slice<'a>(
        &'a self,
        x: ArrayViewD<'a, f64>,
        out_axis: usize,
        g: &ConvGeometry,
        blocks: &Range<usize>,
        units: &Range<usize>,
    ) -> (
        CowArray<'a, f64, IxDyn>,
        CowArray<'a, f64, IxDyn>,
        ConvGeometry,
    ) {
        if g.group == 1 {
            let w = self
                .w
                .slice_axis(Axis(out_axis), Slice::from(units.clone()));
            return (x.into(), w.into(), g.clone());
        }
        let c = x.shape()[1] / g.group;
        let xs = x.slice_axis(Axis(1), Slice::from(blocks.start * c..blocks.end * c));
        // W's axis 0 is output channels (Conv) or input channels (ConvTranspose);
        // either way groups are consecutive runs of it.
        let per = self.w.shape()[0] / g.group;
        let ws = self
            .w
            .slice_axis(Axis(0), Slice::from(blocks.start * per..blocks.end * per));
        let mut geom = g.clone();
        geom.group = blocks.len();
        (xs.to_owned().into(), ws.into(), geom)
    }
}

impl LinearForm for HeLayer {
    fn dense_weights(&self) -> Option<Vec<i64>> {
        // x·W with one row per sample: the dense matrix is W transposed
        let ws = &self.spec.weight_shape;
        match &self.spec.kind {
            LinearKind::MatMul
                if self.spec.input_len() == ws[0] && self.spec.output_len() == ws[1] =>
            {
                Some(self.w.t().iter().map(|&v| v as i64).collect())
            }
            _ => None,
        }
    }

    fn conv_weights(&self) -> Option<Vec<i64>> {
        match &self.spec.kind {
            // [M, C/group, kh, kw], exact integers (checked below 2^52 in `new`)
            LinearKind::Conv(g) if g.strides.len() == 2 => {
                Some(self.w.iter().map(|&v| v as i64).collect())
            }
            _ => None,
        }
    }

    fn input_len(&self) -> usize {
        self.spec.input_len()
    }

    fn output_len(&self) -> usize {
        self.spec.output_len()
    }

    fn fan_in(&self) -> usize {
        self.fan_in
    }

    fn max_abs_row_sum(&self) -> u128 {
        self.max_row_sum
    }

    fn blocks(&self) -> usize {
        match self.blocking() {
            Blocking::Units { units, per_block } => units.div_ceil(per_block),
            Blocking::Groups { groups } => groups,
        }
    }

    fn block_len(&self, block: usize) -> usize {
        self.outputs(block..block + 1).len()
    }

    fn outputs(&self, blocks: Range<usize>) -> Vec<usize> {
        let (outer, m, inner) = self.output_layout();
        let units = match self.blocking() {
            Blocking::Units { .. } => self.unit_range(&blocks),
            Blocking::Groups { groups } => {
                let per = m / groups.max(1);
                blocks.start * per..blocks.end * per
            }
        };
        let mut v = Vec::with_capacity(outer * units.len() * inner);
        for a in 0..outer {
            for u in units.clone() {
                for i in 0..inner {
                    v.push((a * m + u) * inner + i);
                }
            }
        }
        v
    }

    fn apply_blocks(
        &self,
        blocks: Range<usize>,
        x: &[f64],
        rows: usize,
    ) -> Result<Vec<f64>, String> {
        if x.len() != rows * self.input_len() {
            return Err(format!(
                "op {}: {} values for {rows} samples of {}",
                self.spec.op_id,
                x.len(),
                self.input_len()
            ));
        }
        let y = self.apply(blocks, x, rows)?;
        Ok(if y.is_standard_layout() {
            y.into_raw_vec_and_offset().0
        } else {
            y.iter().copied().collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ring_bits: u32) -> LayerSpec {
        LayerSpec {
            op_id: 0,
            source_node: "fc".into(),
            source_op: "Gemm".into(),
            kind: LinearKind::MatMul,
            weight_shape: vec![2, 2],
            input_shape: vec![1, 2],
            output_shape: vec![1, 2],
            batched: true,
            ring_bits,
            input_frac_bits: 8,
            weight_frac_bits: 8,
            input_bound: 1.0,
        }
    }

    #[test]
    fn weights_beyond_the_centred_range_are_refused_at_load() {
        let half = 1i64 << 36;
        assert!(HeLayer::new(&spec(37), &[half, -half, 0, 1]).is_ok());
        for w in [half + 1, -half - 1, i64::MAX, i64::MIN] {
            let e = HeLayer::new(&spec(37), &[0, w, 0, 0]).unwrap_err();
            assert!(e.contains("centred range"), "{e}");
        }
    }
}
