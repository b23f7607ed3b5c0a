//! Joint nonlinear layers on secret shares: the part of model-private
//! inference that runs between two linear layers.
//!
//! Values are additive shares over `Z_2^k` (`x = x_C + x_S`), bits XOR
//! shares. Every protocol here is a function of one [`Party`] (its shares,
//! its correlations from `secinfer-ot`, its mailbox), vectorised over whole
//! tensors so that rounds never grow with the batch, and written as an
//! `async fn` that a [`Machine`] drives without IO ([`io`]). The
//! constructions and their formulas are in `docs/private-mode.md`.
//!
//! Position in the data flow: ring, ot < **mpc** < protocol (which runs the
//! converted model's program step by step, these protocols for its
//! nonlinear steps and HE material for its linear ones).
//!
//! The protocols (both parties call the same function with their own
//! shares; a flight is one message each way at the same time, or one way
//! where noted; `ℓ` is a comparison width, `g` a group size):
//!
//! | protocol | output | flights |
//! |---|---|---|
//! | [`and`], [`cross_and`] | XOR shares | 1 |
//! | [`carry`] on `n` bits | XOR shares of `[α + β ≥ 2^n]` | `1 + ⌈log2 n⌉` |
//! | [`drelu`] on `ℓ` bits | XOR shares of `[v ≥ 0]` | `1 + ⌈log2(ℓ − 1)⌉` |
//! | [`mul_bit`] | shares of `b·y` | 2 |
//! | [`b2a`], [`truncate`] | shares of `b`, of `v/2^s` | 2 (one way each) |
//! | [`relu`] | shares of `max(v, 0)` | DReLU + 2 |
//! | [`max_groups`], [`argmax_groups`] | shares per group | `⌈log2 g⌉ ·` (DReLU on `ℓ + 1` + 2) |
//! | [`piecewise`] ([`Spline`]: Sigmoid, Tanh, LeakyRelu, Clip) | shares of `f(v)` | DReLU on `ℓ + 1` + 2 + 2, for any number of breakpoints |
//! | [`reveal_to_client`] | the values, to the client | 1 (server to client) |
//!
//! [`cost`] gives each protocol's exact correlations and traffic; each
//! protocol checks the store against it before its first message. A
//! protocol on zero elements sends nothing and takes nothing. Malformed
//! messages (wrong length, unreduced ring elements, set padding bits) are
//! errors naming the step and protocol.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod boolean;
mod compare;
pub mod cost;
pub mod io;
mod nonlinear;
mod piecewise;
mod planes;
mod select;
#[cfg(test)]
mod testing;
mod truncate;
pub mod wire;

pub use boolean::{and, cross_and};
pub use compare::{carry, drelu};
pub use cost::Cost;
pub use io::{Io, Machine, Message, Party, PartyStats, run_pair};
pub use nonlinear::{argmax_groups, max_groups, relu};
pub use piecewise::{Approximation, Spline, piecewise};
pub use secinfer_ot::{Bits, Demand, Role};
pub use select::{b2a, mul_bit};
pub use truncate::{Sign, reveal_to_client, truncate};

/// Everything that can go wrong in a joint protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MpcError {
    /// Correlations are missing or would be reused.
    #[error(transparent)]
    Correlation(#[from] secinfer_ot::OtError),
    /// A peer message is for another step, out of order or of the wrong size.
    #[error("step {step}, message {seq}: {problem}")]
    Message {
        /// the step
        step: u32,
        /// the message's number within the step
        seq: u32,
        /// what is wrong
        problem: String,
    },
    /// A payload does not decode.
    #[error("{0}")]
    Payload(String),
    /// Inputs of a protocol disagree with each other (a caller bug or a
    /// converted model that contradicts itself).
    #[error("{0}")]
    Shape(String),
    /// A party could not be set up or driven.
    #[error("{0}")]
    Setup(String),
    /// A function cannot be approximated as asked (a target error the
    /// fixed-point scale cannot meet, or parameters out of range).
    #[error("{0}")]
    Approximation(String),
}

#[cfg(test)]
mod tests {
    //! Properties every protocol shares: exact cost, single use of
    //! correlations, and errors (never panics) on malformed messages.
    use super::*;
    use crate::testing::*;
    use secinfer_ring::Ring;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Protocol {
        And,
        CrossAnd,
        Carry,
        Drelu,
        MulBit,
        B2a,
        Relu,
        Max,
        Argmax,
        TruncateNonNegative,
        TruncateSigned,
        Reveal,
        Piecewise,
    }

    const ALL: [Protocol; 13] = [
        Protocol::And,
        Protocol::CrossAnd,
        Protocol::Carry,
        Protocol::Drelu,
        Protocol::MulBit,
        Protocol::B2a,
        Protocol::Relu,
        Protocol::Max,
        Protocol::Argmax,
        Protocol::TruncateNonNegative,
        Protocol::TruncateSigned,
        Protocol::Reveal,
        Protocol::Piecewise,
    ];

    /// A change to a message in transit.
    type Mutation = dyn Fn(&mut Vec<u8>);

    const BITS: u32 = 20;
    const GROUP: usize = 3;
    const SHIFT: u32 = 12;

    fn cost_of(protocol: Protocol, ring: Ring, n: usize) -> Cost {
        match protocol {
            Protocol::And => cost::and(n),
            Protocol::CrossAnd => cost::cross_and(n),
            Protocol::Carry => cost::carry(n, BITS),
            Protocol::Drelu => cost::drelu(n, BITS),
            Protocol::MulBit => cost::mul_bit(ring, n),
            Protocol::B2a => cost::b2a(ring, n),
            Protocol::Relu => cost::relu(ring, n, BITS),
            Protocol::Max => cost::max_groups(ring, n, GROUP, BITS),
            Protocol::Argmax => cost::argmax_groups(ring, n, GROUP, BITS),
            Protocol::TruncateNonNegative | Protocol::TruncateSigned => {
                cost::truncate(ring, n, SHIFT)
            }
            Protocol::Reveal => cost::reveal_to_client(ring, n),
            Protocol::Piecewise => cost::piecewise(ring, n, &spline(), BITS),
        }
    }

    /// A spline with breakpoints among the test inputs, a truncation, and
    /// one breakpoint outside the `BITS` range.
    fn spline() -> Spline {
        Spline::new(
            vec![-5, 100, 600, 1 << BITS],
            vec![3, -1, 0, 2, 5],
            vec![7, 0, -9, 4, 1],
            SHIFT,
        )
        .expect("a valid spline")
    }

    /// Runs `protocol` on `n` small values (both parties alike); the
    /// output as ring elements or bits, for comparing runs.
    async fn run(p: &mut Party, protocol: Protocol, n: usize) -> Result<Vec<u64>, MpcError> {
        let x: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % 1000).collect();
        let b = Bits::from_bools((0..n).map(|i| i.is_multiple_of(3)));
        let bits = |b: Bits| b.words().to_vec();
        Ok(match protocol {
            Protocol::And => bits(and(p, &b, &b).await?),
            Protocol::CrossAnd => bits(cross_and(p, &b).await?),
            Protocol::Carry => bits(carry(p, &x, BITS).await?),
            Protocol::Drelu => bits(drelu(p, &x, BITS).await?),
            Protocol::MulBit => mul_bit(p, &b, &x).await?,
            Protocol::B2a => b2a(p, &b).await?,
            Protocol::Relu => relu(p, &x, BITS).await?,
            Protocol::Max => max_groups(p, &x, GROUP, BITS).await?,
            Protocol::Argmax => argmax_groups(p, &x, GROUP, BITS).await?,
            Protocol::TruncateNonNegative => truncate(p, &x, SHIFT, Sign::NonNegative).await?,
            Protocol::TruncateSigned => truncate(p, &x, SHIFT, Sign::Signed).await?,
            Protocol::Reveal => reveal_to_client(p, &x).await?.unwrap_or_default(),
            Protocol::Piecewise => piecewise(p, &x, &spline(), BITS).await?,
        })
    }

    #[test]
    fn every_protocol_sends_and_consumes_exactly_its_cost() {
        for k in [8, 37, 62] {
            let r = ring(k);
            for protocol in ALL {
                // comparisons and truncations on BITS + 1 bits need a wider ring
                let narrow = !matches!(
                    protocol,
                    Protocol::And
                        | Protocol::CrossAnd
                        | Protocol::MulBit
                        | Protocol::B2a
                        | Protocol::Reveal
                );
                if narrow && BITS + 1 > k {
                    continue;
                }
                for n in [0, 3, 63, 66, 960] {
                    let c = cost_of(protocol, r, n);
                    let out = duo!(r, c.demand, |p| run(p, protocol, n).await, |p| run(
                        p, protocol, n
                    )
                    .await);
                    assert!(
                        out.client.is_ok() && out.server.is_ok(),
                        "{protocol:?}, n = {n}"
                    );
                    out.check_cost(&c);
                }
            }
        }
    }

    /// `demand` with one fewer of its `i`-th kind, if it has any.
    fn one_short(demand: Demand, i: usize) -> Option<Demand> {
        let mut d = demand;
        let field = match i {
            0 => &mut d.triples,
            1 => &mut d.bit_ots_client_sends,
            2 => &mut d.bit_ots_server_sends,
            3 => &mut d.word_ots_client_sends,
            _ => &mut d.word_ots_server_sends,
        };
        *field = field.checked_sub(1)?;
        Some(d)
    }

    #[test]
    fn a_short_store_fails_before_the_first_message_naming_the_kind() {
        let r = ring(37);
        // (client's view, server's view) of each kind
        let kinds = [
            ("bit triple", "bit triple"),
            ("bit OT (sent)", "bit OT (received)"),
            ("bit OT (received)", "bit OT (sent)"),
            ("word OT (sent)", "word OT (received)"),
            ("word OT (received)", "word OT (sent)"),
        ];
        for protocol in ALL {
            let n = 66;
            let demand = cost_of(protocol, r, n).demand;
            for (i, (client_kind, server_kind)) in kinds.iter().enumerate() {
                let Some(short) = one_short(demand, i) else {
                    continue;
                };
                let mut sent = [0u64; 2];
                let (a, b) = duo_tampered!(
                    r,
                    short,
                    &mut |to_server: bool, _, _: &mut Vec<u8>| sent[to_server as usize] += 1,
                    |p| run(p, protocol, n).await,
                    |p| run(p, protocol, n).await
                );
                for (result, kind) in [(a, client_kind), (b, server_kind)] {
                    let e = result.expect("a short store ends the run").unwrap_err();
                    assert!(
                        matches!(e, MpcError::Correlation(_)) && e.to_string().contains(kind),
                        "{protocol:?}: {e}"
                    );
                }
                assert_eq!(sent, [0, 0], "{protocol:?}: nothing is sent");
            }
        }
    }

    #[test]
    fn a_store_hands_each_correlation_out_once() {
        let r = ring(37);
        let n = 66;
        for protocol in ALL {
            let c = cost_of(protocol, r, n);
            // enough for one run: a second run on the same store fails
            let out = duo!(
                r,
                c.demand,
                |p| {
                    let first = run(p, protocol, n).await;
                    (first, run(p, protocol, n).await)
                },
                |p| {
                    let first = run(p, protocol, n).await;
                    (first, run(p, protocol, n).await)
                }
            );
            for (first, second) in [out.client, out.server] {
                assert!(first.is_ok(), "{protocol:?}");
                if protocol != Protocol::Reveal {
                    assert!(
                        matches!(second, Err(MpcError::Correlation(_))),
                        "{protocol:?}: {second:?}"
                    );
                }
            }
            // enough for two: the second run takes the next correlations
            let twice = c.demand.times(2).expect("small");
            let out = duo!(
                r,
                twice,
                |p| {
                    let first = run(p, protocol, n).await;
                    let position = p.correlations().position();
                    (first, position, run(p, protocol, n).await)
                },
                |p| {
                    let first = run(p, protocol, n).await;
                    (first, run(p, protocol, n).await)
                }
            );
            out.check_cost(&c.plus(c));
            let (first, position, second) = out.client;
            assert_eq!(position.as_seen_by_peer().triples, c.demand.triples);
            assert!(first.is_ok() && second.is_ok(), "{protocol:?}");
        }
    }

    #[test]
    fn protocols_compute_their_functions_on_correlations_from_real_ot_engines() {
        // One run on material from two OtEngines (base OTs, IKNP, the
        // hash), not the dealer: ReLU, a truncation of its output (as after
        // a linear layer), a signed truncation, an AND and an argmax, each
        // checked against its ideal function.
        let r = ring(37);
        let mut rng = rng(71);
        let (n, bits, shift, group) = (999usize, BITS, SHIFT, GROUP);
        let mut v = signed_edges(bits);
        v.extend(random_signed(&mut rng, bits, n - v.len()));
        let (xc, xs) = split_signed(&mut rng, r, &v);
        let (x, y) = (random_bits(&mut rng, n), random_bits(&mut rng, n));
        let (x_c, x_s) = split_bits(&mut rng, &x);
        let (y_c, y_s) = split_bits(&mut rng, &y);
        let cost = cost::relu(r, n, bits)
            .plus(cost::truncate(r, n, shift))
            .plus(cost::truncate(r, n, shift))
            .plus(cost::and(n))
            .plus(cost::argmax_groups(r, n, group, bits));
        async fn run(
            p: &mut Party,
            x: &[u64],
            a: &Bits,
            b: &Bits,
        ) -> Result<[Vec<u64>; 5], MpcError> {
            let relu_out = relu(p, x, BITS).await?;
            let scaled = truncate(p, &relu_out, SHIFT, Sign::NonNegative).await?;
            let signed = truncate(p, x, SHIFT, Sign::Signed).await?;
            let anded = and(p, a, b).await?.words().to_vec();
            let index = argmax_groups(p, x, GROUP, BITS).await?;
            Ok([relu_out, scaled, signed, anded, index])
        }
        let out = duo_on!(
            Duo::from_engines(r, &cost.demand),
            |p| run(p, &xc, &x_c, &y_c).await,
            |p| run(p, &xs, &x_s, &y_s).await
        );
        out.check_cost(&cost);
        let [relu_c, scaled_c, signed_c, and_c, index_c] = out.client.unwrap();
        let [relu_s, scaled_s, signed_s, and_s, index_s] = out.server.unwrap();
        let relu_out = open_signed(r, &relu_c, &relu_s);
        assert_eq!(relu_out, v.iter().map(|&v| v.max(0)).collect::<Vec<_>>());
        // within one unit: ⌈v/2^s⌉ − 1 ≤ r ≤ ⌈v/2^s⌉
        let within = |got: &[i64], of: &[i64], what: &str| {
            for (&g, &v) in got.iter().zip(of) {
                let ceil = v.div_euclid(1 << shift) + i64::from(v.rem_euclid(1 << shift) != 0);
                assert!(
                    g == ceil || g == ceil - 1,
                    "{what}: {v} / 2^{shift} gave {g}"
                );
            }
        };
        within(
            &open_signed(r, &scaled_c, &scaled_s),
            &relu_out,
            "ReLU, truncated",
        );
        within(
            &open_signed(r, &signed_c, &signed_s),
            &v,
            "signed truncation",
        );
        let and_c = Bits::from_words(and_c, n).expect("n bits");
        let and_s = Bits::from_words(and_s, n).expect("n bits");
        assert_eq!(open_bits(&and_c, &and_s), x.and(&y));
        let index = open_signed(r, &index_c, &index_s);
        for (g, chunk) in index.iter().zip(v.chunks(group)) {
            let max = chunk.iter().max().copied().unwrap_or(0);
            let first = chunk.iter().position(|&x| x == max).unwrap_or(0);
            assert_eq!(*g, first as i64, "argmax of {chunk:?}");
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let r = ring(37);
        let n = 66;
        for protocol in ALL {
            let c = cost_of(protocol, r, n);
            for (to_server, count) in [(true, c.client_messages), (false, c.server_messages)] {
                for target in 0..count as usize {
                    let mutations: [&Mutation; 4] = [
                        &|m| {
                            m.pop();
                        },
                        &|m| m.push(0),
                        &|m| m.clear(),
                        &|m| m.fill(0xFF),
                    ];
                    for (which, mutate) in mutations.iter().enumerate() {
                        let mut tamper = |dir: bool, i: usize, m: &mut Vec<u8>| {
                            if dir == to_server && i == target {
                                mutate(m);
                            }
                        };
                        let (a, b) = duo_tampered!(
                            r,
                            c.demand,
                            &mut tamper,
                            |p| run(p, protocol, n).await,
                            |p| run(p, protocol, n).await
                        );
                        let receiver = if to_server { b } else { a };
                        let what = format!(
                            "{protocol:?}, message {target} to server: {to_server}, mutation {which}"
                        );
                        match (which, receiver) {
                            // a wrong length is always refused by name
                            (0..=2, Some(Err(MpcError::Message { problem, .. }))) => {
                                assert!(problem.contains("expected"), "{what}: {problem}");
                            }
                            (0..=2, other) => panic!("{what}: {other:?}"),
                            // right length, wrong content: an error, or a
                            // wrong answer where every pattern is valid
                            (_, Some(Err(MpcError::Payload(_)))) | (_, Some(Ok(_))) => {}
                            (_, other) => panic!("{what}: {other:?}"),
                        }
                    }
                }
            }
        }
    }
}
