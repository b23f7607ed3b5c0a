//! ONNX `Conv` and `ConvTranspose` over a [`Scalar`] (wrapping `u64` on ring
//! tensors, or integer-valued `f64`).
//!
//! Both work per (batch item, group) "unit", whose output is a contiguous
//! slice of the result, so units run in parallel on the rayon pool when the
//! work is large. `conv` is im2col + [`gemm`](crate::matmul); `conv_transpose`
//! is a product of the transposed weights with the input, then a col2im
//! scatter-add in which the pads crop. Up to three spatial axes are handled
//! by treating missing leading axes as size 1.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::matmul::{PAR_MIN_MACS, contiguous, gemm, gemm_serial, shaped};
use crate::{RingError, Scalar};

/// Geometry attributes of an ONNX `Conv`/`ConvTranspose` node.
///
/// Each vector has one entry per spatial axis; an empty vector means the ONNX
/// default (strides and dilations 1, pads 0).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConvGeometry {
    /// Stride per spatial axis (`>= 1`).
    pub strides: Vec<usize>,
    /// Dilation per spatial axis (`>= 1`).
    pub dilations: Vec<usize>,
    /// Padding before each spatial axis (cropping for `ConvTranspose`).
    pub pads_begin: Vec<usize>,
    /// Padding after each spatial axis (cropping for `ConvTranspose`).
    pub pads_end: Vec<usize>,
    /// Number of groups (`>= 1`).
    pub group: usize,
}

impl ConvGeometry {
    /// Unit strides and dilations, no padding, one group, for `rank` spatial axes.
    pub fn identity(rank: usize) -> ConvGeometry {
        ConvGeometry {
            strides: vec![1; rank],
            dilations: vec![1; rank],
            pads_begin: vec![0; rank],
            pads_end: vec![0; rank],
            group: 1,
        }
    }
}

/// Largest number of spatial axes.
const MAX_R: usize = 3;

fn err<T>(msg: String) -> Result<T, RingError> {
    Err(RingError::InvalidConv(msg))
}

/// A validated convolution, spatial axes right-aligned in `[_; 3]` and
/// padded with size-1 axes in front.
#[derive(Debug)]
struct Plan {
    /// Number of real spatial axes.
    r: usize,
    n: usize,
    /// Input channels of `x` (all groups).
    c: usize,
    /// Output channels (all groups).
    m: usize,
    group: usize,
    cg: usize,
    mg: usize,
    /// Spatial dims of `x`.
    d: [usize; MAX_R],
    /// Kernel dims.
    k: [usize; MAX_R],
    s: [usize; MAX_R],
    dil: [usize; MAX_R],
    pb: [usize; MAX_R],
    /// Spatial dims of the output.
    o: [usize; MAX_R],
}

impl Plan {
    fn d_len(&self) -> usize {
        self.d.iter().product()
    }
    fn k_len(&self) -> usize {
        self.k.iter().product()
    }
    fn o_len(&self) -> usize {
        self.o.iter().product()
    }
    fn out_shape(&self) -> Vec<usize> {
        let mut v = vec![self.n, self.m];
        v.extend_from_slice(&self.o[MAX_R - self.r..]);
        v
    }
}

/// Right-aligns one geometry attribute (empty = `default` everywhere).
fn axis_param(
    op: &str,
    name: &str,
    v: &[usize],
    r: usize,
    default: usize,
    min: usize,
) -> Result<[usize; MAX_R], RingError> {
    let mut out = [if min == 0 { 0 } else { 1 }; MAX_R];
    if v.is_empty() {
        out[MAX_R - r..].fill(default);
        return Ok(out);
    }
    if v.len() != r {
        return err(format!(
            "{op} {name} has {} entries {v:?} but the input has {r} spatial axes",
            v.len()
        ));
    }
    if v.iter().any(|&e| e < min) {
        return err(format!("{op} {name} must all be >= {min}, got {v:?}"));
    }
    out[MAX_R - r..].copy_from_slice(v);
    Ok(out)
}

/// Common checks of ranks, kernel and geometry; returns `(r, s, dil, pb, pe, k, d)`.
#[allow(clippy::type_complexity)]
fn common(
    op: &str,
    x_shape: &[usize],
    w_shape: &[usize],
    g: &ConvGeometry,
) -> Result<
    (
        usize,
        [usize; MAX_R],
        [usize; MAX_R],
        [usize; MAX_R],
        [usize; MAX_R],
        [usize; MAX_R],
        [usize; MAX_R],
    ),
    RingError,
> {
    if x_shape.len() < 2 || x_shape.len() > 2 + MAX_R {
        return err(format!(
            "{op} input must have shape [N, C, d_1..d_r] with r <= {MAX_R}, got {x_shape:?}"
        ));
    }
    if w_shape.len() != x_shape.len() {
        return err(format!(
            "{op} weight has rank {} ({w_shape:?}) but input has rank {} ({x_shape:?})",
            w_shape.len(),
            x_shape.len()
        ));
    }
    if g.group == 0 {
        return err(format!("{op} group must be >= 1, got 0"));
    }
    let r = x_shape.len() - 2;
    let s = axis_param(op, "strides", &g.strides, r, 1, 1)?;
    let dil = axis_param(op, "dilations", &g.dilations, r, 1, 1)?;
    let pb = axis_param(op, "pads_begin", &g.pads_begin, r, 0, 0)?;
    let pe = axis_param(op, "pads_end", &g.pads_end, r, 0, 0)?;
    if w_shape[2..].contains(&0) {
        return err(format!(
            "{op} kernel has a zero-sized spatial axis: weight shape {w_shape:?}"
        ));
    }
    let mut k = [1; MAX_R];
    k[MAX_R - r..].copy_from_slice(&w_shape[2..]);
    let mut d = [1; MAX_R];
    d[MAX_R - r..].copy_from_slice(&x_shape[2..]);
    Ok((r, s, dil, pb, pe, k, d))
}

/// Checks that the element count of `shape` fits a `usize`.
fn check_size(op: &str, what: &str, shape: &[usize]) -> Result<usize, RingError> {
    shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| RingError::InvalidConv(format!("{op} {what} {shape:?} is too large")))
}

fn conv_plan(x_shape: &[usize], w_shape: &[usize], g: &ConvGeometry) -> Result<Plan, RingError> {
    let op = "conv";
    let (r, s, dil, pb, pe, k, d) = common(op, x_shape, w_shape, g)?;
    let (n, c, m, cg) = (x_shape[0], x_shape[1], w_shape[0], w_shape[1]);
    if cg.checked_mul(g.group) != Some(c) {
        return err(format!(
            "conv weight has {cg} input channels per group but input has {c} channels and group {}",
            g.group
        ));
    }
    if m % g.group != 0 {
        return err(format!(
            "conv weight has {m} output channels, not a multiple of group {}",
            g.group
        ));
    }
    let mut o = [1; MAX_R];
    for i in MAX_R - r..MAX_R {
        let ext = (k[i] as i128 - 1) * dil[i] as i128 + 1;
        let padded = d[i] as i128 + pb[i] as i128 + pe[i] as i128;
        let oi = (padded - ext).div_euclid(s[i] as i128) + 1;
        if padded < ext || oi < 1 {
            return err(format!(
                "conv spatial axis {}: dilated kernel extent {ext} exceeds padded input size {padded} \
                 (input {x_shape:?}, weight {w_shape:?})",
                i - (MAX_R - r)
            ));
        }
        o[i] = usize::try_from(oi)
            .map_err(|_| RingError::InvalidConv(format!("conv output size {oi} is too large")))?;
    }
    let plan = Plan {
        r,
        n,
        c,
        m,
        group: g.group,
        cg,
        mg: m / g.group,
        d,
        k,
        s,
        dil,
        pb,
        o,
    };
    check_size(op, "output", &plan.out_shape())?;
    check_size(op, "im2col buffer", &[cg, plan.k_len(), plan.o_len()])?;
    Ok(plan)
}

fn conv_transpose_plan(
    x_shape: &[usize],
    w_shape: &[usize],
    g: &ConvGeometry,
    output_padding: &[usize],
) -> Result<Plan, RingError> {
    let op = "conv_transpose";
    let (r, s, dil, pb, pe, k, d) = common(op, x_shape, w_shape, g)?;
    let op_pad = axis_param(op, "output_padding", output_padding, r, 0, 0)?;
    let (n, c, mg) = (x_shape[0], x_shape[1], w_shape[1]);
    if w_shape[0] != c {
        return err(format!(
            "conv_transpose weight has {} input channels but input has {c} channels",
            w_shape[0]
        ));
    }
    if c % g.group != 0 {
        return err(format!(
            "conv_transpose input has {c} channels, not a multiple of group {}",
            g.group
        ));
    }
    let m = mg.checked_mul(g.group).ok_or_else(|| {
        RingError::InvalidConv("conv_transpose output channel count overflows".to_string())
    })?;
    let mut o = [1; MAX_R];
    for i in MAX_R - r..MAX_R {
        let ext = (k[i] as i128 - 1) * dil[i] as i128 + 1;
        let oi = s[i] as i128 * (d[i] as i128 - 1) + op_pad[i] as i128 + ext
            - pb[i] as i128
            - pe[i] as i128;
        if oi < 1 {
            return err(format!(
                "conv_transpose spatial axis {}: output size {oi} < 1 (input {x_shape:?}, \
                 weight {w_shape:?}, pads crop too much)",
                i - (MAX_R - r)
            ));
        }
        o[i] = usize::try_from(oi).map_err(|_| {
            RingError::InvalidConv(format!("conv_transpose output size {oi} is too large"))
        })?;
    }
    let plan = Plan {
        r,
        n,
        c,
        m,
        group: g.group,
        cg: c / g.group,
        mg,
        d,
        k,
        s,
        dil,
        pb,
        o,
    };
    check_size(op, "output", &plan.out_shape())?;
    check_size(op, "column buffer", &[mg, plan.k_len(), plan.d_len()])?;
    Ok(plan)
}

/// Output shape `[N, M, o_1..o_r]` of [`conv`], or the error it would return.
pub fn conv_output_shape(
    x_shape: &[usize],
    w_shape: &[usize],
    g: &ConvGeometry,
) -> Result<Vec<usize>, RingError> {
    Ok(conv_plan(x_shape, w_shape, g)?.out_shape())
}

/// Output shape `[N, M, o_1..o_r]` of [`conv_transpose`], or the error it would return.
pub fn conv_transpose_output_shape(
    x_shape: &[usize],
    w_shape: &[usize],
    g: &ConvGeometry,
    output_padding: &[usize],
) -> Result<Vec<usize>, RingError> {
    Ok(conv_transpose_plan(x_shape, w_shape, g, output_padding)?.out_shape())
}

/// The `t` in `0..len` with `0 <= t * s + off < target`, as a range.
fn valid_range(len: usize, s: usize, off: i64, target: usize) -> (usize, usize) {
    let s = s as i64;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let room = target as i64 - off;
    let hi = if room <= 0 { 0 } else { (room + s - 1) / s };
    let hi = (hi.max(0) as usize).min(len);
    let lo = (lo as usize).min(hi);
    (lo, hi)
}

/// Fills `cols` (`[cg * KK, P]`) from one unit's input channels `xu` (`[cg, D]`).
fn im2col<T: Scalar>(p: &Plan, xu: &[T], cols: &mut [T]) {
    let [d1, d2, d3] = p.d;
    let [o1, o2, o3] = p.o;
    let [s1, s2, s3] = p.s;
    let (dl, ol) = (p.d_len(), p.o_len());
    if dl == 0 || ol == 0 {
        // An empty input is all padding.
        cols.fill(T::default());
        return;
    }
    let mut rows = cols.chunks_exact_mut(ol);
    for xc in xu.chunks_exact(dl).take(p.cg) {
        for k1 in 0..p.k[0] {
            let off1 = (k1 * p.dil[0]) as i64 - p.pb[0] as i64;
            let (a_lo, a_hi) = valid_range(o1, s1, off1, d1);
            for k2 in 0..p.k[1] {
                let off2 = (k2 * p.dil[1]) as i64 - p.pb[1] as i64;
                let (b_lo, b_hi) = valid_range(o2, s2, off2, d2);
                for k3 in 0..p.k[2] {
                    let off3 = (k3 * p.dil[2]) as i64 - p.pb[2] as i64;
                    let (c_lo, c_hi) = valid_range(o3, s3, off3, d3);
                    let Some(dst) = rows.next() else { return };
                    for (a, dst1) in dst.chunks_exact_mut(o2 * o3).enumerate() {
                        if a < a_lo || a >= a_hi {
                            dst1.fill(T::default());
                            continue;
                        }
                        let i1 = (a as i64 * s1 as i64 + off1) as usize;
                        for (b, dst2) in dst1.chunks_exact_mut(o3).enumerate() {
                            if b < b_lo || b >= b_hi {
                                dst2.fill(T::default());
                                continue;
                            }
                            let i2 = (b as i64 * s2 as i64 + off2) as usize;
                            let src = &xc[(i1 * d2 + i2) * d3..][..d3];
                            dst2[..c_lo].fill(T::default());
                            dst2[c_hi..].fill(T::default());
                            if c_lo < c_hi {
                                let first = (c_lo as i64 * s3 as i64 + off3) as usize;
                                if s3 == 1 {
                                    dst2[c_lo..c_hi]
                                        .copy_from_slice(&src[first..first + (c_hi - c_lo)]);
                                } else {
                                    for (dv, &sv) in dst2[c_lo..c_hi]
                                        .iter_mut()
                                        .zip(src[first..].iter().step_by(s3))
                                    {
                                        *dv = sv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds `cols` (`[mg * KK, D]`) into one unit's output (`[mg, O]`); input
/// position `i` and kernel position `k` land at `i * s + k * dil - pb`.
fn col2im<T: Scalar>(p: &Plan, cols: &[T], out: &mut [T]) {
    let [d1, d2, d3] = p.d;
    let [o1, o2, o3] = p.o;
    let [s1, s2, s3] = p.s;
    let (dl, ol) = (p.d_len(), p.o_len());
    if dl == 0 || ol == 0 {
        return;
    }
    let mut rows = cols.chunks_exact(dl);
    for out_m in out.chunks_exact_mut(ol).take(p.mg) {
        for k1 in 0..p.k[0] {
            let off1 = (k1 * p.dil[0]) as i64 - p.pb[0] as i64;
            let (a_lo, a_hi) = valid_range(d1, s1, off1, o1);
            for k2 in 0..p.k[1] {
                let off2 = (k2 * p.dil[1]) as i64 - p.pb[1] as i64;
                let (b_lo, b_hi) = valid_range(d2, s2, off2, o2);
                for k3 in 0..p.k[2] {
                    let off3 = (k3 * p.dil[2]) as i64 - p.pb[2] as i64;
                    let (c_lo, c_hi) = valid_range(d3, s3, off3, o3);
                    let Some(row) = rows.next() else { return };
                    if c_lo >= c_hi {
                        continue;
                    }
                    for a in a_lo..a_hi {
                        let q1 = (a as i64 * s1 as i64 + off1) as usize;
                        for b in b_lo..b_hi {
                            let q2 = (b as i64 * s2 as i64 + off2) as usize;
                            let src = &row[(a * d2 + b) * d3..][c_lo..c_hi];
                            let first = (c_lo as i64 * s3 as i64 + off3) as usize;
                            let dst = &mut out_m[(q1 * o2 + q2) * o3..][first..];
                            if s3 == 1 {
                                for (dv, &sv) in dst.iter_mut().zip(src) {
                                    *dv = dv.plus(sv);
                                }
                            } else {
                                for (dv, &sv) in dst.iter_mut().step_by(s3).zip(src) {
                                    *dv = dv.plus(sv);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether im2col would copy the input unchanged (1x1 kernel, stride 1, no pads).
fn is_pointwise(p: &Plan) -> bool {
    p.k_len() == 1 && p.s == [1; MAX_R] && p.pb == [0; MAX_R] && p.o == p.d
}

/// ONNX `Conv`: `x` `[N, C, d_1..d_r]`, `w` `[M, C/group, k_1..k_r]`, `r <= 3`
/// (`r = 0` is a grouped linear map `[N, C] -> [N, M]`), giving
/// `[N, M, o_1..o_r]` with `o_i = (d_i + pb_i + pe_i - ((k_i-1)*dil_i + 1)) / s_i + 1`.
///
/// Wrapping arithmetic modulo `2^64` for `u64`; for `f64`, exact while every
/// partial sum stays below `2^53`. Any memory layout is accepted.
/// Errors on inconsistent shapes or geometry, or when some `o_i < 1`.
pub fn conv<T: Scalar>(
    x: ArrayViewD<T>,
    w: ArrayViewD<T>,
    g: &ConvGeometry,
) -> Result<ArrayD<T>, RingError> {
    let p = conv_plan(x.shape(), w.shape(), g)?;
    let out_shape = p.out_shape();
    let (dl, kl, ol) = (p.d_len(), p.k_len(), p.o_len());
    let mut out = vec![T::default(); out_shape.iter().product()];
    if out.is_empty() || p.cg == 0 {
        return shaped(IxDyn(&out_shape), out);
    }
    let x = contiguous(&x);
    let w = contiguous(&w);
    let ck = p.cg * kl;

    if p.r == 0 {
        // out[:, group gi] = x[:, group gi] . w_gi^T, as one product per group.
        for gi in 0..p.group {
            let xg: Vec<T> = x
                .chunks_exact(p.c)
                .flat_map(|row| row[gi * p.cg..][..p.cg].iter().copied())
                .collect();
            let wg = &w[gi * p.mg * p.cg..][..p.mg * p.cg];
            let mut wt = vec![T::default(); p.cg * p.mg];
            for (j, wrow) in wg.chunks_exact(p.cg).enumerate() {
                for (c, &v) in wrow.iter().enumerate() {
                    wt[c * p.mg + j] = v;
                }
            }
            let mut og = vec![T::default(); p.n * p.mg];
            gemm(p.n, p.cg, p.mg, &xg, &wt, &mut og);
            for (orow, grow) in out.chunks_exact_mut(p.m).zip(og.chunks_exact(p.mg)) {
                orow[gi * p.mg..][..p.mg].copy_from_slice(grow);
            }
        }
        return shaped(IxDyn(&out_shape), out);
    }

    let pointwise = is_pointwise(&p);
    let unit = |u: usize, out_u: &mut [T], buf: &mut Vec<T>, parallel_gemm: bool| {
        let (n, gi) = (u / p.group, u % p.group);
        let xu = &x[(n * p.c + gi * p.cg) * dl..][..p.cg * dl];
        let wg = &w[gi * p.mg * ck..][..p.mg * ck];
        let cols: &[T] = if pointwise {
            xu
        } else {
            buf.resize(ck * ol, T::default());
            im2col(&p, xu, buf);
            buf
        };
        if parallel_gemm {
            gemm(p.mg, ck, ol, wg, cols, out_u);
        } else {
            gemm_serial(p.mg, ck, ol, wg, cols, ol, out_u);
        }
    };
    let units = p.n * p.group;
    let macs = out.len().saturating_mul(ck);
    if units >= 2 && macs >= PAR_MIN_MACS && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(p.mg * ol)
            .enumerate()
            .for_each_init(Vec::new, |buf, (u, out_u)| unit(u, out_u, buf, false));
    } else {
        let mut buf = Vec::new();
        for (u, out_u) in out.chunks_exact_mut(p.mg * ol).enumerate() {
            unit(u, out_u, &mut buf, true);
        }
    }
    shaped(IxDyn(&out_shape), out)
}

/// ONNX `ConvTranspose`: `x` `[N, C, d_1..d_r]`, `w` `[C, M/group, k_1..k_r]`,
/// giving `[N, M, o_1..o_r]` with
/// `o_i = s_i*(d_i-1) + output_padding_i + ((k_i-1)*dil_i + 1) - pb_i - pe_i`
/// (the pads crop). `output_padding` has one entry per spatial axis, or is
/// empty for zeros.
///
/// Wrapping arithmetic modulo `2^64` for `u64`; for `f64`, exact while every
/// partial sum stays below `2^53`. Any memory layout is accepted.
/// Errors on inconsistent shapes or geometry, or when some `o_i < 1`.
pub fn conv_transpose<T: Scalar>(
    x: ArrayViewD<T>,
    w: ArrayViewD<T>,
    g: &ConvGeometry,
    output_padding: &[usize],
) -> Result<ArrayD<T>, RingError> {
    let p = conv_transpose_plan(x.shape(), w.shape(), g, output_padding)?;
    let out_shape = p.out_shape();
    let (dl, kl, ol) = (p.d_len(), p.k_len(), p.o_len());
    let mut out = vec![T::default(); out_shape.iter().product()];
    if out.is_empty() || p.cg == 0 {
        return shaped(IxDyn(&out_shape), out);
    }
    let x = contiguous(&x);
    let w = contiguous(&w);
    // Per group, w_g is [cg, mg * KK]; store its transpose [mg * KK, cg].
    let mk = p.mg * kl;
    let mut wt = vec![T::default(); p.group * mk * p.cg];
    for (gi, wtg) in wt.chunks_exact_mut(mk * p.cg).enumerate() {
        let wg = &w[gi * p.cg * mk..][..p.cg * mk];
        for (c, wrow) in wg.chunks_exact(mk).enumerate() {
            for (j, &v) in wrow.iter().enumerate() {
                wtg[j * p.cg + c] = v;
            }
        }
    }
    let unit = |u: usize, out_u: &mut [T], buf: &mut Vec<T>, parallel_gemm: bool| {
        let (n, gi) = (u / p.group, u % p.group);
        let xu = &x[(n * p.c + gi * p.cg) * dl..][..p.cg * dl];
        let wtg = &wt[gi * mk * p.cg..][..mk * p.cg];
        buf.clear();
        buf.resize(mk * dl, T::default());
        if parallel_gemm {
            gemm(mk, p.cg, dl, wtg, xu, buf);
        } else {
            gemm_serial(mk, p.cg, dl, wtg, xu, dl, buf);
        }
        col2im(&p, buf, out_u);
    };
    let units = p.n * p.group;
    let macs = (p.n * p.group).saturating_mul(mk).saturating_mul(p.cg * dl);
    if units >= 2 && macs >= PAR_MIN_MACS && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(p.mg * ol)
            .enumerate()
            .for_each_init(Vec::new, |buf, (u, out_u)| unit(u, out_u, buf, false));
    } else {
        let mut buf = Vec::new();
        for (u, out_u) in out.chunks_exact_mut(p.mg * ol).enumerate() {
            unit(u, out_u, &mut buf, true);
        }
    }
    shaped(IxDyn(&out_shape), out)
}

#[cfg(test)]
mod tests;
