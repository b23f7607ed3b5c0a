//! Wrapping `u64` matrix product (exact modulo `2^64`).
//!
//! The kernel is cache-blocked (`KC` rows of `B` by `NC` columns stay in L2)
//! and updates one row strip of `C` (in L1) from four rows of `B` at a time,
//! with the inner loop over contiguous columns so that it vectorises.
//! A `u64` product is formed from 32-bit halves,
//! `a * b = a_lo*b_lo + ((a_hi*b_lo + a_lo*b_hi) << 32)  (mod 2^64)`,
//! each half-product being one `pmuludq` lane; the cross terms of the four
//! rows are summed before the single shift.

use std::borrow::Cow;

use ndarray::{Array, Array2, ArrayView, ArrayView2, Dimension};
use rayon::prelude::*;

use crate::RingError;

/// Rows of `B` per cache block.
const KC: usize = 256;
/// Columns of `B` per cache block (`KC * NC * 8` bytes = 256 KiB).
const NC: usize = 128;
/// Below this many multiply-adds a product is computed on one thread.
pub(crate) const PAR_MIN_MACS: usize = 1 << 18;

const LO: u64 = 0xFFFF_FFFF;

/// The elements of `v` in logical (row-major) order, borrowed when possible.
pub(crate) fn contiguous<'a, D: Dimension>(v: &ArrayView<'a, u64, D>) -> Cow<'a, [u64]> {
    match v.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(v.iter().copied().collect()),
    }
}

/// Wraps a row-major buffer into an array of the given shape.
pub(crate) fn shaped<D: Dimension>(
    shape: D,
    data: Vec<u64>,
) -> Result<Array<u64, D>, RingError> {
    Array::from_shape_vec(shape, data).map_err(|e| RingError::Internal(e.to_string()))
}

/// `c[j] += sum_p a[p] * b[p * ldb + j]` for `j < c.len()`, `p < a.len()`.
#[inline(always)]
fn row_update(c: &mut [u64], a: &[u64], b: &[u64], ldb: usize) {
    let nb = c.len();
    let mut quads = a.chunks_exact(4);
    let mut p = 0;
    for a4 in &mut quads {
        let b0 = &b[p * ldb..][..nb];
        let b1 = &b[(p + 1) * ldb..][..nb];
        let b2 = &b[(p + 2) * ldb..][..nb];
        let b3 = &b[(p + 3) * ldb..][..nb];
        let (l0, h0) = (a4[0] & LO, a4[0] >> 32);
        let (l1, h1) = (a4[1] & LO, a4[1] >> 32);
        let (l2, h2) = (a4[2] & LO, a4[2] >> 32);
        let (l3, h3) = (a4[3] & LO, a4[3] >> 32);
        for ((((cj, &x0), &x1), &x2), &x3) in c.iter_mut().zip(b0).zip(b1).zip(b2).zip(b3) {
            let (y0, z0) = (x0 & LO, x0 >> 32);
            let (y1, z1) = (x1 & LO, x1 >> 32);
            let (y2, z2) = (x2 & LO, x2 >> 32);
            let (y3, z3) = (x3 & LO, x3 >> 32);
            let lo = (y0 * l0)
                .wrapping_add(y1 * l1)
                .wrapping_add(y2 * l2)
                .wrapping_add(y3 * l3);
            let cross = (y0 * h0)
                .wrapping_add(z0 * l0)
                .wrapping_add(y1 * h1)
                .wrapping_add(z1 * l1)
                .wrapping_add(y2 * h2)
                .wrapping_add(z2 * l2)
                .wrapping_add(y3 * h3)
                .wrapping_add(z3 * l3);
            *cj = cj.wrapping_add(lo).wrapping_add(cross << 32);
        }
        p += 4;
    }
    for &av in quads.remainder() {
        let bp = &b[p * ldb..][..nb];
        for (cj, &x) in c.iter_mut().zip(bp) {
            *cj = cj.wrapping_add(av.wrapping_mul(x));
        }
        p += 1;
    }
}

/// `c += a * b` on one thread. `a` is `[m, k]` and `c` is `[m, n]`, both
/// contiguous row-major; row `p` of `b` starts at `p * ldb`.
pub(crate) fn gemm_serial(
    m: usize,
    k: usize,
    n: usize,
    a: &[u64],
    b: &[u64],
    ldb: usize,
    c: &mut [u64],
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    for jc in (0..n).step_by(NC) {
        let nb = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kb = KC.min(k - pc);
            let bblk = &b[pc * ldb + jc..];
            for i in 0..m {
                row_update(
                    &mut c[i * n + jc..][..nb],
                    &a[i * k + pc..][..kb],
                    bblk,
                    ldb,
                );
            }
        }
    }
}

/// `c += a * b`, with `a` `[m, k]`, `b` `[k, n]` and `c` `[m, n]` all
/// contiguous row-major; uses the rayon pool when the product is large.
pub(crate) fn gemm(m: usize, k: usize, n: usize, a: &[u64], b: &[u64], c: &mut [u64]) {
    let threads = rayon::current_num_threads();
    let macs = m.saturating_mul(k).saturating_mul(n);
    if threads < 2 || macs < PAR_MIN_MACS {
        gemm_serial(m, k, n, a, b, n, c);
        return;
    }
    let tasks = 4 * threads;
    if m >= 2 * threads {
        // Split the rows of C.
        let rows = m.div_ceil(tasks);
        c.par_chunks_mut(rows * n)
            .zip(a.par_chunks(rows * k))
            .for_each(|(cc, aa)| gemm_serial(cc.len() / n, k, n, aa, b, n, cc));
    } else {
        // Few rows: split the columns of C into private blocks, then copy.
        let width = n.div_ceil(tasks).next_multiple_of(8);
        let blocks: Vec<(usize, Vec<u64>)> = (0..n)
            .step_by(width)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let nb = width.min(n - j0);
                let mut blk = vec![0u64; m * nb];
                gemm_serial(m, k, nb, a, &b[j0..], n, &mut blk);
                (j0, blk)
            })
            .collect();
        for (j0, blk) in blocks {
            let nb = blk.len() / m;
            for (i, row) in blk.chunks_exact(nb).enumerate() {
                for (d, &s) in c[i * n + j0..][..nb].iter_mut().zip(row) {
                    *d = d.wrapping_add(s);
                }
            }
        }
    }
}

/// Matrix product `[m, k] x [k, n] -> [m, n]`, wrapping modulo `2^64`.
///
/// Any memory layout is accepted (non-contiguous views are copied first).
/// Errors if the inner dimensions differ.
pub fn matmul(a: ArrayView2<u64>, b: ArrayView2<u64>) -> Result<Array2<u64>, RingError> {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    if k != k2 {
        return Err(RingError::MatmulShape { m, k, k2, n });
    }
    let a = contiguous(&a);
    let b = contiguous(&b);
    let mut c = vec![0u64; m * n];
    gemm(m, k, n, &a, &b, &mut c);
    shaped(ndarray::Dim([m, n]), c)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// splitmix64: deterministic test data from a seed.
    pub(crate) fn random_vec(seed: u64, len: usize) -> Vec<u64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            })
            .collect()
    }

    fn random(seed: u64, m: usize, n: usize) -> Array2<u64> {
        Array2::from_shape_vec((m, n), random_vec(seed, m * n)).unwrap()
    }

    /// Reference product in i128 arithmetic, reduced modulo 2^64.
    fn reference(a: &Array2<u64>, b: &Array2<u64>) -> Array2<u64> {
        let (m, k) = a.dim();
        let n = b.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            let mut s: i128 = 0;
            for p in 0..k {
                s = s.wrapping_add((a[[i, p]] as i128).wrapping_mul(b[[p, j]] as i128));
            }
            s as u64
        })
    }

    #[test]
    fn small_example_with_signed_weights() {
        let r = crate::Ring::new(16).unwrap();
        let a = Array2::from_shape_vec((2, 3), vec![1, 2, 3, 4, 5, 6]).unwrap();
        let w: Vec<u64> = [-1i64, 2, 0, -3, 1, 1].iter().map(|&v| v as u64).collect();
        let b = Array2::from_shape_vec((3, 2), w).unwrap();
        let c = matmul(a.view(), b.view()).unwrap();
        let got: Vec<i64> = c.iter().map(|&v| r.to_signed(r.reduce(v))).collect();
        assert_eq!(got, vec![2, -1, 2, -1]);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let a = Array2::<u64>::zeros((2, 3));
        let b = Array2::<u64>::zeros((4, 5));
        let e = matmul(a.view(), b.view()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "matmul: [2, 3] x [4, 5]: inner dimensions 3 and 4 differ"
        );
    }

    #[test]
    fn empty_dimensions() {
        let a = Array2::<u64>::zeros((3, 0));
        let b = Array2::<u64>::zeros((0, 4));
        assert_eq!(matmul(a.view(), b.view()).unwrap(), Array2::<u64>::zeros((3, 4)));
        let a = Array2::<u64>::zeros((0, 5));
        let b = random(1, 5, 4);
        assert_eq!(matmul(a.view(), b.view()).unwrap().dim(), (0, 4));
        let a = random(2, 3, 5);
        let b = Array2::<u64>::zeros((5, 0));
        assert_eq!(matmul(a.view(), b.view()).unwrap().dim(), (3, 0));
    }

    #[test]
    fn non_contiguous_views() {
        let a = random(3, 9, 7);
        let b = random(4, 11, 9);
        let at = a.t(); // [7, 9]
        let bt = b.t(); // [9, 11]
        let want = reference(&at.to_owned(), &bt.to_owned());
        assert_eq!(matmul(at, bt).unwrap(), want);
        let bs = b.slice_axis(ndarray::Axis(0), ndarray::Slice::new(0, None, 2)); // [6, 9] strided rows
        let a2 = random(5, 3, 6);
        assert_eq!(matmul(a2.view(), bs).unwrap(), reference(&a2, &bs.to_owned()));
    }

    #[test]
    fn crosses_cache_blocks_serial_and_parallel() {
        // k and n cross KC/NC; the sizes below hit the serial path, the
        // row-parallel path and the column-parallel path.
        for &(m, k, n) in &[(3, 300, 270), (40, 520, 200), (2, 600, 700), (1, 1000, 300)] {
            let a = random(10 + m as u64, m, k);
            let b = random(20 + n as u64, k, n);
            assert_eq!(matmul(a.view(), b.view()).unwrap(), reference(&a, &b), "{m}x{k}x{n}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_reference(m in 0usize..20, k in 0usize..40, n in 0usize..40, seed in any::<u64>()) {
            let a = random(seed, m, k);
            let b = random(seed ^ 0xABCD, k, n);
            prop_assert_eq!(matmul(a.view(), b.view()).unwrap(), reference(&a, &b));
        }

        #[test]
        fn exact_mod_2k_for_small_rings(bits in 1u32..=64, m in 1usize..6, k in 1usize..30, n in 1usize..10, seed in any::<u64>()) {
            let r = crate::Ring::new(bits).unwrap();
            let a = random(seed, m, k).mapv(|v| r.reduce(v));
            let b = random(!seed, k, n).mapv(|v| r.reduce(v));
            let mut c = matmul(a.view(), b.view()).unwrap().into_dyn();
            r.reduce_tensor(&mut c);
            let want = reference(&a, &b).mapv(|v| r.reduce(v)).into_dyn();
            prop_assert_eq!(c, want);
        }
    }
}
