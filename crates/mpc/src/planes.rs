//! Bit-sliced layout for the boolean protocols: `m` bit planes of `n`
//! elements, plane `j` holding bit `j` of every element (or the `j`-th
//! vector of a batch of bit vectors), 64 elements to a word, each plane
//! padded to whole words with zero bits so that local logic works word by
//! word with no shifting. On the wire and in the correlation store bits are
//! contiguous instead (`m·n` bits, plane `j` at bits `j·n..(j+1)·n`), so a
//! batch consumes exactly one correlation per bit; [`Planes::to_payload`],
//! [`Planes::from_stream_words`] and [`Planes::stream_view`] convert with word shifts. Values become planes by
//! a 64×64 bit-matrix transpose per 64 elements ([`transpose64`], the
//! recursive block swap of Warren, *Hacker's Delight*, §7-3).

use std::borrow::Cow;

use secinfer_ot::Bits;

/// Words per plane of `n` elements.
pub(crate) fn words_per_plane(n: usize) -> usize {
    n.div_ceil(64)
}

/// `m` padded bit planes of `n` elements each. Invariant:
/// `words.len() == m · words_per_plane(n)` and padding bits are zero.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Planes {
    words: Vec<u64>,
    m: usize,
    n: usize,
}

/// Planes hold shares and masked bits: `Debug` shows the shape only.
impl std::fmt::Debug for Planes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Planes({} × {})", self.m, self.n)
    }
}

/// Transposes a 64×64 bit matrix in place: afterwards bit `j` of `a[i]` is
/// what bit `i` of `a[j]` was.
pub(crate) fn transpose64(a: &mut [u64; 64]) {
    let mut width = 32;
    let mut mask: u64 = 0x0000_0000_FFFF_FFFF;
    while width != 0 {
        for block in a.chunks_exact_mut(2 * width) {
            // swap the block (rows 0..w, columns w..2w) with (rows w..2w, columns 0..w)
            let (top, bottom) = block.split_at_mut(width);
            for (t, b) in top.iter_mut().zip(bottom.iter_mut()) {
                let x = ((*t >> width) ^ *b) & mask;
                *t ^= x << width;
                *b ^= x;
            }
        }
        width >>= 1;
        mask ^= mask << width;
    }
}

/// ORs the first `n` bits of the aligned words `src` into the bit stream
/// `dst` starting at bit `pos` (`dst` zero there).
fn put_at(dst: &mut [u64], pos: usize, src: &[u64], n: usize) {
    let (q0, r) = (pos / 64, pos % 64);
    let chunks = words_per_plane(n);
    for (j, &w) in src[..chunks].iter().enumerate() {
        let chunk = if j == chunks - 1 && !n.is_multiple_of(64) {
            w & ((1u64 << (n % 64)) - 1)
        } else {
            w
        };
        dst[q0 + j] |= chunk << r;
        if r != 0
            && let Some(next) = dst.get_mut(q0 + j + 1)
        {
            *next |= chunk >> (64 - r);
        }
    }
}

/// Reads `n` bits of the bit stream `src` from bit `pos` into the aligned
/// words `dst` (padding bits cleared).
fn get_at(src: &[u64], pos: usize, n: usize, dst: &mut [u64]) {
    let (q0, r) = (pos / 64, pos % 64);
    let chunks = words_per_plane(n);
    for (j, out) in dst[..chunks].iter_mut().enumerate() {
        let lo = src[q0 + j] >> r;
        let hi = if r == 0 {
            0
        } else {
            src.get(q0 + j + 1).map_or(0, |w| w << (64 - r))
        };
        let mut chunk = lo | hi;
        if j == chunks - 1 && !n.is_multiple_of(64) {
            chunk &= (1u64 << (n % 64)) - 1;
        }
        *out = chunk;
    }
}

/// Padded planes from a contiguous stream of `m·n` bits.
fn unpack(stream: &[u64], m: usize, n: usize) -> Vec<u64> {
    let w = words_per_plane(n);
    let mut words = vec![0u64; m * w];
    for j in 0..m {
        get_at(stream, j * n, n, &mut words[j * w..(j + 1) * w]);
    }
    words
}

impl Planes {
    /// `m` planes of zeros.
    pub(crate) fn zeros(m: usize, n: usize) -> Planes {
        Planes {
            words: vec![0; m * words_per_plane(n)],
            m,
            n,
        }
    }

    /// Planes from their padded words (padding bits must be zero).
    pub(crate) fn from_words(words: Vec<u64>, m: usize, n: usize) -> Planes {
        debug_assert_eq!(words.len(), m * words_per_plane(n));
        Planes { words, m, n }
    }

    /// One plane holding `bits`.
    pub(crate) fn from_bits(bits: &Bits) -> Planes {
        Planes::from_words(bits.words().to_vec(), 1, bits.len())
    }

    /// Bit planes `0..m` of `values` (higher bits are ignored).
    pub(crate) fn from_values(values: &[u64], m: usize) -> Planes {
        debug_assert!(m <= 64);
        let n = values.len();
        let w = words_per_plane(n);
        let mut words = vec![0; m * w];
        let mut block = [0u64; 64];
        for (c, chunk) in values.chunks(64).enumerate() {
            block[..chunk.len()].copy_from_slice(chunk);
            block[chunk.len()..].fill(0);
            transpose64(&mut block);
            for (i, &plane_word) in block[..m].iter().enumerate() {
                words[i * w + c] = plane_word;
            }
        }
        Planes { words, m, n }
    }

    /// Number of planes.
    pub(crate) fn planes(&self) -> usize {
        self.m
    }

    /// Elements per plane.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// All words, plane after plane.
    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    /// Plane `i`'s words.
    pub(crate) fn plane(&self, i: usize) -> &[u64] {
        let w = words_per_plane(self.n);
        &self.words[i * w..(i + 1) * w]
    }

    /// Plane `i` as a bit vector.
    pub(crate) fn plane_bits(&self, i: usize) -> Bits {
        Bits::from_words(self.plane(i).to_vec(), self.n)
            .expect("a plane holds words_per_plane(n) words")
    }

    /// Planes `from..from + m` as new planes.
    pub(crate) fn range(&self, from: usize, m: usize) -> Planes {
        let w = words_per_plane(self.n);
        Planes::from_words(self.words[from * w..(from + m) * w].to_vec(), m, self.n)
    }

    /// Appends the planes of `other` (same element count).
    pub(crate) fn append(&mut self, other: &[u64]) {
        debug_assert_eq!(other.len() % words_per_plane(self.n).max(1), 0);
        self.words.extend_from_slice(other);
        self.m += other.len() / words_per_plane(self.n).max(1);
    }

    /// An empty set of planes of `n` elements with room for `m`.
    pub(crate) fn with_capacity(m: usize, n: usize) -> Planes {
        Planes {
            words: Vec::with_capacity(m * words_per_plane(n)),
            m: 0,
            n,
        }
    }

    /// The padded planes held in a contiguous stream of `m·n` bits (the
    /// layout of correlations and messages): borrowed when planes are
    /// whole words, unpacked otherwise.
    pub(crate) fn stream_view(stream: &Bits, m: usize, n: usize) -> Cow<'_, [u64]> {
        debug_assert_eq!(stream.len(), m * n);
        if n.is_multiple_of(64) {
            return Cow::Borrowed(stream.words());
        }
        Cow::Owned(unpack(stream.words(), m, n))
    }

    /// Planes from the words of a contiguous stream of `m·n` bits.
    pub(crate) fn from_stream_words(stream: Vec<u64>, m: usize, n: usize) -> Planes {
        debug_assert_eq!(stream.len(), (m * n).div_ceil(64));
        if n.is_multiple_of(64) {
            return Planes::from_words(stream, m, n);
        }
        Planes::from_words(unpack(&stream, m, n), m, n)
    }

    /// The `m·n` bits as a contiguous stream (plane `j` at bits `j·n..`),
    /// packed 8 to a byte: the payload encoding of [`crate::wire`].
    pub(crate) fn to_payload(&self) -> Vec<u8> {
        let total = self.m * self.n;
        let stream = if self.n.is_multiple_of(64) {
            Cow::Borrowed(&self.words[..])
        } else {
            let mut stream = vec![0u64; total.div_ceil(64)];
            for j in 0..self.m {
                put_at(&mut stream, j * self.n, self.plane(j), self.n);
            }
            Cow::Owned(stream)
        };
        let mut out = Vec::with_capacity(8 * stream.len());
        for w in stream.iter() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(total.div_ceil(8));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn debug_shows_the_shape_only() {
        let p = Planes::from_words(vec![0xdead_beef; 6], 3, 100);
        assert_eq!(format!("{p:?}"), "Planes(3 × 100)");
    }

    #[test]
    fn transpose64_swaps_rows_and_columns() {
        let mut a = [0u64; 64];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for w in a.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
        let before = a;
        transpose64(&mut a);
        for (i, row) in a.iter().enumerate() {
            for (j, column) in before.iter().enumerate() {
                assert_eq!((row >> j) & 1, (column >> i) & 1, "({i}, {j})");
            }
        }
        transpose64(&mut a);
        assert_eq!(a, before);
    }

    proptest! {
        #[test]
        fn planes_hold_the_bits_of_the_values(
            values in proptest::collection::vec(any::<u64>(), 0..200),
            m in 0usize..=64,
        ) {
            let p = Planes::from_values(&values, m);
            prop_assert_eq!(p.planes(), m);
            for j in 0..m {
                let plane = p.plane_bits(j);
                for (i, v) in values.iter().enumerate() {
                    prop_assert_eq!(plane.get(i), (v >> j) & 1 == 1);
                }
            }
        }

        #[test]
        fn streams_are_the_planes_back_to_back(
            values in proptest::collection::vec(any::<u64>(), 0..300),
            m in 0usize..12,
        ) {
            let n = values.len();
            let p = Planes::from_values(&values, m);
            let expected = Bits::concat((0..m).map(|j| p.plane_bits(j)).collect::<Vec<_>>().iter());
            prop_assert_eq!(p.to_payload(), expected.to_bytes());
            prop_assert_eq!(&Planes::stream_view(&expected, m, n)[..], p.words());
            let back = Planes::from_stream_words(expected.words().to_vec(), m, n);
            prop_assert_eq!(back, p);
        }
    }
}
