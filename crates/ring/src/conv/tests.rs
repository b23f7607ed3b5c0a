#![allow(clippy::needless_range_loop, clippy::type_complexity)]

use super::*;
use crate::matmul::tests::random_vec;
use ndarray::Dimension;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

fn random(seed: u64, shape: &[usize]) -> ArrayD<u64> {
    let len = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), random_vec(seed, len)).unwrap()
}

fn signed(shape: &[usize], v: &[i64]) -> ArrayD<u64> {
    ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&e| e as u64).collect()).unwrap()
}

/// Small non-negative inputs (below 2^20) and signed weights (|w| <= 2^10),
/// as `u64` bits and as `f64`, so both arithmetics are exact.
fn small_pair(seed: u64, shape: &[usize], signed: bool) -> (ArrayD<u64>, ArrayD<f64>) {
    let u = random(seed, shape).mapv(|v| {
        if signed {
            ((v % 2049) as i64 - 1024) as u64
        } else {
            v % (1 << 20)
        }
    });
    let f = u.mapv(|v| v as i64 as f64);
    (u, f)
}

fn as_signed(t: &ArrayD<u64>) -> Vec<i64> {
    t.iter().map(|&v| v as i64).collect()
}

fn geom(s: &[usize], dil: &[usize], pb: &[usize], pe: &[usize], group: usize) -> ConvGeometry {
    ConvGeometry {
        strides: s.to_vec(),
        dilations: dil.to_vec(),
        pads_begin: pb.to_vec(),
        pads_end: pe.to_vec(),
        group,
    }
}

/// Geometry entries for axis `i`, defaults for empty vectors.
fn at(v: &[usize], i: usize, default: usize) -> usize {
    v.get(i).copied().unwrap_or(default)
}

/// All multi-indices of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    ndarray::indices(IxDyn(shape))
        .into_iter()
        .map(|i| i.slice().to_vec())
        .collect()
}

/// Direct definition of ONNX Conv, wrapping u64.
fn ref_conv(x: &ArrayD<u64>, w: &ArrayD<u64>, g: &ConvGeometry) -> ArrayD<u64> {
    let r = x.ndim() - 2;
    let (n, cg, m) = (x.shape()[0], w.shape()[1], w.shape()[0]);
    let mg = m / g.group;
    let ks = &w.shape()[2..];
    let mut shape = vec![n, m];
    for i in 0..r {
        let ext = (ks[i] - 1) * at(&g.dilations, i, 1) + 1;
        let padded = x.shape()[2 + i] + at(&g.pads_begin, i, 0) + at(&g.pads_end, i, 0);
        shape.push((padded - ext) / at(&g.strides, i, 1) + 1);
    }
    let kidx = indices(ks);
    let mut out = ArrayD::<u64>::zeros(IxDyn(&shape));
    for (idx, o) in out.indexed_iter_mut() {
        let idx = idx.slice();
        let (b, mo) = (idx[0], idx[1]);
        let gi = mo / mg;
        let mut acc = 0u64;
        for c in 0..cg {
            'k: for kk in &kidx {
                let mut xi = vec![b, gi * cg + c];
                for i in 0..r {
                    let pos = (idx[2 + i] * at(&g.strides, i, 1) + kk[i] * at(&g.dilations, i, 1))
                        as i64
                        - at(&g.pads_begin, i, 0) as i64;
                    if pos < 0 || pos >= x.shape()[2 + i] as i64 {
                        continue 'k;
                    }
                    xi.push(pos as usize);
                }
                let mut wi = vec![mo, c];
                wi.extend_from_slice(kk);
                acc = acc.wrapping_add(x[IxDyn(&xi)].wrapping_mul(w[IxDyn(&wi)]));
            }
        }
        *o = acc;
    }
    out
}

/// Direct definition of ONNX ConvTranspose (scatter form), wrapping u64.
fn ref_conv_transpose(
    x: &ArrayD<u64>,
    w: &ArrayD<u64>,
    g: &ConvGeometry,
    op: &[usize],
) -> ArrayD<u64> {
    let r = x.ndim() - 2;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let mg = w.shape()[1];
    let cg = c / g.group;
    let ks = &w.shape()[2..];
    let mut shape = vec![n, mg * g.group];
    for i in 0..r {
        let ext = (ks[i] - 1) * at(&g.dilations, i, 1) + 1;
        let o = at(&g.strides, i, 1) * (x.shape()[2 + i] - 1) + at(op, i, 0) + ext
            - at(&g.pads_begin, i, 0)
            - at(&g.pads_end, i, 0);
        shape.push(o);
    }
    let kidx = indices(ks);
    let mut out = ArrayD::<u64>::zeros(IxDyn(&shape));
    for (idx, &xv) in x.indexed_iter() {
        let idx = idx.slice();
        let (b, ci) = (idx[0], idx[1]);
        let gi = ci / cg;
        for ml in 0..mg {
            'k: for kk in &kidx {
                let mut oi = vec![b, gi * mg + ml];
                for i in 0..r {
                    let pos = (idx[2 + i] * at(&g.strides, i, 1) + kk[i] * at(&g.dilations, i, 1))
                        as i64
                        - at(&g.pads_begin, i, 0) as i64;
                    if pos < 0 || pos >= shape[2 + i] as i64 {
                        continue 'k;
                    }
                    oi.push(pos as usize);
                }
                let mut wi = vec![ci, ml];
                wi.extend_from_slice(kk);
                let e = &mut out[IxDyn(&oi)];
                *e = e.wrapping_add(xv.wrapping_mul(w[IxDyn(&wi)]));
            }
        }
    }
    out
}

#[test]
fn conv_1d_example() {
    let x = signed(&[1, 1, 4], &[1, 2, 3, 4]);
    let w = signed(&[1, 1, 3], &[1, 0, -1]);
    let y = conv(x.view(), w.view(), &ConvGeometry::identity(1)).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2]);
    assert_eq!(as_signed(&y), vec![-2, -2]);
    // pads 1 both sides
    let g = geom(&[1], &[1], &[1], &[1], 1);
    let y = conv(x.view(), w.view(), &g).unwrap();
    assert_eq!(as_signed(&y), vec![-2, -2, -2, 3]);
    // Empty geometry vectors mean ONNX defaults.
    let g = geom(&[], &[], &[], &[], 1);
    assert_eq!(
        as_signed(&conv(x.view(), w.view(), &g).unwrap()),
        vec![-2, -2]
    );
}

#[test]
fn conv_2d_depthwise_example() {
    // 2 channels, group 2, 2x2 kernels of ones / twos over 3x3 inputs.
    let x = signed(&[1, 2, 3, 3], &(0..18).collect::<Vec<_>>());
    let w = signed(&[2, 1, 2, 2], &[1, 1, 1, 1, 2, 2, 2, 2]);
    let y = conv(
        x.view(),
        w.view(),
        &geom(&[1, 1], &[1, 1], &[0, 0], &[0, 0], 2),
    )
    .unwrap();
    assert_eq!(y.shape(), &[1, 2, 2, 2]);
    assert_eq!(
        as_signed(&y),
        vec![8, 12, 20, 24, 2 * 44, 2 * 48, 2 * 56, 2 * 60]
    );
}

#[test]
fn conv_rank0_is_grouped_linear_map() {
    // x [2, 4], w [4, 2] group 2: out[:, 0..2] uses x[:, 0..2], out[:, 2..4] uses x[:, 2..4].
    let x = signed(&[2, 4], &[1, 2, 3, 4, 5, 6, 7, 8]);
    let w = signed(&[4, 2], &[1, 0, 0, 1, 1, 1, -1, 2]);
    let y = conv(x.view(), w.view(), &geom(&[], &[], &[], &[], 2)).unwrap();
    assert_eq!(y.shape(), &[2, 4]);
    assert_eq!(as_signed(&y), vec![1, 2, 7, 5, 5, 6, 15, 9]);
    assert_eq!(y, ref_conv(&x, &w, &geom(&[], &[], &[], &[], 2)));
}

#[test]
fn conv_errors_name_the_problem() {
    let x = random(1, &[1, 4, 5, 5]);
    let w = random(2, &[2, 3, 3, 3]);
    let g = ConvGeometry::identity(2);
    assert_eq!(
        conv(x.view(), w.view(), &g).unwrap_err().to_string(),
        "conv weight has 3 input channels per group but input has 4 channels and group 1"
    );
    let w = random(2, &[3, 2, 3, 3]);
    let g2 = geom(&[1, 1], &[1, 1], &[0, 0], &[0, 0], 2);
    assert_eq!(
        conv(x.view(), w.view(), &g2).unwrap_err().to_string(),
        "conv weight has 3 output channels, not a multiple of group 2"
    );
    let w = random(2, &[2, 4, 3]);
    assert!(
        conv(x.view(), w.view(), &g)
            .unwrap_err()
            .to_string()
            .starts_with("conv weight has rank 3 ([2, 4, 3]) but input has rank 4")
    );
    let w = random(2, &[2, 4, 3, 3]);
    let bad = geom(&[1], &[1, 1], &[0, 0], &[0, 0], 1);
    assert_eq!(
        conv(x.view(), w.view(), &bad).unwrap_err().to_string(),
        "conv strides has 1 entries [1] but the input has 2 spatial axes"
    );
    let bad = geom(&[1, 0], &[1, 1], &[0, 0], &[0, 0], 1);
    assert_eq!(
        conv(x.view(), w.view(), &bad).unwrap_err().to_string(),
        "conv strides must all be >= 1, got [1, 0]"
    );
    let bad = geom(&[1, 1], &[1, 1], &[0, 0], &[0, 0], 0);
    assert!(conv(x.view(), w.view(), &bad).is_err());
    let big = random(2, &[2, 4, 6, 3]);
    let e = conv(x.view(), big.view(), &g).unwrap_err().to_string();
    assert!(
        e.starts_with("conv spatial axis 0: dilated kernel extent 6 exceeds padded input size 5"),
        "{e}"
    );
    let zero_k = random(2, &[2, 4, 0, 3]);
    assert!(conv(x.view(), zero_k.view(), &g).is_err());
    let x6 = random(1, &[1, 1, 2, 2, 2, 2]);
    let w6 = random(1, &[1, 1, 1, 1, 1, 1]);
    assert!(conv(x6.view(), w6.view(), &ConvGeometry::identity(4)).is_err());
    let x1 = random(1, &[3]);
    assert!(conv(x1.view(), x1.view(), &ConvGeometry::identity(0)).is_err());
    // shape helpers agree
    assert!(conv_output_shape(&[1, 4, 5, 5], &[2, 3, 3, 3], &g).is_err());
    assert_eq!(
        conv_output_shape(&[1, 4, 5, 5], &[2, 4, 3, 3], &g).unwrap(),
        vec![1, 2, 3, 3]
    );
}

#[test]
fn conv_transpose_1d_example() {
    let x = signed(&[1, 1, 2], &[1, 2]);
    let w = signed(&[1, 1, 3], &[1, 1, 1]);
    let g = geom(&[2], &[1], &[0], &[0], 1);
    let y = conv_transpose(x.view(), w.view(), &g, &[]).unwrap();
    assert_eq!(as_signed(&y), vec![1, 1, 3, 2, 2]);
    let y = conv_transpose(x.view(), w.view(), &g, &[1]).unwrap();
    assert_eq!(as_signed(&y), vec![1, 1, 3, 2, 2, 0]);
    // pads crop
    let g = geom(&[2], &[1], &[1], &[2], 1);
    let y = conv_transpose(x.view(), w.view(), &g, &[]).unwrap();
    assert_eq!(as_signed(&y), vec![1, 3]);
}

#[test]
fn conv_transpose_errors() {
    let x = random(1, &[1, 4, 5, 5]);
    let w = random(2, &[3, 2, 3, 3]);
    let g = ConvGeometry::identity(2);
    assert_eq!(
        conv_transpose(x.view(), w.view(), &g, &[])
            .unwrap_err()
            .to_string(),
        "conv_transpose weight has 3 input channels but input has 4 channels"
    );
    let w = random(2, &[4, 2, 3, 3]);
    let g3 = geom(&[1, 1], &[1, 1], &[0, 0], &[0, 0], 3);
    assert_eq!(
        conv_transpose(x.view(), w.view(), &g3, &[])
            .unwrap_err()
            .to_string(),
        "conv_transpose input has 4 channels, not a multiple of group 3"
    );
    assert!(conv_transpose(x.view(), w.view(), &g, &[1]).is_err());
    let crop = geom(&[1, 1], &[1, 1], &[4, 0], &[3, 0], 1);
    let e = conv_transpose(x.view(), w.view(), &crop, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("conv_transpose spatial axis 0: output size 0 < 1"),
        "{e}"
    );
    assert_eq!(
        conv_transpose_output_shape(
            &[1, 4, 5, 5],
            &[4, 2, 3, 3],
            &geom(&[2, 2], &[1, 1], &[1, 1], &[1, 1], 2),
            &[1, 1]
        )
        .unwrap(),
        vec![1, 4, 10, 10]
    );
}

#[test]
fn non_contiguous_inputs() {
    let x = random(5, &[2, 5, 6, 3]); // permuted below to [2, 3, 6, 5]
    let xp = x.view().permuted_axes(IxDyn(&[0, 3, 2, 1]));
    let w = random(6, &[4, 3, 2, 2]);
    let g = geom(&[2, 1], &[1, 2], &[1, 0], &[0, 1], 1);
    let want = ref_conv(&xp.to_owned(), &w, &g);
    assert_eq!(conv(xp.clone(), w.view(), &g).unwrap(), want);
    let wt = random(7, &[3, 2, 2, 2]);
    let want = ref_conv_transpose(&xp.to_owned(), &wt, &g, &[1, 0]);
    assert_eq!(conv_transpose(xp, wt.view(), &g, &[1, 0]).unwrap(), want);
}

#[test]
fn empty_batch_and_zero_size_input_axis() {
    let x = random(1, &[0, 2, 4, 4]);
    let w = random(2, &[3, 2, 3, 3]);
    let y = conv(x.view(), w.view(), &ConvGeometry::identity(2)).unwrap();
    assert_eq!(y.shape(), &[0, 3, 2, 2]);
    // A zero-length spatial axis is all padding.
    let x = random(1, &[1, 2, 0]);
    let w = random(2, &[3, 2, 2]);
    let g = geom(&[1], &[1], &[1], &[1], 1);
    let y = conv(x.view(), w.view(), &g).unwrap();
    assert_eq!(y.shape(), &[1, 3, 1]);
    assert!(y.iter().all(|&v| v == 0));
    let wt = random(2, &[2, 3, 3]);
    let y = conv_transpose(x.view(), wt.view(), &ConvGeometry::identity(1), &[]).unwrap();
    assert_eq!(y.shape(), &[1, 3, 2]);
    assert!(y.iter().all(|&v| v == 0));
}

#[test]
fn large_cases_take_parallel_paths() {
    let cases: &[(&[usize], &[usize], ConvGeometry)] = &[
        // many units in parallel, grouped
        (
            &[8, 8, 16, 16],
            &[16, 4, 3, 3],
            geom(&[1, 1], &[1, 1], &[1, 1], &[1, 1], 2),
        ),
        // one unit, parallel gemm (row split)
        (
            &[1, 16, 32, 32],
            &[32, 16, 3, 3],
            geom(&[1, 1], &[1, 1], &[1, 1], &[1, 1], 1),
        ),
        // one unit, few output channels (column split), strided + dilated
        (
            &[1, 64, 40, 40],
            &[2, 64, 3, 3],
            geom(&[2, 1], &[1, 2], &[0, 2], &[1, 0], 1),
        ),
        // pointwise (im2col skipped)
        (&[4, 32, 20, 20], &[16, 32, 1, 1], ConvGeometry::identity(2)),
        // depthwise
        (
            &[16, 32, 16, 16],
            &[32, 1, 3, 3],
            geom(&[1, 1], &[1, 1], &[1, 1], &[1, 1], 32),
        ),
        // rank 0 big dense
        (&[64, 300], &[40, 300], ConvGeometry::identity(0)),
    ];
    for (xs, ws, g) in cases {
        let x = random(11, xs);
        let w = random(12, ws);
        assert_eq!(
            conv(x.view(), w.view(), g).unwrap(),
            ref_conv(&x, &w, g),
            "{xs:?} {ws:?}"
        );
        let (xu, xf) = small_pair(15, xs, false);
        let (wu, wf) = small_pair(16, ws, true);
        let want = as_signed(&ref_conv(&xu, &wu, g));
        let got: Vec<i64> = conv(xf.view(), wf.view(), g)
            .unwrap()
            .iter()
            .map(|&v| v as i64)
            .collect();
        assert_eq!(got, want, "f64 {xs:?} {ws:?}");
    }
    let tcases: &[(&[usize], &[usize], ConvGeometry, &[usize])] = &[
        (
            &[4, 16, 12, 12],
            &[16, 8, 3, 3],
            geom(&[2, 2], &[1, 1], &[1, 0], &[0, 1], 2),
            &[1, 0],
        ),
        (
            &[1, 32, 16, 16],
            &[32, 16, 3, 3],
            geom(&[1, 1], &[1, 1], &[1, 1], &[1, 1], 1),
            &[],
        ),
    ];
    for (xs, ws, g, op) in tcases {
        let x = random(13, xs);
        let w = random(14, ws);
        assert_eq!(
            conv_transpose(x.view(), w.view(), g, op).unwrap(),
            ref_conv_transpose(&x, &w, g, op),
            "{xs:?} {ws:?}"
        );
        let (xu, xf) = small_pair(17, xs, false);
        let (wu, wf) = small_pair(18, ws, true);
        let want = as_signed(&ref_conv_transpose(&xu, &wu, g, op));
        let got: Vec<i64> = conv_transpose(xf.view(), wf.view(), g, op)
            .unwrap()
            .iter()
            .map(|&v| v as i64)
            .collect();
        assert_eq!(got, want, "f64 {xs:?} {ws:?}");
    }
}

/// Random geometry: rank, group, channels, batch, per-axis (k, s, dil, pb, pe, extra).
fn geometry_strategy() -> impl Strategy<
    Value = (
        usize,
        usize,
        usize,
        usize,
        usize,
        Vec<(usize, usize, usize, usize, usize, usize)>,
        u64,
    ),
> {
    (
        0usize..=3,
        1usize..=3,
        1usize..=3,
        1usize..=3,
        1usize..=2,
        proptest::collection::vec(
            (
                1usize..=3,
                1usize..=3,
                1usize..=2,
                0usize..=2,
                0usize..=2,
                0usize..=3,
            ),
            3,
        ),
        any::<u64>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn conv_matches_reference((r, group, cg, mg, n, axes, seed) in geometry_strategy()) {
        let axes = &axes[..r];
        let mut xs = vec![n, cg * group];
        let mut ws = vec![mg * group, cg];
        let mut g = geom(&[], &[], &[], &[], group);
        for &(k, s, dil, pb, pe, extra) in axes {
            let ext = (k - 1) * dil + 1;
            xs.push((ext.saturating_sub(pb + pe) + extra).max(1));
            ws.push(k);
            g.strides.push(s);
            g.dilations.push(dil);
            g.pads_begin.push(pb);
            g.pads_end.push(pe);
        }
        let x = random(seed, &xs);
        let w = random(!seed, &ws);
        let got = conv(x.view(), w.view(), &g).unwrap();
        prop_assert_eq!(got.shape(), &conv_output_shape(&xs, &ws, &g).unwrap()[..]);
        prop_assert_eq!(got, ref_conv(&x, &w, &g));
        // The same geometry in exact f64 arithmetic.
        let (xu, xf) = small_pair(seed, &xs, false);
        let (wu, wf) = small_pair(!seed, &ws, true);
        let got: Vec<i64> = conv(xf.view(), wf.view(), &g).unwrap().iter().map(|&v| v as i64).collect();
        prop_assert_eq!(got, as_signed(&ref_conv(&xu, &wu, &g)));
    }

    #[test]
    fn conv_transpose_matches_reference((r, group, cg, mg, n, axes, seed) in geometry_strategy(), opad in proptest::collection::vec(0usize..3, 3)) {
        let axes = &axes[..r];
        let mut xs = vec![n, cg * group];
        let mut ws = vec![cg * group, mg];
        let mut g = geom(&[], &[], &[], &[], group);
        let mut op = vec![];
        for (i, &(k, s, dil, pb, pe, extra)) in axes.iter().enumerate() {
            let d = 1 + extra;
            let ext = (k - 1) * dil + 1;
            let full = s * (d - 1) + ext;
            let o_pad = opad[i] % s; // output_padding < stride
            // keep at least one output: crop at most full + o_pad - 1
            let pb = pb.min(full + o_pad - 1);
            let pe = pe.min(full + o_pad - 1 - pb);
            xs.push(d);
            ws.push(k);
            g.strides.push(s);
            g.dilations.push(dil);
            g.pads_begin.push(pb);
            g.pads_end.push(pe);
            op.push(o_pad);
        }
        let x = random(seed, &xs);
        let w = random(!seed, &ws);
        let got = conv_transpose(x.view(), w.view(), &g, &op).unwrap();
        prop_assert_eq!(got.shape(), &conv_transpose_output_shape(&xs, &ws, &g, &op).unwrap()[..]);
        prop_assert_eq!(got, ref_conv_transpose(&x, &w, &g, &op));
        let (xu, xf) = small_pair(seed, &xs, false);
        let (wu, wf) = small_pair(!seed, &ws, true);
        let got: Vec<i64> = conv_transpose(xf.view(), wf.view(), &g, &op).unwrap().iter().map(|&v| v as i64).collect();
        prop_assert_eq!(got, as_signed(&ref_conv_transpose(&xu, &wu, &g, &op)));
    }

    /// <conv(x, w), y> == <x, conv_transpose(y, w)> (group 1, matching geometry).
    #[test]
    fn conv_transpose_is_adjoint_of_conv((r, _group, cg, mg, n, axes, seed) in geometry_strategy()) {
        let axes = &axes[..r];
        let mut xs = vec![n, cg];
        let mut ws = vec![mg, cg];
        let mut g = geom(&[], &[], &[], &[], 1);
        for &(k, s, dil, pb, pe, extra) in axes {
            let ext = (k - 1) * dil + 1;
            xs.push((ext.saturating_sub(pb + pe) + extra).max(1));
            ws.push(k);
            g.strides.push(s);
            g.dilations.push(dil);
            g.pads_begin.push(pb);
            g.pads_end.push(pe);
        }
        let x = random(seed, &xs);
        let w = random(!seed, &ws);
        let cx = conv(x.view(), w.view(), &g).unwrap();
        let y = random(seed ^ 77, cx.shape());
        // output_padding restores the input size exactly: the rows conv never read.
        let op: Vec<usize> = axes
            .iter()
            .enumerate()
            .map(|(i, &(k, s, dil, pb, pe, _))| (xs[2 + i] + pb + pe - ((k - 1) * dil + 1)) % s)
            .collect();
        let ty = conv_transpose(y.view(), w.view(), &g, &op).unwrap();
        prop_assert_eq!(ty.shape(), x.shape());
        let lhs = cx.iter().zip(y.iter()).fold(0u64, |a, (&p, &q)| a.wrapping_add(p.wrapping_mul(q)));
        let rhs = x.iter().zip(ty.iter()).fold(0u64, |a, (&p, &q)| a.wrapping_add(p.wrapping_mul(q)));
        prop_assert_eq!(lhs, rhs);
    }
}
