//! The local steps of a program: operations on one party's shares that need
//! no communication, because they are linear with public coefficients
//! (sums, public factors, shifts) or only move elements (reshape, transpose,
//! slice, concat, zero padding). Both parties apply the same operation to
//! their own shares, so the shares still add up to the result. Every result
//! is reduced modulo `2^k`. Also here: gathering the windows of a max pool
//! into the group layout the joint max works on.

use ndarray::{ArrayD, Axis, IxDyn, Slice};
use secinfer_model::PoolGeometry;
use secinfer_ring::{Ring, RingTensor};

/// Per-sample window cells of a pool over a batch: the flat input index of
/// every cell of every window, sample after sample (`None`: padding).
fn batch_windows(
    g: &PoolGeometry,
    x_shape: &[usize],
) -> Result<(Vec<usize>, Vec<Option<usize>>), String> {
    let n = x_shape.first().copied().unwrap_or(1);
    let mut sample = x_shape.to_vec();
    sample[0] = 1;
    let (mut out, cells) = g.windows(&sample)?;
    let stride: usize = sample.iter().product();
    let mut all = Vec::with_capacity(cells.len() * n);
    for b in 0..n {
        all.extend(cells.iter().map(|c| c.map(|i| b * stride + i)));
    }
    out[0] = n;
    Ok((out, all))
}

/// The values of every pool window, window after window, ready for a
/// group-wise max: a padding cell repeats a real cell of its window, which
/// leaves the maximum unchanged. Returns the output shape too.
pub fn gather_windows(x: &RingTensor, g: &PoolGeometry) -> Result<(Vec<usize>, Vec<u64>), String> {
    let (out, cells) = batch_windows(g, x.shape())?;
    let flat = flat(x);
    let w = g.window();
    let mut v = Vec::with_capacity(cells.len());
    for window in cells.chunks(w) {
        let first = window
            .iter()
            .flatten()
            .next()
            .ok_or("a pooling window holds no cell of the input")?;
        v.extend(window.iter().map(|c| flat[c.unwrap_or(*first)]));
    }
    Ok((out, v))
}

/// Sum of every window (padding counts as zero).
pub fn sum_pool(ring: Ring, x: &RingTensor, g: &PoolGeometry) -> Result<RingTensor, String> {
    let (out, cells) = batch_windows(g, x.shape())?;
    let flat = flat(x);
    let v = cells
        .chunks(g.window())
        .map(|w| {
            ring.reduce(
                w.iter()
                    .flatten()
                    .fold(0u64, |s, &i| s.wrapping_add(flat[i])),
            )
        })
        .collect();
    tensor(&out, v)
}

/// Sum over the spatial axes of `[N, C, spatial...]`, keeping them as size 1.
pub fn global_sum(ring: Ring, x: &RingTensor) -> Result<RingTensor, String> {
    let (out, lane) = global_shape(x.shape())?;
    let v = flat(x)
        .chunks(lane)
        .map(|c| ring.reduce(c.iter().fold(0u64, |s, &v| s.wrapping_add(v))))
        .collect();
    tensor(&out, v)
}

/// Output shape and lane length of a global pool.
pub fn global_shape(shape: &[usize]) -> Result<(Vec<usize>, usize), String> {
    if shape.len() < 3 {
        return Err(format!(
            "global pooling needs [N, C, spatial...], got {shape:?}"
        ));
    }
    let lane = shape[2..].iter().product::<usize>().max(1);
    let mut out = shape.to_vec();
    out[2..].iter_mut().for_each(|d| *d = 1);
    Ok((out, lane))
}

/// Elementwise `a + b` or `a − b`.
pub fn add(
    ring: Ring,
    a: &RingTensor,
    b: &RingTensor,
    subtract: bool,
) -> Result<RingTensor, String> {
    if a.shape() != b.shape() {
        return Err(format!("shapes {:?} and {:?} differ", a.shape(), b.shape()));
    }
    let mut out = a.clone();
    ndarray::Zip::from(&mut out).and(b).for_each(|x, &y| {
        *x = ring.reduce(if subtract {
            x.wrapping_sub(y)
        } else {
            x.wrapping_add(y)
        })
    });
    Ok(out)
}

/// Every element times a public integer.
pub fn mul_const(ring: Ring, x: &RingTensor, factor: i64) -> RingTensor {
    let f = factor as u64;
    x.mapv(|v| ring.reduce(v.wrapping_mul(f)))
}

/// Same elements (row-major), new shape.
pub fn reshape(x: RingTensor, shape: &[usize]) -> Result<RingTensor, String> {
    let v = flat(&x);
    tensor(shape, v)
}

/// Axes permuted.
pub fn transpose(x: &RingTensor, perm: &[usize]) -> Result<RingTensor, String> {
    if perm.len() != x.ndim() {
        return Err(format!(
            "permutation {perm:?} of a rank-{} tensor",
            x.ndim()
        ));
    }
    Ok(x.view()
        .permuted_axes(IxDyn(perm))
        .as_standard_layout()
        .into_owned())
}

/// Inputs joined along `axis`.
pub fn concat(xs: &[&RingTensor], axis: usize) -> Result<RingTensor, String> {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    ndarray::concatenate(Axis(axis), &views)
        .map(|t| t.as_standard_layout().into_owned())
        .map_err(|e| e.to_string())
}

/// A strided window per axis: `shape[a]` elements from `starts[a]`, every `steps[a]`.
pub fn slice(
    x: &RingTensor,
    starts: &[usize],
    steps: &[usize],
    shape: &[usize],
) -> Result<RingTensor, String> {
    if starts.len() != x.ndim() || steps.len() != x.ndim() || shape.len() != x.ndim() {
        return Err("slice parameters do not match the tensor's rank".into());
    }
    let mut v = x.view();
    for a in 0..x.ndim() {
        let end = starts[a] + shape[a].saturating_sub(1) * steps[a] + 1;
        if shape[a] > 0 && end > x.shape()[a] {
            return Err(format!(
                "slice of axis {a} runs past its {} elements",
                x.shape()[a]
            ));
        }
        v.slice_axis_inplace(
            Axis(a),
            Slice::new(
                starts[a] as isize,
                Some(end.min(x.shape()[a]) as isize),
                steps[a] as isize,
            ),
        );
    }
    Ok(v.as_standard_layout().into_owned())
}

/// Zero padding: `begin[a]` zeros before and `end[a]` after axis `a`.
pub fn pad(x: &RingTensor, begin: &[usize], end: &[usize]) -> Result<RingTensor, String> {
    if begin.len() != x.ndim() || end.len() != x.ndim() {
        return Err("padding does not match the tensor's rank".into());
    }
    let shape: Vec<usize> = (0..x.ndim())
        .map(|a| x.shape()[a] + begin[a] + end[a])
        .collect();
    let mut out = ArrayD::zeros(IxDyn(&shape));
    let mut v = out.view_mut();
    for (a, &b) in begin.iter().enumerate() {
        v.slice_axis_inplace(Axis(a), Slice::from(b..b + x.shape()[a]));
    }
    v.assign(x);
    Ok(out)
}

/// Row-major elements.
pub fn flat(x: &RingTensor) -> Vec<u64> {
    match x.as_slice() {
        Some(s) => s.to_vec(),
        None => x.iter().copied().collect(),
    }
}

/// A tensor of `shape` from row-major elements.
pub fn tensor(shape: &[usize], v: Vec<u64>) -> Result<RingTensor, String> {
    ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        Ring::new(37).unwrap()
    }

    #[test]
    fn padded_pool_windows_repeat_a_real_cell() {
        // one 1x1x3x3 sample, 2x2 windows, stride 2, one cell of padding after
        let x = tensor(&[1, 1, 3, 3], (1..=9).collect()).unwrap();
        let g = PoolGeometry {
            kernel: vec![2, 2],
            strides: vec![2, 2],
            dilations: vec![1, 1],
            pads_begin: vec![0, 0],
            pads_end: vec![1, 1],
        };
        let (shape, v) = gather_windows(&x, &g).unwrap();
        assert_eq!(shape, vec![1, 1, 2, 2]);
        assert_eq!(v, vec![1, 2, 4, 5, 3, 3, 6, 3, 7, 8, 7, 7, 9, 9, 9, 9]);
        let s = sum_pool(ring(), &x, &g).unwrap();
        assert_eq!(flat(&s), vec![12, 9, 15, 9]);
    }

    #[test]
    fn windows_of_a_batch_follow_each_sample() {
        let x = tensor(&[2, 1, 2, 2], (0..8).collect()).unwrap();
        let g = PoolGeometry {
            kernel: vec![2, 2],
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![0, 0],
            pads_end: vec![0, 0],
        };
        let (shape, v) = gather_windows(&x, &g).unwrap();
        assert_eq!(shape, vec![2, 1, 1, 1]);
        assert_eq!(v, vec![0, 1, 2, 3, 4, 5, 6, 7]);
        let (gshape, lane) = global_shape(&[2, 3, 4, 5]).unwrap();
        assert_eq!((gshape, lane), (vec![2, 3, 1, 1], 20));
    }

    #[test]
    fn local_ops_stay_in_the_ring() {
        let r = ring();
        let a = tensor(&[1, 2], vec![r.mask(), 5]).unwrap();
        let b = tensor(&[1, 2], vec![1, 7]).unwrap();
        assert_eq!(flat(&add(r, &a, &b, false).unwrap()), vec![0, 12]);
        assert_eq!(flat(&add(r, &b, &a, true).unwrap()), vec![2, 2]);
        assert_eq!(
            flat(&mul_const(r, &b, -3)),
            vec![r.from_signed(-3), r.from_signed(-21)]
        );
        let t = tensor(&[1, 2, 3], (0..6).collect()).unwrap();
        assert_eq!(
            flat(&transpose(&t, &[0, 2, 1]).unwrap()),
            vec![0, 3, 1, 4, 2, 5]
        );
        assert_eq!(
            flat(&slice(&t, &[0, 1, 0], &[1, 1, 2], &[1, 1, 2]).unwrap()),
            vec![3, 5]
        );
        let p = pad(&tensor(&[1, 1], vec![9]).unwrap(), &[0, 1], &[0, 2]).unwrap();
        assert_eq!(flat(&p), vec![0, 9, 0, 0]);
        assert!(slice(&t, &[0, 1, 2], &[1, 1, 1], &[1, 1, 2]).is_err());
    }
}
