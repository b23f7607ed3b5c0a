//! Load: a hundred clients at once against one `serve` process over
//! loopback QUIC, each making a hundred MNIST MLP predictions, with the
//! server at its default limit of 64 sessions (the other clients wait their
//! turn with backoff). Every prediction must succeed and give plaintext
//! tract's class, and the server's peak resident memory must stay below the
//! memory budget it was given. The figures (predictions per second, online
//! latency under load, peak memory) are printed for the README; nothing
//! here is a timed assertion.
//!
//! The model is converted in `activations` mode, whose online phase is one
//! round trip per layer: the test is about the server under many sessions,
//! and CI time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::Axis;
use secinfer_converter::Options;
use secinfer_model::Reveal;
use secinfer_tract_ext::ClientModel;
use secinfer_transport::{ClientConfig, QuicChannel, Trust};
use tract_onnx::prelude::*;

mod common;

const CLIENTS: usize = 100;
const PER_CLIENT: usize = 100;
const BUDGET_MIB: u64 = 2048;

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_hundred_clients_of_a_hundred_predictions_each_all_get_plaintexts_class() {
    let dir = std::env::temp_dir().join(format!("secinfer-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options {
        calibration: Some(secinfer::data::calibration_samples("mnist", 1000).expect("data")),
        reveal: Reveal::Activations,
        ..Options::default()
    };
    let converted = secinfer_converter::convert_file(&common::model("mnist_mlp.onnx"), &options)
        .expect("converts");
    converted.write(&dir).expect("writes");

    // plaintext tract's class for every image the clients will send
    let data = secinfer::data::load("mnist").expect("MNIST");
    let images = data
        .inputs
        .slice_axis(Axis(0), (0..CLIENTS * PER_CLIENT).into())
        .to_owned();
    let plain = tract_onnx::onnx()
        .model_for_path(common::model("mnist_mlp.onnx"))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plain model");
    let plain_out = plain
        .run(tvec!(images.clone().into_tensor().into_tvalue()))
        .expect("plain run");
    let plain_logits = plain_out[0].to_plain_array_view::<f32>().unwrap();
    let expected: Vec<usize> = plain_logits
        .outer_iter()
        .map(|row| argmax(row.as_slice().expect("contiguous")))
        .collect();

    let budget = BUDGET_MIB.to_string();
    let served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &["--max-memory-mib", &budget],
        std::process::Stdio::inherit(),
    );
    let arg = |name: &str| served.client_arg(name);
    let token = std::fs::read_to_string(arg("--token-file")).expect("token file");
    let config = ClientConfig::new(
        &arg("--server"),
        Trust::Fingerprint(arg("--fingerprint").parse().expect("fingerprint")),
        token.trim(),
        "",
        "activations",
    );
    let images = Arc::new(images);
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (config, images, client_path) =
                (config.clone(), images.clone(), dir.join("client.onnx"));
            std::thread::spawn(move || -> anyhow::Result<(Vec<usize>, Vec<Duration>)> {
                let client = ClientModel::load_with(&client_path, |digest, _| {
                    QuicChannel::connect(&ClientConfig {
                        model_digest: digest.to_string(),
                        ..config
                    })
                })?;
                client
                    .backend()
                    .preprocess_in_batches(PER_CLIENT, PER_CLIENT)?;
                let mut classes = Vec::with_capacity(PER_CLIENT);
                let mut latencies = Vec::with_capacity(PER_CLIENT);
                for i in 0..PER_CLIENT {
                    let image = images
                        .slice_axis(Axis(0), (c * PER_CLIENT + i..c * PER_CLIENT + i + 1).into())
                        .to_owned()
                        .into_tensor();
                    let t = Instant::now();
                    let out = client.predict(tvec!(image.into_tvalue()))?;
                    latencies.push(t.elapsed());
                    let row: Vec<f32> = out[0]
                        .to_plain_array_view::<f32>()?
                        .iter()
                        .copied()
                        .collect();
                    classes.push(argmax(&row));
                }
                Ok((classes, latencies))
            })
        })
        .collect();
    // the server's resident memory, sampled while the clients run
    let pid = served.child.id();
    let mut peak_rss = 0;
    while clients.iter().any(|t| !t.is_finished()) {
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = start.elapsed();
    let mut latencies = Vec::new();
    let mut failed = Vec::new();
    for (c, t) in clients.into_iter().enumerate() {
        match t.join().expect("client thread") {
            Ok((classes, lat)) => {
                assert_eq!(
                    classes,
                    expected[c * PER_CLIENT..(c + 1) * PER_CLIENT],
                    "client {c} got classes other than plaintext's"
                );
                latencies.extend(lat);
            }
            Err(e) => failed.push(format!("client {c}: {e:#}")),
        }
    }
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(peak_rss);
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failed.is_empty(),
        "{} clients failed: {failed:?}",
        failed.len()
    );
    latencies.sort();
    let total = CLIENTS * PER_CLIENT;
    println!(
        "load: {CLIENTS} clients x {PER_CLIENT} MNIST MLP predictions (activations mode), \
         all equal to plaintext's class, in {:.1} s: {:.0} predictions/s end to end, offline \
         phase included; one online prediction under this load: p50 {:.1} ms, p99 {:.1} ms; \
         server peak RSS {} MiB (budget {BUDGET_MIB} MiB)",
        wall.as_secs_f64(),
        total as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        hwm / 1024
    );
    assert!(
        hwm < BUDGET_MIB * 1024,
        "the server peaked at {} MiB, above its budget of {BUDGET_MIB} MiB",
        hwm / 1024
    );
}
