//! Every decoder a client can reach, fuzzed with an allocation counter:
//! frames before and after authentication (the hello, online and offline
//! messages, correlations and private-batch messages), the HE public key
//! and the encrypted masks. Random bytes, valid messages mutated, and
//! hand-made worst cases (a variant tag followed by a long run of one byte)
//! must give an error or a message, never a panic, and decoding may
//! allocate at most what [`frame::client_decode_bound`] says (24 or 3
//! times the frame's length, by its kind), plus a small constant, at its
//! peak: the server reserves that bound from its memory budget.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use proptest::prelude::*;
use secinfer_protocol::private::PrivateMessage;
use secinfer_protocol::{
    MaskRequest, MaskedInput, OfflineHello, PreprocessingId, Preprocessor, ServerSession,
    WireTensor,
};
use secinfer_transport::frame::{self, ClientFrame, ServerFrame};

mod common;

/// Counts, per thread, the bytes allocated now and the peak since the last
/// reset (tests run on several threads; decoding runs on one).
struct Counting;

thread_local! {
    static NOW: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let _ = NOW.try_with(|now| {
                now.set(now.get() + layout.size() as isize);
                let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now.get())));
            });
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        let _ = NOW.try_with(|now| now.set(now.get() - layout.size() as isize));
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns its result and the peak of the bytes it allocated
/// (on this thread) beyond what was allocated before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = NOW.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// Allocation allowed on top of the factor: error messages and small
/// fixed buffers.
const SLACK: usize = 16 << 10;

/// Decodes `body` as a client frame (what the server does with every frame
/// it reads), checking the allocation bound; returns whether it decoded.
fn decode_checked(body: &[u8]) -> bool {
    let (result, peak) = peak_of(|| {
        std::panic::catch_unwind(|| frame::decode::<ClientFrame>(body).is_ok())
            .map_err(|_| "panicked")
    });
    let ok = result.unwrap_or_else(|e| panic!("decoding {} bytes {e}", body.len()));
    assert!(
        peak <= frame::client_decode_bound(body, body.len()) + SLACK,
        "decoding a frame of {} bytes allocated {peak} bytes (first bytes {:?})",
        body.len(),
        &body[..body.len().min(16)]
    );
    // what a client decodes from the server is held to the same bound
    let (_, peak) = peak_of(|| frame::decode::<ServerFrame>(body).is_ok());
    assert!(peak <= frame::DECODE_FACTOR * body.len() + SLACK);
    ok
}

fn body_of(f: &ClientFrame) -> Vec<u8> {
    frame::encode(f, usize::MAX).expect("encodes")[4..].to_vec()
}

/// Valid frames of every kind a client sends.
fn client_frames() -> impl Strategy<Value = ClientFrame> {
    // small values are one byte on the wire and eight decoded
    let words = prop::collection::vec(prop_oneof![any::<u64>(), 0..128u64], 0..64);
    let bytes = prop::collection::vec(any::<u8>(), 0..256);
    prop_oneof![
        (any::<u32>(), ".{0,40}", ".{0,12}", ".{0,40}").prop_map(|(version, d, r, t)| {
            ClientFrame::Hello {
                version,
                model_digest: d,
                reveal: r,
                token: t,
            }
        }),
        (any::<u32>(), words.clone(), words.clone()).prop_map(|(op, ids, data)| {
            ClientFrame::Online(MaskedInput {
                op,
                ids: ids.into_iter().map(PreprocessingId).collect(),
                masked: WireTensor {
                    shape: vec![1, data.len() as u64],
                    data,
                },
            })
        }),
        (any::<u32>(), bytes.clone()).prop_map(|(degree, public_key)| {
            ClientFrame::OfflineHello(OfflineHello {
                degree,
                ring_bits: 37,
                public_key,
            })
        }),
        (
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(bytes.clone(), 0..4)
        )
            .prop_map(
                |(first, count, ciphertexts)| ClientFrame::Offline(MaskRequest {
                    first_id: PreprocessingId(first),
                    count,
                    op: 0,
                    offset: 0,
                    layout: first,
                    ciphertexts,
                })
            ),
        (any::<u32>(), any::<u32>(), bytes).prop_map(|(step, seq, payload)| {
            ClientFrame::Private(PrivateMessage::Step(secinfer_mpc::Message {
                step,
                seq,
                payload,
            }))
        }),
        words.prop_map(|ids| ClientFrame::Private(PrivateMessage::Begin {
            ids: ids.into_iter().map(PreprocessingId).collect(),
            position: Default::default(),
        })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_decode_within_bounds(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_checked(&body);
    }

    #[test]
    fn mutated_frames_decode_within_bounds(
        f in client_frames(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        mode in 0..3u8,
    ) {
        let mut body = body_of(&f);
        // the unmutated frame decodes
        prop_assert!(decode_checked(&body));
        match mode {
            0 if !body.is_empty() => {
                for (at, b) in edits {
                    let i = at.index(body.len());
                    body[i] = b;
                }
            }
            1 => body.truncate(cut.index(body.len() + 1)),
            _ => {
                // a length or count turned huge: 0xff.. continues a varint
                let i = cut.index(body.len() + 1);
                body.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
        decode_checked(&body);
    }
}

/// The worst cases by hand: every variant tag followed by a megabyte of
/// one repeated byte (zeros decode as a long list of empty or zero
/// elements, 0x01 as ones, 0x80.. as a long varint).
#[test]
fn runs_of_one_byte_after_every_tag_decode_within_bounds() {
    for tag in 0..8u8 {
        for fill in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            for len in [1usize, 100, 10_000, 1 << 20] {
                let mut body = vec![fill; len + 1];
                body[0] = tag;
                decode_checked(&body);
                // and inside a second level: a tag, a small count, then the run
                let mut body = vec![fill; len + 3];
                body[0] = tag;
                body[1] = 1;
                body[2] = 0;
                decode_checked(&body);
            }
        }
    }
}

/// The allocation counter counts (a test of the test).
#[test]
fn the_counter_sees_allocations() {
    let (v, peak) = peak_of(|| vec![1u8; 100_000]);
    assert!(peak >= 100_000 && v.len() == 100_000, "{peak}");
}

/// The largest decoded size per wire byte each message allows, built on
/// purpose: lists of zeros (one byte each on the wire, eight decoded) in
/// every list a client controls, and the most empty ciphertexts a message
/// may carry.
#[test]
fn the_densest_frames_decode_within_bounds() {
    // just past a power of two: the list's last growth is the largest
    let n = (1 << 20) + 1;
    let zeros = vec![0u64; n];
    let worst = [
        ClientFrame::Online(MaskedInput {
            op: 0,
            ids: vec![],
            masked: WireTensor {
                shape: vec![],
                data: zeros.clone(),
            },
        }),
        ClientFrame::Online(MaskedInput {
            op: 0,
            ids: zeros.iter().map(|&z| PreprocessingId(z)).collect(),
            masked: WireTensor {
                shape: zeros.clone(),
                data: vec![],
            },
        }),
        ClientFrame::Private(PrivateMessage::Begin {
            ids: zeros.iter().map(|&z| PreprocessingId(z)).collect(),
            position: Default::default(),
        }),
        ClientFrame::Offline(MaskRequest {
            first_id: PreprocessingId(0),
            count: 0,
            op: 0,
            offset: 0,
            layout: 0,
            ciphertexts: vec![vec![]; secinfer_protocol::offline::CIPHERTEXTS_PER_MESSAGE],
        }),
    ];
    for f in &worst {
        let body = body_of(f);
        assert!(decode_checked(&body), "{} bytes", body.len());
    }
    // a list declared far longer than the bytes that follow
    for declared in [[0xff, 0xff, 0xff, 0x7f], [0x80, 0x80, 0x80, 0x01]] {
        let mut body = vec![1, 0, 0, 0];
        body.extend(declared);
        body.extend([0; 8]);
        assert!(!decode_checked(&body));
    }
}

/// A server session fed mutated keys, encrypted masks, online requests and
/// correlations messages: errors, never panics, and the session refuses
/// what follows a bad message in its own terms.
#[test]
fn mutated_keys_masks_and_requests_give_errors_not_panics() {
    use rand::{Rng, SeedableRng};
    let converted = common::convert_bytes(
        &std::fs::read(common::model("breast_cancer_mlp.onnx")).expect("bundled model"),
    );
    let dir = std::env::temp_dir().join(format!("secinfer-decoder-fuzz-{}", std::process::id()));
    converted.write(&dir).expect("writes");
    let server = Arc::new(
        secinfer_tract_ext::ServerModel::load(&dir.join("server.onnx")).expect("server loads"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let layers = secinfer_protocol::MaskedLinear::layers(&*server).to_vec();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(11);
    let flip = |bytes: &mut Vec<u8>, rng: &mut rand::rngs::ChaCha20Rng| match rng.next_u32() % 3 {
        0 if !bytes.is_empty() => {
            for _ in 0..1 + rng.next_u32() % 4 {
                let i = rng.next_u32() as usize % bytes.len();
                bytes[i] ^= 1 << (rng.next_u32() % 8);
            }
        }
        1 => bytes.truncate(rng.next_u32() as usize % (bytes.len() + 1)),
        _ => bytes.extend((0..rng.next_u32() % 64).map(|_| rng.next_u32() as u8)),
    };
    let mut refused = [0usize; 3];
    for round in 0..24 {
        let mut pre = Preprocessor::new(layers.clone()).expect("preprocessor");
        let mut session = ServerSession::new(server.clone());
        let mut hello = pre.hello();
        let keep_key = round % 2 == 0;
        if !keep_key {
            flip(&mut hello.public_key, &mut rng);
        }
        let accepted =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.accept_hello(hello)))
                .unwrap_or_else(|_| panic!("round {round}: accepting a mutated key panicked"));
        if accepted.is_err() {
            refused[0] += 1;
            continue;
        }
        let first = pre.start(1).expect("a batch");
        while let Some(mut req) = pre.next_request(first).expect("requests") {
            if let Some(ct) = req.ciphertexts.first_mut() {
                flip(ct, &mut rng);
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match session
                .receive_offline(req)?
            {
                Some(job) => job.run(&*server, &mut |_| Ok(())).map(|_| ()),
                None => Ok(()),
            }))
            .unwrap_or_else(|_| panic!("round {round}: a mutated ciphertext panicked"));
            if outcome.is_err() {
                refused[1] += 1;
                break;
            }
        }
        // an online request of any shape
        let len = rng.next_u32() as usize % 64;
        let req = MaskedInput {
            op: rng.next_u32() % 4,
            ids: vec![first],
            masked: WireTensor {
                shape: vec![1, rng.next_u32() as u64 % 64],
                data: (0..len).map(|_| rng.next_u64()).collect(),
            },
        };
        let online = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle(req)))
            .unwrap_or_else(|_| panic!("round {round}: a mutated online request panicked"));
        if online.is_err() {
            refused[2] += 1;
        }
    }
    assert!(
        refused.iter().all(|&r| r > 0),
        "some kind of mutation was never refused ({refused:?}): it is not reaching its decoder"
    );
}
