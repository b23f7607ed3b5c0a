//! Private modes, pass B: prove every value's range, choose the scales, and
//! turn the draft into the final [`Program`].
//!
//! 1. **Intervals.** Starting from the input bound (the one value the client
//!    checks itself), every slot gets a real interval per element, pushed
//!    exactly through each step: a linear op maps `[lo, hi]` to
//!    `W·mid + b ± |W|·rad`, ReLU clamps at 0, pools take the max (or mean)
//!    of their window's bounds, reshapes move bounds with their elements.
//! 2. **Scales.** Each linear op gets the largest fractional bits for which
//!    the worst case over its input interval stays below `2^(k−2)` (one bit
//!    below the half range: the signed truncation needs it).
//! 3. **Truncations.** Right after a linear op (or a scaling step) the value
//!    is truncated to the scale its consumers need (the next linear op's
//!    input scale, followed back through ReLU, pooling and reshapes), so
//!    comparisons run on few bits; nothing is truncated on the way to a
//!    revealed output.
//! 4. **Comparison widths and a final check.** Each comparison gets the bits
//!    its input's proven range needs; every slot is checked to stay clear of
//!    the ring's wrap-around (a margin covers the fixed-point error), or the
//!    conversion fails naming the step.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use secinfer_model::{LayerSpec, LinearKind, Program, Reveal, Sign, Step, StepOp};

use crate::ConvertError;
use crate::extract::LinearLayer;
use crate::program::{Activation, Draft, DraftOp, is_index};
use crate::resolve::LayerShapes;
use crate::scale::{self, Quantised};

/// Relative margin on every proven bound, for the fixed-point error the
/// secure evaluation adds to the real value (orders of magnitude below 1 %
/// at the scales chosen: each layer's rounding error is below 2^-(f+1) of
/// its inputs' scale, times its weights' L1 norm).
const MARGIN: f64 = 1.01;
/// Absolute slack, in ring units, for truncation's and rounding's last-place errors.
const SLACK_UNITS: f64 = 16.0;
/// Extra fractional bits of a non-power-of-two constant factor (relative error 2^-16).
const FACTOR_BITS: i32 = 16;
/// Largest error of the Sigmoid approximation (piecewise linear, proven by
/// `secinfer_mpc::Spline::sigmoid`), and of Tanh's.
pub const SIGMOID_ERROR: f64 = 1e-3;
/// See [`SIGMOID_ERROR`].
pub const TANH_ERROR: f64 = 2e-3;
/// Fractional bits Sigmoid and Tanh are evaluated with at least.
const ACTIVATION_BITS: u32 = 12;
/// Fractional bits of LeakyRelu's slope.
const SLOPE_BITS: u32 = 16;

/// The spline a step evaluates for `a` on inputs with `f` fractional bits,
/// and its largest error.
pub fn spline(a: Activation, f: u32) -> Result<(secinfer_mpc::Spline, f64), String> {
    let e = |e: secinfer_mpc::MpcError| e.to_string();
    match a {
        Activation::Sigmoid => {
            let s = secinfer_mpc::Spline::sigmoid(f, SIGMOID_ERROR).map_err(e)?;
            Ok((s.spline, s.max_error))
        }
        Activation::Tanh => {
            let s = secinfer_mpc::Spline::tanh(f, TANH_ERROR).map_err(e)?;
            Ok((s.spline, s.max_error))
        }
        Activation::LeakyRelu(alpha) => Ok((
            secinfer_mpc::Spline::leaky_relu(alpha, SLOPE_BITS).map_err(e)?,
            // one unit of the truncation, and the slope's rounding over the range
            2f64.powi(-(f as i32)),
        )),
        Activation::Clip(lo, hi) => {
            let q = |v: f64, inf: i64| {
                if v.is_finite() {
                    (v * 2f64.powi(f as i32)).round() as i64
                } else {
                    inf
                }
            };
            Ok((
                secinfer_mpc::Spline::clip(q(lo, i64::MIN), q(hi, i64::MAX)).map_err(e)?,
                0.0,
            ))
        }
    }
}

/// Per-element real bounds of one sample of a slot.
#[derive(Debug, Clone)]
struct Interval {
    lo: ArrayD<f64>,
    hi: ArrayD<f64>,
}

impl Interval {
    fn max_abs(&self) -> f64 {
        self.lo
            .iter()
            .chain(self.hi.iter())
            .fold(0f64, |m, v| m.max(v.abs()))
    }

    fn map(
        &self,
        f: impl Fn(&ArrayD<f64>) -> Result<ArrayD<f64>, String>,
    ) -> Result<Interval, String> {
        Ok(Interval {
            lo: f(&self.lo)?,
            hi: f(&self.hi)?,
        })
    }
}

/// `W·x + b` in f64 on one sample, with the layer's resolved geometry.
fn linear_f64(
    kind: &LinearKind,
    w: &ArrayD<f64>,
    bias: &[f64],
    x: &ArrayD<f64>,
) -> Result<ArrayD<f64>, String> {
    let e = |e: secinfer_ring::RingError| e.to_string();
    let sh = |e: ndarray::ShapeError| e.to_string();
    let mut y = match kind {
        LinearKind::MatMul => {
            let k = w.shape()[0];
            let rows = x.len() / k.max(1);
            let x2 = x.view().into_shape_with_order((rows, k)).map_err(sh)?;
            let w2 = w
                .view()
                .into_shape_with_order((k, w.shape()[1]))
                .map_err(sh)?;
            let y = secinfer_ring::matmul(x2, w2).map_err(e)?;
            let mut shape = x.shape().to_vec();
            let last = shape.len() - 1;
            shape[last] = w.shape()[1];
            y.into_shape_with_order(IxDyn(&shape)).map_err(sh)?
        }
        LinearKind::LeftMatMul => {
            let (m, k) = (w.shape()[0], w.shape()[1]);
            let cols = x.shape()[x.ndim() - 1];
            let batches = x.len() / (k * cols).max(1);
            let x3 = x
                .view()
                .into_shape_with_order((batches, k, cols))
                .map_err(sh)?;
            let w2 = w.view().into_shape_with_order((m, k)).map_err(sh)?;
            let mut out = Vec::with_capacity(batches * m * cols);
            for b in 0..batches {
                out.extend(
                    secinfer_ring::matmul(w2.view(), x3.index_axis(Axis(0), b))
                        .map_err(e)?
                        .iter(),
                );
            }
            let mut shape = x.shape().to_vec();
            let at = shape.len() - 2;
            shape[at] = m;
            ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(sh)?
        }
        LinearKind::Conv(g) => secinfer_ring::conv(x.view(), w.view(), g).map_err(e)?,
        LinearKind::ConvTranspose {
            geometry,
            output_padding,
        } => secinfer_ring::conv_transpose(x.view(), w.view(), geometry, output_padding)
            .map_err(e)?,
    };
    let rank = y.ndim() as isize;
    let axis = kind.bias_axis();
    let axis = if axis < 0 { rank + axis } else { axis } as usize;
    for (j, mut lane) in y.axis_iter_mut(Axis(axis)).enumerate() {
        let b = bias.get(j).copied().unwrap_or(0.0);
        lane.mapv_inplace(|v| v + b);
    }
    Ok(y)
}

/// What pass B produces.
#[derive(Debug, Clone)]
pub struct Finalised {
    /// the program
    pub program: Program,
    /// the linear ops' specs, by op id (= extracted layer index)
    pub specs: Vec<LayerSpec>,
    /// their quantised weights and scale reports
    pub quantised: Vec<Quantised>,
}

/// Per linear op: its resolved shapes, and what calibration saw at its input.
pub struct LayerInput<'a> {
    /// resolved geometry and shapes
    pub shapes: &'a LayerShapes,
    /// typical |input| (rms), if calibrated
    pub typical: Option<f64>,
}

/// Pass B. `input_bounds` gives each program input tensor's bound.
pub fn finalise(
    draft: &Draft,
    layers: &[LinearLayer],
    inputs: &[LayerInput],
    input_bounds: &HashMap<String, (f32, f32)>,
    ring_bits: u32,
    reveal: Reveal,
) -> Result<Finalised, ConvertError> {
    let k = ring_bits;
    let step_err = |i: usize, problem: String| ConvertError::Scale {
        node: format!("step {i} ({})", draft.steps[i].source),
        problem,
    };

    // 1. Intervals, per draft slot.
    let mut iv: HashMap<&str, Interval> = HashMap::new();
    let mut quantised: Vec<Option<Quantised>> = vec![None; layers.len()];
    for (i, s) in draft.steps.iter().enumerate() {
        let bad = |p: String| step_err(i, p);
        let input = |j: usize| -> Result<&Interval, ConvertError> {
            s.inputs
                .get(j)
                .and_then(|n| iv.get(n.as_str()))
                .ok_or_else(|| bad(format!("input {j} has no bound")))
        };
        let sample = IxDyn(&s.shape);
        let out = match &s.op {
            DraftOp::Input { tensor } => {
                let (lo, hi) = *input_bounds
                    .get(tensor)
                    .ok_or_else(|| bad(format!("no range for input '{tensor}'")))?;
                Interval {
                    lo: ArrayD::from_elem(sample.clone(), f64::from(lo)),
                    hi: ArrayD::from_elem(sample, f64::from(hi)),
                }
            }
            DraftOp::Linear { layer } => {
                let x = input(0)?;
                let l = &layers[*layer];
                let shapes = inputs[*layer].shapes;
                let mid = (&x.lo + &x.hi) / 2.0;
                let rad = (&x.hi - &x.lo) / 2.0;
                let y_mid = linear_f64(&shapes.kind, &l.weight, &l.bias, &mid).map_err(&bad)?;
                let abs_w = l.weight.mapv(f64::abs);
                let y_rad = linear_f64(&shapes.kind, &abs_w, &[], &rad).map_err(&bad)?;
                // Scales for this op: the exact worst case over the input
                // interval (widened by the margin), with the quantised
                // weights and two units of error per input in the ring.
                let bound = x.max_abs() * MARGIN + 2f64.powi(-12);
                let typical = inputs[*layer]
                    .typical
                    .unwrap_or(bound / 8.0)
                    .clamp(bound / 4096.0, bound);
                // one bit below the half range for the signed truncation, and
                // room for the margin applied when the result is checked
                let limit = 2f64.powi(k as i32 - 2) / (1.05 * MARGIN);
                let rad_m = rad.mapv(|r| r * MARGIN + 2f64.powi(-12));
                let worst = |wq: &[i64], bq: &[i64], fa: u32| -> f64 {
                    let scale = 2f64.powi(fa as i32);
                    let w = ArrayD::from_shape_vec(
                        l.weight.raw_dim(),
                        wq.iter().map(|&v| v as f64).collect(),
                    );
                    let Ok(w) = w else { return f64::INFINITY };
                    let b: Vec<f64> = bq.iter().map(|&v| v as f64).collect();
                    let ym = linear_f64(&shapes.kind, &w, &b, &mid.mapv(|v| v * scale));
                    let yr = linear_f64(
                        &shapes.kind,
                        &w.mapv(f64::abs),
                        &[],
                        &rad_m.mapv(|r| r * scale + 2.0),
                    );
                    match (ym, yr) {
                        (Ok(ym), Ok(yr)) => {
                            ym.iter()
                                .zip(yr.iter())
                                .fold(0f64, |m, (a, r)| m.max(a.abs() + r))
                                + 1.0
                        }
                        _ => f64::INFINITY,
                    }
                };
                quantised[*layer] = Some(scale::choose_with(l, k, limit, bound, typical, &worst)?);
                Interval {
                    lo: &y_mid - &y_rad,
                    hi: &y_mid + &y_rad,
                }
            }
            DraftOp::Relu => {
                let x = input(0)?;
                Interval {
                    lo: x.lo.mapv(|v| v.max(0.0)),
                    hi: x.hi.mapv(|v| v.max(0.0)),
                }
            }
            DraftOp::MaxPool(g) => {
                let x = input(0)?;
                let (shape, cells) = g.windows(x.lo.shape()).map_err(&bad)?;
                let w = g.window();
                let pool = |a: &ArrayD<f64>| -> Result<ArrayD<f64>, String> {
                    let flat: Vec<f64> = a.iter().copied().collect();
                    let v = cells
                        .chunks(w)
                        .map(|c| {
                            c.iter()
                                .flatten()
                                .map(|&j| flat[j])
                                .fold(f64::NEG_INFINITY, f64::max)
                        })
                        .collect();
                    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string())
                };
                x.map(pool).map_err(&bad)?
            }
            DraftOp::AvgPool { geometry, divisor } => {
                let x = input(0)?;
                let d = *divisor as f64;
                match geometry {
                    Some(g) => {
                        let (shape, cells) = g.windows(x.lo.shape()).map_err(&bad)?;
                        let w = g.window();
                        let pool = |a: &ArrayD<f64>| -> Result<ArrayD<f64>, String> {
                            let flat: Vec<f64> = a.iter().copied().collect();
                            let v = cells
                                .chunks(w)
                                .map(|c| c.iter().flatten().map(|&j| flat[j]).sum::<f64>() / d)
                                .collect();
                            ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string())
                        };
                        x.map(pool).map_err(&bad)?
                    }
                    None => {
                        global(x, &s.shape, |lane| lane.iter().sum::<f64>() / d).map_err(&bad)?
                    }
                }
            }
            DraftOp::GlobalMaxPool => {
                let x = input(0)?;
                global(x, &s.shape, |lane| {
                    lane.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                })
                .map_err(&bad)?
            }
            DraftOp::Scale(f) => {
                let x = input(0)?;
                let (a, b) = (x.lo.mapv(|v| v * f), x.hi.mapv(|v| v * f));
                if *f >= 0.0 {
                    Interval { lo: a, hi: b }
                } else {
                    Interval { lo: b, hi: a }
                }
            }
            DraftOp::Add => {
                let (x, y) = (input(0)?, input(1)?);
                Interval {
                    lo: &x.lo + &y.lo,
                    hi: &x.hi + &y.hi,
                }
            }
            DraftOp::Sub => {
                let (x, y) = (input(0)?, input(1)?);
                Interval {
                    lo: &x.lo - &y.hi,
                    hi: &x.hi - &y.lo,
                }
            }
            DraftOp::Reshape => input(0)?
                .map(|a| {
                    ArrayD::from_shape_vec(sample.clone(), a.iter().copied().collect())
                        .map_err(|e| e.to_string())
                })
                .map_err(&bad)?,
            DraftOp::Transpose(perm) => input(0)?
                .map(|a| {
                    Ok(a.clone()
                        .permuted_axes(IxDyn(perm))
                        .as_standard_layout()
                        .into_owned())
                })
                .map_err(&bad)?,
            DraftOp::Concat(axis) => {
                let parts: Vec<&Interval> =
                    (0..s.inputs.len()).map(input).collect::<Result<_, _>>()?;
                let cat = |pick: fn(&Interval) -> &ArrayD<f64>| -> Result<ArrayD<f64>, String> {
                    let views: Vec<_> = parts.iter().map(|p| pick(p).view()).collect();
                    ndarray::concatenate(Axis(*axis), &views).map_err(|e| e.to_string())
                };
                Interval {
                    lo: cat(|p| &p.lo).map_err(&bad)?,
                    hi: cat(|p| &p.hi).map_err(&bad)?,
                }
            }
            DraftOp::Slice(starts, steps) => input(0)?
                .map(|a| {
                    let mut v = a.view();
                    for (ax, (&st, &sp)) in starts.iter().zip(steps).enumerate() {
                        let end = st + s.shape[ax].saturating_sub(1) * sp + 1;
                        v.slice_axis_inplace(
                            Axis(ax),
                            Slice::new(st as isize, Some(end as isize), sp as isize),
                        );
                    }
                    Ok(v.to_owned())
                })
                .map_err(&bad)?,
            DraftOp::Pad(begin, _) => input(0)?
                .map(|a| {
                    let mut out = ArrayD::zeros(sample.clone());
                    let mut v = out.view_mut();
                    for (ax, &b) in begin.iter().enumerate() {
                        v.slice_axis_inplace(Axis(ax), Slice::from(b..b + a.shape()[ax]));
                    }
                    v.assign(a);
                    Ok(out)
                })
                .map_err(&bad)?,
            DraftOp::Activation(a) => {
                let x = input(0)?;
                // the approximation's error widens the bounds a little
                let slack = match a {
                    Activation::Sigmoid => SIGMOID_ERROR,
                    Activation::Tanh => TANH_ERROR,
                    _ => 0.0,
                };
                let (lo, hi) = if a.monotone() {
                    (
                        x.lo.mapv(|v| a.eval(v) - slack),
                        x.hi.mapv(|v| a.eval(v) + slack),
                    )
                } else {
                    let mut lo = x.lo.clone();
                    let mut hi = x.hi.clone();
                    ndarray::Zip::from(&mut lo).and(&mut hi).for_each(|l, h| {
                        let mut ends = vec![a.eval(*l), a.eval(*h)];
                        if *l < 0.0 && *h > 0.0 {
                            ends.push(a.eval(0.0));
                        }
                        *l = ends.iter().copied().fold(f64::INFINITY, f64::min) - slack;
                        *h = ends.iter().copied().fold(f64::NEG_INFINITY, f64::max) + slack;
                    });
                    (lo, hi)
                };
                Interval { lo, hi }
            }
            DraftOp::ArgMax => {
                let m = input(0)?.lo.shape().last().copied().unwrap_or(1);
                Interval {
                    lo: ArrayD::zeros(sample.clone()),
                    hi: ArrayD::from_elem(sample, (m - 1) as f64),
                }
            }
            DraftOp::Reveal { .. } => input(0)?.clone(),
        };
        if out.lo.shape() != s.shape.as_slice() {
            return Err(bad(format!(
                "bounds have shape {:?}, the step {:?}",
                out.lo.shape(),
                s.shape
            )));
        }
        iv.insert(&s.output, out);
    }
    let quantised: Vec<Quantised> = quantised
        .into_iter()
        .enumerate()
        .map(|(l, q)| {
            q.ok_or_else(|| {
                ConvertError::Invalid(format!("linear layer {l} is not reached by the program"))
            })
        })
        .collect::<Result<_, _>>()?;

    // 2. Desired scales, backwards: what each slot's readers want.
    // A power-of-two average relabels the sum's scale (the division is
    // exact and free), so its input needs that many fewer bits. A constant
    // factor's own fractional bits are truncated away after it, so its
    // input wants what its output wants.
    let extra = |op: &DraftOp| -> u32 {
        match op {
            DraftOp::AvgPool { divisor, .. } if divisor.is_power_of_two() => {
                divisor.trailing_zeros()
            }
            _ => 0,
        }
    };
    let mut desired: HashMap<&str, u32> = HashMap::new();
    for s in draft.steps.iter().rev() {
        let want = match &s.op {
            DraftOp::Linear { layer } => Some(quantised[*layer].input_frac_bits),
            DraftOp::ArgMax | DraftOp::Reveal { .. } | DraftOp::Input { .. } => None,
            DraftOp::AvgPool { .. } | DraftOp::Scale(_) => desired
                .get(s.output.as_str())
                .map(|d| d.saturating_sub(extra(&s.op))),
            // smooth activations need enough input resolution to approximate
            DraftOp::Activation(Activation::Sigmoid | Activation::Tanh) => Some(
                desired
                    .get(s.output.as_str())
                    .copied()
                    .unwrap_or(ACTIVATION_BITS)
                    .max(ACTIVATION_BITS),
            ),
            _ => desired.get(s.output.as_str()).copied(),
        };
        if let Some(w) = want {
            for x in &s.inputs {
                let e = desired.entry(x.as_str()).or_insert(w);
                *e = (*e).min(w);
            }
        }
    }

    // 3. Forward: actual scales, truncations, comparison widths, final steps.
    let mut fw = Forward {
        iv: &iv,
        k,
        steps: Vec::new(),
        cur: HashMap::new(),
    };
    for (i, s) in draft.steps.iter().enumerate() {
        let bad = |p: String| step_err(i, p);
        let (f, nonneg) = match &s.op {
            DraftOp::Input { tensor } => {
                let f = desired.get(s.output.as_str()).copied().unwrap_or(16);
                let (lo, hi) = *input_bounds
                    .get(tensor)
                    .ok_or_else(|| bad(format!("no range for '{tensor}'")))?;
                let op = StepOp::Input {
                    tensor: tensor.clone(),
                    lo: secinfer_model::program::ordered::F32(lo),
                    hi: secinfer_model::program::ordered::F32(hi),
                };
                fw.push(s, op, vec![], &s.output, f);
                (f, false)
            }
            DraftOp::Linear { layer } => {
                let q = &quantised[*layer];
                let x = fw.rescale(&s.inputs[0], q.input_frac_bits, &s.source)?;
                let f = q.input_frac_bits + q.weight_frac_bits;
                fw.push(
                    s,
                    StepOp::Linear { op: *layer as u32 },
                    vec![x],
                    &s.output,
                    f,
                );
                (f, false)
            }
            DraftOp::Relu | DraftOp::MaxPool(_) | DraftOp::GlobalMaxPool | DraftOp::ArgMax => {
                let (x, f, nonneg) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let bits = fw.compare_bits(&s.inputs[0], f);
                let (op, out_f, out_nonneg) = match &s.op {
                    DraftOp::Relu => (StepOp::Relu { bits }, f, true),
                    DraftOp::MaxPool(g) => (
                        StepOp::MaxPool {
                            geometry: g.clone(),
                            bits,
                        },
                        f,
                        nonneg,
                    ),
                    DraftOp::GlobalMaxPool => (StepOp::GlobalMaxPool { bits }, f, nonneg),
                    _ => (StepOp::ArgMax { bits }, 0, true),
                };
                fw.push(s, op, vec![x], &s.output, out_f);
                (out_f, out_nonneg)
            }
            DraftOp::Activation(a) => {
                let (x, f, _) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let bits = fw.compare_bits(&s.inputs[0], f);
                let (spline, _) = spline(*a, f).map_err(&bad)?;
                let (lo, hi) = spline.value_range(bits);
                let limit = 1i128 << (k - 2);
                if lo <= -limit || hi >= limit {
                    return Err(bad(format!(
                        "{} on {bits}-bit inputs reaches 2^{:.1} units before its truncation, beyond Z_2^{k}'s range",
                        a.name(),
                        (lo.unsigned_abs().max(hi.unsigned_abs()) as f64).log2()
                    )));
                }
                let op = StepOp::Piecewise {
                    function: a.name().to_string(),
                    breaks: spline.breaks().to_vec(),
                    slopes: spline.slopes().to_vec(),
                    intercepts: spline.intercepts().to_vec(),
                    slope_frac_bits: spline.slope_frac_bits(),
                    bits,
                };
                fw.push(s, op, vec![x], &s.output, f);
                (f, false)
            }
            DraftOp::AvgPool { geometry, divisor } => {
                let (x, f, nonneg) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let sum = match geometry {
                    Some(g) => StepOp::SumPool {
                        geometry: g.clone(),
                    },
                    None => StepOp::GlobalSumPool,
                };
                if divisor.is_power_of_two() {
                    let f2 = f + divisor.trailing_zeros();
                    fw.push(s, sum, vec![x], &s.output, f2);
                    (f2, nonneg)
                } else {
                    let summed = format!("{}/sum", s.output);
                    fw.push(s, sum, vec![x], &summed, f);
                    let factor = (2f64.powi(FACTOR_BITS) / *divisor as f64).round() as i64;
                    let f2 = f + FACTOR_BITS as u32;
                    fw.push(s, StepOp::MulConst { factor }, vec![summed], &s.output, f2);
                    (f2, nonneg)
                }
            }
            DraftOp::Scale(c) => {
                let (x, f, nonneg) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let g = factor_bits(*c);
                let factor = (c * 2f64.powi(g as i32)).round() as i64;
                if factor == 0 {
                    return Err(bad(format!("the factor {c} rounds to zero")));
                }
                fw.push(s, StepOp::MulConst { factor }, vec![x], &s.output, f + g);
                (f + g, nonneg && factor > 0)
            }
            DraftOp::Add | DraftOp::Sub | DraftOp::Concat(_) => {
                let mut f = u32::MAX;
                let mut all_nonneg = true;
                for x in &s.inputs {
                    let (_, fx, nn) = fw.read(x).map_err(&bad)?;
                    f = f.min(fx);
                    all_nonneg &= nn;
                }
                let ins = s
                    .inputs
                    .iter()
                    .map(|x| fw.rescale(x, f, &s.source))
                    .collect::<Result<Vec<_>, _>>()?;
                // a truncated input may be one unit below zero
                let all_nonneg = all_nonneg
                    && s.inputs
                        .iter()
                        .all(|x| fw.cur.get(x.as_str()).is_some_and(|c| c.2));
                let op = match &s.op {
                    DraftOp::Add => StepOp::Add,
                    DraftOp::Sub => StepOp::Sub,
                    DraftOp::Concat(axis) => StepOp::Concat { axis: *axis },
                    _ => return Err(bad("internal: not a join".into())),
                };
                let nonneg = all_nonneg && !matches!(s.op, DraftOp::Sub);
                fw.push(s, op, ins, &s.output, f);
                (f, nonneg)
            }
            DraftOp::Reshape | DraftOp::Transpose(_) | DraftOp::Slice(..) | DraftOp::Pad(..) => {
                let (x, f, nonneg) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let op = match &s.op {
                    DraftOp::Reshape => StepOp::Reshape,
                    DraftOp::Transpose(p) => StepOp::Transpose { perm: p.clone() },
                    DraftOp::Slice(st, sp) => StepOp::Slice {
                        starts: st.clone(),
                        steps: sp.clone(),
                    },
                    DraftOp::Pad(b, e) => StepOp::Pad {
                        begin: b.clone(),
                        end: e.clone(),
                    },
                    _ => return Err(bad("internal: not a layout op".into())),
                };
                fw.push(s, op, vec![x], &s.output, f);
                (f, nonneg)
            }
            DraftOp::Reveal { .. } => {
                let (x, f, _) = fw.read(&s.inputs[0]).map_err(&bad)?;
                let f = if is_index(&draft.steps, &s.inputs[0]) {
                    0
                } else {
                    f
                };
                fw.push(s, StepOp::Reveal, vec![x], &s.output, f);
                continue;
            }
        };
        // The ring must never wrap.
        let m = fw.units(&s.output, f);
        if m >= 2f64.powi(k as i32 - 1) {
            return Err(bad(format!(
                "values of up to 2^{:.1} units at {f} fractional bits overflow Z_2^{k}",
                m.log2()
            )));
        }
        fw.cur
            .insert(s.output.clone(), (s.output.clone(), f, nonneg));
        if let Some(&d) = desired.get(s.output.as_str())
            && d < f
            && matches!(
                s.op,
                DraftOp::Linear { .. } | DraftOp::AvgPool { .. } | DraftOp::Scale(_)
            )
        {
            fw.rescale(&s.output, d, &s.source)?;
        }
    }
    let steps = fw.steps;
    let specs = layers
        .iter()
        .zip(inputs)
        .zip(&quantised)
        .enumerate()
        .map(|(id, ((l, inp), q))| {
            let shapes = inp.shapes;
            LayerSpec {
                op_id: id as u32,
                source_node: l.source_node.clone(),
                source_op: l.source_op.clone(),
                kind: shapes.kind.clone(),
                weight_shape: l.weight.shape().to_vec(),
                input_shape: shapes.input_shape.clone(),
                output_shape: shapes.output_shape.clone(),
                batched: draft.batched,
                ring_bits: k,
                input_frac_bits: q.input_frac_bits,
                weight_frac_bits: q.weight_frac_bits,
                input_bound: q_bound(q, shapes),
            }
        })
        .collect::<Vec<_>>();
    for spec in &specs {
        spec.validate()?;
    }
    let program = Program {
        reveal,
        batched: draft.batched,
        ring_bits: k,
        steps,
    };
    program.validate(&specs)?;
    Ok(Finalised {
        program,
        specs,
        quantised,
    })
}

/// The proven input bound recorded in the spec (informational in private
/// modes: nobody checks intermediate values at run time).
fn q_bound(q: &Quantised, _shapes: &LayerShapes) -> f32 {
    q.input_bound as f32
}

/// The forward pass's state: program steps so far, and for each draft slot
/// its current program slot, fractional bits, and whether it is exactly
/// non-negative in the ring (a ReLU output; not a truncation's, which can be
/// one unit below zero).
struct Forward<'a> {
    iv: &'a HashMap<&'a str, Interval>,
    k: u32,
    steps: Vec<Step>,
    cur: HashMap<String, (String, u32, bool)>,
}

impl Forward<'_> {
    fn read(&self, x: &str) -> Result<(String, u32, bool), String> {
        self.cur
            .get(x)
            .cloned()
            .ok_or_else(|| format!("slot '{x}' is read before it is written"))
    }

    /// Worst |value| of draft slot `x` in ring units at `f` fractional bits.
    fn units(&self, x: &str, f: u32) -> f64 {
        self.iv.get(x).map_or(f64::INFINITY, |iv| {
            iv.max_abs() * MARGIN * 2f64.powi(f as i32) + SLACK_UNITS
        })
    }

    /// Signed bits a comparison on slot `x` needs.
    fn compare_bits(&self, x: &str, f: u32) -> u32 {
        (self.units(x, f).log2().floor() as u32 + 2).max(2)
    }

    fn push(
        &mut self,
        s: &crate::program::DraftStep,
        op: StepOp,
        inputs: Vec<String>,
        output: &str,
        frac_bits: u32,
    ) {
        self.steps.push(Step {
            op,
            inputs,
            output: output.to_string(),
            shape: s.shape.clone(),
            frac_bits,
            source: s.source.clone(),
        });
    }

    /// Brings draft slot `x` to `f` fractional bits (a truncation or a
    /// shift); returns the program slot holding it.
    fn rescale(&mut self, x: &str, f: u32, source: &str) -> Result<String, ConvertError> {
        let k = self.k;
        let (slot, have, nonneg) = self
            .read(x)
            .map_err(|p| ConvertError::Invalid(format!("internal: {p}")))?;
        if have == f {
            return Ok(slot);
        }
        let shape = self
            .iv
            .get(x)
            .map(|iv| iv.lo.shape().to_vec())
            .unwrap_or_default();
        let op = if have > f {
            let shift = have - f;
            let sign = if nonneg {
                Sign::NonNegative
            } else {
                Sign::Signed
            };
            let m = self.units(x, have);
            let limit = match sign {
                Sign::Signed => 2f64.powi(k as i32 - 2),
                Sign::NonNegative => 2f64.powi(k as i32 - 1) - 2f64.powi(shift as i32),
            };
            if m >= limit {
                return Err(ConvertError::Scale {
                    node: source.to_string(),
                    problem: format!(
                        "a value of up to 2^{:.1} units cannot be truncated safely in Z_2^{k}",
                        m.log2()
                    ),
                });
            }
            StepOp::Truncate { shift, sign }
        } else {
            let m = self.units(x, f);
            if m >= 2f64.powi(k as i32 - 1) {
                return Err(ConvertError::Scale {
                    node: source.to_string(),
                    problem: format!(
                        "values of up to 2^{:.1} units at {f} fractional bits overflow Z_2^{k}",
                        m.log2()
                    ),
                });
            }
            StepOp::ShiftLeft { shift: f - have }
        };
        let name = format!("{slot}/f{f}");
        self.steps.push(Step {
            op,
            inputs: vec![slot],
            output: name.clone(),
            shape,
            frac_bits: f,
            source: source.to_string(),
        });
        self.cur.insert(x.to_string(), (name.clone(), f, false));
        Ok(name)
    }
}

/// Fractional bits given to a constant factor: none for a power of two ≥ 1
/// (an exact integer), else enough for 16 significant bits.
fn factor_bits(c: f64) -> u32 {
    let a = c.abs();
    if a >= 1.0 && a.fract() == 0.0 {
        0
    } else {
        (FACTOR_BITS - a.log2().floor() as i32).max(0) as u32
    }
}

/// Reduces each `[.., C, spatial...]` channel's spatial lanes to one value.
fn global(
    x: &Interval,
    out_shape: &[usize],
    f: impl Fn(&[f64]) -> f64,
) -> Result<Interval, String> {
    let shape = x.lo.shape();
    let lane: usize = shape[2.min(shape.len())..].iter().product();
    let reduce = |a: &ArrayD<f64>| -> Result<ArrayD<f64>, String> {
        let flat: Vec<f64> = a.iter().copied().collect();
        let v = flat.chunks(lane.max(1)).map(&f).collect();
        ArrayD::from_shape_vec(IxDyn(out_shape), v).map_err(|e| e.to_string())
    };
    x.map(reduce)
}
