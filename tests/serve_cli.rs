//! `secinfer serve` and `secinfer predict` as separate processes, as a user
//! runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use secinfer_converter::Options;
use secinfer_model::Reveal;

mod common;

/// `model` (bundled) converted in the fast mode, bounds calibrated on
/// `dataset`, written to a fresh temporary directory, which is returned.
fn converted(model: &str, dataset: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("secinfer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options {
        calibration: Some(
            secinfer::data::calibration_samples(dataset, 1000).expect("calibration data"),
        ),
        reveal: Reveal::Activations,
        ..Options::default()
    };
    secinfer_converter::convert_file(&common::model(model), &options)
        .expect("converts")
        .write(&dir)
        .expect("writes");
    dir
}

/// The first `n` samples of a bundled data set (from the start again when
/// it has fewer) as a `.npy` file for `predict`.
fn samples_npy(dataset: &str, n: usize, path: &Path) {
    let data = secinfer::data::load(dataset).expect("data set");
    let rows = data.inputs.len_of(ndarray::Axis(0));
    let mut shape = data.inputs.shape().to_vec();
    shape[0] = n;
    let values: Vec<f32> = (0..n)
        .flat_map(|i| {
            data.inputs
                .index_axis(ndarray::Axis(0), i % rows)
                .to_owned()
        })
        .collect();
    common::write_npy(path, &shape, &values);
}

/// Whoever read the server's log may go away (`serve | head`, a supervisor
/// restarting its log collector): the server must keep serving, not die on
/// its next line of output.
#[test]
fn serve_keeps_serving_after_its_stdout_is_closed() {
    let dir = converted("breast_cancer_mlp.onnx", "breast-cancer", "serve-cli");
    // A first run makes the certificate and token and says how to connect
    // (address, fingerprint, token file) ...
    let state = dir.join("state");
    let first = common::Served::start(&dir.join("server.onnx"), &state);
    let client_args = first.client_args.clone();
    let server = first.client_arg("--server");
    drop(first);
    // ... a second, on the same address and state, has its stdout closed
    // before it prints its first line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("serve")
        .arg("--model")
        .arg(dir.join("server.onnx"))
        .args(["--listen", &server, "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting serve");
    drop(child.stdout.take());
    let served = common::Served { child, client_args };
    // time to bind (predict also retries its handshake for a while)
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let input = dir.join("row.npy");
    samples_npy("breast-cancer", 1, &input);
    let out = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("predict")
        .args(&served.client_args)
        .arg("--model")
        .arg(dir.join("client.onnx"))
        .arg(&input)
        .output()
        .expect("running predict");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "predict failed:\n{text}");
    assert!(text.contains("class "), "{text}");
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A service manager or container runtime stops a service with SIGTERM:
/// `serve` must drain as on Ctrl-C (the request in flight finishes, clients
/// are told the server is shutting down) and exit cleanly, not die at once.
#[test]
fn serve_drains_and_exits_cleanly_on_sigterm_with_a_request_in_flight() {
    use std::io::Read;
    let dir = converted("mnist_cnn.onnx", "mnist", "sigterm");
    let mut served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &[],
        std::process::Stdio::piped(),
    );
    let input = dir.join("images.npy");
    samples_npy("mnist", 128, &input);
    // 128 CNN images: several offline batches, about ten seconds of HE work;
    // the signal comes well after the client has connected
    let predict = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("predict")
        .args(&served.client_args)
        .arg("--model")
        .arg(dir.join("client.onnx"))
        .arg(&input)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting predict");
    std::thread::sleep(std::time::Duration::from_millis(3000));
    let pid = served.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("running kill");
    assert!(killed.success());
    let status = common::wait_for_exit(&mut served.child, std::time::Duration::from_secs(120))
        .expect("serve exits after SIGTERM within its grace period");
    let mut stderr = String::new();
    if let Some(mut e) = served.child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "serve ended with {status}: {stderr}");
    assert!(stderr.contains("SIGTERM: shutting down"), "{stderr}");
    // the client either finished or was told why it could not (it then
    // tries to reconnect for a while: it is stopped once it has said so)
    let mut predict = predict;
    let stderr = predict.stderr.take().expect("predict's stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut told = String::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(120)) {
        println!("predict: {line}");
        // Told by the server's close, or (seen once in three runs with a
        // second CNN workload beside it, docs/design.md) by its own idle
        // timeout when that close did not arrive: either way it knows.
        if line.contains("shutting down") || line.contains("connection lost") {
            told = line;
            break;
        }
    }
    let _ = predict.kill();
    let out = predict.wait_with_output().expect("predict ends");
    assert!(
        out.status.success() || !told.is_empty(),
        "predict neither finished nor learned that the server went away"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `predict` takes any number of inputs: they go through in chunks that fit
/// the server's per-session limit of preprocessed inferences (which the
/// server states in its welcome), not all preprocessed first.
#[test]
fn predict_streams_more_inputs_than_the_server_lets_a_session_hold() {
    let dir = converted("breast_cancer_mlp.onnx", "breast-cancer", "stream");
    let served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &["--max-pending", "100"],
        std::process::Stdio::inherit(),
    );
    let n = 350;
    let input = dir.join("rows.npy");
    samples_npy("breast-cancer", n, &input);
    let out = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("predict")
        .args(&served.client_args)
        .arg("--model")
        .arg(dir.join("client.onnx"))
        .arg(&input)
        .output()
        .expect("running predict");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "predict failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(": class ")).count(),
        n,
        "{text}"
    );
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// More clients than `--max-sessions` at once: the ones turned away retry
/// with backoff and every one of them gets its answers.
#[test]
fn clients_beyond_the_session_limit_wait_their_turn() {
    let dir = converted("breast_cancer_mlp.onnx", "breast-cancer", "busy");
    let served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &["--max-sessions", "1"],
        std::process::Stdio::inherit(),
    );
    let n = 40;
    let input = dir.join("rows.npy");
    samples_npy("breast-cancer", n, &input);
    // the first client holds the only session for a while (2,000 rows),
    // the others arrive while it does and must wait their turn
    let long_input = dir.join("many.npy");
    samples_npy("breast-cancer", 2000, &long_input);
    // (its 2,000 answer lines go to a file: a pipe nobody reads yet would
    // fill and stall it while it holds the session)
    let first_out = dir.join("first.txt");
    let first = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("predict")
        .args(&served.client_args)
        .arg("--model")
        .arg(dir.join("client.onnx"))
        .arg(&long_input)
        .stdout(std::fs::File::create(&first_out).expect("output file"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the first predict");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_secinfer"))
                .arg("predict")
                .args(&served.client_args)
                .arg("--model")
                .arg(dir.join("client.onnx"))
                .arg(&input)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("starting predict")
        })
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        let out = c.wait_with_output().expect("predict ends");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "a client failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.lines().filter(|l| l.contains(": class ")).count(), n);
        answers.push(text);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "clients disagree");
    let out = first.wait_with_output().expect("the first predict ends");
    assert!(
        out.status.success(),
        "the first client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&first_out)
            .expect("the first client's answers")
            .lines()
            .filter(|l| l.contains(": class "))
            .count(),
        2000
    );
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server is killed (SIGKILL: no drain, nothing said) in the middle of
/// a batch and started again on the same address and state directory:
/// `predict` notices, reconnects, redoes the inputs it had no answer for
/// with new offline material, and prints what an undisturbed run prints.
#[test]
fn predict_reconnects_and_finishes_when_the_server_is_killed_and_restarted() {
    let dir = converted("mnist_cnn.onnx", "mnist", "restart");
    let state = dir.join("state");
    let mut served = common::Served::start_with(
        &dir.join("server.onnx"),
        &state,
        &[],
        std::process::Stdio::inherit(),
    );
    let input = dir.join("images.npy");
    samples_npy("mnist", 128, &input);
    let predict = || {
        Command::new(env!("CARGO_BIN_EXE_secinfer"))
            .arg("predict")
            .args(&served.client_args)
            .arg("--model")
            .arg(dir.join("client.onnx"))
            .arg(&input)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting predict")
    };
    let reference = predict().wait_with_output().expect("predict ends");
    assert!(reference.status.success());
    let disturbed = predict();
    // 128 CNN images take about ten seconds: the kill lands mid-batch
    std::thread::sleep(std::time::Duration::from_millis(3000));
    served.child.kill().expect("killing serve");
    let _ = served.child.wait();
    let addr = served.client_arg("--server");
    let restarted = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("serve")
        .arg("--model")
        .arg(dir.join("server.onnx"))
        .args(["--listen", &addr, "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("restarting serve");
    let _restarted = common::Served {
        child: restarted,
        client_args: served.client_args.clone(),
    };
    let out = disturbed.wait_with_output().expect("predict ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("predict: {stderr}");
    assert!(out.status.success(), "predict failed: {stderr}");
    assert!(stderr.contains("reconnecting to redo inputs"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&reference.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ways a `predict` command line trusts the server and authenticates,
/// between two processes: pinning (`--fingerprint`) or a CA file (`--ca`,
/// with the name checked), the token from `--token-file`, `--token` or
/// `SECINFER_TOKEN`; and the refusals a user meets (wrong token, a name the
/// certificate does not carry, no trust given), each named.
#[test]
fn predict_command_lines_trust_and_authenticate_as_documented() {
    let dir = converted("breast_cancer_mlp.onnx", "breast-cancer", "cli-auth");
    let state = dir.join("state");
    let served = common::Served::start(&dir.join("server.onnx"), &state);
    let input = dir.join("rows.npy");
    samples_npy("breast-cancer", 3, &input);
    let arg = |name: &str| served.client_arg(name);
    let (server, fingerprint, token_file) =
        (arg("--server"), arg("--fingerprint"), arg("--token-file"));
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let predict = |args: &[&str], env_token: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_secinfer"));
        c.arg("predict")
            .args(["--server", &server])
            .args(args)
            .arg("--model")
            .arg(dir.join("client.onnx"))
            .arg(&input)
            .env_remove("SECINFER_TOKEN");
        if let Some(t) = env_token {
            c.env("SECINFER_TOKEN", t);
        }
        let out = c.output().expect("running predict");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, pinned, err) = predict(
        &["--fingerprint", &fingerprint, "--token-file", &token_file],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(pinned.lines().count(), 3, "{pinned}");
    assert!(pinned.lines().all(|l| l.contains(": class ")), "{pinned}");
    // the state directory's certificate as a CA file, the token in the environment
    let ca = state.join("cert.pem");
    let ca = ca.to_str().unwrap();
    let (ok, via_ca, err) = predict(&["--ca", ca], Some(&token));
    assert!(ok, "{err}");
    assert_eq!(via_ca, pinned);
    let (ok, via_token, err) = predict(&["--fingerprint", &fingerprint, "--token", &token], None);
    assert!(ok, "{err}");
    assert_eq!(via_token, pinned);
    // refusals
    let (ok, _, err) = predict(
        &["--ca", ca, "--server-name", "other.example"],
        Some(&token),
    );
    assert!(
        !ok && err.contains("TLS handshake") && err.contains("other.example"),
        "{err}"
    );
    let (ok, _, err) = predict(
        &["--fingerprint", &fingerprint, "--token", "not-the-token"],
        None,
    );
    assert!(!ok && err.contains("unknown API token"), "{err}");
    let (ok, _, err) = predict(&["--token", &token], None);
    assert!(
        !ok && err.contains("--fingerprint") && err.contains("--ca"),
        "{err}"
    );
    let (ok, _, err) = predict(&["--fingerprint", &fingerprint], None);
    assert!(!ok && err.contains("token"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A per-session correlation limit below what a default client needs (its
/// 256 MiB of kept and run correlations beside its largest request's
/// buffers) is refused at start, naming the least accepted; so is an
/// unknown correlation backend.
#[test]
fn serve_refuses_correlation_settings_clients_cannot_use() {
    let dir = converted("breast_cancer_mlp.onnx", "breast-cancer", "serve-ot-limit");
    for (flag, value, said) in [
        (
            "--max-correlation-mib",
            "256",
            "--max-correlation-mib 256: at least 512",
        ),
        (
            "--ot-backends",
            "silent,ferret",
            "--ot-backends: unknown OT backend 'ferret': silent or iknp",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_secinfer"))
            .args(["serve", "--model"])
            .arg(dir.join("server.onnx"))
            .args([flag, value])
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(said), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
