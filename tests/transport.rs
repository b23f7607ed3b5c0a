//! The QUIC transport end to end over loopback: real TLS, tokens, framing and
//! limits, with the bundled models and HE preprocessing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Axis, s};
use secinfer_converter::{Converted, Options};
use secinfer_model::Reveal;
use secinfer_protocol::{Channel, MaskedInput, PreprocessingId, Preprocessor, WireTensor};
use secinfer_tract_ext::{ClientModel, InMemoryChannel, MAX_BATCH, ServerModel};
use secinfer_transport::{
    ClientConfig, Fingerprint, Identity, Limits, Loopback, QuicChannel, Trust,
};
use tract_onnx::prelude::*;

mod common;

/// A bundled model converted (bounds calibrated on its data set) in a reveal
/// mode and written to a fresh directory. The tests of the transport itself
/// (TLS, tokens, limits, framing) use `activations` mode, whose answers are
/// deterministic and compared exactly; the private modes' tests are at the end.
struct Pair {
    dir: PathBuf,
    server: Arc<ServerModel>,
    client_path: PathBuf,
    converted: Converted,
}

impl Pair {
    fn new(model: &str, dataset: &str, tag: &str) -> Pair {
        Pair::with_reveal(model, dataset, tag, Reveal::Activations)
    }

    fn with_reveal(model: &str, dataset: &str, tag: &str, reveal: Reveal) -> Pair {
        let dir =
            std::env::temp_dir().join(format!("secinfer-transport-{}-{tag}", std::process::id()));
        let options = Options {
            calibration: Some(
                secinfer::data::calibration_samples(dataset, 1000).expect("calibration data"),
            ),
            reveal,
            ..Options::default()
        };
        let converted =
            secinfer_converter::convert_file(&common::model(model), &options).expect("converts");
        converted.write(&dir).expect("writes");
        let server = Arc::new(ServerModel::load(&dir.join("server.onnx")).expect("server loads"));
        Pair {
            client_path: dir.join("client.onnx"),
            dir,
            server,
            converted,
        }
    }

    fn serve(&self, limits: Limits) -> Loopback {
        Loopback::start(self.server.clone(), self.server.digest(), limits).expect("server starts")
    }

    fn client(&self, lo: &Loopback) -> ClientModel<QuicChannel> {
        ClientModel::load_with(&self.client_path, |d, _| lo.connect(d)).expect("client connects")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn samples(dataset: &str, from: usize, n: usize) -> Tensor {
    let data = secinfer::data::load(dataset).expect("data set");
    data.inputs
        .slice_axis(Axis(0), (from..from + n).into())
        .to_owned()
        .into_tensor()
}

fn run<C: Channel + 'static>(client: &ClientModel<C>, input: Tensor) -> Vec<f32> {
    let n = client.inferences_in(&input);
    client
        .backend()
        .preprocess_in_batches(n, MAX_BATCH)
        .expect("offline phase");
    let out = client
        .predict(tvec!(input.into_tvalue()))
        .expect("prediction");
    out[0]
        .to_plain_array_view::<f32>()
        .expect("f32 output")
        .iter()
        .copied()
        .collect()
}

/// Waits (up to a minute) for the server to drop every session; this is a
/// bound on how long cleanup may take, not a speed check.
fn wait_until_no_sessions(lo: &Loopback) -> usize {
    let start = Instant::now();
    while lo.server().live_sessions() > 0 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    lo.server().live_sessions()
}

/// A well-formed online request for op 0 under preprocessing id 0 (all zeros).
fn zero_request<C: Channel + 'static>(client: &ClientModel<C>) -> MaskedInput {
    let len = client.layers()[0].input_len();
    MaskedInput {
        op: 0,
        ids: vec![PreprocessingId(0)],
        masked: WireTensor {
            shape: vec![1, len as u64],
            data: vec![0; len],
        },
    }
}

fn message(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn quic_predictions_equal_in_process_predictions() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "equal");
    let input = samples("mnist", 0, 64);
    let lo = pair.serve(Limits::default());
    let quic = pair.client(&lo);
    let over_quic = run(&quic, input.clone());
    let local = ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone()))
        .expect("in-process client");
    let in_process = run(&local, input.clone());
    assert_eq!(over_quic.len(), 64 * 10);
    assert_eq!(over_quic, in_process, "QUIC and in-process outputs differ");
    // and both are the model's answers
    let plain = tract_onnx::onnx()
        .model_for_path(common::model("mnist_mlp.onnx"))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plain model")
        .run(tvec!(input.into_tvalue()))
        .expect("plain run");
    let plain: Vec<f32> = plain[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    let tol = common::tolerance(&pair.converted, 1.0, 0.25);
    for (a, b) in plain.iter().zip(&over_quic) {
        assert!(
            f64::from((a - b).abs()) <= tol,
            "{a} vs {b}, tolerance {tol}"
        );
    }
    let t = quic.backend().channel().traffic();
    assert!(t.offline_up > t.offline_down && t.offline_down > 0, "{t:?}");
    assert!(t.online_up > 0 && t.online_down > 0, "{t:?}");
    drop(quic);
    assert_eq!(wait_until_no_sessions(&lo), 0);
}

#[test]
fn wrong_fingerprint_is_refused() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "fingerprint");
    let lo = pair.serve(Limits::default());
    let other = Identity::self_signed(&["localhost"]).unwrap().fingerprint();
    let mut cfg = lo.client_config(pair.server.digest());
    cfg.trust = Trust::Fingerprint(other);
    let e = message(QuicChannel::connect(&cfg).unwrap_err());
    assert!(e.contains("fingerprint"), "{e}");
    assert!(
        e.contains(&lo.fingerprint().to_string()),
        "names the certificate seen: {e}"
    );
    // a CA file that did not issue the server's certificate fails too
    let ca = pair.dir.join("other-ca.pem");
    std::fs::write(
        &ca,
        rcgen_free_pem(&Identity::self_signed(&["localhost"]).unwrap()),
    )
    .unwrap();
    cfg.trust = Trust::CaFile(ca);
    let e = message(QuicChannel::connect(&cfg).unwrap_err());
    assert!(e.contains("TLS handshake"), "{e}");
    assert_eq!(lo.server().live_sessions(), 0);
}

/// PEM text of an identity's certificate.
fn rcgen_free_pem(id: &Identity) -> String {
    use std::fmt::Write;
    let b64 = base64(id.chain[0].as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap());
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn missing_or_wrong_token_is_refused_before_any_model_work() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "token");
    let lo = pair.serve(Limits::default());
    for token in ["", "0123456789abcdef0123456789abcdef0123456789abcdef"] {
        let mut cfg = lo.client_config(pair.server.digest());
        cfg.token = token.to_string();
        let e = message(QuicChannel::connect(&cfg).unwrap_err());
        assert!(e.contains("refused") && e.contains("API token"), "{e}");
    }
    // A wrong token with a wrong digest is still an authentication failure:
    // the server says nothing about its model to strangers.
    let mut cfg = lo.client_config("not-the-digest");
    cfg.token = "wrong".into();
    let e = message(QuicChannel::connect(&cfg).unwrap_err());
    assert!(
        e.contains("API token") && !e.contains(pair.server.digest()),
        "{e}"
    );
    assert_eq!(lo.server().live_sessions(), 0);
}

#[test]
fn model_digest_mismatch_is_a_clear_error() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "digest");
    let other = Pair::new("mnist_mlp.onnx", "mnist", "digest-other");
    let lo = pair.serve(Limits::default());
    let e = ClientModel::load_with(&other.client_path, |d, _| lo.connect(d))
        .err()
        .expect("the server must refuse another model's client");
    let e = message(e);
    assert!(e.contains("model digest mismatch"), "{e}");
    assert!(e.contains("client.onnx"), "says what to do: {e}");
}

#[test]
fn bad_frames_close_only_their_own_session() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "frames");
    let lo = pair.serve(Limits {
        max_frame_bytes: 8 << 20,
        ..Limits::default()
    });
    let good = pair.client(&lo);
    let expected = run(&good, samples("breast-cancer", 0, 4));

    let bad = lo.connect(pair.server.digest()).unwrap();
    let e = message(
        bad.send_raw_for_tests(&[0xff, 0xff, 0xff, 0xff])
            .unwrap_err(),
    );
    assert!(e.contains("exceeds the limit of 8388608 bytes"), "{e}");
    let bad = lo.connect(pair.server.digest()).unwrap();
    let e = message(
        bad.send_raw_for_tests(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
            .unwrap_err(),
    );
    assert!(e.contains("malformed frame"), "{e}");
    let bad = lo.connect(pair.server.digest()).unwrap();
    let e = message(bad.send_raw_for_tests(&[0, 0, 0, 9, 1]).unwrap_err());
    assert!(
        e.contains("closed the session") || e.contains("ended"),
        "{e}"
    );
    // A well-formed second hello is a protocol error too.
    let hello = secinfer_transport::frame::encode(
        &secinfer_transport::frame::ClientFrame::Hello {
            version: secinfer_transport::PROTOCOL_VERSION,
            model_digest: pair.server.digest().into(),
            reveal: "activations".into(),
            token: lo.token().into(),
        },
        1 << 20,
    )
    .unwrap();
    let bad = lo.connect(pair.server.digest()).unwrap();
    let e = message(bad.send_raw_for_tests(&hello).unwrap_err());
    assert!(e.contains("hello only once"), "{e}");

    // The good session, connected all along, still works.
    let again = run(&good, samples("breast-cancer", 0, 4));
    assert_eq!(again, expected);
}

#[test]
fn reused_preprocessing_id_over_the_wire_closes_the_session() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "reuse");
    let lo = pair.serve(Limits::default());
    let client = pair.client(&lo);
    client.backend().preprocess(2).unwrap();
    let request = zero_request(&client);
    let channel = client.backend().channel();
    channel.round_trip(request.clone()).expect("first use");
    let e = message(channel.round_trip(request).unwrap_err());
    assert!(
        e.contains("already used") && e.contains("single-use"),
        "{e}"
    );
}

#[test]
fn clients_that_vanish_mid_offline_or_mid_online_leave_nothing_behind() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "vanish");
    // A client that vanishes without a word is noticed by the idle timeout.
    let lo = pair.serve(Limits {
        idle_timeout: Duration::from_secs(5),
        ..Limits::default()
    });
    let layers = secinfer_protocol::MaskedLinear::layers(&*pair.server).to_vec();

    // 1. gone after the first chunk of encrypted masks
    let ch = lo.connect(pair.server.digest()).unwrap();
    let mut pre = Preprocessor::new(layers.clone()).unwrap();
    ch.hello(pre.hello()).unwrap();
    let first = pre.start(8).unwrap();
    let req = pre.next_request(first).unwrap().unwrap();
    ch.offline(req, &mut |_| Ok(())).unwrap();
    assert_eq!(lo.server().live_sessions(), 1);
    ch.abort();
    drop(ch);
    assert_eq!(
        wait_until_no_sessions(&lo),
        0,
        "session kept after abort mid-upload"
    );

    // 2. gone while the server is evaluating (its HE job must stop and free
    // it); a full batch, so that op 0's job takes a while
    let ch = Arc::new(lo.connect(pair.server.digest()).unwrap());
    let mut pre = Preprocessor::new(layers.clone()).unwrap();
    ch.hello(pre.hello()).unwrap();
    let count = pre.max_batch();
    let first = pre.start(count).unwrap();
    let mut reqs = Vec::new();
    let params = secinfer_protocol::params_for(&layers).unwrap();
    let in0 = secinfer_protocol::offline::packing_for(&params, &layers[0], count)
        .unwrap()
        .input_ciphertexts();
    while let Some(r) = pre.next_request(first).unwrap() {
        let last = r.op == 0 && r.offset as usize + r.ciphertexts.len() == in0;
        reqs.push(r);
        if last {
            break;
        }
    }
    let last = reqs.pop().unwrap();
    for r in reqs {
        ch.offline(r, &mut |_| Ok(())).unwrap();
    }
    let worker = {
        let ch = ch.clone();
        std::thread::spawn(move || ch.offline(last, &mut |_| Ok(())))
    };
    // cut once the server's job for it is under way
    let start = Instant::now();
    while lo.server().he_jobs() == 0 && !worker.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no HE job started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ch.abort();
    assert!(worker.join().unwrap().is_err(), "the cut call must fail");
    drop(ch);
    assert_eq!(
        wait_until_no_sessions(&lo),
        0,
        "session kept after abort mid-job"
    );

    // 3. gone between the round trips of a prediction
    let client = pair.client(&lo);
    client.backend().preprocess(4).unwrap();
    let request = zero_request(&client);
    client.backend().channel().round_trip(request).unwrap();
    assert_eq!(lo.server().live_sessions(), 1);
    client.backend().channel().abort();
    drop(client);
    assert_eq!(
        wait_until_no_sessions(&lo),
        0,
        "session kept after abort mid-online"
    );

    // and the server still serves
    let client = pair.client(&lo);
    assert_eq!(run(&client, samples("mnist", 0, 2)).len(), 20);
}

#[test]
fn twenty_concurrent_clients_each_get_correct_answers() {
    let pair = Arc::new(Pair::new(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        "twenty",
    ));
    let lo = Arc::new(pair.serve(Limits::default()));
    let local =
        ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone())).unwrap();
    let all = samples("breast-cancer", 0, 100);
    let expected = run(&local, all.clone());
    let per = expected.len() / 100;
    let all = Arc::new(all);
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let (pair, lo, all) = (pair.clone(), lo.clone(), all.clone());
            std::thread::spawn(move || {
                let client = pair.client(&lo);
                let view = all.to_plain_array_view::<f32>().unwrap();
                let mine = view
                    .slice(s![i * 5..i * 5 + 5, ..])
                    .to_owned()
                    .into_tensor();
                run(&client, mine)
            })
        })
        .collect();
    let mut peak = 0;
    for (i, t) in threads.into_iter().enumerate() {
        peak = peak.max(lo.server().live_sessions());
        let got = t.join().expect("client thread");
        assert_eq!(
            got,
            expected[i * 5 * per..(i + 1) * 5 * per],
            "client {i} got wrong answers"
        );
    }
    assert!(peak <= 20);
    assert_eq!(wait_until_no_sessions(&lo), 0);
}

#[test]
fn session_limit_and_graceful_shutdown() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "limits");
    let lo = pair.serve(Limits {
        max_sessions: 1,
        ..Limits::default()
    });
    let first = pair.client(&lo);
    // a client retries a busy server for `busy_wait`, then says why it gave up
    let cfg = ClientConfig {
        busy_wait: Duration::from_secs(1),
        ..lo.client_config(pair.server.digest())
    };
    let e = message(QuicChannel::connect(&cfg).unwrap_err());
    assert!(
        e.contains("limit of 1 sessions") && e.contains("retrying"),
        "{e}"
    );
    let out = run(&first, samples("breast-cancer", 0, 2));
    assert_eq!(out.len(), 4);
    first.backend().preprocess(2).unwrap();
    // Shutting down: the connected client is told, and new ones cannot connect.
    let addr = lo.addr();
    let fingerprint: Fingerprint = lo.fingerprint();
    let token = lo.token().to_string();
    drop(lo);
    let e = message(
        first
            .predict(tvec!(samples("breast-cancer", 0, 2).into_tvalue()))
            .unwrap_err(),
    );
    assert!(e.contains("shutting down") || e.contains("closed"), "{e}");
    let cfg = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::new(
            &addr.to_string(),
            Trust::Fingerprint(fingerprint),
            &token,
            pair.server.digest(),
            "activations",
        )
    };
    assert!(QuicChannel::connect(&cfg).is_err());
}

#[test]
fn online_batches_beyond_the_message_limit_are_split_and_joined() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "split");
    let input = samples("mnist", 0, 40);
    let whole =
        ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone())).unwrap();
    let expected = run(&whole, input.clone());
    // a channel that claims a small message limit, checks it and counts
    // round trips
    let limit = 40_000;
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = counted.clone();
    let small = ClientModel::load(
        &pair.client_path,
        common::InterceptedChannel {
            inner: InMemoryChannel::new(pair.server.clone()),
            on_round_trip: Box::new(move |inner, request| {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let out = inner.round_trip(request.clone())?;
                for size in [request.masked.payload_bytes(), out.masked.payload_bytes()] {
                    anyhow::ensure!(size <= limit, "a message of {size} bytes was sent");
                }
                Ok(out)
            }),
            max_message_bytes: limit,
        },
    )
    .unwrap();
    assert_eq!(run(&small, input), expected);
    let trips = counted.load(std::sync::atomic::Ordering::SeqCst);
    // op 0 (784 inputs) fits 4 samples per message: 10 trips; ops 1 and 2 fewer.
    assert!(trips > 10, "{trips} round trips");
}

// ---- private modes over QUIC ----

fn plain_logits(model: &str, input: Tensor) -> Vec<f32> {
    let out = tract_onnx::onnx()
        .model_for_path(common::model(model))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plain model")
        .run(tvec!(input.into_tvalue()))
        .expect("plain run");
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn private_predictions_over_quic_match_plaintext_and_in_process() {
    let pair = Pair::with_reveal("mnist_mlp.onnx", "mnist", "private-equal", Reveal::Logits);
    let input = samples("mnist", 0, 50);
    let lo = pair.serve(Limits::default());
    let quic = pair.client(&lo);
    assert_eq!(quic.reveal(), Reveal::Logits);
    let over_quic = run(&quic, input.clone());
    let local = ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone()))
        .expect("in-process client");
    let in_process = run(&local, input.clone());
    let plain = plain_logits("mnist_mlp.onnx", input);
    // Truncations round to one of two neighbours at random: the two runs
    // differ slightly; both are within the converter's bound of plaintext.
    let tol = common::tolerance(&pair.converted, 1.25, 10.0);
    for ((p, q), l) in plain.iter().zip(&over_quic).zip(&in_process) {
        assert!(
            f64::from((p - q).abs()) <= tol,
            "{p} vs {q} over QUIC, tolerance {tol}"
        );
        assert!(
            f64::from((p - l).abs()) <= tol,
            "{p} vs {l} in process, tolerance {tol}"
        );
    }
    let t = quic.backend().channel().traffic();
    assert!(t.ot_up > 0 && t.ot_down > 0, "{t:?}");
    assert!(t.online_up > 0 && t.online_down > 0, "{t:?}");
    let runs = quic.backend().run_stats();
    assert_eq!(runs.batches, 1);
    assert!(runs.round_trips >= 10, "{runs:?}");
    drop(quic);
    assert_eq!(wait_until_no_sessions(&lo), 0);
}

#[test]
fn a_client_with_another_reveal_mode_is_refused_at_the_handshake() {
    let pair = Pair::with_reveal(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        "reveal",
        Reveal::Logits,
    );
    let lo = pair.serve(Limits::default());
    let mut cfg = lo.client_config(pair.server.digest());
    cfg.reveal = "activations".into();
    let e = message(QuicChannel::connect(&cfg).unwrap_err());
    assert!(
        e.contains("reveal mode mismatch") && e.contains("logits"),
        "{e}"
    );
    // an activations-mode client model of the same network has another
    // digest too: its conversion differs
    let other = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "reveal-other");
    assert_ne!(other.server.digest(), pair.server.digest());
    let e = message(
        ClientModel::load_with(&other.client_path, |d, r| {
            let mut cfg = lo.client_config(d);
            cfg.reveal = r.as_str().into();
            QuicChannel::connect(&cfg)
        })
        .err()
        .expect("refused"),
    );
    assert!(e.contains("reveal mode mismatch"), "{e}");
}

#[test]
fn private_protocol_violations_over_the_wire_close_only_that_session() {
    use secinfer_protocol::private::PrivateMessage;
    let pair = Pair::with_reveal(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        "private-bad",
        Reveal::Logits,
    );
    let lo = pair.serve(Limits::default());
    let good = pair.client(&lo);
    let expected_len = run(&good, samples("breast-cancer", 0, 2)).len();

    // A step with no batch in progress.
    let bad = pair.client(&lo);
    let e = message(
        bad.backend()
            .channel()
            .send_private(PrivateMessage::Step(secinfer_mpc::Message {
                step: 3,
                seq: 0,
                payload: vec![1, 2, 3],
            }))
            .and_then(|()| bad.backend().channel().recv_private())
            .unwrap_err(),
    );
    assert!(e.contains("no private batch in progress"), "{e}");

    // A batch naming preprocessing ids that were never made.
    let bad = pair.client(&lo);
    bad.backend().make_correlations(Default::default()).unwrap();
    let e = message(
        bad.backend()
            .channel()
            .send_private(PrivateMessage::Begin {
                ids: vec![PreprocessingId(7)],
                position: Default::default(),
            })
            .and_then(|()| bad.backend().channel().recv_private())
            .unwrap_err(),
    );
    assert!(e.contains("#7") && e.contains("unknown"), "{e}");

    // The good session still works.
    assert_eq!(
        run(&good, samples("breast-cancer", 2, 2)).len(),
        expected_len
    );
    drop(good);
    assert_eq!(wait_until_no_sessions(&lo), 0);
}

/// Keep-alives hold a connection open, not a session slot: two clients that
/// connect and then do nothing are ended after the session idle timeout,
/// and a third client is served in their place.
#[test]
fn idle_sessions_give_their_slots_back() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "idle");
    let lo = pair.serve(Limits {
        max_sessions: 2,
        session_idle_timeout: Duration::from_secs(2),
        ..Limits::default()
    });
    let no_waiting = || ClientConfig {
        busy_wait: Duration::ZERO,
        ..lo.client_config(pair.server.digest())
    };
    let idle: Vec<QuicChannel> = (0..2)
        .map(|_| QuicChannel::connect(&no_waiting()).expect("a free slot"))
        .collect();
    // full: a third is turned away at once
    let e = message(QuicChannel::connect(&no_waiting()).unwrap_err());
    assert!(e.contains("limit of 2 sessions"), "{e}");
    // (keep-alives every 2 s would keep both connections up indefinitely)
    std::thread::sleep(Duration::from_millis(5000));
    assert_eq!(lo.server().live_sessions(), 0, "idle sessions still held");
    let third =
        ClientModel::load_with(
            &pair.client_path,
            |_, _| QuicChannel::connect(&no_waiting()),
        )
        .expect("the third client gets a slot");
    let out = run(&third, samples("breast-cancer", 0, 2));
    assert_eq!(out.len(), 4);
    // an idle client learns why its session ended
    let e = message(idle[0].round_trip(zero_request(&third)).unwrap_err());
    assert!(e.contains("no request for 2s"), "{e}");
}

/// HE input ciphertexts waiting in sessions, running HE jobs and what
/// sessions store draw from one server-wide memory budget: work that cannot
/// fit is refused with the budget and the estimate named, and the server
/// keeps serving.
#[test]
fn he_work_beyond_the_servers_memory_budget_is_refused_by_name() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "memory");
    // no room for the client's key (~0.8 MiB), which the session stores
    let lo = pair.serve(Limits {
        max_memory_bytes: 256 << 10,
        ..Limits::default()
    });
    let client = pair.client(&lo);
    let e = message(client.backend().preprocess(1).unwrap_err());
    assert!(
        e.contains("this session's stored material would need ~")
            && e.contains("memory budget for HE work and stored material of 0.2 MiB"),
        "{e}"
    );
    assert_eq!(wait_until_no_sessions(&lo), 0);
    drop(lo);
    // room for the key, none for the first op's job (~1.2 MiB)
    let lo = pair.serve(Limits {
        max_memory_bytes: 1 << 20,
        ..Limits::default()
    });
    let client = pair.client(&lo);
    let e = message(client.backend().preprocess(1).unwrap_err());
    assert!(
        e.contains("this op's HE job would need ~")
            && e.contains("memory budget for HE work and stored material of 1.0 MiB"),
        "{e}"
    );
    assert_eq!(wait_until_no_sessions(&lo), 0);
    assert_eq!(
        lo.server().memory_reserved(),
        0,
        "a refused session's budget kept"
    );
    drop(lo);
    // with room for the work, the same client code is served
    let lo = pair.serve(Limits {
        max_memory_bytes: 64 << 20,
        ..Limits::default()
    });
    let client = pair.client(&lo);
    let out = run(&client, samples("breast-cancer", 0, 2));
    assert_eq!(out.len(), 4);
}

/// A correlation batch's memory (what the session's store gains and the
/// expansion's buffers, ~39 MB with silent OT's default set) and a setup
/// flight's (the whole setup's, ~10 MB) are reserved before their work:
/// under a budget with room for the key and the HE jobs but not for them,
/// the setup or the batch is refused by name and nothing stays reserved;
/// with room, the same client is served.
#[test]
fn correlation_batches_are_reserved_before_their_work() {
    let pair = Pair::with_reveal(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        "ot-memory",
        Reveal::Logits,
    );
    let input = samples("breast-cancer", 0, 2);
    // room for the HE work, none for the correlation setup (~10 MB with
    // silent OT): its first flight is refused before it is handled; then
    // room for the setup, none for the first batch
    for (mib, what) in [(6, "setup flight"), (16, "batch")] {
        let lo = pair.serve(Limits {
            max_memory_bytes: mib << 20,
            ..Limits::default()
        });
        let client = pair.client(&lo);
        client.backend().preprocess(2).expect("the HE work fits");
        let e = message(
            client
                .predict(tvec!(input.clone().into_tvalue()))
                .unwrap_err(),
        );
        assert!(
            e.contains(&format!("this correlation {what} would need ~"))
                && e.contains(&format!(
                    "memory budget for HE work and stored material of {mib}.0 MiB"
                )),
            "{e}"
        );
        assert_eq!(wait_until_no_sessions(&lo), 0);
        assert_eq!(
            lo.server().memory_reserved(),
            0,
            "a refused {what}'s budget kept"
        );
    }
    let lo = pair.serve(Limits {
        max_memory_bytes: 128 << 20,
        ..Limits::default()
    });
    let client = pair.client(&lo);
    assert_eq!(run(&client, input).len(), 4);
}

/// A server that accepts only silent OT refuses a client that asks for
/// IKNP at its first setup flight, by name, and keeps serving: the same
/// client code with the default backend is served.
#[test]
fn a_correlation_backend_the_server_does_not_accept_is_refused_by_name() {
    let pair = Pair::with_reveal(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        "ot-backends",
        Reveal::Logits,
    );
    let input = samples("breast-cancer", 0, 2);
    let lo = pair.serve(Limits {
        accepted_ot_backends: vec![secinfer_ot::Backend::Silent],
        ..Limits::default()
    });
    let client = pair.client(&lo);
    client
        .backend()
        .set_ot_backend(secinfer_ot::Backend::Iknp)
        .unwrap();
    client
        .backend()
        .preprocess(2)
        .expect("the HE work is served");
    let e = message(
        client
            .predict(tvec!(input.clone().into_tvalue()))
            .unwrap_err(),
    );
    assert!(
        e.contains(
            "asks for OT backend iknp, which this server does not accept (it accepts: silent)"
        ),
        "{e}"
    );
    assert_eq!(wait_until_no_sessions(&lo), 0);
    assert_eq!(
        lo.server().memory_reserved(),
        0,
        "a refused setup's budget kept"
    );
    let client = pair.client(&lo);
    assert_eq!(run(&client, input).len(), 4);
    drop(lo);
    // a server that accepts none would serve no private-mode client: it
    // does not start
    let e = Loopback::start(
        pair.server.clone(),
        pair.server.digest(),
        Limits {
            accepted_ot_backends: vec![],
            ..Limits::default()
        },
    )
    .err()
    .expect("a server accepting no backend is refused")
    .to_string();
    assert!(e.contains("no correlation backend accepted"), "{e}");
}

/// Waits (up to a minute) for the server's reserved HE-work budget to meet
/// `done`, and returns it.
fn wait_for_reserved(lo: &Loopback, done: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    while !done(lo.server().memory_reserved()) && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    lo.server().memory_reserved()
}

/// What a session keeps between requests (the client's key, the shares `s`
/// of its preprocessed inferences) holds the HE-work budget while it is
/// kept: a second session's job that would not fit beside it waits, then
/// is refused by name; the material goes back as it is used and when the
/// session ends, and the second session is then served.
#[test]
fn a_sessions_stored_material_holds_the_budget_until_used_or_gone() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "stored");
    let lo = pair.serve(Limits {
        // room for one session's key (~0.8 MiB), the shares of 6,208
        // inferences (~1.9 MiB) and a job for 64 of them (~2.8 MiB); room
        // for a second session's key, not for its job beside them
        max_memory_bytes: 5888 << 10,
        frame_timeout: Duration::from_secs(2),
        ..Limits::default()
    });
    let holder = pair.client(&lo);
    assert_eq!(lo.server().memory_reserved(), 0);
    holder.backend().preprocess(64).expect("a small batch fits");
    let small = wait_for_reserved(&lo, |r| r > 0);
    assert!(small > 512 << 10, "the key alone is ~0.8 MiB: {small}");
    holder
        .backend()
        .preprocess_in_batches(6144, 64)
        .expect("small batches fit while nothing else runs");
    let full = lo.server().memory_reserved();
    // at least the id bookkeeping and one share per output per inference
    let outputs: usize = holder.layers().iter().map(|l| l.output_len()).sum();
    assert!(
        full >= small + 6144 * (outputs as u64 * 8),
        "6,144 inferences' shares not charged: {small} -> {full}"
    );
    // beside that, a second session has no room for a job and is refused
    // once the frame timeout has passed
    let other = pair.client(&lo);
    let e = message(other.backend().preprocess(64).unwrap_err());
    assert!(
        e.contains("stayed taken by work in progress") && e.contains("this op's HE job"),
        "{e}"
    );
    // the holder uses its material: its reservation shrinks
    let data = secinfer::data::load("breast-cancer").expect("data set");
    let rows = data.inputs.len_of(Axis(0));
    let mut left = 6144 + 64;
    while left > 0 {
        let k = left.min(rows).min(MAX_BATCH);
        holder
            .predict(tvec!(samples("breast-cancer", 0, k).into_tvalue()))
            .expect("prediction from stored material");
        left -= k;
    }
    assert_eq!(holder.backend().ready(), 0);
    let shares = 6144 * outputs as u64 * 8;
    let after = wait_for_reserved(&lo, |r| r + shares <= full);
    // (the key and the spent ids, remembered to refuse reuse, stay)
    assert!(
        after + shares <= full,
        "used material still charged: {full} -> {after}"
    );
    // and the session's end gives back the rest
    drop(holder);
    assert_eq!(wait_until_no_sessions(&lo), 0);
    assert_eq!(wait_for_reserved(&lo, |r| r == 0), 0);
    let other = pair.client(&lo);
    let out = run(&other, samples("breast-cancer", 0, 2));
    assert_eq!(out.len(), 4);
}

/// A QUIC channel whose offline replies are taken by a test's gate: the
/// first reply part of op 1 blocks the client's reader until the gate
/// opens, as a client on a slow link or a slow machine would.
struct SlowReader {
    inner: QuicChannel,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    held: std::sync::atomic::AtomicBool,
    /// op 1's reply parts taken, and whether the gate opened (rather than
    /// timed out)
    parts: std::sync::atomic::AtomicUsize,
    opened: std::sync::atomic::AtomicBool,
    started: std::sync::mpsc::SyncSender<()>,
}

impl Channel for SlowReader {
    fn round_trip(&self, request: MaskedInput) -> anyhow::Result<secinfer_protocol::MaskedOutput> {
        self.inner.round_trip(request)
    }
    fn hello(&self, hello: secinfer_protocol::OfflineHello) -> anyhow::Result<()> {
        self.inner.hello(hello)
    }
    fn offline(
        &self,
        request: secinfer_protocol::MaskRequest,
        on_reply: &mut dyn FnMut(secinfer_protocol::ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.inner.offline(request, &mut |reply| {
            // the second op's job has many parts (conv 2 of the CNN)
            if reply.op != 1 {
                return on_reply(reply);
            }
            self.parts.fetch_add(1, SeqCst);
            if !self.held.swap(true, SeqCst) {
                let _ = self.started.send(());
                // well inside the server's frame timeout (60 s)
                let opened = self
                    .gate
                    .lock()
                    .is_ok_and(|g| g.recv_timeout(Duration::from_secs(25)).is_ok());
                self.opened.store(opened, SeqCst);
            }
            on_reply(reply)
        })
    }
    fn ot(
        &self,
        message: secinfer_ot::OtMessage,
    ) -> anyhow::Result<Option<secinfer_ot::OtMessage>> {
        self.inner.ot(message)
    }
    fn send_private(
        &self,
        message: secinfer_protocol::private::PrivateMessage,
    ) -> anyhow::Result<()> {
        self.inner.send_private(message)
    }
    fn recv_private(&self) -> anyhow::Result<secinfer_protocol::private::PrivateMessage> {
        self.inner.recv_private()
    }
    fn traffic(&self) -> secinfer_protocol::Traffic {
        self.inner.traffic()
    }
    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }
    fn max_pending(&self) -> Option<usize> {
        self.inner.max_pending()
    }
}

/// One HE job runs at a time. A client that stops reading its replies
/// (here: until another client's whole offline batch is done, in place of
/// reading each part just under the timeout) must not keep that one job
/// slot: its job gives the slot up while it waits for the reader, another
/// session's batch runs, and the slow client still gets every part.
#[test]
fn a_slow_reader_does_not_hold_the_he_job_slot() {
    use std::sync::atomic::Ordering::SeqCst;
    let pair = Arc::new(Pair::new("mnist_cnn.onnx", "mnist", "slow-reader"));
    let lo = Arc::new(pair.serve(Limits {
        concurrent_he_jobs: 1,
        ..Limits::default()
    }));
    let (open, gate) = std::sync::mpsc::channel();
    let (started, on_start) = std::sync::mpsc::sync_channel(1);
    let slow = {
        let (pair, lo) = (pair.clone(), lo.clone());
        std::thread::spawn(move || {
            let client = ClientModel::load_with(&pair.client_path, |d, _| {
                let config = ClientConfig {
                    // the client's QUIC window holds less than one reply part
                    receive_window: 64 << 10,
                    ..lo.client_config(d)
                };
                Ok(SlowReader {
                    inner: QuicChannel::connect(&config)?,
                    gate: gate.into(),
                    held: false.into(),
                    parts: 0.into(),
                    opened: false.into(),
                    started,
                })
            })
            .expect("slow client connects");
            let out = run(&client, samples("mnist", 0, 64));
            let channel = client.backend().channel();
            (out, channel.parts.load(SeqCst), channel.opened.load(SeqCst))
        })
    };
    on_start
        .recv_timeout(Duration::from_secs(120))
        .expect("the slow client's first reply part");
    // the slow client is reading nothing now; another is served meanwhile
    let other = pair.client(&lo);
    let quick = run(&other, samples("mnist", 16, 2));
    let _ = open.send(());
    let (slow_out, parts, opened) = slow.join().expect("slow client");
    assert!(
        opened,
        "the other client's offline batch did not finish while the slow one was not reading"
    );
    // one part read, one being written, two queued: a job of more parts
    // must wait for the reader
    assert!(
        parts >= 6,
        "only {parts} reply parts: the test needs a job of many"
    );
    let local =
        ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone())).unwrap();
    assert_eq!(slow_out, run(&local, samples("mnist", 0, 64)));
    assert_eq!(quick, run(&local, samples("mnist", 16, 2)));
}

/// Connections that have not said hello are bounded: one stream each, one
/// deadline for TLS and hello together, and at most `max_handshakes` at
/// once (past half of it clients must pass a QUIC Retry, past it they are
/// refused and retry later).
#[test]
fn connections_that_never_authenticate_are_bounded() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "unwelcomed");
    let lo = Arc::new(pair.serve(Limits {
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(3),
        ..Limits::default()
    }));
    let config = ClientConfig {
        busy_wait: Duration::ZERO,
        ..lo.client_config(pair.server.digest())
    };
    // the second of these passes a Retry first
    let silent: Vec<_> = (0..2)
        .map(|_| QuicChannel::connect_without_hello_for_tests(&config).expect("TLS handshake"))
        .collect();
    assert_eq!(lo.server().handshakes(), 2);
    assert_eq!(
        silent[0].streams_opened(3, Duration::from_secs(1)),
        1,
        "an unwelcomed connection may open one stream"
    );
    let e = message(QuicChannel::connect(&config).unwrap_err());
    assert!(
        e.contains("too many connections are opening at once"),
        "{e}"
    );
    // a client that may wait retries until the silent ones are gone
    let waiting = {
        let config = lo.client_config(pair.server.digest());
        std::thread::spawn(move || QuicChannel::connect(&config))
    };
    for c in &silent {
        let why = c
            .closed_within(Duration::from_secs(30))
            .expect("closed at the handshake deadline");
        assert!(why.contains("no hello within 3s"), "{why}");
    }
    let channel = waiting
        .join()
        .expect("thread")
        .expect("served after retrying");
    let client = ClientModel::load_with(&pair.client_path, |_, _| Ok(channel)).unwrap();
    assert_eq!(run(&client, samples("breast-cancer", 0, 2)).len(), 4);
    assert_eq!(lo.server().handshakes(), 0);
}

/// Each session's QUIC buffers (its receive window and the server's send
/// window, `session_window` each way) are charged to the decoding budget
/// at `Welcome` and given back when the session ends; a server whose
/// budget cannot hold every session's buffers refuses to start, by name.
#[test]
fn sessions_connection_buffers_are_charged_at_welcome() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "buffers");
    let too_small = Limits {
        max_decoding_bytes: 4 << 20,
        ..Limits::default()
    };
    let e = match Loopback::start(pair.server.clone(), pair.server.digest(), too_small) {
        Ok(_) => panic!("a server started without room for its sessions' buffers"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("cannot hold 64 sessions' connection buffers"),
        "{e}"
    );
    let limits = Limits {
        max_decoding_bytes: 16 << 20,
        max_sessions: 4,
        ..Limits::default()
    };
    let window = u64::from(secinfer_transport::session_window(&limits));
    assert_eq!(window, 1 << 20);
    let lo = pair.serve(limits);
    assert_eq!(lo.server().decoding_reserved(), 0);
    let first = QuicChannel::connect(&lo.client_config(pair.server.digest())).expect("first");
    let second = QuicChannel::connect(&lo.client_config(pair.server.digest())).expect("second");
    let held = |want: u64| {
        let start = Instant::now();
        while lo.server().decoding_reserved() != want && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        lo.server().decoding_reserved()
    };
    assert_eq!(held(2 * 2 * window), 2 * 2 * window);
    drop(first);
    assert_eq!(held(2 * window), 2 * window);
    drop(second);
    assert_eq!(held(0), 0);
}

/// Reading and decoding a frame draws on the server's decoding budget (an
/// online request may take 26 times its size, body included): a frame
/// that could not fit is refused by name once its kind is known, and
/// smaller ones are served.
#[test]
fn frames_are_counted_against_the_decoding_budget() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "frame-budget");
    let lo = pair.serve(Limits {
        max_decoding_bytes: 16 << 20,
        max_sessions: 8,
        ..Limits::default()
    });
    let client = pair.client(&lo);
    let len: u32 = 1_000_000; // an online request: x 24 = ~23 MiB
    let mut frame = len.to_be_bytes().to_vec();
    frame.push(1);
    frame.extend(std::iter::repeat_n(0u8, len as usize - 1));
    let e = message(
        client
            .backend()
            .channel()
            .send_raw_for_tests(&frame)
            .unwrap_err(),
    );
    assert!(
        e.contains("a frame of 1000000 bytes would need ~24.8 MiB")
            && e.contains("memory budget for frames and connection buffers of 16.0 MiB"),
        "{e}"
    );
    let client = pair.client(&lo);
    assert_eq!(run(&client, samples("breast-cancer", 0, 2)).len(), 4);
}

/// Over a link that delays every datagram, drops 3 % of them and sends 5 %
/// out of order (both directions), predictions complete and equal the
/// in-process ones, and the server is left with no session.
#[test]
fn predictions_over_a_lossy_reordering_link_are_complete_and_correct() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "lossy");
    let link = secinfer_transport::EmulatedLink {
        one_way_delay: Duration::from_millis(5),
        loss: 0.03,
        reorder: 0.05,
        reorder_delay: Duration::from_millis(3),
    };
    let lo = Loopback::start_over(
        pair.server.clone(),
        pair.server.digest(),
        Limits::default(),
        Some(link),
    )
    .expect("server starts");
    let input = samples("mnist", 0, 20);
    let local =
        ClientModel::load(&pair.client_path, InMemoryChannel::new(pair.server.clone())).unwrap();
    let expected = run(&local, input.clone());
    let client = pair.client(&lo);
    assert_eq!(run(&client, input.clone()), expected);
    // the online phase alone, one image at a time, many small round trips
    for i in 0..5 {
        let out = run(&client, samples("mnist", i, 1));
        assert_eq!(out, expected[i * 10..(i + 1) * 10]);
    }
    let lost = client.backend().channel().lost_packets();
    assert!(lost > 0, "no packet was lost: the link is not emulated");
    println!("{lost} packets lost and recovered");
    drop(client);
    assert_eq!(wait_until_no_sessions(&lo), 0);
}

/// The client gives up on a request the server does not finish answering
/// within its request timeout (here far shorter than an HE job), names the
/// timeout, and the same client code is served with the default.
#[test]
fn a_request_not_answered_within_the_clients_timeout_fails_by_name() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "request-timeout");
    let lo = pair.serve(Limits::default());
    let impatient = ClientModel::load_with(&pair.client_path, |d, _| {
        QuicChannel::connect(&ClientConfig {
            request_timeout: Duration::from_millis(1),
            ..lo.client_config(d)
        })
    })
    .expect("connects");
    let e = message(impatient.backend().preprocess(8).unwrap_err());
    assert!(
        e.contains("did not answer within 1ms (the client's request timeout)"),
        "{e}"
    );
    let client = pair.client(&lo);
    assert_eq!(run(&client, samples("mnist", 0, 2)).len(), 20);
}

/// Limits the wire enforces, each refused by name: a frame stalled halfway
/// (the frame timeout), and a hello in another protocol version.
#[test]
fn a_stalled_half_frame_and_a_version_mismatch_are_refused_by_name() {
    let pair = Pair::new("breast_cancer_mlp.onnx", "breast-cancer", "wire-limits");
    let lo = pair.serve(Limits {
        frame_timeout: Duration::from_secs(2),
        ..Limits::default()
    });
    let channel = lo.connect(pair.server.digest()).expect("connects");
    // a frame of 100 bytes of which 10 come
    let mut half = 100u32.to_be_bytes().to_vec();
    half.extend([0u8; 10]);
    let e = message(channel.send_raw_unfinished_for_tests(&half).unwrap_err());
    assert!(e.contains("not completed within 2s"), "{e}");
    let config = lo.client_config(pair.server.digest());
    let raw = QuicChannel::connect_without_hello_for_tests(&config).expect("TLS");
    let version = secinfer_transport::PROTOCOL_VERSION + 1;
    let e = message(raw.hello_with_version(&config, version).unwrap_err());
    assert!(
        e.contains(&format!(
            "protocol version mismatch: client speaks {version}"
        )),
        "{e}"
    );
    // and the server still serves
    let client = pair.client(&lo);
    assert_eq!(run(&client, samples("breast-cancer", 0, 2)).len(), 4);
}

/// The server's own per-session limits, refused by name over the wire even
/// for a client that does not keep to them: preprocessed inferences beyond
/// `max_pending`, and a third batch in flight.
#[test]
fn material_beyond_the_sessions_limits_is_refused_over_the_wire() {
    let pair = Pair::new("mnist_mlp.onnx", "mnist", "wire-pending");
    let lo = pair.serve(Limits {
        max_pending_inferences: 8,
        ..Limits::default()
    });
    let layers = secinfer_protocol::MaskedLinear::layers(&*pair.server).to_vec();
    // too many inferences in one batch
    let ch = lo.connect(pair.server.digest()).expect("connects");
    let mut pre = Preprocessor::new(layers.clone()).unwrap();
    ch.hello(pre.hello()).unwrap();
    let first = pre.start(9).unwrap();
    let req = pre.next_request(first).unwrap().expect("a request");
    let e = message(ch.offline(req, &mut |_| Ok(())).unwrap_err());
    assert!(
        e.contains("would exceed this session's limit of 8 preprocessed inferences"),
        "{e}"
    );
    // a third batch while two are open (each has had its first chunk only)
    let ch = lo.connect(pair.server.digest()).expect("connects");
    let mut pre = Preprocessor::new(layers).unwrap();
    ch.hello(pre.hello()).unwrap();
    let batches: Vec<PreprocessingId> = (0..3).map(|_| pre.start(1).unwrap()).collect();
    let mut outcomes = Vec::new();
    for &b in &batches {
        let req = pre.next_request(b).unwrap().expect("a request");
        outcomes.push(ch.offline(req, &mut |_| Ok(())));
    }
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    let e = message(outcomes.pop().unwrap().unwrap_err());
    assert!(
        e.contains("2 preprocessing batches are already in flight"),
        "{e}"
    );
    assert_eq!(wait_until_no_sessions(&lo), 0);
}
