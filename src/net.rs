//! `secinfer serve` and `secinfer predict`: the server and the client over
//! QUIC, as separate processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ndarray::Axis;
use tract_onnx::prelude::*;

use secinfer_protocol::MaskedLinear;
use secinfer_tract_ext::{ClientModel, ServerModel};
use secinfer_transport::{
    ClientConfig, Identity, Limits, QuicChannel, Server, ServerConfig, TokenSet, Trust,
};

/// `println!` that ignores a closed or failing stdout: a server whose log
/// reader went away (`secinfer serve | head`, a supervisor that closed the
/// pipe) keeps serving.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// the server model
    pub model: PathBuf,
    /// address to listen on
    pub listen: std::net::SocketAddr,
    /// where the generated certificate, key and token file live
    pub state_dir: PathBuf,
    /// a CA-issued certificate chain and key (PEM) instead of the generated pair
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// token file (default: STATE_DIR/tokens)
    pub tokens: Option<PathBuf>,
    /// limits
    pub limits: Limits,
}

/// Runs the server until Ctrl-C.
pub fn serve(mut opts: ServeOptions) -> anyhow::Result<()> {
    let model = Arc::new(ServerModel::load(&opts.model)?);
    // the HE context every session shares, built now so that it is part of
    // the server's own memory, which the budget's pools leave room for
    secinfer_protocol::params_for(model.layers())?;
    // likewise the silent-OT code's index table, shared by private sessions
    if secinfer_protocol::MaskedLinear::program(&*model).is_some() {
        secinfer_ot::silent::prepare_code(&secinfer_ot::silent::DEFAULT_LPN)?;
    }
    let own = resident_bytes().unwrap_or(0);
    opts.limits = within_budget(opts.limits, own)?;
    let (identity, generated) = match &opts.cert_key {
        Some((cert, key)) => (Identity::from_pem_files(cert, key)?, false),
        None => Identity::load_or_generate(&opts.state_dir)?,
    };
    let token_path = opts
        .tokens
        .clone()
        .unwrap_or_else(|| opts.state_dir.join("tokens"));
    if let Some(dir) = token_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (tokens, new_token) = TokenSet::load_or_create(&token_path)?;
    let fingerprint = identity.fingerprint();
    let digest = model.digest().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("secinfer-server")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::start(
            ServerConfig {
                listen: opts.listen,
                identity,
                tokens,
                limits: opts.limits.clone(),
                emulated_link: None,
            },
            model.clone(),
            digest.clone(),
        )?;
        let addr = server.local_addr()?;
        say!(
            "serving {} ({} SecureLinear ops, model digest {digest})",
            opts.model.display(),
            model.layers().len()
        );
        let reveal = model
            .program()
            .map_or(secinfer_model::Reveal::Activations, |p| p.reveal);
        say!(
            "--reveal {reveal}: {}",
            crate::report::what_is_revealed(reveal)
        );
        if !reveal.is_private() {
            say!("WARNING: {}", secinfer_model::Reveal::ACTIVATIONS_WARNING);
        }
        say!("listening on {addr} (QUIC, TLS 1.3)");
        if generated {
            say!(
                "generated a self-signed certificate in {}",
                opts.state_dir.display()
            );
        }
        say!("certificate fingerprint {fingerprint}");
        match &new_token {
            Some(t) => say!("new API token (saved in {}): {t}", token_path.display()),
            None => say!("API tokens are read from {}", token_path.display()),
        }
        say!(
            "clients: secinfer predict --server {addr} --fingerprint {fingerprint} --token-file {} --model DIR/client.onnx INPUT...",
            token_path.display()
        );
        let mib = |b: u64| b >> 20;
        say!(
            "memory budget {} MiB: {} MiB the server's own (model, HE context, runtime, with room to grow), {} MiB HE work and stored material, {} MiB frames and connection buffers",
            mib(opts.limits.max_memory_bytes + opts.limits.max_decoding_bytes + headroom(own)),
            mib(headroom(own)),
            mib(opts.limits.max_memory_bytes),
            mib(opts.limits.max_decoding_bytes)
        );
        say!("Ctrl-C or SIGTERM stops the server after the requests in progress.");
        server.run_until_signal().await
    })
}

/// This process's resident memory (`VmRSS` in /proc/self/status).
fn resident_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
}

/// What the server keeps for itself out of `--max-memory-mib`: what it
/// holds once its model and HE context are loaded, half as much again, and
/// 64 MiB for what no pool counts: worker threads' stacks, the allocator's
/// arenas and retained pages (bounded by `serve`'s allocator settings,
/// `bound_allocator_retention` in main.rs), a decoded message while it is
/// answered.
fn headroom(own: u64) -> u64 {
    own + own / 2 + (64 << 20)
}

/// Shrinks the two pools of `limits` (which share the whole
/// `--max-memory-mib` three to one) so that, with the server's own memory
/// (`own` resident bytes, [`headroom`]), the process stays within the
/// budget.
fn within_budget(mut limits: Limits, own: u64) -> anyhow::Result<Limits> {
    let total = limits.max_memory_bytes + limits.max_decoding_bytes;
    let room = total.saturating_sub(headroom(own));
    if room < 32 << 20 {
        bail!(
            "--max-memory-mib {}: the server itself takes ~{} MiB with this model; give it at least {} MiB",
            total >> 20,
            headroom(own) >> 20,
            (headroom(own) >> 20) + 32
        );
    }
    limits.max_memory_bytes = room / 4 * 3;
    limits.max_decoding_bytes = room / 4;
    Ok(limits)
}

/// Samples per online run of `predict`.
const PREDICT_RUN: usize = 256;

/// Inputs `predict` preprocesses and then predicts at a time: the cost
/// model's most efficient batch (at least one online run), within the
/// memory bounds and the server's per-session limit.
fn predict_chunk<C: secinfer_protocol::Channel + 'static>(
    client: &ClientModel<C>,
) -> anyhow::Result<usize> {
    let max = client.backend().max_batch()?;
    let layers = client.layers();
    let params = secinfer_protocol::params_for(layers)?;
    let efficient = secinfer_protocol::offline::efficient_batch(&params, layers)?;
    Ok(efficient.max(PREDICT_RUN).min(max).max(1))
}

/// What `predict` needs.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// `host:port`
    pub server: String,
    /// the client model
    pub model: PathBuf,
    /// how the server is trusted
    pub trust: Trust,
    /// name in the server certificate (CA trust)
    pub server_name: Option<String>,
    /// API token
    pub token: String,
    /// input files
    pub inputs: Vec<PathBuf>,
    /// print every score, not just the class
    pub scores: bool,
}

/// Connects to the server with `opts`' model, trust and token.
fn connect(opts: &PredictOptions) -> anyhow::Result<ClientModel<QuicChannel>> {
    ClientModel::load_with(&opts.model, |digest, reveal| {
        let mut cfg = ClientConfig::new(
            &opts.server,
            opts.trust.clone(),
            &opts.token,
            digest,
            reveal.as_str(),
        );
        cfg.server_name = opts.server_name.clone();
        QuicChannel::connect(&cfg)
    })
}

/// Times `predict` starts over after losing its connection, and how long it
/// tries to reconnect each time (a restarting server needs some seconds).
const MAX_RECONNECTS: usize = 5;
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether `e` means the session is gone rather than the request wrong.
fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<secinfer_transport::ConnectionLost>()
            .is_some()
    })
}

/// Connects again, with backoff, for up to [`RECONNECT_FOR`].
fn reconnect(opts: &PredictOptions) -> anyhow::Result<ClientModel<QuicChannel>> {
    let start = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match connect(opts) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() + wait < RECONNECT_FOR => {
                eprintln!(
                    "reconnecting: {e:#}; trying again in {:.1} s",
                    wait.as_secs_f64()
                );
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(8));
            }
            Err(e) => return Err(e.context("reconnecting after the connection was lost")),
        }
    }
}

/// Preprocesses (HE) and predicts samples `at..end`; returns their outputs.
fn predict_range(
    client: &ClientModel<QuicChannel>,
    data: &ndarray::ArrayD<f32>,
    batched: bool,
    (at, end, n): (usize, usize, usize),
    progress: &crate::progress::Spinner,
) -> anyhow::Result<Vec<Vec<f32>>> {
    progress.set(format!(
        "offline phase: HE preprocessing for inputs {}..{end} of {n}",
        at + 1
    ));
    client
        .backend()
        .preprocess_in_batches(end - at, end - at)
        .context("offline phase")?;
    progress.set(if client.program().is_some() {
        "online phase (joint evaluation; correlations are made as they are needed)".into()
    } else {
        "online phase".into()
    });
    let mut outputs = Vec::with_capacity(end - at);
    if batched {
        // Runs of at most PREDICT_RUN samples keep every message well
        // below the frame limit, whatever the number of inputs.
        let mut i = at;
        while i < end {
            let r = PREDICT_RUN.min(end - i);
            let run = data.slice_axis(Axis(0), (i..i + r).into()).to_owned();
            let out = client.predict(tvec!(run.into_tensor().into_tvalue()))?;
            outputs.extend(split_rows(&out[0], r)?);
            i += r;
        }
    } else {
        for i in at..end {
            let one = data.index_axis(Axis(0), i).to_owned();
            let out = client.predict(tvec!(one.into_tensor().into_tvalue()))?;
            outputs.extend(split_rows(&out[0], 1)?);
        }
    }
    Ok(outputs)
}

/// Predicts the class of every input sample. If the connection is lost (the
/// server restarted, shut down or stopped answering), it reconnects and
/// redoes the inputs whose answers it did not have, with new offline
/// material: a new session shares nothing with the old one.
pub fn predict(opts: PredictOptions) -> anyhow::Result<()> {
    let progress = crate::progress::Spinner::new("connecting");
    let mut client = connect(&opts)?;
    let declared = client.input_shape()?;
    let batched = declared.first().is_some_and(Option::is_none);
    let sample: Vec<usize> = declared
        .iter()
        .skip(usize::from(batched))
        .map(|d| d.context("the model's input has a symbolic dimension other than the batch"))
        .collect::<anyhow::Result<_>>()?;
    let samples = crate::inputs::read_all(&opts.inputs, &sample)?;
    let n = samples.names.len();
    // One inference per sample, batched or not. The inputs go through in
    // chunks, each preprocessed (HE) and then predicted, so that any number
    // of inputs fits the server's per-session limit and the client holds
    // one chunk's material at a time.
    let chunk = predict_chunk(&client)?;
    let index_only = client.reveal() == secinfer_model::Reveal::Argmax;
    let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(n);
    let mut reconnects = 0;
    while outputs.len() < n {
        let at = outputs.len();
        let end = (at + chunk).min(n);
        match predict_range(&client, &samples.data, batched, (at, end, n), &progress) {
            Ok(out) => outputs.extend(out),
            Err(e) if connection_lost(&e) && reconnects < MAX_RECONNECTS => {
                reconnects += 1;
                progress.set("reconnecting".into());
                eprintln!(
                    "connection lost ({e:#}); reconnecting to redo inputs {}..{end}",
                    at + 1
                );
                client = reconnect(&opts)?;
            }
            Err(e) => return Err(e),
        }
    }
    progress.finish();
    // A closed pipe (`predict ... | head`) ends the output quietly.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if index_only && opts.scores {
        eprintln!(
            "note: --scores: this model was converted with --reveal argmax, so the server reveals only the class"
        );
    }
    for (name, scores) in samples.names.iter().zip(&outputs) {
        let class = if index_only {
            scores.first().map_or(0, |&c| c as usize)
        } else {
            crate::bench::argmax(scores)
        };
        let line = if opts.scores && !index_only {
            let s: Vec<String> = scores.iter().map(|v| format!("{v:.4}")).collect();
            writeln!(out, "{name}: class {class}  scores [{}]", s.join(", "))
        } else {
            writeln!(out, "{name}: class {class}")
        };
        if line.is_err() {
            break;
        }
    }
    Ok(())
}

fn split_rows(t: &TValue, n: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    // argmax mode answers with INT64 class indices
    let t = t
        .cast_to::<f32>()
        .map_err(|e| anyhow::anyhow!("model output: {e:#}"))?;
    let v = t
        .to_plain_array_view::<f32>()
        .map_err(|e| anyhow::anyhow!("model output: {e:#}"))?;
    let flat: Vec<f32> = v.iter().copied().collect();
    if n == 0 || !flat.len().is_multiple_of(n) {
        bail!(
            "model output of {} values does not split into {n} samples",
            flat.len()
        );
    }
    Ok(flat.chunks(flat.len() / n).map(<[f32]>::to_vec).collect())
}

/// The token from the flag, the file or the environment, in that order.
pub fn resolve_token(token: Option<String>, file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(t) = token {
        return Ok(t);
    }
    if let Some(f) = file {
        return secinfer_transport::auth::read_token(f);
    }
    if let Ok(t) = std::env::var("SECINFER_TOKEN") {
        return Ok(t);
    }
    bail!(
        "no API token: give --token, --token-file or set SECINFER_TOKEN (serve prints where its tokens are)"
    )
}

/// `serve`'s limit flags, as given.
#[derive(Debug, Clone, Copy)]
pub struct LimitFlags {
    /// `--max-sessions`
    pub max_sessions: usize,
    /// `--max-frame-mib`
    pub max_frame_mib: usize,
    /// `--max-pending`
    pub max_pending: usize,
    /// `--max-correlation-mib`
    pub max_correlation_mib: u64,
    /// `--he-jobs`
    pub he_jobs: usize,
    /// `--idle-timeout`, seconds
    pub idle_timeout_s: u64,
    /// `--session-idle-timeout`, seconds
    pub session_idle_timeout_s: u64,
    /// `--max-session-lifetime`, seconds
    pub max_session_lifetime_s: u64,
    /// `--shutdown-grace`, seconds
    pub shutdown_grace_s: u64,
    /// `--frame-timeout`, seconds
    pub frame_timeout_s: u64,
    /// `--max-memory-mib` (default: half the machine's memory)
    pub max_memory_mib: Option<u64>,
}

/// `--ot-backends`: each name once, at least one.
pub fn ot_backends(names: &[String]) -> anyhow::Result<Vec<secinfer_ot::Backend>> {
    let mut accepted = Vec::new();
    for name in names {
        let backend: secinfer_ot::Backend = name
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("--ot-backends: {e}"))?;
        if !accepted.contains(&backend) {
            accepted.push(backend);
        }
    }
    if accepted.is_empty() {
        bail!("--ot-backends: name at least one of silent and iknp");
    }
    Ok(accepted)
}

/// Limits from command-line values.
pub fn limits(f: &LimitFlags) -> anyhow::Result<Limits> {
    if f.max_sessions == 0 || f.he_jobs == 0 || f.max_frame_mib == 0 || f.max_pending == 0 {
        bail!("session, frame, pending and HE-job limits must be at least 1");
    }
    let least = secinfer_protocol::DEFAULT_MAX_OT_BYTES >> 20;
    if f.max_correlation_mib < least {
        bail!(
            "--max-correlation-mib {}: at least {least} (what a client keeps ready and makes for one run, {} MiB, beside the buffers of its largest correlation request, ~222 MiB)",
            f.max_correlation_mib,
            secinfer_tract_ext::client::DEFAULT_CORRELATION_BUDGET >> 20
        );
    }
    if f.idle_timeout_s < 5 {
        bail!(
            "--idle-timeout {}: at least 5 s (clients ping every 2 s)",
            f.idle_timeout_s
        );
    }
    if f.session_idle_timeout_s == 0 || f.max_session_lifetime_s == 0 || f.frame_timeout_s == 0 {
        bail!("--session-idle-timeout, --max-session-lifetime and --frame-timeout: at least 1 s");
    }
    if f.max_frame_mib > 1024 {
        bail!("--max-frame-mib {}: at most 1024", f.max_frame_mib);
    }
    let budget = match f.max_memory_mib {
        Some(m) if m < 64 => bail!("--max-memory-mib {m}: at least 64"),
        Some(m) => m << 20,
        None => secinfer_transport::default_max_memory(),
    };
    // three quarters for HE work and stored material, a quarter for frames
    // and connection buffers
    let max_memory_bytes = budget / 4 * 3;
    let max_decoding_bytes = budget / 4;
    Ok(Limits {
        max_sessions: f.max_sessions,
        max_frame_bytes: f.max_frame_mib << 20,
        max_pending_inferences: f.max_pending,
        max_correlation_bytes: f.max_correlation_mib << 20,
        concurrent_he_jobs: f.he_jobs,
        idle_timeout: Duration::from_secs(f.idle_timeout_s),
        session_idle_timeout: Duration::from_secs(f.session_idle_timeout_s),
        max_session_lifetime: Duration::from_secs(f.max_session_lifetime_s),
        shutdown_grace: Duration::from_secs(f.shutdown_grace_s),
        frame_timeout: Duration::from_secs(f.frame_timeout_s),
        max_memory_bytes,
        max_decoding_bytes,
        ..Limits::default()
    })
}
