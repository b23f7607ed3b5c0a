//! Packed bit vectors: 64 bits to a `u64` word, bit `i` is bit `i % 64` of
//! word `i / 64`. Bits at positions `len..` of the last word are always
//! zero, so equality, XOR and counting work on whole words.
//!
//! Bit vectors hold secrets (shares, OT messages, choice bits), so `Debug`
//! shows only the length, and a deserialised vector is checked against the
//! invariant like any other input from outside.

use serde::{Deserialize, Serialize};

/// A packed bit vector. Invariant: `words.len() == len.div_ceil(64)` and the
/// unused high bits of the last word are zero. Deserialisation refuses any
/// other encoding.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "BitsRepr")]
pub struct Bits {
    words: Vec<u64>,
    len: usize,
}

/// Secrets stay out of logs: the length only.
impl std::fmt::Debug for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bits(len {})", self.len)
    }
}

/// The serialised form of [`Bits`], checked before it becomes one.
#[derive(Deserialize)]
struct BitsRepr {
    words: Vec<u64>,
    len: usize,
}

impl TryFrom<BitsRepr> for Bits {
    type Error = String;

    /// Exactly `len.div_ceil(64)` words with zero padding bits, so that a
    /// vector has one encoding and `get`, `xor` and friends never index
    /// past the words.
    fn try_from(r: BitsRepr) -> Result<Bits, String> {
        let want = words_for(r.len);
        if r.words.len() != want {
            return Err(format!(
                "a bit vector of {} bits needs {want} words, got {}",
                r.len,
                r.words.len()
            ));
        }
        if !r.len.is_multiple_of(64) && r.words.last().is_some_and(|w| w >> (r.len % 64) != 0) {
            return Err(format!(
                "a bit vector of {} bits has padding bits set in its last word",
                r.len
            ));
        }
        Ok(Bits {
            words: r.words,
            len: r.len,
        })
    }
}

fn words_for(len: usize) -> usize {
    len.div_ceil(64)
}

impl Bits {
    /// `len` zero bits.
    pub fn zeros(len: usize) -> Bits {
        Bits {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// `len` one bits.
    pub fn ones(len: usize) -> Bits {
        let mut b = Bits {
            words: vec![u64::MAX; words_for(len)],
            len,
        };
        b.clear_tail();
        b
    }

    /// An empty vector with room for `cap` bits.
    pub fn with_capacity(cap: usize) -> Bits {
        Bits {
            words: Vec::with_capacity(words_for(cap)),
            len: 0,
        }
    }

    /// The first `len` bits of `words` (bits beyond `len` are cleared); `None`
    /// if `words` is too short.
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Option<Bits> {
        if words.len() < words_for(len) {
            return None;
        }
        words.truncate(words_for(len));
        let mut b = Bits { words, len };
        b.clear_tail();
        Some(b)
    }

    /// Exactly `len` bits from little-endian bytes (bit `i` is bit `i % 8`
    /// of byte `i / 8`); `None` unless `bytes.len() == len.div_ceil(8)`.
    /// Bits beyond `len` in the last byte must be zero, so that every
    /// vector has exactly one encoding.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Option<Bits> {
        if bytes.len() != len.div_ceil(8) {
            return None;
        }
        if !len.is_multiple_of(8) && bytes.last().is_some_and(|&b| b >> (len % 8) != 0) {
            return None;
        }
        let words = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Some(Bits { words, len })
    }

    /// The little-endian byte encoding read by [`from_bytes`](Self::from_bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len.div_ceil(8));
        out
    }

    /// Bits from booleans.
    pub fn from_bools(bits: impl IntoIterator<Item = bool>) -> Bits {
        let mut b = Bits::default();
        for bit in bits {
            b.push(bit);
        }
        b
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed words (unused high bits of the last one are zero).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bit `i`. Panics if `i >= len` (a programming error, never data).
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} of {}", self.len);
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets bit `i`. Panics if `i >= len`.
    pub fn set(&mut self, i: usize, v: bool) {
        assert!(i < self.len, "bit {i} of {}", self.len);
        let m = 1u64 << (i % 64);
        if v {
            self.words[i / 64] |= m;
        } else {
            self.words[i / 64] &= !m;
        }
    }

    /// Appends one bit.
    pub fn push(&mut self, v: bool) {
        if self.len.is_multiple_of(64) {
            self.words.push(0);
        }
        self.len += 1;
        self.set(self.len - 1, v);
    }

    /// The bits as booleans.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = bool> + '_ {
        (0..self.len).map(|i| self.get(i))
    }

    /// Number of one bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn clear_tail(&mut self) {
        if !self.len.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.len % 64)) - 1;
        }
    }

    /// Appends bits `from..from + n` of `src`. Panics if out of range.
    pub fn extend_from_range(&mut self, src: &Bits, from: usize, n: usize) {
        assert!(from + n <= src.len, "range {from}+{n} of {}", src.len);
        if n == 0 {
            return;
        }
        let shift = self.len % 64;
        let new_len = self.len + n;
        self.words.reserve(words_for(new_len) - self.words.len());
        // Read the source range as aligned 64-bit chunks.
        let (w0, s) = (from / 64, from % 64);
        let chunks = words_for(n);
        for j in 0..chunks {
            let lo = src.words[w0 + j] >> s;
            let hi = if s == 0 {
                0
            } else {
                src.words.get(w0 + j + 1).map_or(0, |w| w << (64 - s))
            };
            let mut chunk = lo | hi;
            if j == chunks - 1 && !n.is_multiple_of(64) {
                chunk &= (1u64 << (n % 64)) - 1;
            }
            if shift == 0 {
                self.words.push(chunk);
            } else {
                let last = self.words.len() - 1;
                self.words[last] |= chunk << shift;
                self.words.push(chunk >> (64 - shift));
            }
        }
        self.words.truncate(words_for(new_len));
        self.len = new_len;
    }

    /// Appends all of `other`.
    pub fn extend(&mut self, other: &Bits) {
        self.extend_from_range(other, 0, other.len);
    }

    /// Bits `from..from + n` as a new vector. Panics if out of range.
    pub fn slice(&self, from: usize, n: usize) -> Bits {
        let mut out = Bits::with_capacity(n);
        out.extend_from_range(self, from, n);
        out
    }

    /// Concatenation of several vectors.
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a Bits>) -> Bits {
        let mut out = Bits::default();
        for p in parts {
            out.extend(p);
        }
        out
    }

    fn zip_with(&self, other: &Bits, f: impl Fn(u64, u64) -> u64) -> Bits {
        assert_eq!(self.len, other.len, "bit vectors of different lengths");
        let words = self
            .words
            .iter()
            .zip(&other.words)
            .map(|(&a, &b)| f(a, b))
            .collect();
        let mut out = Bits {
            words,
            len: self.len,
        };
        out.clear_tail();
        out
    }

    /// `self ⊕ other`. Panics if the lengths differ.
    pub fn xor(&self, other: &Bits) -> Bits {
        self.zip_with(other, |a, b| a ^ b)
    }

    /// `self ∧ other`. Panics if the lengths differ.
    pub fn and(&self, other: &Bits) -> Bits {
        self.zip_with(other, |a, b| a & b)
    }

    /// `self ⊕= other`. Panics if the lengths differ.
    pub fn xor_assign(&mut self, other: &Bits) {
        assert_eq!(self.len, other.len, "bit vectors of different lengths");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a ^= b;
        }
    }

    /// `¬self`.
    pub fn not(&self) -> Bits {
        let mut out = Bits {
            words: self.words.iter().map(|w| !w).collect(),
            len: self.len,
        };
        out.clear_tail();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bools(b: &Bits) -> Vec<bool> {
        b.iter().collect()
    }

    proptest! {
        #[test]
        fn ranges_and_concatenation_match_a_bool_model(
            a in proptest::collection::vec(any::<bool>(), 0..300),
            b in proptest::collection::vec(any::<bool>(), 0..300),
            from in 0usize..300,
            n in 0usize..300,
        ) {
            let (ba, bb) = (Bits::from_bools(a.clone()), Bits::from_bools(b.clone()));
            let mut joined = ba.clone();
            joined.extend(&bb);
            let expected: Vec<bool> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(bools(&joined), expected.clone());
            prop_assert_eq!(joined.words().len(), expected.len().div_ceil(64));
            let from = from.min(expected.len());
            let n = n.min(expected.len() - from);
            prop_assert_eq!(bools(&joined.slice(from, n)), expected[from..from + n].to_vec());
            prop_assert_eq!(Bits::from_bytes(&joined.to_bytes(), joined.len()), Some(joined.clone()));
            prop_assert_eq!(joined.not().count_ones(), expected.iter().filter(|&&x| !x).count());
        }

        #[test]
        fn logic_matches_a_bool_model(
            pairs in proptest::collection::vec(any::<(bool, bool)>(), 0..200),
        ) {
            let a = Bits::from_bools(pairs.iter().map(|p| p.0));
            let b = Bits::from_bools(pairs.iter().map(|p| p.1));
            prop_assert_eq!(bools(&a.xor(&b)), pairs.iter().map(|p| p.0 ^ p.1).collect::<Vec<_>>());
            prop_assert_eq!(bools(&a.and(&b)), pairs.iter().map(|p| p.0 & p.1).collect::<Vec<_>>());
        }
    }

    #[test]
    fn byte_encoding_is_canonical() {
        assert_eq!(Bits::from_bytes(&[0b0000_0111], 3), Some(Bits::ones(3)));
        // a set bit beyond the length, a short or a long buffer: refused
        assert_eq!(Bits::from_bytes(&[0b0000_1111], 3), None);
        assert_eq!(Bits::from_bytes(&[1], 9), None);
        assert_eq!(Bits::from_bytes(&[1, 0], 8), None);
        assert_eq!(Bits::from_words(vec![u64::MAX], 3), Some(Bits::ones(3)));
        assert_eq!(Bits::from_words(vec![], 3), None);
    }

    /// A serialised `Bits` (a map of `words` and `len`) as serde's
    /// in-memory deserialisers present it, so that the test needs no format
    /// crate.
    enum Field {
        Words(Vec<u64>),
        Len(u64),
    }

    impl<'de> serde::de::IntoDeserializer<'de, serde::de::value::Error> for Field {
        type Deserializer = Field;
        fn into_deserializer(self) -> Field {
            self
        }
    }

    impl<'de> serde::Deserializer<'de> for Field {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            match self {
                Field::Words(w) => {
                    visitor.visit_seq(serde::de::value::SeqDeserializer::new(w.into_iter()))
                }
                Field::Len(n) => visitor.visit_u64(n),
            }
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct enum identifier ignored_any
        }
    }

    fn deserialize(words: Vec<u64>, len: u64) -> Result<Bits, String> {
        let fields = [("words", Field::Words(words)), ("len", Field::Len(len))];
        Bits::deserialize(serde::de::value::MapDeserializer::<
            _,
            serde::de::value::Error,
        >::new(fields.into_iter()))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn deserialisation_keeps_the_invariant() {
        let b = Bits::from_bools((0..130).map(|i| i % 3 == 0));
        assert_eq!(deserialize(b.words().to_vec(), 130), Ok(b.clone()));
        assert_eq!(deserialize(vec![], 0), Ok(Bits::default()));
        assert_eq!(deserialize(vec![u64::MAX], 64), Ok(Bits::ones(64)));
        // too few words: `get` and `xor` would index past them
        let e = deserialize(b.words()[..2].to_vec(), 130).unwrap_err();
        assert!(e.contains("130 bits needs 3 words, got 2"), "{e}");
        let e = deserialize(vec![], 1).unwrap_err();
        assert!(e.contains("needs 1 words, got 0"), "{e}");
        // too many words: not the one encoding
        let e = deserialize(vec![0, 0], 64).unwrap_err();
        assert!(e.contains("needs 1 words, got 2"), "{e}");
        // a padding bit set: equality and counting would see it
        let mut words = b.words().to_vec();
        words[2] |= 1 << 2;
        let e = deserialize(words, 130).unwrap_err();
        assert!(e.contains("padding bits set"), "{e}");
        let e = deserialize(vec![1 << 63], 63).unwrap_err();
        assert!(e.contains("padding bits set"), "{e}");
    }

    #[test]
    fn debug_shows_the_length_only() {
        let b = Bits::from_words(vec![0xdead_beef_0123_4567, 0x7], 67).unwrap();
        assert_eq!(format!("{b:?}"), "Bits(len 67)");
        assert_eq!(format!("{:?}", Bits::default()), "Bits(len 0)");
    }
}
