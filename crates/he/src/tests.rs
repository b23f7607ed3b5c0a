use fhe::bfv::Ciphertext;
use fhe_math::zq::Modulus;
use fhe_traits::DeserializeParametrized;
use rand09::{Rng, SeedableRng};

use crate::server::{Privacy, evaluate_with};
use crate::*;

/// A dense `m × n` matrix with signed weights, split into blocks of rows.
struct Dense {
    w: Vec<Vec<i64>>,
    block_rows: usize,
}

impl LinearForm for Dense {
    fn input_len(&self) -> usize {
        self.w[0].len()
    }
    fn output_len(&self) -> usize {
        self.w.len()
    }
    fn fan_in(&self) -> usize {
        self.input_len()
    }
    fn max_abs_row_sum(&self) -> u128 {
        self.w
            .iter()
            .map(|r| r.iter().map(|v| v.unsigned_abs() as u128).sum())
            .max()
            .unwrap_or(0)
    }
    fn blocks(&self) -> usize {
        self.w.len().div_ceil(self.block_rows)
    }
    fn block_len(&self, block: usize) -> usize {
        self.outputs(block..block + 1).len()
    }
    fn outputs(&self, blocks: std::ops::Range<usize>) -> Vec<usize> {
        (blocks.start * self.block_rows..(blocks.end * self.block_rows).min(self.w.len())).collect()
    }
    fn apply_blocks(
        &self,
        blocks: std::ops::Range<usize>,
        x: &[f64],
        rows: usize,
    ) -> Result<Vec<f64>, String> {
        // In i128, so that a limb too wide for f64 would show as a wrong answer.
        let n = self.input_len();
        let outs = self.outputs(blocks);
        let mut y = Vec::with_capacity(rows * outs.len());
        for r in 0..rows {
            for &o in &outs {
                let mut acc = 0i128;
                for j in 0..n {
                    acc += self.w[o][j] as i128 * x[r * n + j] as i128;
                }
                y.push(acc as f64);
            }
        }
        Ok(y)
    }
}

fn rng() -> rand09::rngs::StdRng {
    rand09::rngs::StdRng::seed_from_u64(7)
}

fn random_dense(m: usize, n: usize, bound: i64, block_rows: usize) -> Dense {
    let mut g = rng();
    Dense {
        w: (0..m)
            .map(|_| (0..n).map(|_| g.random_range(-bound..=bound)).collect())
            .collect(),
        block_rows,
    }
}

fn expected(d: &Dense, r: &[u64], ring_bits: u32) -> Vec<u64> {
    let mask = (1u64 << ring_bits) - 1;
    d.w.iter()
        .map(|row| {
            row.iter().zip(r).fold(0u64, |a, (&w, &x)| {
                a.wrapping_add((w as u64).wrapping_mul(x))
            }) & mask
        })
        .collect()
}

#[test]
fn default_parameters_pass_every_check() {
    let p = HeParams::for_ring(37).unwrap();
    assert_eq!(p.degree(), 8192);
    assert!(p.log2_q() <= 218.0, "{}", p.log2_q());
    let plan = p.flood_plan(3136).unwrap();
    assert!(plan.flood_bits >= plan.log2_noise.ceil() as u32 + STAT_SECURITY_BITS);
    assert!(plan.headroom_bits >= 1.0);
}

#[test]
fn unsafe_parameters_are_refused() {
    let err = |r: Result<HeParams, HeError>| match r {
        Err(HeError::Params(m)) => m,
        other => panic!("expected a parameter error, got {other:?}"),
    };
    // beyond the 128-bit table
    assert!(err(HeParams::new(8192, &[60, 60, 60, 45], 37)).contains("exceeds 218"));
    assert!(err(HeParams::new(4096, &[60, 55], 37)).contains("exceeds 109"));
    // degree not in the table
    assert!(err(HeParams::new(512, &[20, 20], 10)).contains("not in the HE-standard"));
    // t not below every prime: a 36-bit prime with t = 2^37
    assert!(err(HeParams::new(8192, &[36, 60, 60], 37)).contains("silently wrong"));
    // one prime only
    assert!(err(HeParams::new(8192, &[60], 37)).contains("two"));
    // a layer whose worst-case noise cannot be flooded
    let p = HeParams::for_ring(37).unwrap();
    assert!(matches!(p.flood_plan(1 << 40), Err(HeError::Params(m)) if m.contains("flood")));
    // N = 4096 cannot flood even a small layer at t = 2^37
    let small = HeParams::new(4096, &[60, 49], 37).unwrap();
    assert!(small.flood_plan(784).is_err());
}

#[test]
fn decryption_is_exactly_w_r_minus_s() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let mask = (1u64 << 37) - 1;
    // weights up to the ring's full centred range
    for (d, count) in [
        (random_dense(5, 7, (1 << 36) - 1, 2), 3),
        (random_dense(3, 40, 1 << 20, 3), p.degree()),
    ] {
        let mut g = rng();
        let masks: Vec<Vec<u64>> = (0..count)
            .map(|_| {
                (0..d.input_len())
                    .map(|_| g.random::<u64>() & mask)
                    .collect()
            })
            .collect();
        let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
        let cts = client.encrypt(&views, d.input_len()).unwrap();
        let reply = evaluate_all(&server, &d, cts.clone(), count).unwrap();
        assert_eq!(reply.masks.len(), count);
        let c = client
            .decrypt(&reply.ciphertexts, count, d.output_len())
            .unwrap();
        assert_eq!(c.len(), d.output_len());
        for b in 0..count {
            let wr = expected(&d, &masks[b], 37);
            let want: Vec<u64> = wr
                .iter()
                .zip(&reply.masks[b])
                .map(|(a, s)| a.wrapping_sub(*s) & mask)
                .collect();
            let got: Vec<u64> = c.iter().map(|row| row[b]).collect();
            assert_eq!(got, want, "inference {b}");
        }
    }
}

#[test]
fn own_encryption_and_decryption_agree_with_fhe() {
    use fhe::bfv::{Encoding, Plaintext};
    use fhe_traits::{FheDecoder, FheDecrypter, FheEncoder, FheEncrypter, Serialize};
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let par = p.bfv();
    let mask = (1u64 << 37) - 1;
    let mut g = rng();
    let msgs: Vec<Vec<u64>> = (0..p.degree())
        .map(|_| vec![g.random::<u64>() & mask, 0, mask])
        .collect();
    let views: Vec<&[u64]> = msgs.iter().map(|m| &m[..]).collect();

    // Ours encrypts, fhe decrypts; the fresh noise is what fhe's own has.
    let ours = client.encrypt(&views, 3).unwrap();
    let theirs_pt = Plaintext::try_encode(&[5u64; 8][..], Encoding::poly(), par).unwrap();
    let mut srng = rand_chacha09::ChaCha20Rng::seed_from_u64(3);
    let theirs = client.secret().try_encrypt(&theirs_pt, &mut srng).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: measure_noise is variable-time; fine in a test.
    let their_noise = unsafe { client.secret().measure_noise(&theirs).unwrap() };
    for (j, bytes) in ours.iter().enumerate() {
        // seeded like fhe's (a full second component would double it)
        assert!(
            bytes.len() <= theirs.to_bytes().len(),
            "{} bytes",
            bytes.len()
        );
        // fhe reads b as coefficients (as tagged) and a in NTT form; its
        // decryption wants both in NTT form
        let mut ct = Ciphertext::from_bytes(bytes, par).unwrap();
        for p in ct.iter_mut() {
            if *p.representation() != fhe_math::rq::Representation::Ntt {
                p.change_representation(fhe_math::rq::Representation::Ntt);
            }
        }
        let pt = client.secret().try_decrypt(&ct).unwrap();
        let v = Vec::<u64>::try_decode(&pt, Encoding::poly()).unwrap();
        let want: Vec<u64> = msgs.iter().map(|m| m[j]).collect();
        assert_eq!(v, want, "ciphertext {j}");
        #[allow(unsafe_code)]
        // SAFETY: as above.
        let noise = unsafe { client.secret().measure_noise(&ct).unwrap() };
        assert!(
            noise <= their_noise + 1,
            "noise 2^{noise} vs fhe's 2^{their_noise}"
        );
    }

    // fhe encrypts, switched to one prime as replies are; ours decrypts.
    let values: Vec<u64> = (0..p.degree() as u64)
        .map(|i| (i * 0x9E37_79B9) & mask)
        .collect();
    let pt = Plaintext::try_encode(&values[..], Encoding::poly(), par).unwrap();
    let mut ct: Ciphertext = client.secret().try_encrypt(&pt, &mut srng).unwrap();
    // fhe would still send the (stale) seed of a switched second component,
    // so replies are written from the components themselves.
    let unseeded = |ct: &Ciphertext| {
        let polys = ct
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.change_representation(fhe_math::rq::Representation::PowerBasis);
                crate::wire::encode_poly(c.coefficients(), c.ctx().moduli())
            })
            .collect();
        let level = par.level_of_context(ct[0].ctx()).unwrap();
        crate::wire::encode_ciphertext(polys, None, level)
    };
    let full = unseeded(&ct);
    ct.switch_to_level(par.max_level()).unwrap();
    let got = client.decrypt(&[unseeded(&ct)], p.degree(), 1).unwrap();
    assert_eq!(got[0], values);
    // A reply still at three primes is named, not misread.
    let e = client.decrypt(&[full], 1, 1).unwrap_err();
    assert!(e.to_string().contains("3 primes"), "{e}");
}

/// Solves `A·w = y (mod p)` for square `A` by Gaussian elimination.
#[allow(clippy::needless_range_loop)] // row operations read clearest indexed
fn solve_mod(mut a: Vec<Vec<u64>>, mut y: Vec<u64>, p: u64) -> Option<Vec<u64>> {
    let m = Modulus::new(p).unwrap();
    let n = y.len();
    for col in 0..n {
        let piv = (col..n).find(|&r| a[r][col] != 0)?;
        a.swap(col, piv);
        y.swap(col, piv);
        let inv = m.inv(a[col][col])?;
        for k in 0..n {
            a[col][k] = m.mul(a[col][k], inv);
        }
        y[col] = m.mul(y[col], inv);
        for r in 0..n {
            if r != col && a[r][col] != 0 {
                let f = a[r][col];
                for k in 0..n {
                    a[r][k] = m.sub(a[r][k], m.mul(f, a[col][k]));
                }
                y[r] = m.sub(y[r], m.mul(f, y[col]));
            }
        }
    }
    Some(y)
}

/// The curious client's attack: the second component of an honest-but-naive
/// reply is `Σ_j W_oj · a_j`, and the client knows every `a_j` (it made
/// them), so `n` residues of it are `n` linear equations in row `o` of `W`.
fn recover_row(p: &HeParams, inputs: &[Vec<u8>], reply: &[u8]) -> Option<Vec<i64>> {
    let par = p.bfv();
    let a: Vec<Ciphertext> = inputs
        .iter()
        .map(|b| Ciphertext::from_bytes(b, par).unwrap())
        .collect();
    let r = decode_reply(par, reply).unwrap();
    let q = par.moduli()[0];
    let n = inputs.len();
    let rows: Vec<Vec<u64>> = (0..n)
        .map(|i| a.iter().map(|ct| ct[1].coefficients()[[0, i]]).collect())
        .collect();
    let y: Vec<u64> = (0..n).map(|i| r[1].coefficients()[[0, i]]).collect();
    let w = solve_mod(rows, y, q)?;
    Some(
        w.into_iter()
            .map(|v| {
                if v > q / 2 {
                    v as i64 - q as i64
                } else {
                    v as i64
                }
            })
            .collect(),
    )
}

#[test]
fn without_rerandomisation_the_client_recovers_the_weights() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let d = random_dense(2, 6, 1 << 30, 1);
    let masks: Vec<Vec<u64>> = vec![vec![1, 2, 3, 4, 5, 6]];
    let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
    let cts = client.encrypt(&views, 6).unwrap();

    // A naive server: no re-randomisation, no flooding, no shrinking.
    let run = |privacy| {
        crate::server::collect(&d, 1, |emit| {
            evaluate_with(&server, &d, cts.clone(), 1, privacy, false, emit)
        })
        .unwrap()
    };
    let naive = run(Privacy::NoneInsecure);
    for o in 0..2 {
        let w = recover_row(&p, &cts, &naive.ciphertexts[o]).expect("solvable");
        assert_eq!(w, d.w[o], "the attack recovers row {o} of W exactly");
    }
    // The real server, inspected at the same point (before shrinking): the
    // same attack yields nothing like the weights.
    let real = run(Privacy::Full);
    for o in 0..2 {
        let w = recover_row(&p, &cts, &real.ciphertexts[o]);
        assert_ne!(
            w.as_ref(),
            Some(&d.w[o]),
            "re-randomised reply leaked row {o}"
        );
        if let Some(w) = w {
            // uniform-looking garbage, not small weights
            assert!(w.iter().any(|v| v.unsigned_abs() > 1 << 40), "{w:?}");
        }
    }
    // And its shrunk form still decrypts to W·r − s.
    let c = client.decrypt(
        &evaluate_all(&server, &d, cts.clone(), 1)
            .unwrap()
            .ciphertexts,
        1,
        2,
    );
    assert!(c.is_ok());
}

#[test]
fn flooded_noise_is_as_wide_as_planned() {
    // The client's view of the noise, before shrinking, is dominated by the
    // flood whatever the weights: zero weights and large weights look alike.
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let plan = p.flood_plan(4).unwrap();
    for bound in [0i64, 1 << 36] {
        let d = random_dense(1, 4, bound, 1);
        let cts = client.encrypt(&[&[9, 8, 7, 6]], 4).unwrap();
        let reply = crate::server::collect(&d, 1, |emit| {
            evaluate_with(&server, &d, cts.clone(), 1, Privacy::Full, false, emit)
        })
        .unwrap();
        let ct = decode_reply(p.bfv(), &reply.ciphertexts[0]).unwrap();
        // SAFETY: measure_noise is variable-time; fine in a test.
        #[allow(unsafe_code)]
        let bits = unsafe { client.secret().measure_noise(&ct).unwrap() };
        assert!(
            (plan.flood_bits as usize - 2..=plan.flood_bits as usize + 1).contains(&bits),
            "noise of 2^{bits} with weights up to {bound}, flood 2^{}",
            plan.flood_bits
        );
    }
}

#[test]
fn malformed_inputs_are_errors() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    assert!(ServerKey::from_bytes(&p, b"not a key").is_err());
    let d = random_dense(2, 3, 5, 1);
    let cts = client.encrypt(&[&[1, 2, 3]], 3).unwrap();
    assert!(matches!(
        evaluate_all(&server, &d, cts[..2].to_vec(), 1),
        Err(HeError::Shape(_))
    ));
    assert!(matches!(
        evaluate_all(&server, &d, cts.clone(), 0),
        Err(HeError::Shape(_))
    ));
    let mut bad = cts.clone();
    bad[1] = vec![0xff; 100];
    assert!(matches!(
        evaluate_all(&server, &d, bad, 1),
        Err(HeError::Malformed { .. })
    ));
    assert!(client.encrypt(&[&[1, 2]], 3).is_err());
    assert!(client.decrypt(&[vec![1, 2, 3]], 1, 1).is_err());
    // a mask ciphertext (one polynomial and a seed) is not a reply
    let e = client.decrypt(&[cts[0].clone()], 1, 1).unwrap_err();
    assert!(e.to_string().contains("1 polynomials and a seed"), "{e}");
}

/// Reads a reply ciphertext (sent in coefficient representation) into the
/// NTT representation `fhe` computes with (tests decrypt it with `fhe`).
pub(crate) fn decode_reply(
    par: &std::sync::Arc<fhe::bfv::BfvParameters>,
    bytes: &[u8],
) -> Result<Ciphertext, HeError> {
    let mut ct = crate::decode_guarded("reply ciphertext", || Ciphertext::from_bytes(bytes, par))?;
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

/// Runs a batch through the block packing and returns, per inference, the
/// decrypted `c` and the server's `s` (each `output_len` long).
fn run_blocks(
    client: &ClientKey,
    server: &ServerKey,
    d: &Dense,
    shape: &BlockShape,
    masks: &[Vec<u64>],
) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
    let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
    let cts = client
        .encrypt_blocks(shape, &views, 0..shape.input_ciphertexts())
        .unwrap();
    assert_eq!(cts.len(), shape.input_ciphertexts());
    let mut c = vec![vec![u64::MAX; d.output_len()]; shape.count];
    let mut s = vec![vec![u64::MAX; d.output_len()]; shape.count];
    let mut seen = vec![false; shape.output_ciphertexts()];
    evaluate_blocks(server, d, shape, cts, &mut |parts| {
        for part in parts {
            assert!(!seen[part.index], "reply {} twice", part.index);
            seen[part.index] = true;
            let values = client
                .decrypt_block(shape, part.index, &part.ciphertext)
                .unwrap();
            let kept = shape.kept(part.index);
            assert_eq!(values.len(), kept.len());
            assert_eq!(part.masks.len(), kept.len());
            for ((kp, v), m) in kept.iter().zip(values).zip(part.masks) {
                c[kp.inference][kp.output] = v;
                s[kp.inference][kp.output] = m;
            }
        }
        Ok(())
    })
    .unwrap();
    assert!(seen.iter().all(|&x| x), "every reply arrives");
    (c, s)
}

#[test]
fn block_packing_decrypts_exactly_to_w_r_minus_s() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let mask = (1u64 << 37) - 1;
    // (layer, batch, forced shape or None for the chosen one): a batch of 1,
    // of 2, a partial group, blocks that do not divide the layer, weights up
    // to the full centred range
    let d_small = random_dense(13, 29, (1 << 36) - 1, 4);
    let d_mlp = random_dense(128, 784, 1 << 14, 16);
    let cases: Vec<(&Dense, usize, Option<BlockShape>)> = vec![
        (&d_mlp, 1, None),
        (&d_mlp, 2, None),
        (
            &d_small,
            5,
            Some(BlockShape {
                input_len: 29,
                output_len: 13,
                count: 5,
                width: 2,
                in_block: 8,
                out_block: 5,
            }),
        ),
        (
            &d_small,
            3,
            Some(BlockShape {
                input_len: 29,
                output_len: 13,
                count: 3,
                width: 4,
                in_block: 29,
                out_block: 13,
            }),
        ),
    ];
    for (d, count, forced) in cases {
        let shape = match forced {
            Some(s) => s,
            None => match Packing::choose(&p, d.input_len(), d.output_len(), count).unwrap() {
                Packing::Blocks(s) => s,
                other => panic!("a batch of {count} should take blocks, got {other:?}"),
            },
        };
        assert!(shape.in_block * shape.out_block * shape.width <= p.degree());
        let mut g = rng();
        let masks: Vec<Vec<u64>> = (0..count)
            .map(|_| {
                (0..d.input_len())
                    .map(|_| g.random::<u64>() & mask)
                    .collect()
            })
            .collect();
        let (c, s) = run_blocks(&client, &server, d, &shape, &masks);
        for b in 0..count {
            let want: Vec<u64> = expected(d, &masks[b], 37)
                .iter()
                .zip(&s[b])
                .map(|(wr, s)| wr.wrapping_sub(*s) & mask)
                .collect();
            assert_eq!(c[b], want, "{shape:?}, inference {b}");
        }
    }
}

#[test]
fn the_layout_follows_the_batch_size() {
    let p = HeParams::for_ring(37).unwrap();
    // the MNIST MLP's first layer: a batch of 1 is a few ciphertexts, a full
    // batch keeps the per-coefficient packing
    let one = Packing::choose(&p, 784, 128, 1).unwrap();
    let full = Packing::choose(&p, 784, 128, p.degree()).unwrap();
    assert!(matches!(one, Packing::Blocks(_)), "{one:?}");
    assert!(matches!(full, Packing::PerCoefficient { .. }), "{full:?}");
    assert!(one.estimated_seconds(&p) * 50.0 < full.estimated_seconds(&p));
    assert!(
        one.wire_bytes(&p) * 50 < full.wire_bytes(&p),
        "batch of 1: {} B, full batch: {} B",
        one.wire_bytes(&p),
        full.wire_bytes(&p)
    );
    // the estimated cost per inference never grows with the batch
    let mut last = f64::INFINITY;
    for count in [1, 2, 16, 100, 1000, 8192] {
        let per = Packing::choose(&p, 784, 128, count)
            .unwrap()
            .estimated_seconds(&p)
            / count as f64;
        assert!(
            per <= last * 1.0001,
            "batch {count}: {per} B per inference after {last}"
        );
        last = per;
    }
    // a layer too big for a dense matrix keeps the per-coefficient packing
    // while its job fits the server's memory bound ...
    let wide = Packing::choose(&p, 800, 30000, 1).unwrap();
    assert!(matches!(wide, Packing::PerCoefficient { .. }));
    assert!(wide.server_bytes(&p) <= JOB_MEMORY_BYTES);
    // ... and is refused, with the estimate, where even that does not fit
    let e = Packing::choose(&p, 6272, 12544, 1).unwrap_err().to_string();
    assert!(e.contains("1024 MiB") && e.contains("needs ~"), "{e}");
    // and nonsense is refused
    assert!(Packing::choose(&p, 784, 128, 0).is_err());
    assert!(Packing::choose(&p, 784, 128, p.degree() + 1).is_err());
}

#[test]
fn block_replies_carry_only_the_kept_coefficients_and_bad_ones_are_refused() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let d = random_dense(10, 50, 1 << 20, 5);
    let shape = BlockShape {
        input_len: 50,
        output_len: 10,
        count: 1,
        width: 1,
        in_block: 50,
        out_block: 10,
    };
    let masks = [vec![1u64; 50]];
    let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
    let cts = client.encrypt_blocks(&shape, &views, 0..1).unwrap();
    let mut replies = Vec::new();
    evaluate_blocks(&server, &d, &shape, cts.clone(), &mut |parts| {
        replies.extend(parts);
        Ok(())
    })
    .unwrap();
    let reply = &replies[0].ciphertext;
    // c1 (one 60-bit prime) plus 10 kept coefficients, not a whole c0
    assert!(
        reply.len() < p.degree() * 60 / 8 + 200,
        "{} bytes",
        reply.len()
    );
    // a truncated reply, a wrong count, a reply of another layout
    assert!(
        client
            .decrypt_block(&shape, 0, &reply[..reply.len() - 9])
            .is_err()
    );
    let mut wrong = reply.clone();
    wrong[0] ^= 1;
    let e = client
        .decrypt_block(&shape, 0, &wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("kept coefficients"), "{e}");
    assert!(client.decrypt_block(&shape, 1, reply).is_err());
    // the server refuses a wrong number of inputs and a layout that does not fit
    let e = evaluate_blocks(&server, &d, &shape, vec![], &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("0 ciphertexts"), "{e}");
    // a malformed input is refused before any reply is made
    let mut bad = cts.clone();
    bad[0] = vec![0xff; 100];
    let mut emitted = 0;
    let e = evaluate_blocks(&server, &d, &shape, bad, &mut |p| {
        emitted += p.len();
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(e, HeError::Malformed { .. }), "{e}");
    assert_eq!(emitted, 0);
    let too_big = BlockShape {
        width: 8192,
        ..shape
    };
    let e = evaluate_blocks(&server, &d, &too_big, cts, &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

/// A 2-D convolution computed naively, for the convolution packing's tests.
struct NaiveConv {
    d: ConvDims,
    w: Vec<i64>,
}

impl NaiveConv {
    fn random(d: ConvDims, bound: i64) -> NaiveConv {
        let mut g = rng();
        let len = d.out_channels * (d.channels / d.group) * d.kernel[0] * d.kernel[1];
        NaiveConv {
            d,
            w: (0..len).map(|_| g.random_range(-bound..=bound)).collect(),
        }
    }

    /// `W·x mod 2^37` for one inference.
    fn apply(&self, x: &[u64]) -> Vec<u64> {
        let d = &self.d;
        let [ho, wo] = d.output_hw();
        let (cg, mg) = (d.channels / d.group, d.out_channels / d.group);
        let [kh, kw] = d.kernel;
        let mut y = vec![0u64; d.output_len()];
        for m in 0..d.out_channels {
            let gr = m / mg;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0u64;
                    for c in 0..cg {
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy = (oy * d.strides[0] + i * d.dilations[0]) as i64
                                    - d.pads[0] as i64;
                                let ix = (ox * d.strides[1] + j * d.dilations[1]) as i64
                                    - d.pads[1] as i64;
                                if iy < 0 || ix < 0 || iy >= d.height as i64 || ix >= d.width as i64
                                {
                                    continue;
                                }
                                let xv = x[((gr * cg + c) * d.height + iy as usize) * d.width
                                    + ix as usize];
                                let wv = self.w[((m * cg + c) * kh + i) * kw + j];
                                acc = acc.wrapping_add((wv as u64).wrapping_mul(xv));
                            }
                        }
                    }
                    y[(m * ho + oy) * wo + ox] = acc & ((1 << 37) - 1);
                }
            }
        }
        y
    }
}

impl LinearForm for NaiveConv {
    fn input_len(&self) -> usize {
        self.d.input_len()
    }
    fn output_len(&self) -> usize {
        self.d.output_len()
    }
    fn fan_in(&self) -> usize {
        (self.d.channels / self.d.group) * self.d.kernel[0] * self.d.kernel[1]
    }
    fn max_abs_row_sum(&self) -> u128 {
        1
    }
    fn blocks(&self) -> usize {
        1
    }
    fn block_len(&self, _: usize) -> usize {
        self.output_len()
    }
    fn outputs(&self, _: std::ops::Range<usize>) -> Vec<usize> {
        (0..self.output_len()).collect()
    }
    fn apply_blocks(
        &self,
        _: std::ops::Range<usize>,
        _: &[f64],
        _: usize,
    ) -> Result<Vec<f64>, String> {
        Err("not used by the convolution packing".into())
    }
    fn conv_weights(&self) -> Option<Vec<i64>> {
        Some(self.w.clone())
    }
}

#[test]
fn convolution_packing_decrypts_exactly_to_w_r_minus_s() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let mask = (1u64 << 37) - 1;
    let dims = |channels, hw: [usize; 2], out, kernel, strides, dilations, pads, group| ConvDims {
        channels,
        height: hw[0],
        width: hw[1],
        out_channels: out,
        kernel,
        strides,
        dilations,
        pads,
        group,
    };
    // (dims, forced layouts beside the chosen one): MNIST's first conv, a
    // strided and dilated one with uneven padding, grouped and depthwise,
    // and layouts with partial channel blocks and several row tiles
    let cases = [
        dims(1, [28, 28], 8, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 1),
        dims(3, [11, 9], 4, [3, 2], [2, 3], [2, 1], [1, 0, 2, 1], 1),
        dims(4, [7, 7], 6, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 2),
        dims(5, [6, 6], 5, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 5),
    ];
    for d in cases {
        let conv = NaiveConv::random(d, (1 << 36) - 1);
        for count in [1usize, 2] {
            let mut shapes = Vec::new();
            if let Packing::Conv(s) = Packing::choose_conv(&p, &d, count).unwrap() {
                shapes.push(s);
            }
            let ho = d.output_hw()[0];
            shapes.push(ConvShape {
                dims: d,
                count,
                in_block: (d.channels / d.group).div_ceil(2),
                out_block: 1,
                rows: ho.div_ceil(3),
            });
            for shape in shapes {
                shape.check(p.degree()).unwrap();
                let mut g = rng();
                let masks: Vec<Vec<u64>> = (0..count)
                    .map(|_| {
                        (0..d.input_len())
                            .map(|_| g.random::<u64>() & mask)
                            .collect()
                    })
                    .collect();
                let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
                let cts = client
                    .encrypt_blocks(&shape, &views, 0..shape.input_ciphertexts())
                    .unwrap();
                let mut got = vec![vec![None; d.output_len()]; count];
                evaluate_packed(&server, &conv, &Packing::Conv(shape), cts, &mut |parts| {
                    for part in parts {
                        let c = client
                            .decrypt_block(&shape, part.index, &part.ciphertext)
                            .unwrap();
                        for ((kp, c), s) in shape.kept(part.index).iter().zip(c).zip(part.masks) {
                            assert!(got[kp.inference][kp.output].is_none(), "twice");
                            got[kp.inference][kp.output] = Some(c.wrapping_add(s) & mask);
                        }
                    }
                    Ok(())
                })
                .unwrap();
                for b in 0..count {
                    let want = conv.apply(&masks[b]);
                    let have: Vec<u64> = got[b]
                        .iter()
                        .map(|v| v.expect("every output arrives"))
                        .collect();
                    assert_eq!(have, want, "{shape:?}, inference {b}");
                }
            }
        }
    }
}

#[test]
fn a_public_key_must_be_seeded_and_look_uniform() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let honest =
        <fhe::proto::bfv::PublicKey as prost::Message>::decode(&client.public_key_bytes()[..])
            .unwrap();
    let ct = honest.c.clone().unwrap();
    assert_eq!(
        (ct.c.len(), ct.seed.len()),
        (1, 32),
        "fhe writes keys seeded"
    );
    let par = p.bfv();
    let full = Ciphertext::from_bytes(&prost::Message::encode_to_vec(&ct), par).unwrap();
    let moduli = par.moduli().to_vec();
    let coeffs = |i: usize| {
        let mut poly = full[i].clone();
        poly.change_representation(fhe_math::rq::Representation::PowerBasis);
        poly.coefficients().to_owned()
    };
    let key_with = |polys: Vec<ndarray::Array2<u64>>, seed: Vec<u8>| {
        let mut proto = honest.clone();
        proto.c = Some(fhe::proto::bfv::Ciphertext {
            c: polys
                .iter()
                .map(|c| crate::wire::encode_poly(c.view(), &moduli))
                .collect(),
            seed,
            level: 0,
        });
        prost::Message::encode_to_vec(&proto)
    };
    let zero = ndarray::Array2::<u64>::zeros(coeffs(0).raw_dim());
    // the honest key, re-encoded
    assert!(ServerKey::from_bytes(&p, &key_with(vec![coeffs(0)], ct.seed.clone())).is_ok());
    // both components sent explicitly (the second could be anything): refused
    for second in [coeffs(1), zero.clone()] {
        let e = ServerKey::from_bytes(&p, &key_with(vec![coeffs(0), second], vec![]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("from a 32-byte seed"), "{e}");
    }
    // a zero first component with an honest seed
    let e = ServerKey::from_bytes(&p, &key_with(vec![zero], ct.seed.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("first component"), "{e}");
}

/// The curious client's attack on a block-packed reply: its second
/// component is `P·a` in `R_Q` for the one input ciphertext's `a`, which the
/// client made, so `P = c1 · a⁻¹` (slot by slot in the NTT domain) gives
/// the weight polynomial, whose coefficients are the weights.
fn recover_weight_poly(p: &HeParams, input: &[u8], reply: &[u8]) -> Vec<i64> {
    use fhe_math::rq::{Poly, Representation, traits::TryConvertFrom};
    let par = p.bfv();
    let ctx = par.context_at_level(0).unwrap().clone();
    let (seed, _) = crate::wire::decode_mask_ciphertext(input, par).unwrap();
    let a = Poly::random_from_seed(&ctx, Representation::Ntt, seed);
    let ct = decode_reply(par, reply).unwrap();
    let c1 = ct[1].coefficients().to_owned();
    let mut quotient = c1.clone();
    for (l, &q) in par.moduli().iter().enumerate() {
        let m = fhe_math::zq::Modulus::new(q).unwrap();
        for i in 0..p.degree() {
            let inv = m.inv(a.coefficients()[[l, i]]).expect("a invertible");
            quotient[[l, i]] = m.mul(c1[[l, i]], inv);
        }
    }
    let mut w = Poly::try_convert_from(quotient, &ctx, false, Representation::Ntt).unwrap();
    w.change_representation(Representation::PowerBasis);
    let q0 = par.moduli()[0];
    w.coefficients()
        .row(0)
        .iter()
        .map(|&v| {
            if v > q0 / 2 {
                v as i64 - q0 as i64
            } else {
                v as i64
            }
        })
        .collect()
}

#[test]
fn without_rerandomisation_a_block_reply_gives_the_weights_away() {
    let p = HeParams::for_ring(37).unwrap();
    let client = ClientKey::generate(&p);
    let server = ServerKey::from_bytes(&p, &client.public_key_bytes()).unwrap();
    let d = random_dense(3, 20, 1 << 20, 3);
    let shape = BlockShape {
        input_len: 20,
        output_len: 3,
        count: 1,
        width: 1,
        in_block: 20,
        out_block: 3,
    };
    let masks = [(0..20u64).map(|v| v * 977 + 5).collect::<Vec<u64>>()];
    let views: Vec<&[u64]> = masks.iter().map(|m| &m[..]).collect();
    let cts = client.encrypt_blocks(&shape, &views, 0..1).unwrap();
    assert_eq!(cts.len(), 1);
    // at full level (no switch down), so that the attack needs no rounding
    let run = |privacy| {
        let mut replies = Vec::new();
        crate::blocks::evaluate_packed_with(
            &server,
            &d,
            &Packing::Blocks(shape),
            cts.clone(),
            privacy,
            false,
            &mut |parts| {
                replies.extend(parts);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(replies.len(), 1);
        recover_weight_poly(&p, &cts[0], &replies[0].ciphertext)
    };
    let positions = shape.weight_positions(0, 0);
    let naive = run(Privacy::NoneInsecure);
    for &(coefficient, o, j) in &positions {
        assert_eq!(
            naive[coefficient], d.w[o][j],
            "W[{o}][{j}] read off the naive reply"
        );
    }
    // The real server's reply at the same point: nothing like the weights.
    let real = run(Privacy::Full);
    let matches = positions
        .iter()
        .filter(|&&(c, o, j)| real[c] == d.w[o][j])
        .count();
    assert_eq!(
        matches, 0,
        "a re-randomised reply matched {matches} weights"
    );
    assert!(
        positions
            .iter()
            .all(|&(c, _, _)| real[c].unsigned_abs() > 1 << 30),
        "the re-randomised quotient looks small at a weight position"
    );
}
