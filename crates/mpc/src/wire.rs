//! Payload encodings. Bits travel packed, 8 to a byte ([`Bits::to_bytes`]);
//! ring elements of `Z_2^k` travel as `⌈k/8⌉` little-endian bytes each. Both
//! encodings have exactly one valid form per value, and decoding checks the
//! length and that every element is reduced.

use secinfer_ot::Bits;
use secinfer_ring::Ring;

use crate::MpcError;

/// Bytes of `n` packed bits.
pub fn bits_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Bytes of `n` ring elements.
pub fn ring_len(ring: Ring, n: usize) -> usize {
    n * (ring.bits() as usize).div_ceil(8)
}

/// Appends the packed bits.
pub fn put_bits(out: &mut Vec<u8>, bits: &Bits) {
    out.extend(bits.to_bytes());
}

/// Appends ring elements (each must be reduced).
pub fn put_ring(out: &mut Vec<u8>, ring: Ring, values: &[u64]) {
    let width = (ring.bits() as usize).div_ceil(8);
    out.reserve(values.len() * width);
    for &v in values {
        out.extend_from_slice(&ring.reduce(v).to_le_bytes()[..width]);
    }
}

/// Reads a payload front to back.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over a message of protocol `what` (named in errors).
    pub fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MpcError> {
        if self.bytes.len() < n {
            return Err(MpcError::Payload(format!(
                "{}: message ends {} bytes early",
                self.what,
                n - self.bytes.len()
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    /// The next `n` packed bits.
    pub fn bits(&mut self, n: usize) -> Result<Bits, MpcError> {
        let what = self.what;
        Bits::from_bytes(self.take(bits_len(n))?, n).ok_or_else(|| {
            MpcError::Payload(format!("{what}: padding bits of a bit vector are not zero"))
        })
    }

    /// The next `n` ring elements.
    pub fn ring(&mut self, ring: Ring, n: usize) -> Result<Vec<u64>, MpcError> {
        let width = (ring.bits() as usize).div_ceil(8);
        let bytes = self.take(n * width)?;
        let mut out = Vec::with_capacity(n);
        for (i, chunk) in bytes.chunks(width).enumerate() {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(chunk);
            let v = u64::from_le_bytes(b);
            if v != ring.reduce(v) {
                return Err(MpcError::Payload(format!(
                    "{}: element {i} = {v} is not in Z_2^{}",
                    self.what,
                    ring.bits()
                )));
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Checks that nothing is left.
    pub fn finish(self) -> Result<(), MpcError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(MpcError::Payload(format!(
                "{}: {} bytes left over",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_elements_round_trip_and_unreduced_ones_are_refused() {
        let ring = Ring::new(37).unwrap();
        let values = vec![0, 1, ring.mask(), 1 << 36, 12345];
        let mut out = Vec::new();
        put_ring(&mut out, ring, &values);
        assert_eq!(out.len(), ring_len(ring, values.len()));
        let mut r = Reader::new(&out, "test");
        assert_eq!(r.ring(ring, 5).unwrap(), values);
        r.finish().unwrap();
        let mut bad = out.clone();
        bad[4] |= 0x20; // bit 37 of element 0
        let e = Reader::new(&bad, "test").ring(ring, 5).unwrap_err();
        assert!(e.to_string().contains("element 0"), "{e}");
        assert!(Reader::new(&out[1..], "test").ring(ring, 5).is_err());
        let mut long = Reader::new(&out, "test");
        long.ring(ring, 4).unwrap();
        assert!(long.finish().is_err());
    }
}
