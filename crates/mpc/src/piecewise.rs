//! Public piecewise-linear functions of shared fixed-point values, and the
//! splines for Sigmoid, Tanh, LeakyRelu and Clip.
//!
//! **The function.** A [`Spline`] with breakpoints `t_1 < … < t_m`, slopes
//! `a_0 … a_m`, intercepts `c_0 … c_m` and `s = slope_frac_bits` maps an
//! integer `x` (a fixed-point input with `f` fractional bits) to
//!
//! ```text
//! u(x) = a_j·x + c_j     for t_j ≤ x < t_(j+1)   (t_0 = −∞, t_(m+1) = +∞)
//!      = a_0·x + c_0 + Σ_(i=1..m) [x ≥ t_i]·((a_i − a_(i−1))·x + (c_i − c_(i−1)))
//! ```
//!
//! and outputs `r = trunc_s(u)`: `⌈u/2^s⌉ − 1 ≤ r ≤ ⌈u/2^s⌉`, so
//! `|r − u/2^s| ≤ 1`, exact when `2^s` divides `u` (see [`truncate`]).
//! Slopes carry `s` fractional bits and intercepts `f + s`, so `u` has
//! `f + s` and **the output has `f` fractional bits, as the input**. With
//! `s = 0` nothing is truncated and the output is `u` exactly.
//!
//! **The protocol** evaluates the second form. Breakpoints outside the
//! input range are decided publicly: for `|v| < 2^(bits−1)`,
//! `[x ≥ t_i] = 1` if `t_i ≤ −2^(bits−1)` (its term joins the base line)
//! and `0` if `t_i ≥ 2^(bits−1)` (its term is dropped). For the `m'`
//! others, each party forms `x − t_i` locally (the client subtracts `t_i`)
//! and **one** [`drelu`] over all `n·m'` differences gives XOR shares of
//! `[x ≥ t_i]`; the differences lie in the signed range of `bits + 1`
//! bits (of `bits` when every remaining breakpoint is 0, as for
//! LeakyRelu). `y_i = (a_i − a_(i−1))·x + (c_i − c_(i−1))` is local (a
//! public integer times a share; the client adds the constant), **one**
//! [`mul_bit`] over all `n·m'` pairs gives shares of `[x ≥ t_i]·y_i`, each
//! party adds its base line and its products, and one [`truncate`] by `s`
//! (signed) gives the output. All arithmetic is in `Z_2^k`, where the
//! decomposition is exact whatever the size of the intermediate `y_i`;
//! only `u` itself must lie in the truncation's range `|u| < 2^(k−2)`
//! (`−2^(k−1) ≤ u < 2^(k−1)` when `s = 0`), which the protocol checks
//! publicly from the spline and `bits` before its first message
//! ([`Spline::value_range`]). Flights: DReLU's `1 + ⌈log2(w − 1)⌉` for
//! comparison width `w`, two for the products, two for the truncation (none
//! when `s = 0`), whatever `m'` and the batch size; cost in
//! [`cost::piecewise`]. The parties learn nothing beyond what the
//! sub-protocols reveal (nothing): which breakpoints are compared depends
//! only on the public spline and `bits`.
//!
//! **Sigmoid and Tanh** ([`Spline::sigmoid`], [`Spline::tanh`]). Both
//! satisfy `g(−x) = 2·g(0) − g(x)`, are concave on `x ≥ 0` and tend to 1.
//! A central segment `[−A_1, A_1)` takes the odd line `g(0) + β̂·x`; the
//! right half is then cut greedily into segments `[A_j, A_(j+1))` with
//! integer ends, each as long as its bound allows (reaching furthest at
//! each step minimises the count when every sub-segment of a good segment
//! is good, which holds here up to the rounding of coefficients),
//! until `1 − g(A_p) ≤ ε`; the left half is the mirror image (slope `â`,
//! intercept `2·g(0)·2^(f+s) − ĉ`) and the tails are the constants
//! `2·g(0) − 1` and 1 (0/1 for Sigmoid, ±1 for Tanh), whose truncation is
//! exact. A segment's slope is the chord's, rounded to `s` bits
//! (`â = round(α·2^s)`), and its intercept `ĉ` centres the range of
//! `g − β̂·x` (`β̂ = â/2^s`); the central slope balances the error's two
//! signs. The bound is not a sum of worst cases but the **exact supremum**
//! of `|g − û|` on the real segment (`û(x) = β̂·x + ĉ·2^−(f+s)`, the
//! implemented line): on `x ≥ 0` the error `g − û` is concave (concave
//! minus affine), so its least value is at an end of the segment and its
//! greatest at the one point where `g' = β̂` (`g'` decreases; found by
//! bisection, and an error `δ` in that point costs only `O(|g''|·δ²)`
//! since the derivative vanishes there), or at an end. This supremum is the
//! interpolation error (the chord deviates from `g` by up to
//! `h²/8·max|g''|` on a segment of length `h`; centring halves it) and the
//! rounding of slope and intercept together, measured rather than bounded
//! separately. For every input `x` of segment `j`, and any output `r` the
//! protocol may give,
//!
//! ```text
//! |r·2^−f − g(x·2^−f)| ≤ sup_j |g − û_j| + 2^−f + 10^−12
//! ```
//!
//! (the truncation's one unit, and a margin for the `f64` evaluation,
//! whose own error is below `10^−15`); on the tails the bound is
//! `1 − g(A_p)`. [`Approximation::max_error`] is the largest of these, and
//! is attained up to the truncation's randomness: the supremum is reached
//! at a point of the segment. `s = ⌈log2(64/ε)⌉` keeps the coefficient
//! rounding near 1 % of the target.
//!
//! **LeakyRelu and Clip** are exactly piecewise linear, so they are splines
//! too rather than compositions of [`relu`](crate::relu): LeakyRelu(α) has
//! breakpoints `[0]`, slopes `[round(α·2^s), 2^s]`, intercepts `[0, 0]`: one DReLU on
//! `bits` bits (the breakpoint is 0), one product and one truncation, the
//! same as `α·v + (1 − α)·relu(v)` would cost, but exact for `v ≥ 0` (that
//! slope is `2^s`, so `u` is a multiple of `2^s`) and within one unit of
//! `round(α·2^s)·v/2^s` below. Clip(lo, hi) has breakpoints `[lo, hi]`, slopes
//! `[0, 1, 0]`, intercepts `[lo, 0, hi]` with `s = 0`: exact, no truncation,
//! and a bound outside the input range (e.g. `i64::MAX` for "no maximum")
//! costs no comparison.

use std::ops::Range;

use secinfer_ring::Ring;

use crate::compare::drelu;
use crate::select::mul_bit;
use crate::truncate::{Sign, truncate};
use crate::{Cost, MpcError, Party, cost};

/// A public piecewise-linear function of fixed-point integers (see the
/// module docs for its meaning and scales). Always well formed: built by
/// [`Spline::new`] or one of the constructors.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Spline {
    breaks: Vec<i64>,
    slopes: Vec<i64>,
    intercepts: Vec<i64>,
    slope_frac_bits: u32,
}

/// A spline approximating a smooth function, with its proven error.
#[derive(Clone, Debug, PartialEq)]
pub struct Approximation {
    /// the spline; its input and output have the same fractional bits `f`
    pub spline: Spline,
    /// proven bound on `|r·2^−f − g(x·2^−f)|` over every integer input `x`,
    /// where `r` is any output the protocol may give (truncation included)
    pub max_error: f64,
    /// the bound for each segment of `spline`, in order (the largest is
    /// `max_error`)
    pub segment_errors: Vec<f64>,
    /// the spline is constant for `x ≥ saturation` and for
    /// `x < −saturation` (input units)
    pub saturation: i64,
}

/// Margin for the `f64` evaluation in the proven bounds (their own error is
/// below `10^−15`).
const PROOF_MARGIN: f64 = 1e-12;
/// Most segments on either side of an approximation.
const MAX_SEGMENTS_PER_SIDE: usize = 2048;

fn shape(problem: String) -> MpcError {
    MpcError::Shape(problem)
}

impl Spline {
    /// The spline with breakpoints `breaks` (strictly increasing), one more
    /// slope and intercept than breakpoints, and `slope_frac_bits ≤ 62`.
    pub fn new(
        breaks: Vec<i64>,
        slopes: Vec<i64>,
        intercepts: Vec<i64>,
        slope_frac_bits: u32,
    ) -> Result<Spline, MpcError> {
        let m = breaks.len();
        if slopes.len() != m + 1 || intercepts.len() != m + 1 {
            return Err(shape(format!(
                "spline with {m} breakpoints needs {} slopes and intercepts, got {} and {}",
                m + 1,
                slopes.len(),
                intercepts.len()
            )));
        }
        if let Some(i) = breaks.windows(2).position(|w| w[0] >= w[1]) {
            return Err(shape(format!(
                "spline breakpoints must increase strictly: t_{} = {} is followed by {}",
                i + 1,
                breaks[i],
                breaks[i + 1]
            )));
        }
        if slope_frac_bits > 62 {
            return Err(shape(format!(
                "spline slopes with {slope_frac_bits} fractional bits: at most 62"
            )));
        }
        Ok(Spline {
            breaks,
            slopes,
            intercepts,
            slope_frac_bits,
        })
    }

    /// The breakpoints `t_1 < … < t_m` (input units).
    pub fn breaks(&self) -> &[i64] {
        &self.breaks
    }

    /// The slopes `a_0 … a_m` (`slope_frac_bits` fractional bits).
    pub fn slopes(&self) -> &[i64] {
        &self.slopes
    }

    /// The intercepts `c_0 … c_m` (in units of the product `a·x`).
    pub fn intercepts(&self) -> &[i64] {
        &self.intercepts
    }

    /// `s`: the slopes' fractional bits, removed from the result by the
    /// final truncation.
    pub fn slope_frac_bits(&self) -> u32 {
        self.slope_frac_bits
    }

    /// The number of segments, `m + 1`.
    pub fn segments(&self) -> usize {
        self.slopes.len()
    }

    /// The segment `j` with `t_j ≤ x < t_(j+1)`.
    pub fn segment(&self, x: i64) -> usize {
        self.breaks.partition_point(|&t| t <= x)
    }

    /// `u(x) = a_j·x + c_j`, before the truncation (exact).
    pub fn exact(&self, x: i64) -> i128 {
        let j = self.segment(x);
        self.slopes[j] as i128 * x as i128 + self.intercepts[j] as i128
    }

    /// The least and greatest input, `−2^(bits−1)` and `2^(bits−1) − 1`
    /// (`bits` taken in `1..=64`).
    fn input_range(bits: u32) -> (i128, i128) {
        let half = 1i128 << (bits.clamp(1, 64) - 1);
        (-half, half - 1)
    }

    /// The indices of the breakpoints that inputs `|v| < 2^(bits−1)` fall
    /// on both sides of; segments `start..=end` are the reachable ones.
    fn active(&self, bits: u32) -> Range<usize> {
        let (lo, hi) = Spline::input_range(bits);
        let start = self.breaks.partition_point(|&t| t as i128 <= lo);
        let end = self.breaks.partition_point(|&t| t as i128 <= hi);
        start..end
    }

    /// How many comparisons the protocol makes per element for inputs
    /// with `|v| < 2^(bits−1)`: the breakpoints inside that range.
    pub fn comparisons(&self, bits: u32) -> usize {
        self.active(bits).len()
    }

    /// The width of those comparisons: `bits` if every breakpoint inside
    /// the range is 0 (at least 2), else `bits + 1`.
    pub fn comparison_bits(&self, bits: u32) -> u32 {
        let all_zero = self.breaks[self.active(bits)].iter().all(|&t| t == 0);
        if all_zero { bits.max(2) } else { bits + 1 }
    }

    /// The least and greatest `u(x)` over `|x| < 2^(bits−1)` (exact; for
    /// overflow checks and bound propagation).
    pub fn value_range(&self, bits: u32) -> (i128, i128) {
        let (lo, hi) = Spline::input_range(bits);
        let active = self.active(bits);
        let (mut min, mut max) = (i128::MAX, i128::MIN);
        for j in active.start..=active.end {
            let start = if j == 0 {
                lo
            } else {
                (self.breaks[j - 1] as i128).max(lo)
            };
            let end = match self.breaks.get(j) {
                Some(&t) => (t as i128 - 1).min(hi),
                None => hi,
            };
            if start > end {
                continue;
            }
            for x in [start, end] {
                let u = self.slopes[j] as i128 * x + self.intercepts[j] as i128;
                min = min.min(u);
                max = max.max(u);
            }
        }
        (min, max)
    }

    /// The protocol's exact cost on `n` inputs with `|v| < 2^(bits−1)`
    /// (same as [`cost::piecewise`]).
    pub fn cost(&self, ring: Ring, n: usize, bits: u32) -> Cost {
        cost::piecewise(ring, n, self, bits)
    }

    /// LeakyRelu: `v` for `v ≥ 0`, `α̂·v` below, `α̂ = round(α·2^s)/2^s`
    /// with `s = slope_frac_bits`. Exact for `v ≥ 0`; within one unit of
    /// `α̂·v` below.
    pub fn leaky_relu(alpha: f64, slope_frac_bits: u32) -> Result<Spline, MpcError> {
        if slope_frac_bits > 62 {
            return Err(shape(format!(
                "LeakyRelu slope with {slope_frac_bits} fractional bits: at most 62"
            )));
        }
        let scaled = (alpha * (slope_frac_bits as f64).exp2()).round();
        if !scaled.is_finite() || scaled.abs() >= 2f64.powi(62) {
            return Err(shape(format!(
                "LeakyRelu alpha {alpha} with {slope_frac_bits} fractional bits does not fit"
            )));
        }
        Spline::new(
            vec![0],
            vec![scaled as i64, 1 << slope_frac_bits],
            vec![0, 0],
            slope_frac_bits,
        )
    }

    /// Clip: `lo` below `lo`, `hi` from `hi` on, the input between (all in
    /// input units, `lo ≤ hi`). Exact, no truncation.
    pub fn clip(lo: i64, hi: i64) -> Result<Spline, MpcError> {
        match lo.cmp(&hi) {
            std::cmp::Ordering::Greater => Err(shape(format!("Clip with min {lo} > max {hi}"))),
            std::cmp::Ordering::Equal => Spline::new(vec![], vec![0], vec![lo], 0),
            std::cmp::Ordering::Less => {
                Spline::new(vec![lo, hi], vec![0, 1, 0], vec![lo, 0, hi], 0)
            }
        }
    }

    /// The logistic function `1/(1 + e^−x)` on inputs and outputs with
    /// `f_in` fractional bits, within `max_error` (see the module docs).
    pub fn sigmoid(f_in: u32, max_error: f64) -> Result<Approximation, MpcError> {
        approximate(&SIGMOID, f_in, max_error)
    }

    /// `tanh` on inputs and outputs with `f_in` fractional bits, within
    /// `max_error` (see the module docs).
    pub fn tanh(f_in: u32, max_error: f64) -> Result<Approximation, MpcError> {
        approximate(&TANH, f_in, max_error)
    }
}

/// A smooth odd-symmetric activation: `g(−x) = 2·g(0) − g(x)`, concave on
/// `x ≥ 0` (so `g'` decreases there), tending to 1.
struct Smooth {
    name: &'static str,
    value: fn(f64) -> f64,
    slope: fn(f64) -> f64,
    /// `2·g(0)`
    twice_center: i64,
}

fn logistic(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

const SIGMOID: Smooth = Smooth {
    name: "Sigmoid",
    value: logistic,
    // σ' = e^−|x| / (1 + e^−|x|)², without cancellation
    slope: |x| {
        let e = (-x.abs()).exp();
        e / ((1.0 + e) * (1.0 + e))
    },
    twice_center: 1,
};

const TANH: Smooth = Smooth {
    name: "Tanh",
    value: f64::tanh,
    // tanh' = 1/cosh², without cancellation
    slope: |x| {
        let c = x.cosh();
        1.0 / (c * c)
    },
    twice_center: 0,
};

/// The least and greatest values of `e(x) = g(x) − β·x` on `[xa, xb]`
/// (`0 ≤ xa < xb`). `e` is concave there, so its least value is at an end
/// and its greatest where `g' = β` (bisection; `g'` decreases), or at an
/// end if `g' − β` keeps one sign. Locating that point to within `δ`
/// misses the maximum by `O(|g''|·δ²)` only, as `e' = 0` there.
fn extremes(g: &Smooth, beta: f64, xa: f64, xb: f64) -> (f64, f64) {
    let e = |x: f64| (g.value)(x) - beta * x;
    let (ea, eb) = (e(xa), e(xb));
    let max = if (g.slope)(xa) <= beta {
        ea
    } else if (g.slope)(xb) >= beta {
        eb
    } else {
        let (mut lo, mut hi) = (xa, xb);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            if (g.slope)(mid) > beta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        e(lo).max(e(hi)).max(ea).max(eb)
    };
    (ea.min(eb), max)
}

/// One segment's line: `u(x) = slope·x + intercept` and its proven error
/// after truncation.
struct Fit {
    slope: i64,
    intercept: i64,
    error: f64,
}

/// Fixed-point scales of an approximation.
#[derive(Clone, Copy)]
struct Scales {
    /// input and output fractional bits
    f: u32,
    /// slope fractional bits
    s: u32,
}

impl Scales {
    /// `2^−f`: one input or output unit.
    fn unit(self) -> f64 {
        (-(self.f as f64)).exp2()
    }

    /// `2^(f+s)`: one in the scale of `u`.
    fn one(self) -> f64 {
        ((self.f + self.s) as f64).exp2()
    }
}

/// The line for `g` on `[a, b]` (input units, `0 < a < b`): the chord's
/// slope rounded to `s` bits, the intercept that centres the error range
/// of `g − slope·x`, and the exact `sup |g − u|` plus truncation and margin.
fn fit(g: &Smooth, sc: Scales, a: i64, b: i64) -> Fit {
    let (unit, one) = (sc.unit(), sc.one());
    let (xa, xb) = (a as f64 * unit, b as f64 * unit);
    let chord = ((g.value)(xb) - (g.value)(xa)) / (xb - xa);
    let slope = (chord * (sc.s as f64).exp2()).round() as i64;
    let beta = slope as f64 / (sc.s as f64).exp2();
    let (min, max) = extremes(g, beta, xa, xb);
    let intercept = (0.5 * (min + max) * one).round() as i64;
    let c = intercept as f64 / one;
    Fit {
        slope,
        intercept,
        error: (max - c).max(c - min) + unit + PROOF_MARGIN,
    }
}

/// The odd line `g(0) + β·x` for `g` on `[−a, a]`, `a > 0`: on `[0, a]` the
/// error `e = g − g(0) − β·x` is concave with `e(0) = 0`, and odd about 0,
/// so `sup |e| = max(max e, −min e)` over `[0, a]`. Its greatest value
/// falls and its least value rises as `β` grows; `β` is where they meet
/// (bisection), then the best of its roundings to `s` bits.
fn fit_central(g: &Smooth, sc: Scales, a: i64) -> Fit {
    let unit = sc.unit();
    let xa = a as f64 * unit;
    let g0 = (g.value)(0.0);
    let sup = |beta: f64| {
        let (min, max) = extremes(g, beta, 0.0, xa);
        ((max - g0).max(0.0), (g0 - min).max(0.0))
    };
    let (mut lo, mut hi) = ((g.slope)(xa), (g.slope)(0.0));
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        let (above, below) = sup(mid);
        if above > below {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let scale = (sc.s as f64).exp2();
    let center = (lo * scale).round() as i64;
    let error = |slope: i64| {
        let (above, below) = sup(slope as f64 / scale);
        above.max(below)
    };
    let slope = (center - 1..=center + 1)
        .min_by(|&x, &y| error(x).total_cmp(&error(y)))
        .unwrap_or(center);
    Fit {
        slope,
        intercept: g.twice_center << (sc.f + sc.s - 1),
        error: error(slope) + unit + PROOF_MARGIN,
    }
}

/// The largest `b` in `(a, a + cap]` with `meets(b)`, for a condition that
/// holds up to some point and fails after it; `None` if `meets(a + 1)`
/// fails.
fn longest(a: i64, cap: i64, meets: impl Fn(i64) -> bool) -> Option<i64> {
    if !meets(a + 1) {
        return None;
    }
    // double, then halve the gap between the last length that meets the
    // condition and the first that does not
    let mut len = 1;
    while len < cap && meets(a + 2 * len) {
        len *= 2;
    }
    let (mut good, mut bad) = (a + len, a + 2 * len);
    if len < cap {
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if meets(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
    }
    Some(good)
}

fn approximation_error(g: &Smooth, problem: String) -> MpcError {
    MpcError::Approximation(format!("{}: {problem}", g.name))
}

fn approximate(g: &Smooth, f: u32, eps: f64) -> Result<Approximation, MpcError> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(approximation_error(
            g,
            format!("target error {eps} is not a positive number"),
        ));
    }
    if !(1..=40).contains(&f) {
        return Err(approximation_error(
            g,
            format!("{f} fractional bits: between 1 and 40"),
        ));
    }
    let unit = (-(f as f64)).exp2();
    if unit + PROOF_MARGIN >= eps {
        return Err(approximation_error(
            g,
            format!(
                "the truncation alone errs by up to 2^-{f} = {unit:e}, not below the target {eps:e}"
            ),
        ));
    }
    let s = (64.0 / eps).log2().ceil().max(1.0) as u32;
    if f + s > 60 {
        return Err(approximation_error(
            g,
            format!("target {eps:e} needs {s} slope fractional bits, too many with {f} input bits"),
        ));
    }
    let sc = Scales { f, s };
    let one = 1i64 << (f + s);
    // no segment is longer than 32 (real units): the tails are flat by then
    let cap = 1i64 << (f + 5);
    let tail = |a: i64| 1.0 - (g.value)(a as f64 * unit) + PROOF_MARGIN;
    let no_segment = |a: i64| {
        approximation_error(
            g,
            format!("no segment from {a} meets {eps:e} with {f} fractional bits"),
        )
    };

    // a segment that reaches the flat part ends where the tail may start
    let flat_from = |a: i64, b: i64, meets: &dyn Fn(i64) -> bool| {
        if tail(b) > eps {
            return b;
        }
        let (mut steep, mut flat) = (a, b);
        while flat - steep > 1 {
            let mid = steep + (flat - steep) / 2;
            if tail(mid) <= eps {
                flat = mid;
            } else {
                steep = mid;
            }
        }
        if meets(flat) { flat } else { b }
    };

    let meets = |b: i64| fit_central(g, sc, b).error <= eps;
    let first = longest(0, cap, meets).ok_or(no_segment(0))?;
    let first = flat_from(0, first, &meets);
    let central = fit_central(g, sc, first);
    let mut ends = vec![first];
    let mut lines: Vec<Fit> = Vec::new();
    let mut a = first;
    while tail(a) > eps {
        if lines.len() == MAX_SEGMENTS_PER_SIDE {
            return Err(approximation_error(
                g,
                format!("more than {MAX_SEGMENTS_PER_SIDE} segments per side for {eps:e}"),
            ));
        }
        let meets = |b: i64| fit(g, sc, a, b).error <= eps;
        let b = longest(a, cap, meets).ok_or(no_segment(a))?;
        let b = flat_from(a, b, &meets);
        lines.push(fit(g, sc, a, b));
        ends.push(b);
        a = b;
    }
    let tail_error = tail(a);

    // left tail, left lines (mirrored), the central line, right lines,
    // right tail
    let center = g.twice_center * one;
    let mut breaks: Vec<i64> = ends.iter().rev().map(|&e| -e).collect();
    breaks.extend_from_slice(&ends);
    let mut slopes = vec![0];
    let mut intercepts = vec![center - one];
    let mut segment_errors = vec![tail_error];
    for line in lines.iter().rev() {
        slopes.push(line.slope);
        intercepts.push(center - line.intercept);
        segment_errors.push(line.error);
    }
    slopes.push(central.slope);
    intercepts.push(central.intercept);
    segment_errors.push(central.error);
    for line in &lines {
        slopes.push(line.slope);
        intercepts.push(line.intercept);
        segment_errors.push(line.error);
    }
    slopes.push(0);
    intercepts.push(one);
    segment_errors.push(tail_error);
    let spline = Spline::new(breaks, slopes, intercepts, s)?;
    let max_error = segment_errors.iter().copied().fold(0.0, f64::max);
    Ok(Approximation {
        spline,
        max_error,
        segment_errors,
        saturation: a,
    })
}

/// Shares of `trunc_s(u(v))` for shared `v` (this party's shares `x`,
/// `|v| < 2^(bits−1)`), with `u` the spline's exact value (see the module
/// docs): `⌈u/2^s⌉ − 1 ≤ r ≤ ⌈u/2^s⌉`, exact when `s = 0`. Refuses, before
/// any message, a width the ring cannot compare or a spline whose values on
/// that range leave the truncation's range.
pub async fn piecewise(
    p: &mut Party,
    x: &[u64],
    spline: &Spline,
    bits: u32,
) -> Result<Vec<u64>, MpcError> {
    let ring = p.ring();
    let (k, mask) = (ring.bits(), ring.mask());
    let n = x.len();
    let active = spline.active(bits);
    let width = spline.comparison_bits(bits);
    if bits == 0 || bits > k || (!active.is_empty() && width > k) {
        return Err(shape(format!(
            "piecewise function of {bits}-bit values in Z_2^{k}: its breakpoints are compared on \
             {width} bits, at most {k}"
        )));
    }
    let s = spline.slope_frac_bits;
    if s > 0 && s + 2 > k {
        return Err(shape(format!(
            "piecewise function truncated by {s} bits in Z_2^{k}: at most {} bits",
            k.saturating_sub(2)
        )));
    }
    let (lo, hi) = spline.value_range(bits);
    let (min, max) = if s > 0 {
        (-(1i128 << (k - 2)) + 1, (1i128 << (k - 2)) - 1)
    } else {
        (-(1i128 << (k - 1)), (1i128 << (k - 1)) - 1)
    };
    if lo < min || hi > max {
        return Err(shape(format!(
            "piecewise function on {bits}-bit inputs reaches [{lo}, {hi}] before its shift by \
             {s} bits, outside [{min}, {max}] in Z_2^{k}"
        )));
    }
    cost::ensure(p.correlations(), &spline.cost(ring, n, bits).demand)?;

    let client = p.is_client();
    let coefficient = |v: i64| (v as u64) & mask;
    let x: Vec<u64> = x.iter().map(|&v| v & mask).collect();
    // the segment in force at the lowest input: every breakpoint below the
    // range is passed, publicly
    let base = active.start;
    let (a0, c0) = (
        coefficient(spline.slopes[base]),
        coefficient(spline.intercepts[base]),
    );
    let mut u: Vec<u64> = x
        .iter()
        .map(|&v| {
            let ax = a0.wrapping_mul(v);
            (if client { ax.wrapping_add(c0) } else { ax }) & mask
        })
        .collect();
    if !active.is_empty() && n > 0 {
        let pairs = n * active.len();
        let (mut diffs, mut ys) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
        for i in active {
            let t = coefficient(spline.breaks[i]);
            let da = coefficient(spline.slopes[i + 1].wrapping_sub(spline.slopes[i]));
            let dc = coefficient(spline.intercepts[i + 1].wrapping_sub(spline.intercepts[i]));
            for &v in &x {
                let (d, y) = if client {
                    (v.wrapping_sub(t), da.wrapping_mul(v).wrapping_add(dc))
                } else {
                    (v, da.wrapping_mul(v))
                };
                diffs.push(d & mask);
                ys.push(y & mask);
            }
        }
        let passed = drelu(p, &diffs, width).await?;
        let terms = mul_bit(p, &passed, &ys).await?;
        for chunk in terms.chunks_exact(n) {
            for (u, t) in u.iter_mut().zip(chunk) {
                *u = u.wrapping_add(*t) & mask;
            }
        }
    }
    truncate(p, &u, s, Sign::Signed).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::{Io, Machine, Role, run_pair};
    use secinfer_ot::insecure_test_dealer;

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Runs the protocol as two [`Machine`]s under [`run_pair`] on dealt
    /// correlations; checks the traffic and that both stores end empty;
    /// returns the opened outputs.
    fn run_machines(k: u32, spline: &Spline, bits: u32, v: &[i64], rng: &mut Rng) -> Vec<i64> {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::piecewise(r, v.len(), spline, bits);
        let (cs, ss) = insecure_test_dealer::stores(rng, &c.demand);
        let (ic, is) = (Io::default(), Io::default());
        let client = Party::new(Role::Client, r, cs, ic.clone()).unwrap();
        let server = Party::new(Role::Server, r, ss, is.clone()).unwrap();
        let run = |mut p: Party, x: Vec<u64>, spline: Spline| async move {
            let out = piecewise(&mut p, &x, &spline, bits).await;
            let stats = p.stats();
            (out, stats, p.into_correlations().available())
        };
        let (a, b) = run_pair(
            Machine::new(ic, run(client, xc, spline.clone())),
            Machine::new(is, run(server, xs, spline.clone())),
        )
        .unwrap();
        for ((_, stats, left), role) in [(&a, Role::Client), (&b, Role::Server)] {
            assert_eq!(stats.messages_sent, c.messages(role), "{role:?} messages");
            assert_eq!(stats.bytes_sent, c.bytes(role), "{role:?} bytes");
            assert!(left.is_zero(), "{role:?} left {left:?}");
        }
        open_signed(r, a.0.as_ref().unwrap(), b.0.as_ref().unwrap())
    }

    /// As [`run_machines`] with the test driver (tampering, message log).
    fn run_duo(k: u32, spline: &Spline, bits: u32, v: &[i64], rng: &mut Rng) -> Vec<i64> {
        let r = ring(k);
        let (xc, xs) = split_signed(rng, r, v);
        let c = cost::piecewise(r, v.len(), spline, bits);
        let out = duo!(
            r,
            c.demand,
            |p| piecewise(p, &xc, spline, bits).await,
            |p| { piecewise(p, &xs, spline, bits).await }
        );
        out.check_cost(&c);
        open_signed(
            r,
            out.client.as_ref().unwrap(),
            out.server.as_ref().unwrap(),
        )
    }

    /// `⌈u/2^s⌉ − 1 ≤ r ≤ ⌈u/2^s⌉`, equality when `2^s` divides `u`.
    fn assert_truncation_of(spline: &Spline, x: i64, r: i64) {
        let s = spline.slope_frac_bits();
        let u = spline.exact(x);
        let ceil = u.div_euclid(1 << s) + (u.rem_euclid(1 << s) != 0) as i128;
        if u.rem_euclid(1 << s) == 0 {
            assert_eq!(r as i128, ceil, "x = {x}: u = {u} is a multiple of 2^{s}");
        } else {
            assert!(
                r as i128 == ceil || r as i128 == ceil - 1,
                "x = {x}: u = {u}, r = {r}"
            );
        }
    }

    type Reference = fn(f64) -> f64;

    /// Sigmoid within 1e-3 and Tanh within 2e-3 at 12, 14 and 16
    /// fractional bits: `(name, reference, approximation, f, target)`.
    fn approximations() -> Vec<(&'static str, Reference, Approximation, u32, f64)> {
        let mut out = Vec::new();
        for f in [12u32, 14, 16] {
            let sig = Spline::sigmoid(f, 1e-3).unwrap();
            out.push(("sigmoid", sigmoid as Reference, sig, f, 1e-3));
            let tanh = Spline::tanh(f, 2e-3).unwrap();
            out.push(("tanh", f64::tanh as Reference, tanh, f, 2e-3));
        }
        out
    }

    #[test]
    fn sigmoid_and_tanh_bounds_hold_on_every_input_and_are_nearly_attained() {
        // in the clear, on every representable input of the non-constant
        // part and one unit of input beyond: the exact value before the
        // truncation, plus the truncation's one unit, is within each
        // segment's bound
        for (name, g, approx, f, eps) in approximations() {
            let spline = &approx.spline;
            assert!(approx.max_error <= eps, "{name} f = {f}");
            assert_eq!(approx.segment_errors.len(), spline.segments());
            let unit = (-(f as f64)).exp2();
            let scale = ((f + spline.slope_frac_bits()) as f64).exp2();
            let span = approx.saturation + (1 << f);
            let mut worst = vec![0f64; spline.segments()];
            for x in -span..=span {
                let j = spline.segment(x);
                let err = (spline.exact(x) as f64 / scale - g(x as f64 * unit)).abs();
                // the tails are exact multiples: no truncation error there
                let trunc = if j == 0 || j + 1 == spline.segments() {
                    0.0
                } else {
                    unit
                };
                worst[j] = worst[j].max(err + trunc);
                assert!(
                    err + trunc <= approx.segment_errors[j],
                    "{name} f = {f}, x = {x}: {err} + {trunc} > {}",
                    approx.segment_errors[j]
                );
            }
            // every segment's bound is within 2 % of what its inputs reach
            for (j, (&w, &bound)) in worst.iter().zip(&approx.segment_errors).enumerate() {
                assert!(
                    w >= 0.98 * bound,
                    "{name} f = {f}, segment {j}: reached {w}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn sigmoid_and_tanh_segment_counts_for_the_stated_targets() {
        // the breakpoint counts this construction reaches (2p + 1 for p
        // linear segments per side); a change that needs more segments for
        // the same target fails here
        let table: Vec<(&str, u32, f64, usize, f64, f64)> = approximations()
            .into_iter()
            .map(|(name, _, a, f, eps)| {
                let sat = a.saturation as f64 / (f as f64).exp2();
                (name, f, eps, a.spline.breaks().len(), a.max_error, sat)
            })
            .collect();
        for (name, f, eps, m, err, sat) in &table {
            println!(
                "{name:8} f_in = {f}: target {eps:e}, {m} breakpoints, proven {err:.4e}, constant beyond ±{sat:.3}"
            );
        }
        for (name, f, _, m, _, _) in table {
            let limit = match (name, f) {
                ("sigmoid", 12) => 22,
                _ => 20,
            };
            assert!(m <= limit, "{name} f = {f}: {m} breakpoints");
        }
    }

    #[test]
    fn sigmoid_and_tanh_in_the_protocol_are_within_the_proven_bound() {
        let mut rng = rng(71);
        for (name, g, approx, f, _) in approximations() {
            if f == 14 {
                continue;
            }
            let spline = &approx.spline;
            let bits = f + 8; // inputs in (−128, 128)
            let half = 1i64 << (bits - 1);
            let mut v: Vec<i64> = vec![0, 1, -1, half - 1, -half, half - 2, -half + 1];
            for &t in spline.breaks() {
                v.extend((-2..=2).map(|d| t + d));
            }
            // a dense grid over the non-constant part and both saturation
            // sides, and random inputs over the whole range
            let span = approx.saturation + (1 << f);
            let stride = (1 << f) / 512;
            v.extend((-span / stride..=span / stride).map(|i| i * stride + (i % 3)));
            v.extend(random_signed(&mut rng, bits, 500));
            let got = run_machines(37, spline, bits, &v, &mut rng);
            let unit = (-(f as f64)).exp2();
            let mut worst = 0f64;
            for (&x, &r) in v.iter().zip(&got) {
                assert_truncation_of(spline, x, r);
                let err = (r as f64 * unit - g(x as f64 * unit)).abs();
                assert!(
                    err <= approx.max_error,
                    "{name} f = {f}: x = {x} gave {r}, error {err} > {}",
                    approx.max_error
                );
                worst = worst.max(err);
            }
            println!(
                "{name:8} f_in = {f}: {} inputs, worst error {worst:.4e}, proven {:.4e}",
                v.len(),
                approx.max_error
            );
            assert!(
                worst >= approx.max_error / 4.0,
                "{name} f = {f}: bound {} is loose, reached {worst}",
                approx.max_error
            );
        }
    }

    #[test]
    fn leaky_relu_and_clip_are_exact_up_to_the_truncation() {
        let mut rng = rng(72);
        let bits = 20;
        let top = (1i64 << (bits - 1)) - 1;
        for (alpha, s) in [(0.01, 16u32), (0.2, 8), (0.5, 1), (-0.25, 12), (1.0, 0)] {
            let spline = Spline::leaky_relu(alpha, s).unwrap();
            // a single breakpoint at 0: compared on `bits` bits, like ReLU
            assert_eq!(spline.comparison_bits(bits), bits);
            let mut v = signed_edges(bits);
            v.extend([2, -2, 255, -255, 256, -256, top - 1]);
            v.extend(random_signed(&mut rng, bits, 300));
            let got = run_duo(37, &spline, bits, &v, &mut rng);
            let a = (alpha * (s as f64).exp2()).round() as i64;
            for (&x, &r) in v.iter().zip(&got) {
                if x >= 0 {
                    assert_eq!(r, x, "LeakyRelu({alpha}) of {x}");
                } else {
                    assert_truncation_of(&spline, x, r);
                    let want = (a * x) as f64 / (s as f64).exp2();
                    assert!((r as f64 - want).abs() <= 1.0, "{x}: {r} vs {want}");
                }
            }
        }
        for (lo, hi) in [
            (0i64, 6 << 12),
            (-4096, 4096),
            (-top - 1, top + 1), // the whole range: no comparison
            (5, 5),
            (0, i64::MAX),
            (i64::MIN, -7),
        ] {
            let spline = Spline::clip(lo, hi).unwrap();
            let mut v = signed_edges(bits);
            for e in [lo, hi] {
                v.extend(
                    [-1, 0, 1]
                        .map(|d| e.saturating_add(d))
                        .map(|x| x.clamp(-top - 1, top)),
                );
            }
            v.extend(random_signed(&mut rng, bits, 300));
            let got = run_duo(37, &spline, bits, &v, &mut rng);
            for (&x, &r) in v.iter().zip(&got) {
                assert_eq!(r, x.clamp(lo, hi), "Clip({lo}, {hi}) of {x}");
            }
        }
        // Clip of the whole range costs nothing, Clip(0, ∞) one comparison
        let whole = Spline::clip(-top - 1, top + 1).unwrap();
        assert_eq!(whole.comparisons(bits), 0);
        assert_eq!(
            cost::piecewise(ring(37), 100, &whole, bits),
            Cost::default()
        );
        assert_eq!(Spline::clip(0, i64::MAX).unwrap().comparisons(bits), 1);
        // a breakpoint at the top of the range is still compared
        assert_eq!(Spline::clip(-top - 1, top).unwrap().comparisons(bits), 1);
    }

    #[test]
    fn breakpoints_outside_the_input_range_are_decided_publicly() {
        let mut rng = rng(73);
        let bits = 10; // inputs in [−512, 511]
        let spline = Spline::new(
            vec![-2000, -512, -511, 0, 300, 511, 512, 4000],
            vec![1, -2, 3, -4, 5, -6, 7, -8, 9],
            vec![10, -20, 30, -40, 50, -60, 70, -80, 90],
            2,
        )
        .unwrap();
        // −2000 and −512 are always passed, 512 and 4000 never
        assert_eq!(spline.comparisons(bits), 4);
        let mut v: Vec<i64> = (-512..512).collect();
        v.extend(signed_edges(bits));
        let got = run_duo(37, &spline, bits, &v, &mut rng);
        for (&x, &r) in v.iter().zip(&got) {
            assert_truncation_of(&spline, x, r);
        }
        let (lo, hi) = spline.value_range(bits);
        let exact: Vec<i128> = (-512..512).map(|x| spline.exact(x)).collect();
        assert_eq!(
            (lo, hi),
            (*exact.iter().min().unwrap(), *exact.iter().max().unwrap())
        );
    }

    #[test]
    fn rounds_do_not_grow_with_the_number_of_breakpoints() {
        let r = ring(37);
        let mut flights = Vec::new();
        for m in [1usize, 2, 7, 40] {
            let breaks: Vec<i64> = (0..m as i64).map(|i| 10 * i + 3).collect();
            let spline = Spline::new(breaks, vec![1; m + 1], vec![0; m + 1], 4).unwrap();
            let c = cost::piecewise(r, 100, &spline, 20);
            flights.push((c.client_messages, c.server_messages));
            // and the protocol sends exactly that
            let v: Vec<i64> = (-50..450).collect();
            run_duo(37, &spline, 20, &v, &mut rng(74));
        }
        assert!(flights.windows(2).all(|w| w[0] == w[1]), "{flights:?}");
        // DReLU on 21 bits (6 flights), the products (2), the truncation (2
        // flights, one message each way)
        assert_eq!(flights[0], (9, 9));
    }

    #[test]
    fn output_shares_and_messages_are_uniform_for_a_fixed_input() {
        let r = ring(40);
        let n = 1 << 12;
        let f = 12;
        let sig = Spline::sigmoid(f, 1e-3).unwrap().spline;
        let tanh = Spline::tanh(f, 2e-3).unwrap().spline;
        let leaky = Spline::leaky_relu(0.01, 16).unwrap();
        let clip = Spline::clip(0, 6 << f).unwrap();
        for (name, spline, x) in [
            ("sigmoid, middle", &sig, 3 << (f - 2)),
            ("sigmoid, saturated", &sig, -(20 << f)),
            ("tanh", &tanh, -(1 << f)),
            ("LeakyRelu", &leaky, -(5 << f)),
            ("Clip, untruncated", &clip, 7 << f),
        ] {
            // the client holds the whole input: a fixed split
            let (xc, xs) = (vec![r.from_signed(x); n], vec![0u64; n]);
            let c = cost::piecewise(r, n, spline, 20);
            let out = duo!(r, c.demand, |p| piecewise(p, &xc, spline, 20).await, |p| {
                piecewise(p, &xs, spline, 20).await
            });
            let (a, b) = (out.client.as_ref().unwrap(), out.server.as_ref().unwrap());
            assert_uniform_ring(r, a, &format!("{name}: client share"));
            assert_uniform_ring(r, b, &format!("{name}: server share"));
            out.assert_uniform_messages(name);
            let opened = open_signed(r, a, b);
            assert_truncation_of(spline, x, opened[0]);
        }
    }

    #[test]
    fn a_store_with_exactly_the_demand_ends_empty_and_one_fewer_fails_naming_the_kind() {
        let r = ring(37);
        let spline = Spline::sigmoid(12, 1e-3).unwrap().spline;
        let bits = 20;
        let n = 70;
        let v: Vec<i64> = (0..n as i64).map(|i| (i - 35) * 500).collect();
        // exactly the demand: run_duo checks both stores end empty
        run_duo(37, &spline, bits, &v, &mut rng(75));
        let c = cost::piecewise(r, n, &spline, bits);
        let kinds = [
            ("bit triple", "bit triple"),
            ("bit OT (sent)", "bit OT (received)"),
            ("bit OT (received)", "bit OT (sent)"),
            ("word OT (sent)", "word OT (received)"),
            ("word OT (received)", "word OT (sent)"),
        ];
        let mut tried = 0;
        for (i, (client_kind, server_kind)) in kinds.iter().enumerate() {
            let mut short = c.demand;
            let field = [
                &mut short.triples,
                &mut short.bit_ots_client_sends,
                &mut short.bit_ots_server_sends,
                &mut short.word_ots_client_sends,
                &mut short.word_ots_server_sends,
            ]
            .into_iter()
            .nth(i)
            .unwrap();
            let Some(fewer) = field.checked_sub(1) else {
                continue;
            };
            *field = fewer;
            tried += 1;
            let x = vec![0u64; n];
            let mut sent = 0;
            let (a, b) = duo_tampered!(
                r,
                short,
                &mut |_, _, _: &mut Vec<u8>| sent += 1,
                |p| piecewise(p, &x, &spline, bits).await,
                |p| piecewise(p, &x, &spline, bits).await
            );
            for (result, kind) in [(a, client_kind), (b, server_kind)] {
                let e = result.expect("a short store ends the run").unwrap_err();
                assert!(
                    matches!(e, MpcError::Correlation(_)) && e.to_string().contains(kind),
                    "{e}"
                );
            }
            assert_eq!(sent, 0, "nothing is sent");
        }
        // triples, bit OTs the server sends, word OTs both ways
        assert_eq!(tried, 4);
    }

    #[test]
    fn malformed_splines_and_out_of_range_values_are_refused_before_any_message() {
        assert!(matches!(
            Spline::new(vec![1, 1], vec![0; 3], vec![0; 3], 0),
            Err(MpcError::Shape(m)) if m.contains("increase")
        ));
        assert!(matches!(
            Spline::new(vec![1, 2], vec![0; 2], vec![0; 3], 0),
            Err(MpcError::Shape(m)) if m.contains("slopes")
        ));
        assert!(Spline::new(vec![], vec![0], vec![0], 63).is_err());
        assert!(Spline::clip(3, 2).is_err());
        assert!(Spline::leaky_relu(f64::NAN, 8).is_err());

        let sig = Spline::sigmoid(16, 1e-3).unwrap().spline;
        let steep = Spline::new(vec![0], vec![0, 1 << 20], vec![0, 0], 2).unwrap();
        let x = vec![0u64; 5];
        for (k, spline, bits, what) in [
            // values up to 2^32 need |u| < 2^(k−2)
            (33u32, &sig, 20u32, "outside"),
            (37, &steep, 20, "outside"),
            // comparisons on bits + 1 bits
            (37, &sig, 37, "compared on 38 bits"),
            (37, &sig, 0, "compared"),
        ] {
            let mut sent = 0;
            let (a, b) = duo_tampered!(
                ring(k),
                cost::piecewise(ring(k), 5, spline, bits.min(k - 1)).demand,
                &mut |_, _, _: &mut Vec<u8>| sent += 1,
                |p| piecewise(p, &x, spline, bits).await,
                |p| piecewise(p, &x, spline, bits).await
            );
            for result in [a, b] {
                let e = result.unwrap().unwrap_err();
                assert!(
                    matches!(&e, MpcError::Shape(m) if m.contains(what)),
                    "k = {k}, bits = {bits}: {e}"
                );
            }
            assert_eq!(sent, 0);
        }
        // the same sigmoid fits a 37-bit ring: its values stay within the
        // error bound of [0, 1] (in units of 2^−32)
        let (lo, hi) = sig.value_range(20);
        assert!(lo > -(1 << 22) && hi < (1 << 32) + (1 << 22), "{lo} {hi}");
    }

    #[test]
    fn approximation_targets_that_cannot_be_met_are_refused() {
        for (f, eps) in [
            (12u32, 2e-4),
            (8, 1e-3),
            (0, 0.1),
            (12, 0.0),
            (12, f64::NAN),
        ] {
            for result in [Spline::sigmoid(f, eps), Spline::tanh(f, eps)] {
                assert!(
                    matches!(result, Err(MpcError::Approximation(_))),
                    "f = {f}, eps = {eps}: {result:?}"
                );
            }
        }
        // a loose target is met by fewer segments
        let a = Spline::tanh(12, 0.05).unwrap().spline.breaks().len();
        let b = Spline::tanh(12, 0.005).unwrap().spline.breaks().len();
        assert!(a < b, "{a} {b}");
        // the halves mirror each other about the centre
        for (approx, f, twice_center) in [
            (Spline::sigmoid(12, 1e-3).unwrap(), 12, 1i64),
            (Spline::tanh(14, 2e-3).unwrap(), 14, 0),
        ] {
            let s = &approx.spline;
            let center = twice_center << (f + s.slope_frac_bits());
            let m = s.breaks().len();
            let last = s.segments() - 1;
            for i in 0..m {
                assert_eq!(s.breaks()[i], -s.breaks()[m - 1 - i]);
            }
            for j in 0..=last {
                assert_eq!(s.slopes()[j], s.slopes()[last - j]);
                assert_eq!(s.intercepts()[j] + s.intercepts()[last - j], center);
            }
        }
    }
}
