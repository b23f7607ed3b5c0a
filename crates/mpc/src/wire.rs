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

/// Appends ring elements (each reduced first).
pub fn put_ring(out: &mut Vec<u8>, ring: Ring, values: &[u64]) {
    let mask = ring.mask();
    match (ring.bits() as usize).div_ceil(8) {
        1 => put_fixed::<1>(out, mask, values),
        2 => put_fixed::<2>(out, mask, values),
        3 => put_fixed::<3>(out, mask, values),
        4 => put_fixed::<4>(out, mask, values),
        5 => put_fixed::<5>(out, mask, values),
        6 => put_fixed::<6>(out, mask, values),
        7 => put_fixed::<7>(out, mask, values),
        _ => put_fixed::<8>(out, mask, values),
    }
}

/// [`put_ring`] for a width known at compile time, so that each element is
/// one fixed-size copy.
fn put_fixed<const W: usize>(out: &mut Vec<u8>, mask: u64, values: &[u64]) {
    let start = out.len();
    out.resize(start + values.len() * W, 0);
    for (chunk, &v) in out[start..].chunks_exact_mut(W).zip(values) {
        chunk.copy_from_slice(&(v & mask).to_le_bytes()[..W]);
    }
}

/// Ring elements of `W` bytes each; also the OR of their bits above the
/// mask (zero iff all are reduced).
fn read_fixed<const W: usize>(bytes: &[u8], mask: u64) -> (Vec<u64>, u64) {
    let mut excess = 0;
    let values = bytes
        .chunks_exact(W)
        .map(|chunk| {
            let mut b = [0u8; 8];
            b[..W].copy_from_slice(chunk);
            let v = u64::from_le_bytes(b);
            excess |= v & !mask;
            v
        })
        .collect();
    (values, excess)
}

/// Reads a payload front to back.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

/// The payload is a peer's masked shares: `Debug` shows how much is left.
impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reader({}, {} bytes left)", self.what, self.bytes.len())
    }
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
        let words = self.bit_words(n)?;
        Bits::from_words(words, n)
            .ok_or_else(|| MpcError::Payload(format!("{what}: bit vector too short")))
    }

    /// The next `n` packed bits as words (bit `i` is bit `i % 64` of word
    /// `i / 64`), without building a [`Bits`].
    pub fn bit_words(&mut self, n: usize) -> Result<Vec<u64>, MpcError> {
        let what = self.what;
        let bytes = self.take(bits_len(n))?;
        if !n.is_multiple_of(8) && bytes.last().is_some_and(|&b| b >> (n % 8) != 0) {
            return Err(MpcError::Payload(format!(
                "{what}: padding bits of a bit vector are not zero"
            )));
        }
        Ok(bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect())
    }

    /// The next `n` ring elements.
    pub fn ring(&mut self, ring: Ring, n: usize) -> Result<Vec<u64>, MpcError> {
        let width = (ring.bits() as usize).div_ceil(8);
        let bytes = self.take(n * width)?;
        let mask = ring.mask();
        let (values, excess) = match width {
            1 => read_fixed::<1>(bytes, mask),
            2 => read_fixed::<2>(bytes, mask),
            3 => read_fixed::<3>(bytes, mask),
            4 => read_fixed::<4>(bytes, mask),
            5 => read_fixed::<5>(bytes, mask),
            6 => read_fixed::<6>(bytes, mask),
            7 => read_fixed::<7>(bytes, mask),
            _ => read_fixed::<8>(bytes, mask),
        };
        if excess != 0
            && let Some((i, v)) = values.iter().enumerate().find(|(_, v)| **v & !mask != 0)
        {
            return Err(MpcError::Payload(format!(
                "{}: element {i} = {v} is not in Z_2^{}",
                self.what,
                ring.bits()
            )));
        }
        Ok(values)
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
    fn debug_shows_sizes_only() {
        let payload = [0xab; 12];
        let mut r = Reader::new(&payload, "AND");
        r.bits(16).unwrap();
        assert_eq!(format!("{r:?}"), "Reader(AND, 10 bytes left)");
    }

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
