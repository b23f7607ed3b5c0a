//! ONNX's own test cases (shipped in the `onnx` Python package under
//! backend/test/data/pytorch-converted): every Conv, ConvTranspose, Linear and
//! BatchNorm case is converted and run securely, and must match the case's
//! expected output within a tolerance derived from the chosen scales.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;

mod common;

const PREFIXES: &[&str] = &[
    "test_Conv",
    "test_ConvTranspose",
    "test_Linear",
    "test_BatchNorm",
];

/// Every case of those prefixes in the pinned `onnx` package (35): the test
/// runs exactly these, so a case that goes missing (a renamed directory, a
/// changed package) fails it instead of shrinking it.
const CASES: &[&str] = &[
    "test_BatchNorm1d_3d_input_eval",
    "test_BatchNorm2d_eval",
    "test_BatchNorm2d_momentum_eval",
    "test_BatchNorm3d_eval",
    "test_BatchNorm3d_momentum_eval",
    "test_Conv1d",
    "test_Conv1d_dilated",
    "test_Conv1d_groups",
    "test_Conv1d_pad1",
    "test_Conv1d_pad1size1",
    "test_Conv1d_pad2",
    "test_Conv1d_pad2size1",
    "test_Conv1d_stride",
    "test_Conv2d",
    "test_Conv2d_depthwise",
    "test_Conv2d_depthwise_padded",
    "test_Conv2d_depthwise_strided",
    "test_Conv2d_depthwise_with_multiplier",
    "test_Conv2d_dilated",
    "test_Conv2d_groups",
    "test_Conv2d_groups_thnn",
    "test_Conv2d_no_bias",
    "test_Conv2d_padding",
    "test_Conv2d_strided",
    "test_Conv3d",
    "test_Conv3d_dilated",
    "test_Conv3d_dilated_strided",
    "test_Conv3d_groups",
    "test_Conv3d_no_bias",
    "test_Conv3d_stride",
    "test_Conv3d_stride_padding",
    "test_ConvTranspose2d",
    "test_ConvTranspose2d_no_bias",
    "test_Linear",
    "test_Linear_no_bias",
];

/// Cases secinfer does not support, with the reason (also listed in the README).
const UNSUPPORTED: &[(&str, &str)] = &[];

fn cases_dir() -> PathBuf {
    let py = common::onnx_python();
    let out = Command::new(py)
        .arg(common::repo().join("scripts/onnx_conformance_dir.py"))
        .output()
        .expect("running onnx_conformance_dir.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn read_tensor(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let proto = pb::TensorProto::decode(bytes.as_slice()).unwrap();
    secinfer_converter::tensor::from_proto(&proto).unwrap()
}

fn run_case(dir: &Path) -> Result<(f64, f64), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let converted =
        secinfer_converter::convert(&bytes, &Default::default()).map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let input = read_tensor(&data.join("input_0.pb"));
    let expected = read_tensor(&data.join("output_0.pb"));
    let input_max = input
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let mut pair = common::SecurePair::new(&converted);
    let out = pair.predict(input);
    let got = out[0]
        .to_plain_array_view::<f32>()
        .map_err(|e| e.to_string())?;
    let want = expected
        .to_plain_array_view::<f32>()
        .map_err(|e| e.to_string())?;
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    // First layer sees the test input; later ones are bounded by the converter's input bound.
    let tolerance = common::tolerance(&converted, input_max, 0.01)
        + 1e-5 * want.iter().fold(1f64, |m, v| m.max(f64::from(v.abs())));
    let err = got
        .iter()
        .zip(want.iter())
        .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    if err > tolerance {
        return Err(format!(
            "max |error| {err:.3e} exceeds the scale-derived tolerance {tolerance:.3e}"
        ));
    }
    Ok((err, tolerance))
}

#[test]
fn pytorch_converted_linear_cases_match() {
    let root = cases_dir();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    names.sort();
    assert_eq!(
        names,
        CASES,
        "the cases in {} are not the expected 35",
        root.display()
    );
    let mut failures = Vec::new();
    for name in &names {
        let expected_failure = UNSUPPORTED.iter().find(|(n, _)| n == name);
        match (run_case(&root.join(name)), expected_failure) {
            (Ok((err, tol)), None) => {
                println!("ok    {name}: max |error| {err:.2e} (tolerance {tol:.2e})")
            }
            (Err(e), Some((_, why))) => println!("skip  {name}: {why} ({e})"),
            (Ok(_), Some(_)) => failures.push(format!(
                "{name}: listed as unsupported but passes; update the list"
            )),
            (Err(e), None) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}
