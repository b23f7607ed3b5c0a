//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use secinfer_converter::{Converted, Options};
use secinfer_tract_ext::{ClientModel, InMemoryChannel, ServerModel};
use tract_onnx::prelude::*;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn model(name: &str) -> PathBuf {
    repo().join("onnx-models").join(name)
}

/// Python with the `onnx` package, from the repo's own setup script (creates
/// target/onnx-venv on first use; pip needs the package registry).
pub fn onnx_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/onnx-venv.sh"))
            .output()
            .expect("running scripts/onnx-venv.sh");
        assert!(
            out.status.success(),
            "scripts/onnx-venv.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("venv script printed no python path")
                .trim(),
        )
    })
    .clone()
}

/// Runs the converted pair in one process, material from the HE offline phase.
pub struct SecurePair {
    pub server: Arc<ServerModel>,
    pub client: ClientModel<InMemoryChannel<ServerModel>>,
}

impl SecurePair {
    pub fn new(converted: &Converted) -> SecurePair {
        use prost::Message;
        let server = Arc::new(
            ServerModel::from_bytes(&converted.server.encode_to_vec()).expect("server model loads"),
        );
        let client = ClientModel::from_bytes(
            &converted.client.encode_to_vec(),
            InMemoryChannel::new(server.clone()),
        )
        .expect("client model loads");
        SecurePair { server, client }
    }

    /// Preprocesses the run (HE) and predicts.
    pub fn predict(&mut self, input: Tensor) -> TVec<TValue> {
        self.try_predict(input).expect("secure prediction")
    }

    /// Preprocesses the run (HE) and predicts, returning errors.
    pub fn try_predict(&mut self, input: Tensor) -> anyhow::Result<TVec<TValue>> {
        let n = self.client.inferences_in(&input);
        let ready = self.client.backend().ready();
        if ready < n {
            self.client
                .backend()
                .preprocess_in_batches(n - ready, secinfer_tract_ext::MAX_BATCH)?;
        }
        self.client.predict(tvec!(input.into_tvalue()))
    }
}

pub fn convert_bytes(bytes: &[u8]) -> Converted {
    secinfer_converter::convert(bytes, &Options::default()).expect("conversion")
}

/// Bound on the secure-vs-plaintext error of a converted model: the first
/// layer's inputs are within `first_input_max`, later ones within the bounds
/// the converter recorded; each layer contributes its own rounding bound. In
/// the private modes a joint truncation errs by up to one unit instead of
/// half of one, so the bound doubles.
pub fn tolerance(converted: &Converted, first_input_max: f64) -> f64 {
    let per_layer: f64 = converted
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.error_bound(if i == 0 {
                first_input_max
            } else {
                f64::from(l.spec.input_bound)
            })
        })
        .sum();
    if converted.reveal.is_private() {
        2.0 * per_layer
    } else {
        per_layer
    }
}

/// An opset-13 model around `graph`.
pub fn opset13_model(graph: tract_onnx::pb::GraphProto) -> tract_onnx::pb::ModelProto {
    use tract_onnx::pb;
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}
