//! `secinfer convert` from the outside: good models pass onnx.checker with
//! full_check, bad ones fail with a message naming the node and op, a
//! non-zero exit, and nothing written.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use tract_onnx::pb;

mod common;

fn secinfer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_secinfer"))
        .args(args)
        .output()
        .expect("running secinfer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("secinfer-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn check_with_onnx(files: &[&Path]) {
    let out = Command::new(common::onnx_python())
        .arg(common::repo().join("scripts/check_onnx.py"))
        .args(files)
        .output()
        .expect("running check_onnx.py");
    assert!(
        out.status.success(),
        "onnx.checker rejected a converted file:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bundled_models_convert_and_pass_the_onnx_checker() {
    for (model, bound) in [
        ("mnist_cnn.onnx", "64"),
        ("mnist_mlp.onnx", "64"),
        ("breast_cancer_mlp.onnx", "64"),
    ] {
        let dir = tmp(model);
        let path = common::model(model);
        let (ok, text) = secinfer(&[
            "convert",
            path.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--input-bound",
            bound,
        ]);
        assert!(ok, "{text}");
        assert!(
            text.contains("headroom") && text.contains("model digest"),
            "{text}"
        );
        let (server, client) = (dir.join("server.onnx"), dir.join("client.onnx"));
        check_with_onnx(&[&server, &client]);
        // The client file holds no weights: no initializer as large as the smallest weight tensor.
        let client_model =
            pb::ModelProto::decode(std::fs::read(&client).unwrap().as_slice()).unwrap();
        let server_model =
            pb::ModelProto::decode(std::fs::read(&server).unwrap().as_slice()).unwrap();
        let smallest_weight = server_model
            .graph
            .unwrap()
            .initializer
            .iter()
            .filter(|t| t.name.starts_with("weight_"))
            .map(|t| t.dims.iter().product::<i64>())
            .min()
            .unwrap();
        for t in &client_model.graph.unwrap().initializer {
            assert!(
                t.dims.iter().product::<i64>() < smallest_weight,
                "client.onnx carries tensor {} {:?}",
                t.name,
                t.dims
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn tiny_model(op: &str, weight_as_input: bool) -> pb::ModelProto {
    use pb::tensor_proto::DataType;
    let vi = |name: &str, dims: &[i64]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let w = pb::TensorProto {
        name: "w".into(),
        dims: vec![2, 1, 3, 3],
        data_type: DataType::Float as i32,
        float_data: vec![0.5; 18],
        ..Default::default()
    };
    let mut input = vec![vi("x", &[1, 1, 5, 5])];
    if weight_as_input {
        input.push(vi("w", &[2, 1, 3, 3]));
    }
    common::opset13_model(pb::GraphProto {
        name: "tiny".into(),
        node: vec![pb::NodeProto {
            name: "the_node".into(),
            op_type: op.into(),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            ..Default::default()
        }],
        initializer: if weight_as_input { vec![] } else { vec![w] },
        input,
        output: vec![vi("y", &[1, 2, 3, 3])],
        ..Default::default()
    })
}

fn convert_fails(name: &str, bytes: &[u8], expect: &[&str]) {
    let dir = tmp(name);
    let file =
        std::env::temp_dir().join(format!("secinfer-cli-{}-{name}.onnx", std::process::id()));
    std::fs::write(&file, bytes).unwrap();
    let (ok, text) = secinfer(&[
        "convert",
        file.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(!ok, "conversion of {name} should fail:\n{text}");
    for e in expect {
        assert!(
            text.contains(e),
            "message for {name} should mention '{e}':\n{text}"
        );
    }
    assert!(
        !dir.join("server.onnx").exists() && !dir.join("client.onnx").exists(),
        "{name}: files were written"
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_tiny_conv_model_converts() {
    let dir = tmp("tiny-ok");
    let file = std::env::temp_dir().join(format!("secinfer-cli-{}-tiny.onnx", std::process::id()));
    std::fs::write(&file, tiny_model("Conv", false).encode_to_vec()).unwrap();
    let (ok, text) = secinfer(&[
        "convert",
        file.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(dir.join("server.onnx").exists() && dir.join("client.onnx").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_inputs_fail_with_clear_errors_and_write_nothing() {
    convert_fails(
        "garbage",
        b"\x08\x96\x01 this is not protobuf \xff\xff",
        &["not an ONNX model"],
    );
    convert_fails(
        "unknown-op",
        &tiny_model("FrobnicateTensor", false).encode_to_vec(),
        &["the_node", "FrobnicateTensor"],
    );
    convert_fails(
        "dynamic-weights",
        &tiny_model("Conv", true).encode_to_vec(),
        &["the_node", "Conv", "'w'", "run time"],
    );
    convert_fails(
        "lstm",
        &tiny_model("LSTM", false).encode_to_vec(),
        &["the_node", "LSTM", "recurrent"],
    );
    let mut nan = tiny_model("Conv", false);
    nan.graph.as_mut().unwrap().initializer[0].float_data[3] = f32::NAN;
    convert_fails("nan-weights", &nan.encode_to_vec(), &["'w'", "NaN"]);
    let mut dangling = tiny_model("Conv", false);
    dangling.graph.as_mut().unwrap().node[0].input[0] = "nowhere".into();
    convert_fails(
        "dangling",
        &dangling.encode_to_vec(),
        &["the_node", "nowhere"],
    );
    let (ok, text) = secinfer(&["convert", "/nonexistent/model.onnx", "-o", "/tmp/x"]);
    assert!(!ok && text.contains("/nonexistent/model.onnx"), "{text}");
}

/// The tiny conv followed by `op` (no weights) named `after_conv`.
fn conv_then(op: &str) -> pb::ModelProto {
    let mut m = tiny_model("Conv", false);
    let g = m.graph.as_mut().unwrap();
    g.node.push(pb::NodeProto {
        name: "after_conv".into(),
        op_type: op.into(),
        input: vec!["y".into()],
        output: vec!["z".into()],
        ..Default::default()
    });
    g.output[0].name = "z".into();
    m
}

#[test]
fn an_operator_without_a_joint_protocol_fails_in_logits_mode_and_runs_in_activations_mode() {
    let bytes = conv_then("Exp").encode_to_vec();
    // logits is the default: refused, naming the node, the op and the way out
    convert_fails(
        "exp-logits",
        &bytes,
        &["after_conv", "Exp", "--reveal activations"],
    );
    // argmax likewise
    let dir = tmp("exp-argmax");
    let file = std::env::temp_dir().join(format!("secinfer-cli-{}-exp.onnx", std::process::id()));
    std::fs::write(&file, &bytes).unwrap();
    let (ok, text) = secinfer(&[
        "convert",
        file.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--reveal",
        "argmax",
    ]);
    assert!(
        !ok && text.contains("after_conv") && text.contains("Exp"),
        "{text}"
    );
    assert!(!dir.join("server.onnx").exists() && !dir.join("client.onnx").exists());
    // activations mode runs it on the client, and says what that costs
    let (ok, text) = secinfer(&[
        "convert",
        file.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--reveal",
        "activations",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("WARNING") && text.contains("reconstruct the model's weights"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(file);
}

#[test]
fn private_conversions_print_the_program_and_pass_the_onnx_checker() {
    let dir = tmp("cnn-logits");
    let path = common::model("mnist_cnn.onnx");
    let (ok, text) = secinfer(&[
        "convert",
        path.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--calibrate",
        "mnist",
    ]);
    assert!(ok, "{text}");
    for expected in [
        "--reveal logits",
        "SecureMaxPool",
        "SecureRelu",
        "SecureTruncate",
        "on 1",
        "seen",
    ] {
        assert!(text.contains(expected), "missing '{expected}':\n{text}");
    }
    assert!(!text.contains("WARNING"), "{text}");
    check_with_onnx(&[&dir.join("server.onnx"), &dir.join("client.onnx")]);
    let _ = std::fs::remove_dir_all(dir);
}
