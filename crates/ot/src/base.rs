//! Base OTs: Chou and Orlandi, "The Simplest Protocol for Oblivious
//! Transfer" (LATINCRYPT 2015), on ristretto255, semi-honest.
//!
//! These are the only public-key operations of a session: 128 of them per
//! direction, once, to seed the IKNP extension ([`crate::iknp`]). The sender
//! picks `a` and sends `A = a·G`; for each OT `i` the receiver with choice
//! `b_i` picks `x_i` and sends `B_i = x_i·G + b_i·A`; the sender's keys are
//! `k0_i = KDF(i, A, B_i, a·B_i)` and `k1_i = KDF(i, A, B_i, a·(B_i − A))`,
//! the receiver's `k_{b_i} = KDF(i, A, B_i, x_i·A)`. The KDF is SHA-256 over
//! a domain-separation tag, the index and the three points, truncated to a
//! 128-bit seed. Both sides refuse points that do not decode or are the
//! identity, naming the OT. Sans IO: messages are byte strings, one
//! compressed point (32 bytes) for the sender and `32·n` bytes for the
//! receiver.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{Identity, IsIdentity};
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable};

use crate::{Bits, OtError};

/// Bytes of one compressed ristretto255 point on the wire.
pub const POINT_BYTES: usize = 32;

const KDF_TAG: &[u8] = b"secinfer-ot/chou-orlandi/ristretto255/kdf/v1";

/// A uniform scalar: 64 random bytes reduced mod the group order (bias below
/// 2^-250).
fn random_scalar(rng: &mut impl CryptoRng) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// Decodes a point the peer sent; `what` names it in the error.
fn decode_point(bytes: &[u8], what: &dyn Fn() -> String) -> Result<RistrettoPoint, OtError> {
    let point = CompressedRistretto::from_slice(bytes)
        .ok()
        .and_then(|c| c.decompress())
        .ok_or_else(|| OtError::Message(format!("{} is not a ristretto255 point", what())))?;
    if point.is_identity() {
        return Err(OtError::Message(format!(
            "{} is the identity point",
            what()
        )));
    }
    Ok(point)
}

fn kdf(index: usize, a: &[u8; 32], b: &[u8], shared: &RistrettoPoint) -> u128 {
    let digest = Sha256::new()
        .chain_update(KDF_TAG)
        .chain_update((index as u64).to_le_bytes())
        .chain_update(a)
        .chain_update(b)
        .chain_update(shared.compress().as_bytes())
        .finalize();
    let mut seed = [0u8; 16];
    seed.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(seed)
}

/// The sender of a set of base OTs: its secret `a` and its message `A`.
pub struct BaseOtSender {
    a: Scalar,
    a_point: RistrettoPoint,
    a_bytes: [u8; 32],
}

impl std::fmt::Debug for BaseOtSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseOtSender").finish_non_exhaustive()
    }
}

impl BaseOtSender {
    /// Picks `a` at random.
    pub fn new(rng: &mut impl CryptoRng) -> BaseOtSender {
        let a = random_scalar(rng);
        let a_point = RistrettoPoint::mul_base(&a);
        BaseOtSender {
            a,
            a_point,
            a_bytes: a_point.compress().to_bytes(),
        }
    }

    /// The first message, `A` (sent to the receiver).
    pub fn message(&self) -> [u8; POINT_BYTES] {
        self.a_bytes
    }

    /// Both keys of each of `count` OTs from the receiver's message
    /// (`count · 32` bytes): `[k0_i, k1_i]`.
    pub fn keys(&self, receiver_message: &[u8], count: usize) -> Result<Vec<[u128; 2]>, OtError> {
        if Some(receiver_message.len()) != count.checked_mul(POINT_BYTES) {
            return Err(OtError::Message(format!(
                "base-OT receiver message has {} bytes, {count} points need {}",
                receiver_message.len(),
                count.saturating_mul(POINT_BYTES)
            )));
        }
        let a_a = self.a * self.a_point;
        receiver_message
            .chunks_exact(POINT_BYTES)
            .enumerate()
            .map(|(i, b_bytes)| {
                let b = decode_point(b_bytes, &|| format!("base OT {i}: the receiver's point B"))?;
                if b == self.a_point {
                    return Err(OtError::Message(format!(
                        "base OT {i}: the receiver's point B equals the sender's A"
                    )));
                }
                let a_b = self.a * b;
                Ok([
                    kdf(i, &self.a_bytes, b_bytes, &a_b),
                    kdf(i, &self.a_bytes, b_bytes, &(a_b - a_a)),
                ])
            })
            .collect()
    }
}

/// What the receiver of a set of base OTs holds after answering.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseOtReceived {
    /// its message to the sender: `B_i` for every OT, 32 bytes each
    pub message: Vec<u8>,
    /// `k_{b_i}` for every OT
    pub keys: Vec<u128>,
}

impl std::fmt::Debug for BaseOtReceived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseOtReceived")
            .field("ots", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The receiver's side: answers the sender's `A` with one `B_i` per choice
/// bit and derives the chosen keys. The choice enters `B_i` by a
/// constant-time select.
pub fn receive(
    rng: &mut impl CryptoRng,
    sender_message: &[u8],
    choices: &Bits,
) -> Result<BaseOtReceived, OtError> {
    if sender_message.len() != POINT_BYTES {
        return Err(OtError::Message(format!(
            "base-OT sender message has {} bytes, a point has {POINT_BYTES}",
            sender_message.len()
        )));
    }
    let a_point = decode_point(sender_message, &|| "the base-OT sender's point A".into())?;
    let mut a_bytes = [0u8; 32];
    a_bytes.copy_from_slice(sender_message);
    let mut message = Vec::with_capacity(choices.len() * POINT_BYTES);
    let mut keys = Vec::with_capacity(choices.len());
    for (i, choice) in choices.iter().enumerate() {
        let x = random_scalar(rng);
        let chosen = RistrettoPoint::conditional_select(
            &RistrettoPoint::identity(),
            &a_point,
            Choice::from(u8::from(choice)),
        );
        let b = RistrettoPoint::mul_base(&x) + chosen;
        let b_bytes = b.compress().to_bytes();
        keys.push(kdf(i, &a_bytes, &b_bytes, &(x * a_point)));
        message.extend_from_slice(&b_bytes);
    }
    Ok(BaseOtReceived { message, keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::ChaCha20Rng;
    use rand::{Rng, SeedableRng};

    fn random_choices(rng: &mut impl Rng, n: usize) -> Bits {
        let words = (0..n.div_ceil(64)).map(|_| rng.next_u64()).collect();
        Bits::from_words(words, n).unwrap()
    }

    fn run(seed: u64, n: usize) -> (Bits, Vec<[u128; 2]>, Vec<u128>) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let choices = random_choices(&mut rng, n);
        let sender = BaseOtSender::new(&mut rng);
        let received = receive(&mut rng, &sender.message(), &choices).unwrap();
        let keys = sender.keys(&received.message, n).unwrap();
        (choices, keys, received.keys)
    }

    #[test]
    fn the_receiver_gets_the_chosen_key_and_not_the_other() {
        let n = 300;
        let (choices, keys, chosen) = run(1, n);
        let ones = choices.count_ones();
        assert!(ones > 100 && ones < 200, "both choice values occur: {ones}");
        for i in 0..n {
            let b = usize::from(choices.get(i));
            assert_eq!(chosen[i], keys[i][b], "OT {i}");
            assert_ne!(chosen[i], keys[i][1 - b], "OT {i}");
        }
        // every key of the session is distinct
        let mut all: Vec<u128> = keys.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * n);
    }

    #[test]
    fn all_zero_and_all_one_choices_work() {
        for choices in [Bits::zeros(128), Bits::ones(128)] {
            let mut rng = ChaCha20Rng::seed_from_u64(2);
            let sender = BaseOtSender::new(&mut rng);
            let received = receive(&mut rng, &sender.message(), &choices).unwrap();
            let keys = sender.keys(&received.message, 128).unwrap();
            for (i, k) in received.keys.iter().enumerate() {
                assert_eq!(*k, keys[i][usize::from(choices.get(i))]);
            }
        }
    }

    /// χ² of the byte values of `keys` against the uniform distribution, and
    /// the fraction of one bits.
    fn byte_statistics(keys: &[u128]) -> (f64, f64) {
        let mut counts = [0u64; 256];
        let mut ones = 0u64;
        for k in keys {
            for byte in k.to_le_bytes() {
                counts[byte as usize] += 1;
            }
            ones += u64::from(k.count_ones());
        }
        let n = (keys.len() * 16) as f64;
        let expected = n / 256.0;
        let chi2 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        (chi2, ones as f64 / (n * 8.0))
    }

    /// The receiver's key is exactly the sender's key for its choice, never
    /// the other, and the sender's two keys differ, for every OT.
    fn assert_keys_match_the_choices(choices: &Bits, keys: &[[u128; 2]], chosen: &[u128]) {
        assert_eq!((keys.len(), chosen.len()), (choices.len(), choices.len()));
        for i in 0..choices.len() {
            let b = usize::from(choices.get(i));
            assert_ne!(
                keys[i][0], keys[i][1],
                "OT {i}: the sender's keys are equal"
            );
            assert_eq!(chosen[i], keys[i][b], "OT {i}: not the chosen key");
            assert_ne!(chosen[i], keys[i][1 - b], "OT {i}: the other key");
        }
    }

    #[test]
    fn keys_of_both_parties_look_uniform() {
        let n = 2048;
        let (choices, keys, chosen) = run(3, n);
        // uniform-looking keys are worthless unless they are the right ones:
        // a KDF that ignored the shared point, or keys drawn at random,
        // would pass the statistics below but not this
        assert_keys_match_the_choices(&choices, &keys, &chosen);
        let k0: Vec<u128> = keys.iter().map(|k| k[0]).collect();
        let k1: Vec<u128> = keys.iter().map(|k| k[1]).collect();
        for (name, ks) in [("k0", &k0), ("k1", &k1), ("chosen", &chosen)] {
            let (chi2, balance) = byte_statistics(ks);
            // 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond 6 sd.
            assert!(chi2 < 400.0, "{name}: χ² = {chi2}");
            // 262144 bits: sd of the fraction 0.001
            assert!((balance - 0.5).abs() < 0.006, "{name}: {balance}");
        }
        // the key derivation mixes the index: equal points at two indices
        // would still give unrelated keys
        let p = RistrettoPoint::mul_base(&Scalar::from(7u64));
        let a = [1u8; 32];
        assert_ne!(kdf(0, &a, &[2; 32], &p), kdf(1, &a, &[2; 32], &p));
    }

    #[test]
    fn the_kdf_is_its_definition_and_binds_every_input() {
        // SHA-256 of the tag, the index (8 bytes little-endian), A, B and
        // the shared point, truncated to 16 bytes little-endian
        let p = RistrettoPoint::mul_base(&Scalar::from(7u64));
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut h = Sha256::new();
        h.update(b"secinfer-ot/chou-orlandi/ristretto255/kdf/v1");
        h.update(5u64.to_le_bytes());
        h.update(a);
        h.update(b);
        h.update(p.compress().as_bytes());
        let digest = h.finalize();
        let want = u128::from_le_bytes(digest[..16].try_into().unwrap());
        let key = kdf(5, &a, &b, &p);
        assert_eq!(key, want);
        // each input changes the key
        let q = RistrettoPoint::mul_base(&Scalar::from(8u64));
        assert_ne!(kdf(6, &a, &b, &p), key);
        assert_ne!(kdf(5, &[3; 32], &b, &p), key);
        assert_ne!(kdf(5, &a, &[3; 32], &p), key);
        assert_ne!(kdf(5, &a, &b, &q), key);
        // and both parties' keys follow from it as the module docs say
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let choices = random_choices(&mut rng, 64);
        let sender = BaseOtSender::new(&mut rng);
        let received = receive(&mut rng, &sender.message(), &choices).unwrap();
        let keys = sender.keys(&received.message, 64).unwrap();
        assert_keys_match_the_choices(&choices, &keys, &received.keys);
        for (i, b_bytes) in received.message.chunks_exact(32).enumerate() {
            let b = CompressedRistretto::from_slice(b_bytes)
                .unwrap()
                .decompress()
                .unwrap();
            let a_a = sender.a * sender.a_point;
            assert_eq!(
                keys[i][0],
                kdf(i, &sender.a_bytes, b_bytes, &(sender.a * b))
            );
            assert_eq!(
                keys[i][1],
                kdf(i, &sender.a_bytes, b_bytes, &(sender.a * b - a_a))
            );
        }
    }

    #[test]
    fn bad_points_and_lengths_are_refused_naming_the_ot() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let choices = random_choices(&mut rng, 8);
        let identity = RistrettoPoint::identity().compress().to_bytes();
        let err = receive(&mut rng, &identity, &choices).unwrap_err();
        assert!(
            format!("{err}").contains("sender's point A is the identity"),
            "{err}"
        );
        let err = receive(&mut rng, &[0xff; 32], &choices).unwrap_err();
        assert!(
            format!("{err}").contains("not a ristretto255 point"),
            "{err}"
        );
        let err = receive(&mut rng, &[0; 31], &choices).unwrap_err();
        assert!(format!("{err}").contains("31 bytes"), "{err}");

        let sender = BaseOtSender::new(&mut rng);
        let mut received = receive(&mut rng, &sender.message(), &choices).unwrap();
        assert!(sender.keys(&received.message[..7 * 32], 8).is_err());
        received.message[5 * 32..6 * 32].copy_from_slice(&[0xee; 32]);
        let err = sender.keys(&received.message, 8).unwrap_err();
        assert!(format!("{err}").contains("base OT 5"), "{err}");
        received.message[5 * 32..6 * 32].copy_from_slice(&identity);
        let err = sender.keys(&received.message, 8).unwrap_err();
        assert!(
            format!("{err}").contains("base OT 5: the receiver's point B is the identity"),
            "{err}"
        );
        received.message[5 * 32..6 * 32].copy_from_slice(&sender.message());
        let err = sender.keys(&received.message, 8).unwrap_err();
        assert!(format!("{err}").contains("base OT 5"), "{err}");
    }
}
