//! The client's side: its own BFV key, encryption of masks, decryption of
//! replies.

use fhe::bfv::{Ciphertext, Encoding, Plaintext, PublicKey, SecretKey};
use fhe_traits::{
    DeserializeParametrized, FheDecoder, FheDecrypter, FheEncoder, FheEncrypter, Serialize,
};
use rand_chacha09::ChaCha20Rng;
use rand_chacha09::rand_core::SeedableRng;
use rayon::prelude::*;

use crate::{HeError, HeParams, decode_guarded, lib_err};

/// A client's key pair; the secret key never leaves this struct (and `fhe`
/// zeroes it on drop).
pub struct ClientKey {
    params: HeParams,
    sk: SecretKey,
    pk: PublicKey,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// A fresh key pair from the operating system's CSPRNG.
    pub fn generate(params: &HeParams) -> ClientKey {
        let mut rng = ChaCha20Rng::from_os_rng();
        let sk = SecretKey::random(params.bfv(), &mut rng);
        let pk = PublicKey::new(&sk, &mut rng);
        ClientKey {
            params: params.clone(),
            sk,
            pk,
        }
    }

    /// The parameters the key belongs to.
    pub fn params(&self) -> &HeParams {
        &self.params
    }

    /// The public key, serialised for the server (it re-randomises replies
    /// with it).
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.pk.to_bytes()
    }

    /// Encrypts one layer's masks for `masks.len()` inferences (at most `N`),
    /// each of `input_len` ring elements: ciphertext `j` holds feature `j` of
    /// inference `b` in coefficient `b`.
    pub fn encrypt(&self, masks: &[&[u64]], input_len: usize) -> Result<Vec<Vec<u8>>, HeError> {
        let n = self.params.degree();
        if masks.is_empty() || masks.len() > n {
            return Err(HeError::Shape(format!(
                "{} inferences in one batch; a ciphertext holds 1..={n}",
                masks.len()
            )));
        }
        let t_mask = (1u64 << self.params.ring_bits()) - 1;
        if let Some((b, m)) = masks.iter().enumerate().find(|(_, m)| m.len() != input_len) {
            return Err(HeError::Shape(format!(
                "mask {b} has {} elements, the layer takes {input_len}",
                m.len()
            )));
        }
        let par = self.params.bfv();
        (0..input_len)
            .into_par_iter()
            .map_init(ChaCha20Rng::from_os_rng, |rng, j| {
                let column: Vec<u64> = masks.iter().map(|m| m[j] & t_mask).collect();
                let pt =
                    Plaintext::try_encode(&column[..], Encoding::poly(), par).map_err(lib_err)?;
                let ct: Ciphertext = self.sk.try_encrypt(&pt, rng).map_err(lib_err)?;
                Ok(ct.to_bytes())
            })
            .collect()
    }

    /// Decrypts reply ciphertexts: for each, `c = W·r − s` in `Z_2^k` of its
    /// output feature, for the batch's `count` inferences (one row per
    /// ciphertext).
    pub fn decrypt(
        &self,
        replies: &[Vec<u8>],
        count: usize,
        output_len: usize,
    ) -> Result<Vec<Vec<u64>>, HeError> {
        let n = self.params.degree();
        if count == 0 || count > n {
            return Err(HeError::Shape(format!(
                "{count} inferences; a batch holds 1..={n}"
            )));
        }
        if replies.len() != output_len {
            return Err(HeError::Shape(format!(
                "reply has {} ciphertexts, the layer has {output_len} outputs",
                replies.len()
            )));
        }
        let par = self.params.bfv();
        replies
            .par_iter()
            .map(|bytes| {
                let ct = decode_reply(par, bytes)?;
                let pt = self.sk.try_decrypt(&ct).map_err(lib_err)?;
                let mut v = Vec::<u64>::try_decode(&pt, Encoding::poly()).map_err(lib_err)?;
                v.truncate(count);
                Ok(v)
            })
            .collect()
    }

    /// The secret key, for tests that play a curious client.
    #[cfg(test)]
    pub(crate) fn secret(&self) -> &SecretKey {
        &self.sk
    }
}

/// Reads a reply ciphertext (sent in coefficient representation) into the
/// NTT representation `fhe` computes with.
pub(crate) fn decode_reply(
    par: &std::sync::Arc<fhe::bfv::BfvParameters>,
    bytes: &[u8],
) -> Result<Ciphertext, HeError> {
    let mut ct = decode_guarded("reply ciphertext", || Ciphertext::from_bytes(bytes, par))?;
    if ct.len() != 2 {
        return Err(HeError::Malformed {
            what: "reply ciphertext",
            problem: format!("{} components, expected 2", ct.len()),
        });
    }
    for p in ct.iter_mut() {
        if *p.representation() != fhe_math::rq::Representation::Ntt {
            p.change_representation(fhe_math::rq::Representation::Ntt);
        }
    }
    Ok(ct)
}
