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

/// Converts a bundled model in `activations` mode into `dir`.
fn convert(model: &str, dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
    let options = Options {
        calibration: Some(secinfer::data::calibration_samples("mnist", 1000).expect("data")),
        reveal: Reveal::Activations,
        ..Options::default()
    };
    let converted =
        secinfer_converter::convert_file(&common::model(model), &options).expect("converts");
    converted.write(dir).expect("writes");
}

/// The first `n` MNIST images.
fn mnist_images(n: usize) -> ndarray::ArrayD<f32> {
    let data = secinfer::data::load("mnist").expect("MNIST");
    data.inputs.slice_axis(Axis(0), (0..n).into()).to_owned()
}

/// Plaintext tract's class for every image.
fn plaintext_classes(model: &str, images: &ndarray::ArrayD<f32>) -> Vec<usize> {
    let plain = tract_onnx::onnx()
        .model_for_path(common::model(model))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plain model");
    let out = plain
        .run(tvec!(images.clone().into_tensor().into_tvalue()))
        .expect("plain run");
    let logits = out[0].to_plain_array_view::<f32>().expect("f32 logits");
    logits
        .outer_iter()
        .map(|row| argmax(row.as_slice().expect("contiguous")))
        .collect()
}

/// A client's configuration for a `serve` process, from what it printed.
fn client_config(served: &common::Served) -> ClientConfig {
    let arg = |name: &str| served.client_arg(name);
    let token = std::fs::read_to_string(arg("--token-file")).expect("token file");
    ClientConfig::new(
        &arg("--server"),
        Trust::Fingerprint(arg("--fingerprint").parse().expect("fingerprint")),
        token.trim(),
        "",
        "activations",
    )
}

/// A client of the model in `dir`, connected with `config`.
fn connect(
    dir: &std::path::Path,
    config: &ClientConfig,
) -> anyhow::Result<ClientModel<QuicChannel>> {
    ClientModel::load_with(&dir.join("client.onnx"), |digest, _| {
        QuicChannel::connect(&ClientConfig {
            model_digest: digest.to_string(),
            ..config.clone()
        })
    })
}

/// The class a client's answer for one image gives.
fn class_of(
    client: &ClientModel<QuicChannel>,
    image: ndarray::ArrayD<f32>,
) -> anyhow::Result<usize> {
    let out = client.predict(tvec!(image.into_tensor().into_tvalue()))?;
    let row: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    Ok(argmax(&row))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_hundred_clients_of_a_hundred_predictions_each_all_get_plaintexts_class() {
    let dir = std::env::temp_dir().join(format!("secinfer-load-{}", std::process::id()));
    convert("mnist_mlp.onnx", &dir);
    let images = mnist_images(CLIENTS * PER_CLIENT);
    let expected = plaintext_classes("mnist_mlp.onnx", &images);
    let budget = BUDGET_MIB.to_string();
    let served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &["--max-memory-mib", &budget],
        std::process::Stdio::inherit(),
    );
    let config = client_config(&served);
    let images = Arc::new(images);
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (config, images, dir) = (config.clone(), images.clone(), dir.clone());
            std::thread::spawn(move || -> anyhow::Result<(Vec<usize>, Vec<Duration>)> {
                let client = connect(&dir, &config)?;
                client
                    .backend()
                    .preprocess_in_batches(PER_CLIENT, PER_CLIENT)?;
                let mut classes = Vec::with_capacity(PER_CLIENT);
                let mut latencies = Vec::with_capacity(PER_CLIENT);
                for i in 0..PER_CLIENT {
                    let image = images
                        .slice_axis(Axis(0), (c * PER_CLIENT + i..c * PER_CLIENT + i + 1).into())
                        .to_owned();
                    let t = Instant::now();
                    classes.push(class_of(&client, image)?);
                    latencies.push(t.elapsed());
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

/// CNN clients at once against one `serve` process with a small memory
/// budget and one HE slot.
const CNN_CLIENTS: usize = 12;
/// Inferences each CNN client preprocesses (one batch: conv 2's job alone
/// is priced at ~180 MiB).
const CNN_BATCH: usize = 16;
const CNN_BUDGET_MIB: u64 = 512;

/// Memory under heavy HE work: twelve MNIST CNN sessions each send a batch
/// at once while one HE job at a time runs, so that completed ops queue up
/// in sessions behind the running job, and a thirteenth asks for a batch whose
/// conv-2 job (over 1 GiB) could never fit. The server's peak resident
/// memory stays below its budget; every session either gets material that
/// gives plaintext's class or is refused with a message that names the
/// memory budget; the oversized batch is refused at once; and the server
/// serves a new client afterwards.
#[test]
fn cnn_sessions_queued_behind_a_long_job_stay_within_the_memory_budget() {
    let dir = std::env::temp_dir().join(format!("secinfer-memory-{}", std::process::id()));
    convert("mnist_cnn.onnx", &dir);
    let images = mnist_images(CNN_CLIENTS + 1);
    let expected = plaintext_classes("mnist_cnn.onnx", &images);
    let budget = CNN_BUDGET_MIB.to_string();
    let served = common::Served::start_with(
        &dir.join("server.onnx"),
        &dir.join("state"),
        &[
            "--max-memory-mib",
            &budget,
            "--he-jobs",
            "1",
            "--frame-timeout",
            "5",
        ],
        std::process::Stdio::inherit(),
    );
    let config = client_config(&served);
    let images = Arc::new(images);
    let clients: Vec<_> = (0..CNN_CLIENTS)
        .map(|c| {
            let (config, images, dir) = (config.clone(), images.clone(), dir.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let client = connect(&dir, &config)?;
                client.backend().preprocess(CNN_BATCH)?;
                let image = images.slice_axis(Axis(0), (c..c + 1).into()).to_owned();
                class_of(&client, image)
            })
        })
        .collect();
    let oversized = {
        let config = config.clone();
        let dir = dir.clone();
        std::thread::spawn(move || connect(&dir, &config)?.backend().preprocess(400))
    };
    let pid = served.child.id();
    while clients.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = format!("{:#}", oversized.join().expect("thread").unwrap_err());
    assert!(
        e.contains("more than the server's whole memory budget for HE work and stored material"),
        "{e}"
    );
    let (mut served_ok, mut refused) = (0, Vec::new());
    for (c, t) in clients.into_iter().enumerate() {
        match t.join().expect("client thread") {
            Ok(class) => {
                assert_eq!(
                    class, expected[c],
                    "client {c}'s class differs from plaintext's"
                );
                served_ok += 1;
            }
            Err(e) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains("memory budget for HE work")
                        || e.contains("memory budget for frames"),
                    "client {c}: {e}"
                );
                refused.push(e);
            }
        }
    }
    let hwm = status_kib(pid, "VmHWM:").expect("serve's peak memory");
    println!(
        "memory: {CNN_CLIENTS} MNIST CNN sessions x {CNN_BATCH} inferences at once, one HE slot: \
         {served_ok} served, {} refused by the budget; server peak RSS {} MiB (budget \
         {CNN_BUDGET_MIB} MiB)",
        refused.len(),
        hwm / 1024
    );
    assert!(served_ok > 0, "nobody was served: {refused:?}");
    assert!(
        hwm < CNN_BUDGET_MIB * 1024,
        "the server peaked at {} MiB, above its budget of {CNN_BUDGET_MIB} MiB",
        hwm / 1024
    );
    // and it still serves
    let client = connect(&dir, &config).expect("a new client");
    client.backend().preprocess(1).expect("material");
    let image = images
        .slice_axis(Axis(0), (CNN_CLIENTS..CNN_CLIENTS + 1).into())
        .to_owned();
    assert_eq!(
        class_of(&client, image).expect("answer"),
        expected[CNN_CLIENTS]
    );
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}
