//! Pass 5: fixed-point scales with a worst-case no-overflow bound.
//!
//! Input x is encoded with `fa` fractional bits, weights with `fw`, bias with
//! `fa + fw`; the output `W·x + b` then has `fa + fw` fractional bits. For
//! |x| <= A (the layer's input bound) every output satisfies
//! |y| <= max_m (sum_k |Wq[m,k]|·ceil(A·2^fa) + |bq[m]|): the bound holds for
//! *any* input within A, whatever the signs. We take the largest `fa + fw`
//! for which that bound stays below 2^(k−1) (the centred range of Z_2^k)
//! and report the headroom left, in bits.
//!
//! The total is split to minimise the typical rounding error. Rounding
//! errors are independent and uniform, so an output's error variance is
//! (‖x‖²·2^-2fw + ‖w‖²·2^-2fa)/12 with x over one output's receptive field
//! (fan-in n): minimal when fw − fa = log2(‖x‖/‖w‖), with ‖x‖ ≈ √n·rms(x)
//! (rms from calibration, else assumed A/8) and ‖w‖ the rms row norm.

use crate::ConvertError;
use crate::extract::LinearLayer;

/// The chosen scales and the quantised weights.
#[derive(Debug, Clone)]
pub struct Quantised {
    /// fractional bits of the input
    pub input_frac_bits: u32,
    /// fractional bits of the weights
    pub weight_frac_bits: u32,
    /// weights, row-major in the layer's layout
    pub weight: Vec<i64>,
    /// bias at input_frac_bits + weight_frac_bits
    pub bias: Vec<i64>,
    /// log2 of the worst-case |output| in ring units
    pub bound_bits: f64,
    /// bits between the worst case and the ring's half range
    pub headroom_bits: f64,
    /// max over output features of sum |w| (real weights), for error bounds
    pub weight_l1_max: f64,
    /// max number of weights feeding one output feature
    pub fan_in: usize,
    /// the input bound the scales were chosen for
    pub input_bound: f64,
}

fn quantise(v: f64, frac: u32) -> Result<i64, String> {
    secinfer_ring::quantize(v, frac).map_err(|e| e.to_string())
}

/// Quantised weights and bias at `fw` and `fa + fw` fractional bits, or
/// None if they do not fit i64.
fn quantise_layer(layer: &LinearLayer, fa: u32, fw: u32) -> Option<(Vec<i64>, Vec<i64>)> {
    let wq: Vec<i64> = layer
        .weight
        .iter()
        .map(|&w| quantise(w, fw))
        .collect::<Result<_, _>>()
        .ok()?;
    let bq: Vec<i64> = layer
        .bias
        .iter()
        .map(|&b| quantise(b, fa + fw))
        .collect::<Result<_, _>>()
        .ok()?;
    Some((wq, bq))
}

/// Worst-case |output| in ring units of quantised weights for any input
/// with |x| <= `bound`: max over outputs of sum |Wq|·(ceil(A·2^fa) + 1) + |bq|.
fn l1_worst_case(
    layer: &LinearLayer,
    features: &[usize],
    wq: &[i64],
    bq: &[i64],
    fa: u32,
    bound: f64,
) -> f64 {
    let mut l1 = vec![0f64; layer.features()];
    for (w, &m) in wq.iter().zip(features) {
        l1[m] += (*w as f64).abs();
    }
    let xmax = (bound * 2f64.powi(fa as i32)).ceil() + 1.0;
    l1.iter()
        .zip(bq)
        .map(|(l, b)| l * xmax + (*b as f64).abs())
        .fold(0.0, f64::max)
}

/// Chooses scales for a layer in Z_2^`ring_bits` with inputs bounded by `input_bound`.
pub fn choose(
    layer: &LinearLayer,
    ring_bits: u32,
    input_bound: f64,
    typical_input: f64,
) -> Result<Quantised, ConvertError> {
    choose_below(
        layer,
        ring_bits,
        2f64.powi(ring_bits as i32 - 1),
        input_bound,
        typical_input,
    )
}

/// As [`choose`], with the worst case kept below `limit` ring units instead
/// of the half range (the private modes keep a bit free for truncation).
pub fn choose_below(
    layer: &LinearLayer,
    ring_bits: u32,
    limit: f64,
    input_bound: f64,
    typical_input: f64,
) -> Result<Quantised, ConvertError> {
    let features = layer.feature_of_weights();
    let worst =
        |wq: &[i64], bq: &[i64], fa: u32| l1_worst_case(layer, &features, wq, bq, fa, input_bound);
    choose_with(layer, ring_bits, limit, input_bound, typical_input, &worst)
}

/// A layer's worst case in ring units for quantised weights, quantised
/// bias and the input's fractional bits.
pub type WorstCase<'a> = &'a dyn Fn(&[i64], &[i64], u32) -> f64;

/// The scale search: the largest `fa + fw` whose worst case (in ring units,
/// as `worst(quantised weights, quantised bias, fa)` computes it) stays
/// strictly below `limit`, split between `fa` and `fw` to minimise the
/// typical rounding error. `input_bound` is the largest |input|.
pub fn choose_with(
    layer: &LinearLayer,
    ring_bits: u32,
    limit: f64,
    input_bound: f64,
    typical_input: f64,
    worst: WorstCase,
) -> Result<Quantised, ConvertError> {
    let features = layer.feature_of_weights();
    let mut l1 = vec![0f64; layer.features()];
    let mut l2 = vec![0f64; layer.features()];
    let mut count = vec![0usize; layer.features()];
    for (w, &m) in layer.weight.iter().zip(&features) {
        l1[m] += w.abs();
        l2[m] += w * w;
        count[m] += 1;
    }
    let fan_in = count.iter().copied().max().unwrap_or(0);
    let w_norm = (l2.iter().sum::<f64>() / l2.len().max(1) as f64).sqrt();
    let x_norm = (fan_in as f64).sqrt() * typical_input;
    let skew = if w_norm > 0.0 && x_norm > 0.0 {
        (x_norm / w_norm).log2().round() as i64
    } else {
        0
    };
    // Largest total first; each step costs one pass over the weights, and the
    // first candidate is usually right, so this stays cheap.
    for total in (2..=ring_bits.saturating_sub(2)).rev() {
        let fw = (total as i64 + skew)
            .div_euclid(2)
            .clamp(1, total as i64 - 1) as u32;
        let fa = total - fw;
        let Some((weight, bias)) = quantise_layer(layer, fa, fw) else {
            continue;
        };
        let worst = worst(&weight, &bias, fa);
        // Strictly below the half range, with one spare unit for the encoder's rounding.
        if worst + 1.0 < limit {
            let bound_bits = worst.max(1.0).log2();
            return Ok(Quantised {
                input_frac_bits: fa,
                weight_frac_bits: fw,
                weight,
                bias,
                bound_bits,
                headroom_bits: limit.log2() - bound_bits,
                weight_l1_max: l1.iter().copied().fold(0.0, f64::max),
                fan_in,
                input_bound,
            });
        }
    }
    Err(ConvertError::Scale {
        node: layer.source_node.clone(),
        problem: format!(
            "no fixed-point scale keeps |W·x + b| below 2^{:.1} for |x| <= {input_bound}: weights or bias too large for the ring",
            limit.log2()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::RawKind;
    use tract_onnx::tract_hir::internal::tract_ndarray::{ArrayD, IxDyn};

    fn dense(w: Vec<f64>, k: usize, m: usize, bias: Vec<f64>) -> LinearLayer {
        LinearLayer {
            node: 0,
            source_node: "fc".into(),
            source_op: "Gemm".into(),
            input: "x".into(),
            output: "y".into(),
            kind: RawKind::MatMul,
            weight: ArrayD::from_shape_vec(IxDyn(&[k, m]), w).unwrap(),
            bias,
            folded: vec![],
        }
    }

    #[test]
    fn bound_holds_for_the_worst_input() {
        let layer = dense(
            vec![0.75, -1.5, -0.25, 2.0, 0.5, -0.125],
            3,
            2,
            vec![3.0, -1.0],
        );
        let q = choose(&layer, 37, 8.0, 1.0).unwrap();
        // Evaluate the worst input exactly in i128: x = ±A at every position with the sign of w.
        let xa = (8.0 * 2f64.powi(q.input_frac_bits as i32)) as i128;
        for m in 0..2 {
            let y: i128 = (0..3)
                .map(|k| (q.weight[k * 2 + m] as i128).abs() * xa)
                .sum::<i128>()
                + (q.bias[m] as i128).abs();
            assert!(y < 1i128 << 36, "output {y} overflows the centred ring");
        }
        assert!(
            q.headroom_bits >= 0.0 && q.headroom_bits < 2.0,
            "scales leave {} bits unused",
            q.headroom_bits
        );
        assert!(q.input_frac_bits + q.weight_frac_bits > 20);
    }

    #[test]
    fn larger_inputs_get_fewer_fractional_bits() {
        let layer = dense(vec![1.0, 1.0], 2, 1, vec![0.0]);
        let small = choose(&layer, 37, 1.0, 0.125).unwrap();
        let large = choose(&layer, 37, 1024.0, 128.0).unwrap();
        assert_eq!(
            small.input_frac_bits + small.weight_frac_bits
                - (large.input_frac_bits + large.weight_frac_bits),
            10
        );
    }

    #[test]
    fn bits_go_where_rounding_hurts_most() {
        // Many small weights and large inputs: weight rounding dominates.
        let wide = dense(vec![0.01; 1024], 1024, 1, vec![0.0]);
        let q = choose(&wide, 37, 4.0, 1.0).unwrap();
        assert!(
            q.weight_frac_bits >= q.input_frac_bits + 5,
            "fa {} fw {}",
            q.input_frac_bits,
            q.weight_frac_bits
        );
        // One large weight and tiny inputs: input rounding dominates.
        let narrow = dense(vec![30.0], 1, 1, vec![0.0]);
        let q = choose(&narrow, 37, 1.0, 0.01).unwrap();
        assert!(
            q.input_frac_bits >= q.weight_frac_bits + 5,
            "fa {} fw {}",
            q.input_frac_bits,
            q.weight_frac_bits
        );
    }

    #[test]
    fn impossible_layers_are_refused() {
        let layer = dense(vec![1e12, 1.0], 2, 1, vec![0.0]);
        let e = choose(&layer, 37, 1e6, 1.0).unwrap_err().to_string();
        assert!(e.contains("fc") && e.contains("too large"), "{e}");
    }
}
