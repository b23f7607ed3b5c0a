//! Test support: two parties on dealt correlations, driven against each
//! other in one thread with every message recorded (and optionally
//! tampered with), reconstruction of shares, and the statistical checks.
//!
//! The statistical checks are χ² tests with a threshold at `z = 8` of the
//! Wilson–Hilferty normal approximation (a false failure has probability
//! below `10^-14`), which a constant or visibly biased share or message
//! exceeds by orders of magnitude at the sample sizes used.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use rand::{RngExt, SeedableRng};
use secinfer_ot::{Bits, CorrelationStore, Demand, OtEngine, Role, insecure_test_dealer};
use secinfer_ring::Ring;

use crate::cost::Cost;
use crate::wire::Reader;
use crate::{Io, Party, PartyStats};

pub(crate) type Rng = rand::rngs::ChaCha20Rng;

/// Element counts every protocol is tried on.
pub(crate) const SIZES: [usize; 6] = [0, 1, 63, 64, 65, 1000];

pub(crate) fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

pub(crate) fn ring(k: u32) -> Ring {
    Ring::new(k).expect("test ring width")
}

pub(crate) fn random_bits(rng: &mut Rng, n: usize) -> Bits {
    Bits::from_bools((0..n).map(|_| rng.random::<bool>()))
}

/// Random XOR shares of `b`.
pub(crate) fn split_bits(rng: &mut Rng, b: &Bits) -> (Bits, Bits) {
    let mask = random_bits(rng, b.len());
    (b.xor(&mask), mask)
}

pub(crate) fn open_bits(a: &Bits, b: &Bits) -> Bits {
    a.xor(b)
}

/// `0, ±1, ±(2^(bits−1) − 1), −2^(bits−1)`.
pub(crate) fn signed_edges(bits: u32) -> Vec<i64> {
    let top = (1i64 << (bits - 1)) - 1;
    let mut v = vec![0, 1, -1, top, -top, -top - 1];
    v.dedup();
    v
}

/// Uniform values in the signed `bits` range.
pub(crate) fn random_signed(rng: &mut Rng, bits: u32, n: usize) -> Vec<i64> {
    let half = 1i64 << (bits - 1);
    (0..n).map(|_| rng.random_range(-half..half)).collect()
}

/// Random additive shares of `v`.
pub(crate) fn split_signed(rng: &mut Rng, ring: Ring, v: &[i64]) -> (Vec<u64>, Vec<u64>) {
    let s: Vec<u64> = v.iter().map(|_| ring.reduce(rng.random())).collect();
    let c = v
        .iter()
        .zip(&s)
        .map(|(&v, &s)| ring.reduce(ring.from_signed(v).wrapping_sub(s)))
        .collect();
    (c, s)
}

pub(crate) fn open_signed(ring: Ring, a: &[u64], b: &[u64]) -> Vec<i64> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            assert_eq!(*a, ring.reduce(*a), "unreduced share");
            assert_eq!(*b, ring.reduce(*b), "unreduced share");
            ring.to_signed(a.wrapping_add(*b))
        })
        .collect()
}

static SEED: AtomicU64 = AtomicU64::new(1);

/// A client and a server holding dealt correlations for `demand`.
pub(crate) struct Duo {
    pub(crate) client: Party,
    pub(crate) server: Party,
    pub(crate) client_io: Io,
    pub(crate) server_io: Io,
}

impl Duo {
    pub(crate) fn new(ring: Ring, demand: &Demand) -> Duo {
        let mut rng = rng(SEED.fetch_add(1, Ordering::Relaxed));
        let (c, s) = insecure_test_dealer::stores(&mut rng, demand);
        Duo::with_stores(ring, c, s)
    }

    /// A client and a server holding `demand` made by two real OT engines
    /// (base OTs, then IKNP extension and refinement in two batches, so
    /// that runs straddle a batch boundary), as a session makes them.
    pub(crate) fn from_engines(ring: Ring, demand: &Demand) -> Duo {
        let mut client = OtEngine::new(Role::Client, u64::MAX).expect("client engine");
        let mut server = OtEngine::new(Role::Server, u64::MAX).expect("server engine");
        let mut next = Some(client.start_setup().expect("setup flight 0"));
        let mut to_server = true;
        while let Some(m) = next.take() {
            next = if to_server {
                server.handle(m).expect("server setup")
            } else {
                client.handle(m).expect("client setup")
            };
            to_server = !to_server;
        }
        assert!(client.is_ready() && server.is_ready());
        let half = Demand {
            triples: demand.triples / 2,
            bit_ots_client_sends: demand.bit_ots_client_sends / 2,
            bit_ots_server_sends: demand.bit_ots_server_sends / 2,
            word_ots_client_sends: demand.word_ots_client_sends / 2,
            word_ots_server_sends: demand.word_ots_server_sends / 2,
        };
        let rest = Demand {
            triples: demand.triples - half.triples,
            bit_ots_client_sends: demand.bit_ots_client_sends - half.bit_ots_client_sends,
            bit_ots_server_sends: demand.bit_ots_server_sends - half.bit_ots_server_sends,
            word_ots_client_sends: demand.word_ots_client_sends - half.word_ots_client_sends,
            word_ots_server_sends: demand.word_ots_server_sends - half.word_ots_server_sends,
        };
        for batch in [half, rest] {
            let request = client.request(batch).expect("request");
            let answer = server.handle(request).expect("server batch");
            let answer = answer.expect("the server answers a batch");
            assert_eq!(client.handle(answer).expect("client batch"), None);
        }
        let (at_c, at_s) = (client.position(), server.position());
        let c = client.take_at(at_s, demand).expect("client's run");
        let s = server.take_at(at_c, demand).expect("server's run");
        Duo::with_stores(ring, c, s)
    }

    fn with_stores(ring: Ring, c: CorrelationStore, s: CorrelationStore) -> Duo {
        let (client_io, server_io) = (Io::default(), Io::default());
        Duo {
            client: Party::new(Role::Client, ring, c, client_io.clone()).expect("client"),
            server: Party::new(Role::Server, ring, s, server_io.clone()).expect("server"),
            client_io,
            server_io,
        }
    }
}

/// What two parties' run produced.
pub(crate) struct Outcome<A, B> {
    pub(crate) client: A,
    pub(crate) server: B,
    pub(crate) client_stats: PartyStats,
    pub(crate) server_stats: PartyStats,
    pub(crate) client_left: Demand,
    pub(crate) server_left: Demand,
    /// payloads the client received, in order
    pub(crate) to_client: Vec<Vec<u8>>,
    /// payloads the server received, in order
    pub(crate) to_server: Vec<Vec<u8>>,
}

/// Messages in transit: `(to_server, index in that direction, payload)`.
pub(crate) type Tamper<'a> = &'a mut dyn FnMut(bool, usize, &mut Vec<u8>);

/// What [`drive`] returns: both results if they ended, and the payloads
/// received by the client and by the server.
pub(crate) type Driven<A, B> = (Option<A>, Option<B>, Vec<Vec<u8>>, Vec<Vec<u8>>);

/// Polls both protocol futures, moving messages between the mailboxes,
/// until both end or neither can move.
pub(crate) fn drive<A, B>(
    client_io: &Io,
    server_io: &Io,
    client: impl Future<Output = A>,
    server: impl Future<Output = B>,
    mut tamper: Option<Tamper<'_>>,
) -> Driven<A, B> {
    let mut client = pin!(client);
    let mut server = pin!(server);
    let mut cx = Context::from_waker(Waker::noop());
    let (mut a, mut b) = (None, None);
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    loop {
        let waiting = (client_io.incoming(), server_io.incoming());
        let mut moved = false;
        if a.is_none()
            && let Poll::Ready(v) = client.as_mut().poll(&mut cx)
        {
            a = Some(v);
            moved = true;
        }
        if b.is_none()
            && let Poll::Ready(v) = server.as_mut().poll(&mut cx)
        {
            b = Some(v);
            moved = true;
        }
        moved |= waiting != (client_io.incoming(), server_io.incoming());
        while let Some(mut m) = client_io.take_outgoing() {
            if let Some(t) = tamper.as_mut() {
                t(true, to_server.len(), &mut m.payload);
            }
            to_server.push(m.payload.clone());
            server_io.deliver(m);
            moved = true;
        }
        while let Some(mut m) = server_io.take_outgoing() {
            if let Some(t) = tamper.as_mut() {
                t(false, to_client.len(), &mut m.payload);
            }
            to_client.push(m.payload.clone());
            client_io.deliver(m);
            moved = true;
        }
        if (a.is_some() && b.is_some()) || !moved {
            return (a, b, to_client, to_server);
        }
    }
}

impl Duo {
    /// Collects a finished run; panics if either party is stuck.
    pub(crate) fn outcome<A, B>(mut self, driven: Driven<A, B>) -> Outcome<A, B> {
        let (a, b, to_client, to_server) = driven;
        let (Some(client), Some(server)) = (a, b) else {
            panic!("a party is waiting for a message that never comes");
        };
        Outcome {
            client,
            server,
            client_stats: self.client.stats(),
            server_stats: self.server.stats(),
            client_left: self.client.correlations().available(),
            server_left: self.server.correlations().available(),
            to_client,
            to_server,
        }
    }
}

/// Runs `$client` with `&mut Party` bound to `$pc` against `$server`, on
/// correlations dealt for `$demand`; gives an [`Outcome`].
macro_rules! duo {
    ($ring:expr, $demand:expr, |$pc:ident| $client:expr, |$ps:ident| $server:expr) => {
        $crate::testing::duo_on!(
            $crate::testing::Duo::new($ring, &$demand),
            |$pc| $client,
            |$ps| $server
        )
    };
}
pub(crate) use duo;

/// As [`duo`], on the parties of a given [`Duo`].
macro_rules! duo_on {
    ($duo:expr, |$pc:ident| $client:expr, |$ps:ident| $server:expr) => {{
        let mut duo: $crate::testing::Duo = $duo;
        let driven = {
            let $crate::testing::Duo {
                client,
                server,
                client_io,
                server_io,
            } = &mut duo;
            let c = async {
                let $pc: &mut $crate::Party = client;
                // bodies may be blocks, which read better in a closure
                #[allow(unused_braces)]
                let out = $client;
                out
            };
            let s = async {
                let $ps: &mut $crate::Party = server;
                // bodies may be blocks, which read better in a closure
                #[allow(unused_braces)]
                let out = $server;
                out
            };
            $crate::testing::drive(client_io, server_io, c, s, None)
        };
        duo.outcome(driven)
    }};
}
pub(crate) use duo_on;

/// As [`duo`], with messages tampered with in transit; gives what each
/// party returned (`None`: stuck).
macro_rules! duo_tampered {
    ($ring:expr, $demand:expr, $tamper:expr, |$pc:ident| $client:expr, |$ps:ident| $server:expr) => {{
        let mut duo = $crate::testing::Duo::new($ring, &$demand);
        let $crate::testing::Duo {
            client,
            server,
            client_io,
            server_io,
        } = &mut duo;
        let c = async {
            let $pc: &mut $crate::Party = client;
            #[allow(unused_braces)]
            let out = $client;
            out
        };
        let s = async {
            let $ps: &mut $crate::Party = server;
            #[allow(unused_braces)]
            let out = $server;
            out
        };
        let (a, b, _, _) = $crate::testing::drive(client_io, server_io, c, s, Some($tamper));
        (a, b)
    }};
}
pub(crate) use duo_tampered;

impl<A, B> Outcome<A, B> {
    /// The run sent exactly what `cost` says and used up exactly its demand.
    pub(crate) fn check_cost(&self, cost: &Cost) {
        let sent = |s: &PartyStats| (s.messages_sent, s.bytes_sent);
        assert_eq!(
            sent(&self.client_stats),
            (cost.client_messages, cost.client_bytes),
            "client traffic"
        );
        assert_eq!(
            sent(&self.server_stats),
            (cost.server_messages, cost.server_bytes),
            "server traffic"
        );
        assert!(
            self.client_left.is_zero(),
            "client left {:?}",
            self.client_left
        );
        assert!(
            self.server_left.is_zero(),
            "server left {:?}",
            self.server_left
        );
    }

    /// Every message either party received looks uniform.
    pub(crate) fn assert_uniform_messages(&self, what: &str) {
        assert!(!self.to_client.is_empty() || !self.to_server.is_empty());
        for (dir, msgs) in [
            ("to client", &self.to_client),
            ("to server", &self.to_server),
        ] {
            for (i, m) in msgs.iter().enumerate() {
                assert_uniform_bytes(m, &format!("{what}: message {i} {dir}"));
            }
        }
    }
}

/// The χ² value above which `df` degrees of freedom are rejected.
fn chi2_limit(df: usize) -> f64 {
    let (df, z) = (df as f64, 8.0);
    let t = 2.0 / (9.0 * df);
    df * (1.0 - t + z * t.sqrt()).powi(3)
}

/// χ² of `samples` against uniform over `buckets`.
fn chi2(samples: impl Iterator<Item = usize>, buckets: usize) -> (f64, usize) {
    let mut counts = vec![0u64; buckets];
    let mut n = 0;
    for s in samples {
        counts[s] += 1;
        n += 1;
    }
    let expected = n as f64 / buckets as f64;
    let x = counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum();
    (x, n)
}

pub(crate) fn check_chi2(samples: impl Iterator<Item = usize>, buckets: usize, what: &str) {
    let (x, n) = chi2(samples, buckets);
    assert!(
        n >= 5 * buckets,
        "{what}: too few samples ({n}) for a χ² test"
    );
    let limit = chi2_limit(buckets - 1);
    assert!(
        x < limit,
        "{what}: χ² = {x:.1} over {buckets} buckets exceeds {limit:.1} ({n} samples)"
    );
}

/// Bytes uniform: nibbles (and whole bytes when there are enough), and the
/// balance of the bits.
pub(crate) fn assert_uniform_bytes(bytes: &[u8], what: &str) {
    check_chi2(
        bytes
            .iter()
            .flat_map(|b| [(b & 15) as usize, (b >> 4) as usize]),
        16,
        &format!("{what} (nibbles)"),
    );
    if bytes.len() >= 10 * 256 {
        check_chi2(
            bytes.iter().map(|&b| b as usize),
            256,
            &format!("{what} (bytes)"),
        );
    }
    let ones: u64 = bytes.iter().map(|b| b.count_ones() as u64).sum();
    let n = 8.0 * bytes.len() as f64;
    assert!(
        (ones as f64 - n / 2.0).abs() < 8.0 * n.sqrt() / 2.0,
        "{what}: {ones} one bits of {n}"
    );
}

/// A bit vector's bits are balanced and its nibbles uniform.
pub(crate) fn assert_uniform_bits(b: &Bits, what: &str) {
    assert_eq!(b.len() % 8, 0, "test sizes are whole bytes");
    assert_uniform_bytes(&b.to_bytes(), what);
}

/// Ring elements uniform: their top and bottom 8 bits, and each bit's balance.
pub(crate) fn assert_uniform_ring(ring: Ring, v: &[u64], what: &str) {
    let k = ring.bits();
    check_chi2(
        v.iter().map(|&x| (x >> (k - 8)) as usize),
        256,
        &format!("{what} (top byte)"),
    );
    check_chi2(
        v.iter().map(|&x| (x & 255) as usize),
        256,
        &format!("{what} (low byte)"),
    );
    let n = v.len() as f64;
    for bit in 0..k {
        let ones = v.iter().filter(|&&x| (x >> bit) & 1 == 1).count() as f64;
        assert!(
            (ones - n / 2.0).abs() < 8.0 * n.sqrt() / 2.0,
            "{what}: bit {bit} is one {ones} times of {n}"
        );
    }
}

/// Part of what a party sees: a received message (or one part of one that
/// has masks of its own, such as one bit plane) or its output share, as
/// bytes.
pub(crate) type Piece = (String, Vec<u8>);

/// Each payload cut into pieces of `size` bytes (the last may be shorter),
/// named by `who`, message and piece.
pub(crate) fn cut(payloads: &[Vec<u8>], size: usize, who: &str) -> Vec<Piece> {
    payloads
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            m.chunks(size)
                .enumerate()
                .map(move |(j, c)| (format!("{who}'s message {i} piece {j}"), c.to_vec()))
        })
        .collect()
}

/// The `k` bit planes of ring elements, as pieces of `v.len()` bits each
/// (plane `t`: bit `t` of every element), so that bits of ring elements
/// line up element by element with bit messages and with each other.
pub(crate) fn bit_planes(ring: Ring, v: &[u64], name: &str) -> Vec<Piece> {
    (0..ring.bits())
        .map(|t| {
            let plane = Bits::from_bools(v.iter().map(|&x| (x >> t) & 1 == 1));
            (format!("{name} bit {t}"), plane.to_bytes())
        })
        .collect()
}

/// A payload of `n` ring elements, decoded.
pub(crate) fn ring_values(ring: Ring, payload: &[u8], n: usize) -> Vec<u64> {
    let mut r = Reader::new(payload, "test");
    let v = r.ring(ring, n).expect("ring elements");
    r.finish().expect("exactly n elements");
    v
}

/// No XOR mask serves twice in one party's view: the XOR of every two
/// pieces (over the shorter one's length) looks uniform. A mask used for
/// two messages, or for a message and the output share, cancels in their
/// XOR even when each looks uniform alone. Pieces should be bit vectors of
/// one bit per element (messages cut into planes, ring values through
/// [`bit_planes`]), so that a relation between the same element's bits
/// shows.
pub(crate) fn assert_pairwise_xor_uniform(view: &[Piece], what: &str) {
    assert!(view.len() >= 2, "{what}: nothing to pair");
    for (i, (name_a, a)) in view.iter().enumerate() {
        for (name_b, b) in &view[i + 1..] {
            let xor: Vec<u8> = a.iter().zip(b).map(|(a, b)| a ^ b).collect();
            assert_uniform_bytes(&xor, &format!("{what}: {name_a} ⊕ {name_b}"));
        }
    }
}

/// The same for additive masks: the difference and the sum of every two
/// vectors of ring elements (over the shorter one's length) look uniform.
pub(crate) fn assert_pairwise_ring_uniform(ring: Ring, view: &[(String, Vec<u64>)], what: &str) {
    assert!(view.len() >= 2, "{what}: nothing to pair");
    let mask = ring.mask();
    for (i, (name_a, a)) in view.iter().enumerate() {
        for (name_b, b) in &view[i + 1..] {
            let diff: Vec<u64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| a.wrapping_sub(*b) & mask)
                .collect();
            assert_uniform_ring(ring, &diff, &format!("{what}: {name_a} − {name_b}"));
            let sum: Vec<u64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| a.wrapping_add(*b) & mask)
                .collect();
            assert_uniform_ring(ring, &sum, &format!("{what}: {name_a} + {name_b}"));
        }
    }
}

#[test]
fn the_statistical_checks_reject_constant_and_biased_data() {
    let r = ring(40);
    let caught = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    let mut rng = rng(99);
    let uniform: Vec<u64> = (0..8192).map(|_| r.reduce(rng.random())).collect();
    assert!(!caught(&|| assert_uniform_ring(r, &uniform, "uniform")));
    assert!(caught(&|| assert_uniform_ring(
        r,
        &vec![5; 8192],
        "constant"
    )));
    // one bit stuck at zero
    let biased: Vec<u64> = uniform.iter().map(|x| x & !(1 << 20)).collect();
    assert!(caught(&|| assert_uniform_ring(r, &biased, "biased")));
    let bytes: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    assert!(!caught(&|| assert_uniform_bytes(&bytes, "uniform")));
    // a quarter of the bits in one direction
    let skewed: Vec<u8> = bytes.iter().map(|b| b | 0x11).collect();
    assert!(caught(&|| assert_uniform_bytes(&skewed, "skewed")));
    let bits = random_bits(&mut rng, 8192);
    assert!(!caught(&|| assert_uniform_bits(&bits, "uniform")));
    assert!(caught(&|| assert_uniform_bits(&Bits::ones(8192), "ones")));

    // one mask on two messages: each uniform, their XOR or difference not
    let mask: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let other: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let piece = |name: &str, m: &[u8], x: u8| (name.to_string(), m.iter().map(|b| b ^ x).collect());
    let fresh = [piece("a", &mask, 0), piece("b", &other, 0)];
    assert!(!caught(&|| assert_pairwise_xor_uniform(&fresh, "fresh")));
    let reused = [
        piece("a", &mask, 0x5a),
        piece("b", &other, 0),
        piece("c", &mask, 0),
    ];
    assert!(caught(&|| assert_pairwise_xor_uniform(&reused, "reused")));
    let m: Vec<u64> = (0..8192).map(|_| r.reduce(rng.random())).collect();
    let y = 12345u64;
    let masked = |sign: bool| -> Vec<u64> {
        m.iter()
            .map(|&m| if sign { y.wrapping_add(m) } else { y.wrapping_sub(m) } & r.mask())
            .collect()
    };
    let fresh = [
        ("u".to_string(), masked(true)),
        ("v".to_string(), uniform.clone()),
    ];
    assert!(!caught(&|| assert_pairwise_ring_uniform(
        r, &fresh, "fresh"
    )));
    // y + m and y + m differ by 0; y + m and y − m sum to 2y
    for twice in [masked(true), masked(false)] {
        let reused = [("u".to_string(), masked(true)), ("v".to_string(), twice)];
        assert!(caught(&|| assert_pairwise_ring_uniform(
            r, &reused, "reused"
        )));
    }
}
