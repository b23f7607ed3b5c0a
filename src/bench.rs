//! `secinfer bench`: convert a model, serve it and run the client in one
//! process (over loopback QUIC by default, or an in-memory channel), and
//! compare the secure predictions with plaintext tract on the original model.
//!
//! Offline material is made by the two-party HE phase (`"preprocessing":
//! "bfv"`), in batches of up to 8192 inferences (one per ciphertext
//! coefficient), each made when the online loop runs out; in the private
//! modes (`--reveal logits`, `argmax`) the correlations for the joint
//! nonlinear layers are made too (`"correlations": "iknp"`), in batches that
//! fit [`secinfer_tract_ext::client::DEFAULT_CORRELATION_BUDGET`]. Offline
//! (HE and OT apart) and online time are measured apart and together. With
//! `compare`, the same model also runs in `activations` mode and its report
//! rides along as `comparison`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ndarray::{ArrayD, Axis, IxDyn};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use secinfer_converter::{Converted, Options, convert_file};
use secinfer_model::Reveal;
use secinfer_ot::Demand;
use secinfer_protocol::{Channel, MaskedLinear};
use secinfer_tract_ext::client::DEFAULT_CORRELATION_BUDGET;
use secinfer_tract_ext::{ClientModel, InMemoryChannel, ServerModel};
use secinfer_transport::Loopback;

use crate::data::Dataset;

/// Where the inputs come from.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// a bundled data set by name
    Dataset(String),
    /// N inputs drawn uniformly in [-1, 1) with a fixed seed, in the model's declared input shape
    Random(usize),
}

/// How the bench's client reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// a QUIC server on 127.0.0.1 in the same process (TLS, token, framing)
    Quic,
    /// direct calls into the server session; bytes are counted, not sent
    Memory,
}

impl Transport {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Memory => "memory",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// original ONNX model
    pub model: PathBuf,
    /// inputs
    pub inputs: Inputs,
    /// use only the first N samples
    pub limit: Option<usize>,
    /// inferences per round trip
    pub batch: usize,
    /// inferences per offline (HE) batch; `None` picks [`auto_offline_batch`]
    /// (never more than the memory bounds allow)
    pub offline_batch: Option<usize>,
    /// how client and server talk
    pub transport: Transport,
    /// QUIC only: both ends send through an emulated link with this
    /// round-trip time (`bench --rtt-ms`)
    pub rtt: Option<std::time::Duration>,
    /// where the private modes' correlations come from (`bench --ot`)
    pub ot: secinfer_ot::Backend,
    /// single-sample predictions timed for the latency percentiles
    pub latency_samples: usize,
    /// online batch sizes to sweep (empty: no sweep)
    pub sweep: Vec<usize>,
    /// converter settings (including the reveal mode)
    pub options: Options,
    /// where the converted files go
    pub work_dir: PathBuf,
    /// in a private mode, also run the model in `activations` mode
    pub compare: bool,
    /// also run the predictions again on a new session whose background
    /// pool makes the offline material while they run (`bench --pipelined`)
    pub pipelined: bool,
}

/// The bench's result; field names are a fixed interface (JSON keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// the model file
    pub model: String,
    /// data set name, or "random"
    pub dataset: String,
    /// number of predictions
    pub n: usize,
    /// plaintext tract accuracy on the original model (None for random inputs)
    pub accuracy_plain: Option<f64>,
    /// secure accuracy (None for random inputs)
    pub accuracy_secure: Option<f64>,
    /// predictions whose argmax equals plaintext tract's
    pub agreement: usize,
    /// max |secure output − plaintext output| over all outputs (`None` in
    /// argmax mode: the client learns no output values)
    pub max_abs_error: Option<f64>,
    /// what the client learns: logits, argmax or activations
    #[serde(default = "activations")]
    pub reveal: String,
    /// where offline material came from
    pub preprocessing: String,
    /// where the correlations of the joint nonlinear layers came from
    /// (private modes: "silent" or "iknp")
    #[serde(default)]
    pub correlations: Option<String>,
    /// how client and server talk
    pub transport: String,
    /// inferences per round trip
    pub batch: usize,
    /// inferences per offline (HE) batch
    pub offline_batch: usize,
    /// end to end: offline and online phase, predictions per second
    pub predictions_per_s: f64,
    /// online phase only (client graph + masked evaluation), predictions per second
    pub online_predictions_per_s: f64,
    /// offline phase only (HE and correlations), predictions per second
    pub offline_predictions_per_s: f64,
    /// the HE part of the offline phase alone, predictions per second
    #[serde(default)]
    pub offline_he_predictions_per_s: f64,
    /// the correlations (OT) part of the offline phase alone, predictions per
    /// second (private modes)
    #[serde(default)]
    pub offline_ot_predictions_per_s: Option<f64>,
    /// plaintext tract on the original model, same batches, predictions per second
    pub plain_predictions_per_s: f64,
    /// online bytes per prediction, both directions
    pub bytes_online_per_prediction: f64,
    /// HE offline bytes per prediction, both directions (the public key included)
    pub bytes_offline_per_prediction: f64,
    /// correlations (OT extension) bytes per prediction, both directions
    #[serde(default)]
    pub bytes_ot_per_prediction: f64,
    /// messages the client waits for during one batch: the round trips every
    /// prediction goes through, whatever the batch size
    #[serde(default)]
    pub round_trips_per_prediction: f64,
    /// latency of one prediction (batch 1, material ready: the online phase),
    /// milliseconds
    #[serde(default)]
    pub latency_ms: Latency,
    /// one prediction from nothing: a new client connects (over QUIC: a new
    /// connection and session), makes its own material for one inference
    /// (HE and, in the private modes, correlations) and predicts; the median
    /// of [`COLD_RUNS`] runs, milliseconds, and the offline bytes of one
    #[serde(default)]
    pub cold_latency_ms: f64,
    /// bytes of a cold prediction's offline phase (HE and correlations, both
    /// directions; online bytes are as for any prediction)
    #[serde(default)]
    pub cold_offline_bytes: f64,
    /// online and plaintext throughput per batch size (with `--sweep-batch`)
    #[serde(default)]
    pub sweep: Vec<SweepPoint>,
    /// per-layer scales and headroom chosen by the converter
    pub layers: Vec<LayerSummary>,
    /// the same model in `activations` mode, same run (private modes, `compare`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Box<BenchReport>>,
    /// end to end with the phases overlapped (`--pipelined`): the same
    /// predictions on a new session whose background pool makes HE material
    /// and correlations while they run, timed from the pool's start to the
    /// last answer, predictions per second
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipelined_predictions_per_s: Option<f64>,
    /// predictions of the pipelined run whose class equals plaintext's
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipelined_agreement: Option<usize>,
}

/// Cold predictions timed for `cold_latency_ms`.
pub const COLD_RUNS: usize = 3;

fn activations() -> String {
    "activations".into()
}

/// Percentiles of single-prediction latency, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    /// median
    pub p50: f64,
    /// 95th percentile
    pub p95: f64,
    /// 99th percentile
    pub p99: f64,
    /// predictions timed
    pub samples: usize,
}

impl Latency {
    /// Percentiles (nearest rank) of `times`.
    pub fn of(mut times: Vec<Duration>) -> Latency {
        if times.is_empty() {
            return Latency::default();
        }
        times.sort();
        let at = |q: f64| {
            let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
            times[rank - 1].as_secs_f64() * 1e3
        };
        Latency {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            samples: times.len(),
        }
    }
}

/// Throughput at one online batch size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SweepPoint {
    /// inferences per round trip
    pub batch: usize,
    /// predictions run at this size
    pub n: usize,
    /// secure, online phase only, predictions per second
    pub online_predictions_per_s: f64,
    /// plaintext tract, same batches, predictions per second
    pub plain_predictions_per_s: f64,
}

/// Predictions run per swept batch size (at least one batch).
pub const SWEEP_PREDICTIONS: usize = 1000;

/// One SecureLinear op as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSummary {
    /// op id
    pub op: u32,
    /// original node and op type
    pub source: String,
    /// fractional bits of input and weights
    pub frac_bits: (u32, u32),
    /// spare bits below overflow, worst case
    pub headroom_bits: f64,
}

/// The automatic offline batch for a model: the smallest batch whose
/// estimated cost per inference is near the best
/// ([`secinfer_protocol::offline::efficient_batch`]).
pub fn auto_offline_batch(layers: &[secinfer_model::LayerSpec]) -> anyhow::Result<usize> {
    let params = secinfer_protocol::params_for(layers)?;
    Ok(secinfer_protocol::offline::efficient_batch(
        &params, layers,
    )?)
}

fn plain_model(path: &Path) -> anyhow::Result<Arc<TypedRunnableModel>> {
    tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| anyhow::anyhow!("loading {} in tract: {e:#}", path.display()))
}

/// Declared input shape with the batch axis (if symbolic) set to `n`.
fn declared_input_shape(path: &Path, n: usize) -> anyhow::Result<(Vec<usize>, bool)> {
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_typed())
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let fact = model.input_fact(0).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let dims = fact.shape.to_tvec();
    let mut batched = false;
    let shape = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match d.to_usize() {
            Ok(v) => Ok(v),
            Err(_) if i == 0 => {
                batched = true;
                Ok(n)
            }
            Err(_) => bail!("input dimension {i} ({d}) is not fixed"),
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((shape, batched))
}

fn random_inputs(path: &Path, count: usize) -> anyhow::Result<(Dataset, bool)> {
    let (shape, batched) = declared_input_shape(path, 1)?;
    let per: usize = shape.iter().product();
    // A fixed seed: these are test inputs, not secrets.
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(0x5ec1_4fe2);
    let mut full = shape.clone();
    if batched {
        full[0] = count;
    } else {
        full.insert(0, count);
    }
    let data: Vec<f32> = (0..count * per)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
        .collect();
    let inputs = ArrayD::from_shape_vec(IxDyn(&full), data)?;
    Ok((
        Dataset {
            name: "random".into(),
            inputs,
            labels: vec![],
        },
        batched,
    ))
}

/// Index of the largest score (the first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// Converts and writes the model, printing nothing.
pub fn convert_into(model: &Path, dir: &Path, options: &Options) -> anyhow::Result<Converted> {
    let converted =
        convert_file(model, options).with_context(|| format!("converting {}", model.display()))?;
    converted.write(dir)?;
    Ok(converted)
}

/// What the bench is doing, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// an offline (HE) batch for this many inferences is starting
    Preprocessing {
        /// inferences in the batch
        count: usize,
    },
    /// correlations (OT) for this many inferences are being made
    Correlations {
        /// inferences
        count: usize,
    },
    /// the same model in activations mode, for comparison, is starting
    Comparison,
    /// the pipelined run (`--pipelined`) of this many predictions is starting
    Pipelined {
        /// predictions
        total: usize,
    },
    /// `done` of `total` predictions are finished
    Predicted {
        /// finished
        done: usize,
        /// all
        total: usize,
    },
}

/// Makes sure `n` inferences of material are ready (outside the timed runs;
/// normally the main run's batches already made it).
fn top_up<C: Channel + 'static>(
    client: &ClientModel<C>,
    n: usize,
    offline_batch: usize,
    per: &Demand,
) -> anyhow::Result<()> {
    let ready = client.backend().ready();
    if ready < n {
        client
            .backend()
            .preprocess_in_batches((n - ready).max(offline_batch), offline_batch)?;
    }
    ensure_correlations(client, n, per)?;
    Ok(())
}

/// Makes correlations for at least `n` inferences if fewer are ready
/// (private modes), but never more than the client's budget holds
/// ([`correlation_batch`]): a larger prediction makes the rest run by run,
/// as `predict` does, so that the server's per-session limit holds;
/// returns whether it made any.
fn ensure_correlations<C: Channel + 'static>(
    client: &ClientModel<C>,
    n: usize,
    per: &Demand,
) -> anyhow::Result<bool> {
    if per.is_zero() {
        return Ok(false);
    }
    let n = n.min(correlation_batch(per));
    let want = per
        .times(n as u64)
        .ok_or_else(|| anyhow::anyhow!("correlations for {n} inferences overflow"))?;
    let ready = client.backend().correlations_ready();
    if want.fits_in(&ready) {
        return Ok(false);
    }
    client.backend().make_correlations(want.shortfall(&ready))?;
    Ok(true)
}

/// Inferences per correlation batch: as many as fit the client's whole
/// correlation budget (the bench keeps no pool beside them), at least one.
pub fn correlation_batch(per: &Demand) -> usize {
    (DEFAULT_CORRELATION_BUDGET / per.stored_bytes().max(1)).clamp(1, 1 << 20) as usize
}

/// Runs the bench (and, with `compare` in a private mode, the same model in
/// `activations` mode after it).
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(Progress)) -> anyhow::Result<BenchReport> {
    let mut report = run_mode(cfg, &mut progress)?;
    if cfg.compare && cfg.options.reveal.is_private() {
        progress(Progress::Comparison);
        let plain = BenchConfig {
            options: Options {
                reveal: Reveal::Activations,
                ..cfg.options.clone()
            },
            sweep: vec![],
            compare: false,
            pipelined: false,
            work_dir: cfg.work_dir.join("activations"),
            ..cfg.clone()
        };
        report.comparison = Some(Box::new(run_mode(&plain, &mut progress)?));
    }
    Ok(report)
}

fn run_mode(cfg: &BenchConfig, progress: &mut dyn FnMut(Progress)) -> anyhow::Result<BenchReport> {
    let converted = convert_into(&cfg.model, &cfg.work_dir, &cfg.options)?;
    let server = Arc::new(ServerModel::load(&cfg.work_dir.join("server.onnx"))?);
    let client_path = cfg.work_dir.join("client.onnx");
    match cfg.transport {
        Transport::Memory => {
            let connect = || -> anyhow::Result<ClientModel<InMemoryChannel<ServerModel>>> {
                let client = ClientModel::load(&client_path, InMemoryChannel::new(server.clone()))?;
                client.backend().set_ot_backend(cfg.ot)?;
                Ok(client)
            };
            let client = connect()?;
            run_on(cfg, &converted, &server, &client, &connect, progress)
        }
        Transport::Quic => {
            let link = cfg.rtt.map(secinfer_transport::EmulatedLink::with_rtt);
            let lo =
                Loopback::start_over(server.clone(), server.digest(), Default::default(), link)?;
            let connect = || -> anyhow::Result<_> {
                let client = ClientModel::load_with(&client_path, |digest, _| lo.connect(digest))?;
                client.backend().set_ot_backend(cfg.ot)?;
                Ok(client)
            };
            let client = connect()?;
            let report = run_on(cfg, &converted, &server, &client, &connect, progress);
            drop(client);
            report
        }
    }
}

fn run_on<C: Channel + 'static>(
    cfg: &BenchConfig,
    converted: &Converted,
    server: &ServerModel,
    client: &ClientModel<C>,
    connect: &dyn Fn() -> anyhow::Result<ClientModel<C>>,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<BenchReport> {
    if client.digest() != server.digest() {
        bail!("client and server files come from different conversions");
    }
    let (data, batched) = match &cfg.inputs {
        Inputs::Dataset(name) => (crate::data::load(name)?, true),
        Inputs::Random(n) => random_inputs(&cfg.model, *n)?,
    };
    let total = data
        .inputs
        .len_of(Axis(0))
        .min(cfg.limit.unwrap_or(usize::MAX));
    if total == 0 {
        bail!("no samples to run");
    }
    let batch = if batched { cfg.batch.max(1) } else { 1 };
    let plain = plain_model(&cfg.model)?;
    let offline_batch = match cfg.offline_batch {
        Some(b) => b,
        None => auto_offline_batch(server.layers())?,
    }
    .clamp(1, client.backend().max_batch()?);
    let mut offline = Duration::ZERO;
    let all_batched = server.layers().iter().all(|l| l.batched);
    let sweep: Vec<usize> = if all_batched && batched {
        cfg.sweep.iter().map(|&b| b.clamp(1, total)).collect()
    } else {
        vec![]
    };
    let sweep_runs: Vec<(usize, usize)> = sweep
        .iter()
        .map(|&b| (b, b * SWEEP_PREDICTIONS.min(total).div_ceil(b)))
        .collect();
    // Material for the latency and sweep runs rides along in the main run's
    // offline batches (a batch costs the same for any size), so offline time
    // covers it too: the offline rate is, if anything, understated.
    let extra = cfg.latency_samples + sweep_runs.iter().map(|&(_, m)| m).sum::<usize>();
    // Correlations per inference (private modes; zero in activations mode).
    let per = match client.program() {
        Some(p) => secinfer_protocol::private::program_cost(p, client.layers(), 1)?.demand,
        None => Demand::default(),
    };
    let ot_batch = correlation_batch(&per);
    let mut offline_ot = Duration::ZERO;

    let (mut correct_plain, mut correct_secure, mut agreement) = (0, 0, 0);
    let mut max_abs_error = 0f64;
    let index_output = client.reveal() == Reveal::Argmax;
    let (mut online, mut plain_time) = (Duration::ZERO, Duration::ZERO);
    // plaintext's class of every sample, for the pipelined run's agreement
    let mut plain_classes = Vec::with_capacity(total);
    // samples `at..at + n` as one input
    let batch_input = |at: usize, n: usize| -> Tensor {
        let slice = data
            .inputs
            .slice_axis(Axis(0), (at..at + n).into())
            .to_owned();
        if batched {
            slice.into_tensor()
        } else {
            // Unbatched models take their declared shape whole: drop the sample axis.
            slice.index_axis(Axis(0), 0).to_owned().into_tensor()
        }
    };
    let mut done = 0;
    while done < total {
        let n = batch.min(total - done);
        let input = batch_input(done, n);
        let inferences = if all_batched { n } else { 1 };
        // Each run uses `inferences` ids (n, or 1 for an unbatched model with
        // batch 1), so the runs left need `total - done` ids in all.
        while client.backend().ready() < inferences {
            let needed = (total - done + extra).saturating_sub(client.backend().ready());
            let count = offline_batch.min(needed).max(1);
            progress(Progress::Preprocessing { count });
            let t = Instant::now();
            client.backend().preprocess(count)?;
            offline += t.elapsed();
        }
        let want = ot_batch.min(total - done + extra).max(inferences);
        if !per.is_zero()
            && !per
                .times(inferences as u64)
                .is_some_and(|d| d.fits_in(&client.backend().correlations_ready()))
        {
            progress(Progress::Correlations { count: want });
            let t = Instant::now();
            ensure_correlations(client, want, &per)?;
            offline_ot += t.elapsed();
        }
        let t = Instant::now();
        let reference = plain
            .run(tvec!(input.clone().into_tvalue()))
            .map_err(|e| anyhow::anyhow!("plaintext run: {e:#}"))?;
        plain_time += t.elapsed();
        let t = Instant::now();
        let secure = client.predict(tvec!(input.into_tvalue()))?;
        online += t.elapsed();

        let r = reference[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if index_output {
            // argmax mode: the client holds one class index per sample
            let idx = secure[0]
                .cast_to::<i64>()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?
                .into_owned();
            let idx = idx
                .to_plain_array_view::<i64>()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?
                .iter()
                .copied()
                .collect::<Vec<_>>();
            if idx.len() != n {
                bail!("argmax mode returned {} indices for {n} samples", idx.len());
            }
            let per_sample = r.len() / n;
            let r: Vec<f32> = r.iter().copied().collect();
            for (i, &class) in idx.iter().enumerate() {
                let ra = argmax(&r[i * per_sample..(i + 1) * per_sample]);
                plain_classes.push(ra);
                agreement += usize::from(ra as i64 == class);
                if let Some(&label) = data.labels.get(done + i) {
                    correct_plain += usize::from(ra == label);
                    correct_secure += usize::from(class == label as i64);
                }
            }
            done += n;
            progress(Progress::Predicted { done, total });
            continue;
        }
        let s = secure[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if r.shape() != s.shape() {
            bail!(
                "secure output shape {:?} differs from plaintext {:?}",
                s.shape(),
                r.shape()
            );
        }
        let per = r.len() / n;
        let (r, s) = (
            r.iter().copied().collect::<Vec<_>>(),
            s.iter().copied().collect::<Vec<_>>(),
        );
        for i in 0..n {
            let (ri, si) = (&r[i * per..(i + 1) * per], &s[i * per..(i + 1) * per]);
            let (ra, sa) = (argmax(ri), argmax(si));
            plain_classes.push(ra);
            agreement += usize::from(ra == sa);
            if let Some(&label) = data.labels.get(done + i) {
                correct_plain += usize::from(ra == label);
                correct_secure += usize::from(sa == label);
            }
            for (a, b) in ri.iter().zip(si) {
                max_abs_error = max_abs_error.max(f64::from((a - b).abs()));
            }
        }
        done += n;
        progress(Progress::Predicted { done, total });
    }
    let traffic = client.backend().channel().traffic();

    // Latency: single samples, material ready, one after another.
    let sample = |i: usize| -> Tensor {
        let one = data.inputs.index_axis(Axis(0), i % total).to_owned();
        if batched {
            one.insert_axis(Axis(0)).into_tensor()
        } else {
            one.into_tensor()
        }
    };
    let mut times = Vec::with_capacity(cfg.latency_samples);
    for i in 0..cfg.latency_samples {
        top_up(client, 1, offline_batch, &per)?;
        let input = sample(i);
        let t = Instant::now();
        client.predict(tvec!(input.into_tvalue()))?;
        times.push(t.elapsed());
    }
    let latency_ms = Latency::of(times);

    // Cold: a new client, its own material for one inference, one prediction.
    let mut cold = Vec::with_capacity(COLD_RUNS);
    let mut cold_offline_bytes = 0.0;
    for i in 0..COLD_RUNS {
        let t = Instant::now();
        let fresh = connect()?;
        fresh.backend().preprocess(1)?;
        ensure_correlations(&fresh, 1, &per)?;
        fresh.predict(tvec!(sample(i).into_tvalue()))?;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let tr = fresh.backend().channel().traffic();
        cold_offline_bytes = (tr.offline_up + tr.offline_down + tr.ot_up + tr.ot_down) as f64;
    }
    cold.sort_by(f64::total_cmp);
    let cold_latency_ms = cold[cold.len() / 2];

    // Pipelined: a new session whose background pool makes HE material and
    // correlations while the same predictions run, in the same batches, as
    // an application using the pool would; from the pool's start to the
    // last answer. The pool's batches are the main run's offline batches.
    let (pipelined_predictions_per_s, pipelined_agreement) = if cfg.pipelined {
        progress(Progress::Pipelined { total });
        let fresh = connect()?;
        let t = Instant::now();
        let pool = secinfer_tract_ext::PreprocessingPool::start(
            fresh.backend().clone(),
            secinfer_protocol::PoolPolicy {
                batch: offline_batch,
                low_water: batch.min(offline_batch),
            },
        )?;
        let (mut at, mut agree) = (0, 0);
        let mut outputs = Vec::new();
        while at < total {
            let n = batch.min(total - at);
            let input = batch_input(at, n);
            outputs.push((at, n, fresh.predict(tvec!(input.into_tvalue()))?));
            at += n;
        }
        let elapsed = t.elapsed();
        pool.stop();
        for (at, n, out) in outputs {
            let classes = classes_of(&out[0], n, index_output)?;
            for (i, c) in classes.into_iter().enumerate() {
                agree += usize::from(plain_classes.get(at + i) == Some(&c));
            }
        }
        (
            Some(total as f64 / elapsed.as_secs_f64().max(1e-9)),
            Some(agree),
        )
    } else {
        (None, None)
    };

    // Sweep: the same samples in batches of each size, secure and plaintext.
    let mut points = Vec::new();
    for &(b, m) in &sweep_runs {
        let (mut secure_time, mut plain_sweep) = (Duration::ZERO, Duration::ZERO);
        let mut at = 0;
        while at < m {
            let k = b.min(m - at);
            let idx: Vec<usize> = (at..at + k).map(|i| i % total).collect();
            let input = data.inputs.select(Axis(0), &idx).into_tensor();
            top_up(client, k, offline_batch, &per)?;
            let t = Instant::now();
            plain
                .run(tvec!(input.clone().into_tvalue()))
                .map_err(|e| anyhow::anyhow!("plaintext run: {e:#}"))?;
            plain_sweep += t.elapsed();
            let t = Instant::now();
            client.predict(tvec!(input.into_tvalue()))?;
            secure_time += t.elapsed();
            at += k;
        }
        points.push(SweepPoint {
            batch: b,
            n: m,
            online_predictions_per_s: m as f64 / secure_time.as_secs_f64().max(1e-9),
            plain_predictions_per_s: m as f64 / plain_sweep.as_secs_f64().max(1e-9),
        });
    }
    let has_labels = !data.labels.is_empty();
    let acc = |c: usize| has_labels.then(|| c as f64 / total as f64);
    let round_trips = match client.program() {
        Some(_) => {
            let s = client.backend().run_stats();
            s.round_trips as f64 / s.batches.max(1) as f64
        }
        // one round trip per linear op and batch
        None => client.layers().len() as f64,
    };
    let rate = |d: Duration| total as f64 / d.as_secs_f64().max(1e-9);
    Ok(BenchReport {
        model: cfg.model.display().to_string(),
        dataset: data.name,
        n: total,
        accuracy_plain: acc(correct_plain),
        accuracy_secure: acc(correct_secure),
        agreement,
        max_abs_error: (!index_output).then_some(max_abs_error),
        reveal: client.reveal().as_str().into(),
        preprocessing: "bfv".into(),
        correlations: client
            .program()
            .map(|_| client.backend().ot_backend().name().to_string()),
        transport: match (cfg.transport, cfg.rtt) {
            (Transport::Quic, Some(rtt)) => {
                format!("quic over an emulated link of {} ms RTT", rtt.as_millis())
            }
            (t, _) => t.name().into(),
        },
        batch,
        offline_batch,
        predictions_per_s: rate(online + offline + offline_ot),
        online_predictions_per_s: rate(online),
        offline_predictions_per_s: rate(offline + offline_ot),
        offline_he_predictions_per_s: rate(offline),
        offline_ot_predictions_per_s: client.program().map(|_| rate(offline_ot)),
        plain_predictions_per_s: rate(plain_time),
        bytes_online_per_prediction: (traffic.online_up + traffic.online_down) as f64
            / total as f64,
        bytes_offline_per_prediction: (traffic.offline_up + traffic.offline_down) as f64
            / total as f64,
        bytes_ot_per_prediction: (traffic.ot_up + traffic.ot_down) as f64 / total as f64,
        round_trips_per_prediction: round_trips,
        latency_ms,
        cold_latency_ms,
        cold_offline_bytes,
        sweep: points,
        layers: converted
            .layers
            .iter()
            .map(|l| LayerSummary {
                op: l.spec.op_id,
                source: format!("{} '{}'", l.spec.source_op, l.spec.source_node),
                frac_bits: (l.spec.input_frac_bits, l.spec.weight_frac_bits),
                headroom_bits: l.headroom_bits,
            })
            .collect(),
        comparison: None,
        pipelined_predictions_per_s,
        pipelined_agreement,
    })
}

/// The class of each of the `n` samples in a secure output: the index
/// itself in argmax mode, the largest value's index otherwise.
fn classes_of(out: &TValue, n: usize, index_output: bool) -> anyhow::Result<Vec<usize>> {
    let classes: Vec<usize> = if index_output {
        let idx = out
            .cast_to::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?
            .into_owned();
        idx.to_plain_array_view::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?
            .iter()
            .map(|&c| usize::try_from(c).unwrap_or(usize::MAX))
            .collect()
    } else {
        let v = out
            .to_plain_array_view::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let v: Vec<f32> = v.iter().copied().collect();
        if n == 0 || !v.len().is_multiple_of(n) {
            bail!("the secure output holds {} values for {n} samples", v.len());
        }
        let per = v.len() / n;
        (0..n).map(|i| argmax(&v[i * per..(i + 1) * per])).collect()
    };
    if classes.len() != n {
        bail!(
            "the secure output holds {} classes for {n} samples",
            classes.len()
        );
    }
    Ok(classes)
}

impl BenchReport {
    /// The human summary.
    pub fn summary(&self) -> String {
        let pct = |v: Option<f64>| {
            v.map(|v| format!("{:.2} %", v * 100.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let reveal: Reveal = self.reveal.parse().unwrap_or(Reveal::Activations);
        let mut out = format!(
            "model            {}\n\
             reveal           {} ({})\n\
             data             {} ({} predictions, batch {})\n\
             accuracy         plaintext {}   secure {}\n\
             argmax agreement {}/{}\n\
             max |error|      {}\n\
             throughput       {:.1} predictions/s end to end (offline {:.1}/s: HE {:.1}/s{}; online {:.0}/s)   plaintext tract {:.0}/s\n\
             latency          p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (one prediction, online, {} timed), {:.0} round trips\n\
             cold             {:.0} ms from connect to answer for one prediction with its own offline phase ({:.0} offline bytes; median of {})\n\
             bytes            {:.0} per prediction: HE offline {:.0}, OT offline {:.0}, online {:.0}\n\
             preprocessing    {} (two-party, lattice HE; offline batches of up to {}){}\n\
             transport        {}",
            self.model,
            self.reveal,
            crate::report::what_is_revealed(reveal),
            self.dataset,
            self.n,
            self.batch,
            pct(self.accuracy_plain),
            pct(self.accuracy_secure),
            self.agreement,
            self.n,
            self.max_abs_error
                .map_or("n/a (argmax mode reveals no values)".into(), |e| format!(
                    "{e:.3e}"
                )),
            self.predictions_per_s,
            self.offline_predictions_per_s,
            self.offline_he_predictions_per_s,
            self.offline_ot_predictions_per_s
                .map_or(String::new(), |r| format!(", correlations {r:.1}/s")),
            self.online_predictions_per_s,
            self.plain_predictions_per_s,
            self.latency_ms.p50,
            self.latency_ms.p95,
            self.latency_ms.p99,
            self.latency_ms.samples,
            self.round_trips_per_prediction,
            self.cold_latency_ms,
            self.cold_offline_bytes,
            COLD_RUNS,
            self.bytes_offline_per_prediction
                + self.bytes_ot_per_prediction
                + self.bytes_online_per_prediction,
            self.bytes_offline_per_prediction,
            self.bytes_ot_per_prediction,
            self.bytes_online_per_prediction,
            self.preprocessing,
            self.offline_batch,
            self.correlations
                .as_ref()
                .map_or(String::new(), |c| format!(
                    ", correlations by {c} OT extension"
                )),
            self.transport
        );
        if reveal == Reveal::Activations {
            out.push_str(&format!(
                "\nWARNING          {}",
                Reveal::ACTIVATIONS_WARNING
            ));
        }
        if let Some(p) = self.pipelined_predictions_per_s {
            out.push_str(&format!(
                "\npipelined        {p:.1} predictions/s end to end with the phases overlapped (a new session; its background pool makes HE material and correlations while the same predictions run); agreement {}/{}",
                self.pipelined_agreement.unwrap_or(0),
                self.n
            ));
        }
        if let Some(c) = &self.comparison {
            out.push_str(&format!(
                "\nactivations mode (same model, same run, for comparison; the client could reconstruct the weights):\n\
                 \x20                agreement {}/{}, {:.1} predictions/s end to end (online {:.0}/s), {:.0} bytes per prediction, {:.0} round trips",
                c.agreement,
                c.n,
                c.predictions_per_s,
                c.online_predictions_per_s,
                c.bytes_offline_per_prediction + c.bytes_online_per_prediction,
                c.round_trips_per_prediction
            ));
        }
        out + &self
            .sweep
            .iter()
            .map(|p| {
                format!(
                    "\nsweep batch {:>5}  online {:>9.0}/s   plaintext {:>10.0}/s   ({:.1} %)",
                    p.batch,
                    p.online_predictions_per_s,
                    p.plain_predictions_per_s,
                    100.0 * p.online_predictions_per_s / p.plain_predictions_per_s.max(1e-9)
                )
            })
            .collect::<String>()
    }
}
