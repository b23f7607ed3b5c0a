//! The bundled models on their full test sets: every secure prediction's
//! argmax equals plaintext tract's on the original model.

use std::path::PathBuf;

use secinfer::bench::{self, BenchConfig, Inputs, Transport};
use secinfer_converter::Options;

mod common;

/// The CNN's 10k-image run uses the in-memory channel (13 GB of offline
/// traffic would add minutes to CI and prove nothing more than the QUIC
/// tests do); the other models run over loopback QUIC.
fn full_run(
    model: &str,
    dataset: &str,
    input_bound: f32,
    transport: Transport,
) -> bench::BenchReport {
    let work_dir: PathBuf =
        std::env::temp_dir().join(format!("secinfer-test-{}-{model}", std::process::id()));
    let cfg = BenchConfig {
        model: common::model(model),
        inputs: Inputs::Dataset(dataset.into()),
        limit: None,
        batch: 200,
        offline_batch: None,
        transport,
        latency_samples: 10,
        sweep: vec![],
        options: Options {
            input_bound,
            calibration: Some(
                secinfer::data::calibration_samples(dataset, 1000).expect("calibration data"),
            ),
            ..Options::default()
        },
        work_dir: work_dir.clone(),
    };
    let report = bench::run(&cfg, |_| {}).expect("bench runs");
    let _ = std::fs::remove_dir_all(work_dir);
    println!("{}", report.summary());
    report
}

#[test]
fn mnist_cnn_all_10000_images_agree() {
    let r = full_run("mnist_cnn.onnx", "mnist", 64.0, Transport::Memory);
    assert_eq!(r.n, 10_000);
    assert_eq!(r.agreement, r.n, "max error {}", r.max_abs_error);
    assert_eq!(r.accuracy_plain, r.accuracy_secure);
    assert!(r.accuracy_plain.unwrap() >= 0.992);
    assert!(r.max_abs_error < 5e-2, "max error {}", r.max_abs_error);
}

#[test]
fn mnist_mlp_all_10000_images_agree() {
    let r = full_run("mnist_mlp.onnx", "mnist", 64.0, Transport::Quic);
    assert_eq!(r.n, 10_000);
    assert_eq!(r.agreement, r.n, "max error {}", r.max_abs_error);
    assert!(r.max_abs_error < 5e-2, "max error {}", r.max_abs_error);
}

#[test]
fn breast_cancer_mlp_test_split_agrees() {
    let r = full_run(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        64.0,
        Transport::Quic,
    );
    assert!(r.n > 100);
    assert_eq!(r.agreement, r.n, "max error {}", r.max_abs_error);
}

#[test]
fn random_inputs_report_agreement_and_the_fixed_json_keys() {
    let work_dir: PathBuf =
        std::env::temp_dir().join(format!("secinfer-test-{}-random", std::process::id()));
    let cfg = BenchConfig {
        model: common::model("mnist_mlp.onnx"),
        inputs: Inputs::Random(50),
        limit: None,
        batch: 16,
        offline_batch: Some(256),
        transport: Transport::Quic,
        latency_samples: 7,
        sweep: vec![1, 8, 1000],
        options: Options::default(),
        work_dir: work_dir.clone(),
    };
    let r = bench::run(&cfg, |_| {}).expect("bench runs");
    let _ = std::fs::remove_dir_all(work_dir);
    assert_eq!((r.n, r.dataset.as_str()), (50, "random"));
    assert_eq!(r.agreement, 50, "max error {}", r.max_abs_error);
    assert!(r.accuracy_plain.is_none() && r.accuracy_secure.is_none());
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "model",
        "dataset",
        "n",
        "accuracy_plain",
        "accuracy_secure",
        "agreement",
        "max_abs_error",
        "preprocessing",
        "transport",
        "batch",
        "predictions_per_s",
        "online_predictions_per_s",
        "plain_predictions_per_s",
        "bytes_online_per_prediction",
        "bytes_offline_per_prediction",
    ] {
        assert!(json.get(key).is_some(), "JSON report lacks '{key}'");
    }
    assert_eq!(json["preprocessing"], "bfv");
    assert_eq!(json["transport"], "quic");
    // latency percentiles over the 7 timed single predictions, in order
    let lat = &json["latency_ms"];
    let (p50, p95, p99) = (
        lat["p50"].as_f64().unwrap(),
        lat["p95"].as_f64().unwrap(),
        lat["p99"].as_f64().unwrap(),
    );
    assert_eq!(lat["samples"], 7);
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{lat}");
    // the sweep ran each size (1000 capped to the 50 samples there are)
    let sizes: Vec<u64> = json["sweep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1, 8, 50]);
    for p in r.sweep.iter() {
        assert!(p.n >= 50 && p.online_predictions_per_s > 0.0 && p.plain_predictions_per_s > 0.0);
    }
    // and the plot draws both panels
    let svg = std::env::temp_dir().join(format!("secinfer-test-{}.svg", std::process::id()));
    secinfer::plot::write_svg(std::slice::from_ref(&r), &svg).expect("plot");
    let text = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(
        text.starts_with("<svg") && text.contains("mnist_mlp secure"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("throughput") && text.contains("Accuracy"));
    // 50 predictions plus the latency and sweep runs' 163 fit one batch of 256.
    assert_eq!(r.offline_batch, 256);
    assert!(r.bytes_offline_per_prediction > r.bytes_online_per_prediction);
}
