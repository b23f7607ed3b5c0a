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
/// half of one, so the bound doubles. The bound is derived from the scales
/// the converter chose, so each caller also gives a `ceiling` (today's
/// bound with some headroom): a regression that picks fewer fractional bits
/// raises the bound together with the error and would otherwise pass.
pub fn tolerance(converted: &Converted, first_input_max: f64, ceiling: f64) -> f64 {
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
    let bound = if converted.reveal.is_private() {
        2.0 * per_layer
    } else {
        per_layer
    };
    assert!(
        bound <= ceiling,
        "the derived error bound {bound:.3e} exceeds the ceiling {ceiling:.3e}: fewer fractional bits than before? (layers' input/weight bits: {:?})",
        converted
            .layers
            .iter()
            .map(|l| (l.spec.input_frac_bits, l.spec.weight_frac_bits))
            .collect::<Vec<_>>()
    );
    bound
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

/// A little-endian f32 `.npy` file (format 1.0) of the given shape.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // magic (6) + version (2) + header length (2) + header, padded to 64 bytes
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("writing the input");
}

/// A `secinfer serve` process on a free loopback port, killed when dropped.
/// Its stdout is read to the end on a thread (echoed with a `serve:`
/// prefix); `client_args` is the `--server … --fingerprint … --token-file …`
/// part of the `predict` command line it prints.
pub struct Served {
    pub child: std::process::Child,
    pub client_args: Vec<String>,
}

impl Served {
    pub fn start(model: &Path, state_dir: &Path) -> Served {
        Served::start_with(model, state_dir, &[], std::process::Stdio::inherit())
    }

    /// [`Served::start`] with more `serve` flags and serve's stderr going
    /// to `stderr`.
    pub fn start_with(
        model: &Path,
        state_dir: &Path,
        flags: &[&str],
        stderr: std::process::Stdio,
    ) -> Served {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_secinfer"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting serve");
        let stdout = child.stdout.take().expect("serve's stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("serve: {line}");
                if let Some(rest) = line.strip_prefix("clients: secinfer predict ") {
                    let args: Vec<String> = rest
                        .split_whitespace()
                        .take_while(|w| *w != "--model")
                        .map(str::to_owned)
                        .collect();
                    let _ = tx.send(args);
                }
            }
        });
        let mut served = Served {
            child,
            client_args: Vec::new(),
        };
        served.client_args = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("serve printed how to connect");
        served
    }

    /// The value of `name` (`--server`, `--fingerprint`, `--token-file`) in
    /// the `predict` command line `serve` printed.
    pub fn client_arg(&self, name: &str) -> String {
        self.client_args
            .iter()
            .skip_while(|a| *a != name)
            .nth(1)
            .unwrap_or_else(|| panic!("{name} in serve's client line"))
            .clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for a child to exit (a bound on a hang, not a speed
/// check).
pub fn wait_for_exit(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// Online round trips as a test wants them: `on_round_trip` sees each
/// request and the in-memory channel and answers (or fails) in its place.
pub type RoundTrip = dyn Fn(
        &InMemoryChannel<ServerModel>,
        secinfer_protocol::MaskedInput,
    ) -> anyhow::Result<secinfer_protocol::MaskedOutput>
    + Send
    + Sync;

/// An in-memory channel whose online round trips go through a test's
/// closure and which may claim a message limit; everything else passes
/// through.
pub struct InterceptedChannel {
    pub inner: InMemoryChannel<ServerModel>,
    pub on_round_trip: Box<RoundTrip>,
    pub max_message_bytes: usize,
}

impl secinfer_protocol::Channel for InterceptedChannel {
    fn round_trip(
        &self,
        request: secinfer_protocol::MaskedInput,
    ) -> anyhow::Result<secinfer_protocol::MaskedOutput> {
        (self.on_round_trip)(&self.inner, request)
    }
    fn hello(&self, hello: secinfer_protocol::OfflineHello) -> anyhow::Result<()> {
        self.inner.hello(hello)
    }
    fn offline(
        &self,
        request: secinfer_protocol::MaskRequest,
        on_reply: &mut dyn FnMut(secinfer_protocol::ProductReply) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.inner.offline(request, on_reply)
    }
    fn ot(
        &self,
        message: secinfer_ot::OtMessage,
    ) -> anyhow::Result<Option<secinfer_ot::OtMessage>> {
        self.inner.ot(message)
    }
    fn send_private(
        &self,
        message: secinfer_protocol::private::PrivateMessage,
    ) -> anyhow::Result<()> {
        self.inner.send_private(message)
    }
    fn recv_private(&self) -> anyhow::Result<secinfer_protocol::private::PrivateMessage> {
        self.inner.recv_private()
    }
    fn traffic(&self) -> secinfer_protocol::Traffic {
        self.inner.traffic()
    }
    fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }
}
