//! `secinfer serve` and `secinfer predict` as separate processes, as a user
//! runs them.

use std::process::Command;

use secinfer_converter::Options;
use secinfer_model::Reveal;

mod common;

/// Whoever read the server's log may go away (`serve | head`, a supervisor
/// restarting its log collector): the server must keep serving, not die on
/// its next line of output.
#[test]
fn serve_keeps_serving_after_its_stdout_is_closed() {
    let dir = std::env::temp_dir().join(format!("secinfer-serve-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options {
        calibration: Some(
            secinfer::data::calibration_samples("breast-cancer", 1000).expect("calibration data"),
        ),
        reveal: Reveal::Activations,
        ..Options::default()
    };
    let converted =
        secinfer_converter::convert_file(&common::model("breast_cancer_mlp.onnx"), &options)
            .expect("converts");
    converted.write(&dir).expect("writes");
    // A first run makes the certificate and token and says how to connect
    // (address, fingerprint, token file) ...
    let state = dir.join("state");
    let first = common::Served::start(&dir.join("server.onnx"), &state);
    let client_args = first.client_args.clone();
    drop(first);
    let server = client_args
        .iter()
        .skip_while(|a| *a != "--server")
        .nth(1)
        .expect("--server in the printed command")
        .clone();
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
    let served = common::Served {
        child,
        client_args,
    };
    // time to bind (predict also retries its handshake for a while)
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let data = secinfer::data::load("breast-cancer").expect("data set");
    let row: Vec<f32> = data.inputs.index_axis(ndarray::Axis(0), 0).iter().copied().collect();
    let input = dir.join("row.npy");
    common::write_npy(&input, &[1, row.len()], &row);
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
