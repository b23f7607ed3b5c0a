//! The bundled models on their test sets, in every reveal mode: every secure
//! prediction's argmax equals plaintext tract's on the original model. The
//! full 10,000-image runs belong to `bench` (README), not to CI.

use std::path::PathBuf;

use secinfer::bench::{self, BenchConfig, Inputs, Transport};
use secinfer_converter::Options;
use secinfer_model::Reveal;

mod common;

fn run(
    model: &str,
    dataset: &str,
    limit: usize,
    reveal: Reveal,
    transport: Transport,
) -> bench::BenchReport {
    run_compared(model, dataset, limit, reveal, transport, false)
}

fn run_compared(
    model: &str,
    dataset: &str,
    limit: usize,
    reveal: Reveal,
    transport: Transport,
    compare: bool,
) -> bench::BenchReport {
    run_full(model, dataset, limit, reveal, transport, compare, false)
}

fn run_full(
    model: &str,
    dataset: &str,
    limit: usize,
    reveal: Reveal,
    transport: Transport,
    compare: bool,
    pipelined: bool,
) -> bench::BenchReport {
    let work_dir: PathBuf = std::env::temp_dir().join(format!(
        "secinfer-test-{}-{model}-{reveal}",
        std::process::id()
    ));
    let cfg = BenchConfig {
        model: common::model(model),
        inputs: Inputs::Dataset(dataset.into()),
        limit: Some(limit),
        batch: 100,
        offline_batch: None,
        transport,
        rtt: None,
        ot: secinfer_ot::Backend::default(),
        latency_samples: 5,
        sweep: vec![],
        options: Options {
            calibration: Some(
                secinfer::data::calibration_samples(dataset, 1000).expect("calibration data"),
            ),
            reveal,
            ..Options::default()
        },
        work_dir: work_dir.clone(),
        compare,
        pipelined,
    };
    let report = bench::run(&cfg, |_| {}).expect("bench runs");
    let _ = std::fs::remove_dir_all(work_dir);
    println!("{}", report.summary());
    report
}

#[test]
fn mnist_mlp_2000_images_agree_in_logits_mode_over_quic() {
    let r = run_compared(
        "mnist_mlp.onnx",
        "mnist",
        2000,
        Reveal::Logits,
        Transport::Quic,
        true,
    );
    assert_eq!((r.n, r.reveal.as_str()), (2000, "logits"));
    assert_eq!(r.agreement, r.n, "max error {:?}", r.max_abs_error);
    assert_eq!(r.accuracy_plain, r.accuracy_secure);
    let e = r.max_abs_error.expect("logits mode reports the error");
    assert!(e < 2e-2, "max error {e}");
    // every joint step ran, and the correlations were made by the parties
    assert_eq!(r.correlations.as_deref(), Some("silent"));
    assert!(r.bytes_ot_per_prediction > 0.0 && r.round_trips_per_prediction >= 10.0);
    // the same model in activations mode ran beside it: one round trip per
    // linear op, no correlations, and the same answers
    let c = r.comparison.as_ref().expect("comparison run");
    assert_eq!((c.reveal.as_str(), c.agreement), ("activations", 2000));
    assert_eq!(c.round_trips_per_prediction, 3.0);
    assert_eq!(c.bytes_ot_per_prediction, 0.0);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["comparison"]["reveal"], "activations");
}

#[test]
fn mnist_mlp_argmax_mode_reveals_only_agreeing_classes() {
    let r = run(
        "mnist_mlp.onnx",
        "mnist",
        500,
        Reveal::Argmax,
        Transport::Memory,
    );
    assert_eq!(r.reveal, "argmax");
    assert_eq!(r.agreement, r.n);
    assert_eq!(r.accuracy_plain, r.accuracy_secure);
    assert!(r.max_abs_error.is_none(), "argmax mode reveals no values");
}

#[test]
fn mnist_cnn_200_images_agree_in_logits_mode() {
    let r = run(
        "mnist_cnn.onnx",
        "mnist",
        200,
        Reveal::Logits,
        Transport::Memory,
    );
    assert_eq!(r.n, 200);
    assert_eq!(r.agreement, r.n, "max error {:?}", r.max_abs_error);
    assert_eq!(r.accuracy_plain, r.accuracy_secure);
    let e = r.max_abs_error.expect("logits mode reports the error");
    assert!(e < 5e-2, "max error {e}");
}

#[test]
fn breast_cancer_mlp_test_split_agrees_in_logits_mode() {
    // also pipelined: a second session's background pool makes the
    // material while the same predictions run, and they agree too
    let r = run_full(
        "breast_cancer_mlp.onnx",
        "breast-cancer",
        usize::MAX,
        Reveal::Logits,
        Transport::Quic,
        false,
        true,
    );
    assert_eq!(r.n, 114);
    assert_eq!(r.agreement, r.n, "max error {:?}", r.max_abs_error);
    assert_eq!(r.pipelined_agreement, Some(r.n));
    assert!(r.pipelined_predictions_per_s.is_some_and(|p| p > 0.0));
    let e = r.max_abs_error.expect("logits mode reports the error");
    // measured 2.2e-4 (2026-12-02)
    assert!(e < 1e-3, "max error {e}");
}

#[test]
fn mnist_mlp_all_10000_images_agree_in_activations_mode() {
    let r = run(
        "mnist_mlp.onnx",
        "mnist",
        10_000,
        Reveal::Activations,
        Transport::Quic,
    );
    assert_eq!((r.n, r.reveal.as_str()), (10_000, "activations"));
    assert_eq!(r.agreement, r.n, "max error {:?}", r.max_abs_error);
    assert!(r.max_abs_error.is_some_and(|e| e < 5e-2));
    assert_eq!(r.bytes_ot_per_prediction, 0.0);
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
        rtt: None,
        ot: secinfer_ot::Backend::default(),
        latency_samples: 7,
        sweep: vec![1, 8, 1000],
        // random inputs in [-1, 1): a matching input bound keeps precision
        options: Options {
            input_bound: 1.0,
            ..Options::default()
        },
        work_dir: work_dir.clone(),
        compare: false,
        pipelined: false,
    };
    let r = bench::run(&cfg, |_| {}).expect("bench runs");
    let _ = std::fs::remove_dir_all(work_dir);
    assert_eq!((r.n, r.dataset.as_str()), (50, "random"));
    assert_eq!(r.agreement, 50, "max error {:?}", r.max_abs_error);
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
        "reveal",
        "round_trips_per_prediction",
        "bytes_ot_per_prediction",
    ] {
        assert!(json.get(key).is_some(), "JSON report lacks '{key}'");
    }
    assert_eq!(json["preprocessing"], "bfv");
    assert_eq!(json["transport"], "quic");
    assert_eq!(json["reveal"], "logits");
    assert!(json.get("comparison").is_none(), "no comparison asked for");
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
