//! Fixed-point encoding: a real `x` is the ring element `round(x * 2^f)`
//! (two's complement), `f` being the number of fractional bits.
//!
//! Rounding is half away from zero (`f64::round`). Scaling by `2^f` is exact
//! in `f64` (an `f32` input has 24 significant bits), so the only rounding is
//! that final one: `decode(encode(x))` is within `2^-(f+1)` of `x`.

use ndarray::{ArrayD, ArrayViewD, Dimension};

use crate::error::TensorIndex;
use crate::{Ring, RingError, RingTensor};

/// The largest accepted number of fractional bits (`2^1023` is the largest
/// finite power of two in `f64`).
pub const MAX_FRAC_BITS: u32 = 1023;

/// Why one value could not be encoded (the index is added by the caller).
enum Fail {
    NotFinite,
    OutOfRange,
}

fn check_frac(frac_bits: u32) -> Result<f64, RingError> {
    if frac_bits > MAX_FRAC_BITS {
        return Err(RingError::InvalidFracBits {
            frac_bits,
            max: MAX_FRAC_BITS,
        });
    }
    Ok(2f64.powi(frac_bits as i32))
}

/// `round(x * scale)` as a ring element, if finite and `|.| < 2^(bits-1)`.
#[inline]
/// `2^(bits-1)`: encodings must stay below it in magnitude.
fn half_range(ring: Ring) -> f64 {
    2f64.powi(ring.bits() as i32 - 1)
}

fn encode_one(ring: Ring, x: f64, scale: f64, half: f64) -> Result<u64, Fail> {
    if !x.is_finite() {
        return Err(Fail::NotFinite);
    }
    let q = (x * scale).round();
    // Also rejects x * scale == +-inf.
    if q.abs() < half {
        Ok(ring.from_signed(q as i64))
    } else {
        Err(Fail::OutOfRange)
    }
}

fn encode_error(ring: Ring, x: f32, frac_bits: u32, fail: Fail, at: TensorIndex) -> RingError {
    // The f64 nearest the f32's shortest decimal form, so that messages read
    // "1.2e12" rather than "1.199999942656e12".
    let x = format!("{x:e}").parse::<f64>().unwrap_or(x as f64);
    match fail {
        Fail::NotFinite => RingError::NotFinite { value: x, at },
        Fail::OutOfRange => RingError::OutOfRange {
            value: x,
            at,
            bits: ring.bits(),
            frac_bits,
        },
    }
}

/// Encodes `x` as `round(x * 2^frac_bits)` in `ring` (two's complement).
///
/// Errors on NaN or an infinity, when the rounded value `q` has
/// `|q| >= 2^(bits-1)` (so `-2^(bits-1)` is rejected too: the range is
/// symmetric), or when `frac_bits` exceeds [`MAX_FRAC_BITS`].
pub fn encode(ring: Ring, x: f32, frac_bits: u32) -> Result<u64, RingError> {
    let scale = check_frac(frac_bits)?;
    encode_one(ring, x as f64, scale, half_range(ring))
        .map_err(|fail| encode_error(ring, x, frac_bits, fail, TensorIndex(None)))
}

/// Encodes every element as [`encode`] does; the error names the first bad
/// index in logical (row-major) order. The result has the layout of `x`.
pub fn encode_tensor(
    ring: Ring,
    x: ArrayViewD<f32>,
    frac_bits: u32,
) -> Result<RingTensor, RingError> {
    let scale = check_frac(frac_bits)?;
    let half = half_range(ring);
    let mut bad = false;
    let out = x.mapv(|v| match encode_one(ring, v as f64, scale, half) {
        Ok(u) => u,
        Err(_) => {
            bad = true;
            0
        }
    });
    if !bad {
        return Ok(out);
    }
    for (idx, &v) in x.indexed_iter() {
        if let Err(fail) = encode_one(ring, v as f64, scale, half) {
            let at = TensorIndex(Some(idx.slice().to_vec()));
            return Err(encode_error(ring, v, frac_bits, fail, at));
        }
    }
    // Unreachable: a failing element was seen above. Report it generically.
    Err(RingError::NotFinite {
        value: f64::NAN,
        at: TensorIndex(None),
    })
}

/// Decodes a ring element: its centred lift divided by `2^frac_bits`,
/// computed in `f64` and then rounded to `f32`.
pub fn decode(ring: Ring, v: u64, frac_bits: u32) -> f32 {
    let scale = 2f64.powi(-(frac_bits.min(2 * MAX_FRAC_BITS) as i32));
    (ring.to_signed(v) as f64 * scale) as f32
}

/// Decodes every element as [`decode`] does (the result has the layout of `v`).
pub fn decode_tensor(ring: Ring, v: ArrayViewD<u64>, frac_bits: u32) -> ArrayD<f32> {
    let scale = 2f64.powi(-(frac_bits.min(2 * MAX_FRAC_BITS) as i32));
    v.mapv(|e| (ring.to_signed(e) as f64 * scale) as f32)
}

/// `round(x * 2^frac_bits)` as an `i64`, rounding half away from zero.
///
/// Errors on NaN/inf, when the result is outside the `i64` range, or when
/// `frac_bits` exceeds [`MAX_FRAC_BITS`].
pub fn quantize(x: f64, frac_bits: u32) -> Result<i64, RingError> {
    let scale = check_frac(frac_bits)?;
    if !x.is_finite() {
        return Err(RingError::NotFinite {
            value: x,
            at: TensorIndex(None),
        });
    }
    let q = (x * scale).round();
    let lim = 2f64.powi(63);
    if q >= -lim && q < lim {
        Ok(q as i64)
    } else {
        Err(RingError::QuantizeOverflow {
            value: x,
            frac_bits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, IxDyn};
    use proptest::prelude::*;

    fn ring(b: u32) -> Ring {
        Ring::new(b).unwrap()
    }

    #[test]
    fn encode_examples() {
        let r = ring(16);
        assert_eq!(encode(r, 1.0, 8).unwrap(), 256);
        assert_eq!(encode(r, -1.0, 8).unwrap(), 65536 - 256);
        assert_eq!(encode(r, 0.5, 0).unwrap(), 1); // half away from zero
        assert_eq!(encode(r, -0.5, 0).unwrap(), r.from_signed(-1));
        assert_eq!(encode(r, 1.5, 0).unwrap(), 2);
        assert_eq!(encode(r, 2.5, 0).unwrap(), 3);
        assert_eq!(decode(r, 65536 - 256, 8), -1.0);
        assert_eq!(decode(r, 384, 8), 1.5);
        // Largest magnitude accepted: 2^15 - 1.
        assert_eq!(encode(r, 32767.0, 0).unwrap(), 32767);
        assert_eq!(encode(r, -32767.0, 0).unwrap(), r.from_signed(-32767));
        assert!(encode(r, 32768.0, 0).is_err());
        assert!(encode(r, -32768.0, 0).is_err());
        assert!(encode(r, 32767.6, 0).is_err());
        let r64 = ring(64);
        assert_eq!(encode(r64, -3.25, 2).unwrap(), (-13i64) as u64);
        assert!(encode(r64, 9.3e18, 0).is_err());
        assert!(encode(r64, 1.0, 63).is_err());
        assert_eq!(encode(r64, 0.5, 62).unwrap(), 1u64 << 61);
    }

    #[test]
    fn encode_errors_name_the_problem() {
        let r = ring(37);
        assert_eq!(
            encode(r, f32::NAN, 12).unwrap_err().to_string(),
            "NaN cannot be encoded in fixed point"
        );
        assert_eq!(
            encode(r, f32::INFINITY, 12).unwrap_err().to_string(),
            "inf cannot be encoded in fixed point"
        );
        assert!(matches!(
            encode(r, f32::NEG_INFINITY, 12),
            Err(RingError::NotFinite { .. })
        ));
        assert_eq!(
            encode(r, 1.2e12, 12).unwrap_err().to_string(),
            "value 1.2e12 does not fit Z_2^37 with 12 fractional bits"
        );
        assert_eq!(
            encode(r, 1.0, 5000).unwrap_err().to_string(),
            "5000 fractional bits is too many (at most 1023)"
        );
        // Finite x whose scaled value overflows f64.
        assert!(matches!(
            encode(r, f32::MAX, 1023),
            Err(RingError::OutOfRange { .. })
        ));
    }

    #[test]
    fn encode_tensor_reports_first_bad_index() {
        let r = ring(37);
        let mut x = Array2::<f32>::zeros((2, 5));
        x[[1, 1]] = f32::NAN;
        x[[0, 3]] = f32::NAN;
        let e = encode_tensor(r, x.view().into_dyn(), 12).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NaN at index [0, 3] cannot be encoded in fixed point"
        );
        // Logical order even on a transposed (column-major) view.
        let xt = x.t();
        let e = encode_tensor(r, xt.into_dyn(), 12).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NaN at index [1, 1] cannot be encoded in fixed point"
        );
        let mut y = Array2::<f32>::zeros((2, 2));
        y[[1, 0]] = 1.2e12;
        let e = encode_tensor(r, y.view().into_dyn(), 12).unwrap_err();
        assert_eq!(
            e.to_string(),
            "value 1.2e12 at index [1, 0] does not fit Z_2^37 with 12 fractional bits"
        );
        y[[0, 1]] = f32::NEG_INFINITY;
        let e = encode_tensor(r, y.view().into_dyn(), 12).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-inf at index [0, 1] cannot be encoded in fixed point"
        );
    }

    #[test]
    fn tensor_round_trip_and_layout() {
        let r = ring(40);
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.0f32, -1.25, 3.5, 100.0, -0.0, 7.75])
            .unwrap();
        let e = encode_tensor(r, x.view(), 4).unwrap();
        assert_eq!(e.shape(), &[2, 3]);
        assert_eq!(e[[0, 1]], r.from_signed(-20));
        assert_eq!(decode_tensor(r, e.view(), 4), x);
        let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 4]));
        assert_eq!(encode_tensor(r, empty.view(), 4).unwrap().shape(), &[0, 4]);
    }

    #[test]
    fn quantize_examples_and_errors() {
        assert_eq!(quantize(1.0, 10).unwrap(), 1024);
        assert_eq!(quantize(-2.5, 0).unwrap(), -3);
        assert_eq!(quantize(2.5, 0).unwrap(), 3);
        assert_eq!(quantize(-0.4, 0).unwrap(), 0);
        assert_eq!(quantize(-(2f64.powi(63)), 0).unwrap(), i64::MIN);
        assert!(matches!(
            quantize(2f64.powi(63), 0),
            Err(RingError::QuantizeOverflow { .. })
        ));
        assert!(quantize(1.0, 63).is_err());
        assert!(quantize(f64::NAN, 3).is_err());
        assert!(quantize(f64::INFINITY, 3).is_err());
        assert!(quantize(1.0, 2000).is_err());
        assert_eq!(
            quantize(1e300, 8).unwrap_err().to_string(),
            "value 1e300 with 8 fractional bits does not fit in an i64"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip_within_half_ulp(bits in 2u32..=64, f in 0u32..=24, u in -1.0f64..1.0) {
            // |x * 2^f| <= lim * 2^f < 2^(bits-1) - 1 (the margin covers f64 rounding at 64 bits).
            let lim = (2f64.powi(bits as i32 - 1) - 1.0) * (1.0 - 2f64.powi(-20)) / 2f64.powi(f as i32);
            let x = (u * lim) as f32;
            prop_assume!((x as f64).abs() <= lim);
            let r = Ring::new(bits).unwrap();
            let e = encode(r, x, f).unwrap();
            prop_assert_eq!(r.reduce(e), e);
            let d = decode(r, e, f);
            prop_assert!(((d as f64) - (x as f64)).abs() <= 2f64.powi(-(f as i32) - 1),
                "x={x} d={d}");
            // quantize agrees with encode
            prop_assert_eq!(r.from_signed(quantize(x as f64, f).unwrap()), e);
        }

        #[test]
        fn out_of_range_rejected(bits in 1u32..=63, f in 0u32..=24, u in 1.0f64..4.0, neg in any::<bool>()) {
            let x = u * 2f64.powi(bits as i32 - 1 - f as i32);
            let x = (if neg { -x } else { x }) as f32;
            let r = Ring::new(bits).unwrap();
            let is_out_of_range = matches!(encode(r, x, f), Err(RingError::OutOfRange { .. }));
            prop_assert!(is_out_of_range);
        }
    }
}
