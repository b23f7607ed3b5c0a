//! An ImageNet-size model end to end, as a user runs it: a ResNet-18 of
//! torchvision's architecture with random weights (scripts/make_resnet.py,
//! 11.7 M parameters, input 224×224×3; generated here, not committed) is
//! converted in the fast mode (`--reveal activations`), served by a real
//! `secinfer serve` process and queried by a real `secinfer predict` process
//! over loopback QUIC, offline phase included. The secure scores must equal
//! plaintext tract's on the original model within the converter's derived
//! error bound, and the server's peak resident memory (VmHWM) is reported and
//! must stay far below what the old per-coefficient packing needed (its first
//! layer alone was ~27 GB of uploaded ciphertexts).

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use rand::{Rng, SeedableRng};
use secinfer_converter::Options;
use secinfer_model::Reveal;
use tract_onnx::prelude::*;

mod common;

/// Peak server memory this test accepts for one ResNet-18 prediction: the
/// model's weights as ring elements and tract plans (~0.4 GB), the
/// weight-polynomial cache (at most 512 MiB) and one op's HE job. A regression
/// to a packing whose memory grows with the layer's width fails here.
const SERVER_PEAK_LIMIT_MIB: u64 = 3 * 1024;

/// `VmHWM` (peak resident set) of a running process, MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

#[test]
fn resnet18_one_secure_prediction_over_quic_matches_plaintext() {
    let dir: PathBuf = std::env::temp_dir().join(format!("secinfer-resnet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let onnx = dir.join("resnet18.onnx");
    let out = Command::new(common::onnx_python())
        .arg(common::repo().join("scripts/make_resnet.py"))
        .args(["--depth", "18", "--out"])
        .arg(&onnx)
        .output()
        .expect("running make_resnet.py");
    assert!(
        out.status.success(),
        "make_resnet.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One image, uniform in [0, 1) like a normalised photo's pixels.
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(18);
    let shape = [1usize, 3, 224, 224];
    let per: usize = shape.iter().product();
    let uniform = |rng: &mut rand::rngs::ChaCha20Rng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32)
            .collect()
    };
    let pixels = uniform(&mut rng, per);
    // Layer bounds calibrated on four images of the same kind (the one
    // predicted among them), as `convert --calibrate` does with a data set:
    // random weights make activations grow with depth, far from the default
    // bound's assumptions, and calibrated bounds give a tight error bound.
    let mut calibration = pixels.clone();
    calibration.extend(uniform(&mut rng, 3 * per));
    let options = Options {
        reveal: Reveal::Activations,
        input_bound: 1024.0,
        calibration: Some(
            tract_ndarray::Array::from_shape_vec(vec![4, 3, 224, 224], calibration)
                .expect("calibration shape")
                .into_tensor(),
        ),
        ..Options::default()
    };
    let converted = secinfer_converter::convert_file(&onnx, &options).expect("ResNet-18 converts");
    let model_dir = dir.join("converted");
    converted.write(&model_dir).expect("writes the pair");

    let input = dir.join("image.npy");
    common::write_npy(&input, &shape, &pixels);

    let served = common::Served::start(&model_dir.join("server.onnx"), &dir.join("state"));
    let started = std::time::Instant::now();
    let predicted = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .arg("predict")
        .args(&served.client_args)
        .arg("--model")
        .arg(model_dir.join("client.onnx"))
        .arg("--scores")
        .arg(&input)
        .output()
        .expect("running predict");
    let took = started.elapsed();
    let server_peak = peak_rss_mib(served.child.id());
    drop(served);
    let text = String::from_utf8_lossy(&predicted.stdout).into_owned();
    assert!(
        predicted.status.success(),
        "predict failed:\n{text}{}",
        String::from_utf8_lossy(&predicted.stderr)
    );
    let scores: Vec<f32> = text
        .split_once("scores [")
        .and_then(|(_, s)| s.split_once(']'))
        .expect("predict printed scores")
        .0
        .split(", ")
        .map(|v| v.parse().expect("a score"))
        .collect();

    let plain = tract_onnx::onnx()
        .model_for_path(&onnx)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("plaintext tract loads ResNet-18");
    let reference = plain
        .run(tvec!(
            tract_ndarray::Array::from_shape_vec(shape.to_vec(), pixels)
                .expect("shape")
                .into_tensor()
                .into_tvalue()
        ))
        .expect("plaintext prediction");
    let reference: Vec<f32> = reference[0]
        .to_plain_array_view::<f32>()
        .expect("f32 logits")
        .iter()
        .copied()
        .collect();
    assert_eq!(scores.len(), 1000, "one score per ImageNet class");
    assert_eq!(reference.len(), 1000);

    // The derived bound, plus the 4 decimals `predict --scores` prints.
    // ResNet-18 sums twenty layers' bounds: 5.1 today
    let tolerance = common::tolerance(&converted, 1.0, 6.0) + 5e-5;
    let worst = scores
        .iter()
        .zip(&reference)
        .map(|(s, r)| f64::from((s - r).abs()))
        .fold(0.0, f64::max);
    println!(
        "ResNet-18, one secure prediction (predict process, offline included): {:.1} s; \
         max |secure - plaintext| = {worst:.3e} (bound {tolerance:.3e}); server peak RSS {server_peak} MiB",
        took.as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    assert!(
        worst <= tolerance,
        "secure scores differ from plaintext by {worst:.3e}, more than the bound {tolerance:.3e}"
    );
    let argmax = |v: &[f32]| {
        (0..v.len())
            .max_by(|&a, &b| v[a].total_cmp(&v[b]))
            .unwrap_or(0)
    };
    assert_eq!(argmax(&scores), argmax(&reference), "the class differs");
    assert!(
        server_peak < SERVER_PEAK_LIMIT_MIB,
        "the server peaked at {server_peak} MiB for one ResNet-18 prediction (limit {SERVER_PEAK_LIMIT_MIB} MiB)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
