//! The `secinfer` command line: convert, serve, predict, bench, demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use secinfer::bench::{self, BenchConfig, Inputs, Transport};
use secinfer::net;
use secinfer_converter::Options;

#[derive(Parser)]
#[command(
    name = "secinfer",
    version,
    about = "Private neural-network inference: ONNX in, exact secure linear layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConvertArgs {
    /// Ring Z_2^k of the secure linear layers.
    #[arg(long, default_value_t = secinfer_model::DEFAULT_RING_BITS)]
    ring_bits: u32,
    /// Largest |value| entering any secure linear layer; the fixed-point
    /// scales guarantee no overflow up to it, and larger inputs are refused.
    #[arg(long, default_value_t = Options::default().input_bound)]
    input_bound: f32,
    /// Choose each layer's bound from the plaintext model run on the first
    /// 1,000 samples of a bundled data set (mnist or breast-cancer): the
    /// smallest power of two >= 2x the largest value seen, capped by --input-bound.
    #[arg(long, value_name = "DATASET")]
    calibrate: Option<String>,
    /// What the client may learn: logits (the model's outputs; the default),
    /// argmax (only the class index) or activations (the fast mode, in which
    /// the client sees every linear layer's output and can reconstruct the weights).
    #[arg(long, default_value = "logits", value_parser = ["logits", "argmax", "activations"])]
    reveal: String,
}

impl ConvertArgs {
    fn options(&self) -> anyhow::Result<Options> {
        let calibration = match &self.calibrate {
            Some(name) => Some(secinfer::data::calibration_samples(name, 1000)?),
            None => None,
        };
        Ok(Options {
            ring_bits: self.ring_bits,
            input_bound: self.input_bound,
            calibration,
            reveal: self.reveal.parse()?,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert MODEL.onnx into DIR/server.onnx and DIR/client.onnx.
    Convert {
        /// The ONNX model.
        model: PathBuf,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        args: ConvertArgs,
    },
    /// Convert a model and compare secure with plaintext predictions in one process.
    Bench {
        /// The original ONNX model.
        #[arg(long)]
        model: PathBuf,
        /// Bundled data set: mnist or breast-cancer.
        #[arg(long, conflicts_with = "random", required_unless_present = "random")]
        dataset: Option<String>,
        /// Use N random inputs (fixed seed) in the model's declared input shape.
        #[arg(long, value_name = "N")]
        random: Option<usize>,
        /// Only the first N samples.
        #[arg(long)]
        limit: Option<usize>,
        /// How client and server talk: quic (a server on 127.0.0.1 in this
        /// process, TLS and all) or memory (direct calls, bytes counted).
        #[arg(long, default_value = "quic", value_parser = ["quic", "memory"])]
        transport: String,
        /// Inferences per round trip.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Send through an emulated link with this round-trip time in
        /// milliseconds (both ends delay every datagram by half), to see the
        /// figures at WAN distances; QUIC only.
        #[arg(long, value_name = "MS")]
        rtt_ms: Option<u64>,
        /// Where the private modes' correlations come from: silent OT
        /// (default) or IKNP, for comparison.
        #[arg(long, default_value = "silent", value_parser = ["silent", "iknp"])]
        ot: String,
        /// Inferences per offline (HE) batch, 1..=8192 (default: as many as
        /// fit 4 GiB of offline material).
        #[arg(long, value_name = "N")]
        offline_batch: Option<usize>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw throughput vs batch size and accuracy into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Also run the online phase at these batch sizes (default list
        /// 1,10,100,1000), secure and plaintext, 1,000 predictions each.
        #[arg(long, value_name = "SIZES", num_args = 0.., value_delimiter = ',')]
        sweep_batch: Option<Vec<usize>>,
        /// Single-sample predictions timed for the latency percentiles.
        #[arg(long, default_value_t = 100)]
        latency_samples: usize,
        /// With --dataset, layer bounds are calibrated on that data set unless
        /// this is given (then --input-bound applies to every layer).
        #[arg(long, conflicts_with = "calibrate")]
        no_calibrate: bool,
        /// In logits or argmax mode, do not also run the model in activations
        /// mode for comparison (that run makes its own HE offline batch).
        #[arg(long)]
        no_compare: bool,
        /// Also run the predictions again on a new session whose background
        /// pool makes HE material and correlations while they run (the
        /// phases overlapped, as an application using the pool runs them),
        /// and report that throughput.
        #[arg(long)]
        pipelined: bool,
        #[command(flatten)]
        args: ConvertArgs,
    },
    /// Serve a converted model to clients over QUIC until Ctrl-C or SIGTERM.
    Serve {
        /// The server model (DIR/server.onnx from `convert`).
        #[arg(long)]
        model: PathBuf,
        /// Address to listen on (UDP).
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: std::net::SocketAddr,
        /// Where the generated certificate, key and token file are kept.
        #[arg(long, default_value = "secinfer-state")]
        state_dir: PathBuf,
        /// A certificate chain (PEM) to use instead of the generated one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The private key (PEM) of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// File of accepted API tokens, one per line (default: STATE_DIR/tokens,
        /// created with one new token on first start).
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Clients served at once.
        #[arg(long, default_value_t = 64)]
        max_sessions: usize,
        /// Largest message, MiB.
        #[arg(long, default_value_t = 64)]
        max_frame_mib: usize,
        /// Preprocessed inferences (ready or in flight) one client may hold.
        #[arg(long, default_value_t = secinfer_protocol::DEFAULT_MAX_PENDING)]
        max_pending: usize,
        /// OT correlations one client may hold (private modes), MiB.
        #[arg(long, default_value_t = secinfer_protocol::DEFAULT_MAX_OT_BYTES >> 20)]
        max_correlation_mib: u64,
        /// Correlation backends clients may choose (private modes), comma
        /// separated: silent (the default, ~3 bits of traffic per OT) and
        /// iknp (128 bits per OT, about 40 times the traffic).
        #[arg(long, default_value = "silent,iknp", value_delimiter = ',')]
        ot_backends: Vec<String>,
        /// HE evaluations at once across clients (each uses every core).
        #[arg(long, default_value_t = 1)]
        he_jobs: usize,
        /// Close a connection silent for this long, seconds.
        #[arg(long, default_value_t = 60)]
        idle_timeout: u64,
        /// End a session that has made no request for this long (its
        /// keep-alives do not count), seconds.
        #[arg(long, default_value_t = 300)]
        session_idle_timeout: u64,
        /// End any session this long after it began, seconds (the client
        /// reconnects for more).
        #[arg(long, default_value_t = 6 * 3600)]
        max_session_lifetime: u64,
        /// On Ctrl-C or SIGTERM, how long requests in progress may take, seconds.
        #[arg(long, default_value_t = 30)]
        shutdown_grace: u64,
        /// How long a client has to finish sending a message it began, or
        /// to take one of the server's; also how long work waits for room
        /// in the memory budget before it is refused, seconds.
        #[arg(long, default_value_t = 60)]
        frame_timeout: u64,
        /// Memory that all clients' work may take together, MiB (default:
        /// half the machine's): three quarters for HE work and what
        /// sessions store, a quarter for frames and connection buffers.
        #[arg(long)]
        max_memory_mib: Option<u64>,
    },
    /// Predict with a served model: the input stays private, the weights stay on the server.
    #[command(group(clap::ArgGroup::new("trust").required(true).args(["fingerprint", "ca"])))]
    Predict {
        /// The server, host:port.
        #[arg(long)]
        server: String,
        /// The client model (DIR/client.onnx from `convert`).
        #[arg(long)]
        model: PathBuf,
        /// Pin the server's certificate by the SHA-256 fingerprint `serve` prints.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Trust server certificates issued by the CA certificate(s) in this PEM file.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Name to check in the server certificate with --ca (default: the host of --server).
        #[arg(long)]
        server_name: Option<String>,
        /// API token (or --token-file, or the SECINFER_TOKEN environment variable).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// File whose first line is the API token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print every output score, not just the class.
        #[arg(long)]
        scores: bool,
        /// Input files: .npy arrays, PNG images (image models) or CSV rows (tabular models).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Draw bench reports (JSON files from `bench --json`) into one SVG.
    Plot {
        /// The reports.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The SVG file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// The bundled MNIST CNN on MNIST test images, --reveal logits, over loopback QUIC.
    Demo {
        /// The first N test images (up to 10000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. }) {
        bound_allocator_retention();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes glibc's allocator give freed memory back, so that `serve`'s
/// resident memory follows what its budget counts. By default glibc raises
/// its mmap threshold (up to 32 MiB) each time a large block is freed, so
/// that the next HE job's buffers come from heap arenas that keep their
/// pages after the job, one arena per thread: with the MNIST CNN under
/// `tests/load.rs`'s memory test the server peaked at 511 MiB in a
/// 512 MiB budget; with blocks of 1 MiB and up always mapped (and freed
/// back to the system) and two arenas, at 368 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_allocator_retention() {
    // SAFETY: mallopt only sets glibc malloc tunables; it is called before
    // this process has started any other thread, and the values are valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_allocator_retention() {}

fn convert(model: &Path, output: &Path, options: &Options) -> anyhow::Result<()> {
    let spinner = secinfer::progress::Spinner::new(&format!("converting {}", model.display()));
    let converted = secinfer_converter::convert_file(model, options);
    spinner.finish();
    let converted = converted?;
    let (server, client) = converted.write(output)?;
    println!(
        "{}",
        secinfer::report::conversion(&converted, options.ring_bits)
    );
    println!("wrote {} and {}", server.display(), client.display());
    Ok(())
}

fn bundled(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run_bench(cfg: BenchConfig, json: Option<&Path>, plot: Option<&Path>) -> anyhow::Result<()> {
    let tty = secinfer::progress::on_terminal();
    let started = std::time::Instant::now();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut spinner: Option<secinfer::progress::Spinner> = None;
    let extension = match cfg.ot {
        secinfer_ot::Backend::Silent => "silent OT",
        secinfer_ot::Backend::Iknp => "IKNP extension",
    };
    let report = bench::run(&cfg, |p| match p {
        bench::Progress::Preprocessing { count } => {
            let msg = format!("offline: HE preprocessing for {count} inferences (one batch)");
            if tty {
                if let Some(b) = &bar {
                    b.suspend(|| ());
                }
                spinner = Some(secinfer::progress::Spinner::new(&msg));
            } else {
                eprintln!("[{:>5.0} s] {msg}", started.elapsed().as_secs_f64());
            }
        }
        bench::Progress::Correlations { count } => {
            let msg = format!(
                "offline: oblivious-transfer correlations for {count} inferences ({extension})"
            );
            if tty {
                if let Some(b) = &bar {
                    b.suspend(|| ());
                }
                if let Some(s) = spinner.take() {
                    s.finish();
                }
                spinner = Some(secinfer::progress::Spinner::new(&msg));
            } else {
                eprintln!("[{:>5.0} s] {msg}", started.elapsed().as_secs_f64());
            }
        }
        bench::Progress::Pipelined { total } => {
            if let Some(s) = spinner.take() {
                s.finish();
            }
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!(
                "[{:>5.0} s] pipelined: {total} predictions on a new session, its background pool making the offline material meanwhile",
                started.elapsed().as_secs_f64()
            );
        }
        bench::Progress::Comparison => {
            if let Some(s) = spinner.take() {
                s.finish();
            }
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!(
                "[{:>5.0} s] the same model in activations mode, for comparison",
                started.elapsed().as_secs_f64()
            );
        }
        bench::Progress::Predicted { done, total } => {
            if let Some(s) = spinner.take() {
                s.finish();
            }
            if tty {
                let b =
                    bar.get_or_insert_with(|| secinfer::progress::bar(total as u64, "predictions"));
                b.set_position(done as u64);
                if done == total {
                    b.finish_and_clear();
                }
            }
        }
    });
    if let Some(s) = spinner.take() {
        s.finish();
    }
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    let report = report?;
    println!("{}", report.summary());
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = plot {
        secinfer::plot::write_svg(std::slice::from_ref(&report), path)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

fn work_dir(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    std::env::temp_dir().join(format!("secinfer-{}-{stem}", std::process::id()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert {
            model,
            output,
            args,
        } => convert(&model, &output, &args.options()?),
        Command::Bench {
            model,
            dataset,
            random,
            limit,
            transport,
            batch,
            rtt_ms,
            ot,
            offline_batch,
            json,
            plot,
            sweep_batch,
            latency_samples,
            no_calibrate,
            no_compare,
            pipelined,
            mut args,
        } => {
            if rtt_ms.is_some() && transport == "memory" {
                anyhow::bail!("--rtt-ms emulates a network link: it needs --transport quic");
            }
            let sweep = match sweep_batch {
                Some(v) if v.is_empty() => vec![1, 10, 100, 1000],
                Some(v) => v,
                None => vec![],
            };
            if sweep.contains(&0) {
                anyhow::bail!("--sweep-batch: batch sizes start at 1");
            }
            if let Some(b) = offline_batch
                && !(1..=secinfer_tract_ext::MAX_BATCH).contains(&b)
            {
                anyhow::bail!(
                    "--offline-batch {b}: an offline batch holds 1..={} inferences",
                    secinfer_tract_ext::MAX_BATCH
                );
            }
            if let (Some(d), None, false) = (&dataset, &args.calibrate, no_calibrate) {
                println!(
                    "calibrating layer bounds on the first 1,000 samples of {d} (--no-calibrate to skip)"
                );
                args.calibrate = Some(d.clone());
            }
            let inputs = match (dataset, random) {
                (Some(d), None) => Inputs::Dataset(d),
                (None, Some(n)) => Inputs::Random(n),
                _ => anyhow::bail!("give exactly one of --dataset and --random"),
            };
            let work_dir = work_dir(&model);
            let cfg = BenchConfig {
                model,
                inputs,
                limit,
                batch,
                offline_batch,
                transport: if transport == "memory" {
                    Transport::Memory
                } else {
                    Transport::Quic
                },
                rtt: rtt_ms.map(std::time::Duration::from_millis),
                ot: ot.parse().map_err(anyhow::Error::msg)?,
                latency_samples,
                sweep,
                options: args.options()?,
                work_dir: work_dir.clone(),
                compare: !no_compare,
                pipelined,
            };
            let result = run_bench(cfg, json.as_deref(), plot.as_deref());
            let _ = std::fs::remove_dir_all(&work_dir);
            result
        }
        Command::Serve {
            model,
            listen,
            state_dir,
            cert,
            key,
            tokens,
            max_sessions,
            max_frame_mib,
            max_pending,
            max_correlation_mib,
            ot_backends,
            he_jobs,
            idle_timeout,
            session_idle_timeout,
            max_session_lifetime,
            shutdown_grace,
            frame_timeout,
            max_memory_mib,
        } => {
            let mut limits = net::limits(&net::LimitFlags {
                max_sessions,
                max_frame_mib,
                max_pending,
                max_correlation_mib,
                he_jobs,
                idle_timeout_s: idle_timeout,
                session_idle_timeout_s: session_idle_timeout,
                max_session_lifetime_s: max_session_lifetime,
                shutdown_grace_s: shutdown_grace,
                frame_timeout_s: frame_timeout,
                max_memory_mib,
            })?;
            limits.accepted_ot_backends = net::ot_backends(&ot_backends)?;
            net::serve(net::ServeOptions {
                model,
                listen,
                state_dir,
                cert_key: cert.zip(key),
                tokens,
                limits,
            })
        }
        Command::Predict {
            server,
            model,
            fingerprint,
            ca,
            server_name,
            token,
            token_file,
            scores,
            inputs,
        } => {
            let trust = match (fingerprint, ca) {
                (Some(f), None) => secinfer_transport::Trust::Fingerprint(f.parse()?),
                (None, Some(ca)) => secinfer_transport::Trust::CaFile(ca),
                _ => anyhow::bail!("give exactly one of --fingerprint and --ca"),
            };
            net::predict(net::PredictOptions {
                server,
                model,
                trust,
                server_name,
                token: net::resolve_token(token, token_file.as_deref())?,
                inputs,
                scores,
            })
        }
        Command::Plot { reports, output } => {
            let reports = reports
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    serde_json::from_str::<bench::BenchReport>(&text)
                        .with_context(|| format!("{}: not a bench report", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            secinfer::plot::write_svg(&reports, &output)?;
            println!("plot written to {}", output.display());
            Ok(())
        }
        Command::Demo { limit } => {
            let model = bundled("onnx-models/mnist_cnn.onnx");
            let work_dir = work_dir(&model);
            println!(
                "secinfer demo: the bundled MNIST CNN on the first {limit} MNIST test images, --reveal logits:\n\
                 the client learns the logits and nothing else; every activation stays secret-shared and the\n\
                 ReLU and max-pooling layers are computed jointly with oblivious transfer.\n\
                 A server on 127.0.0.1 (QUIC, TLS 1.3, pinned certificate, API token) and a client run in one\n\
                 process. Offline first: lattice HE for the linear layers (polynomial products sized to the\n\
                 batch) and OT correlations for the comparisons (about 0.25 s per image), then the online\n\
                 predictions, then one cold prediction (a new client, its own offline phase). `bench --model onnx-models/mnist_cnn.onnx --dataset mnist` also\n\
                 runs the model in activations mode for comparison.\n"
            );
            let cfg = BenchConfig {
                model,
                inputs: Inputs::Dataset("mnist".into()),
                limit: Some(limit),
                batch: 100,
                offline_batch: None,
                transport: Transport::Quic,
                rtt: None,
                ot: secinfer_ot::Backend::default(),
                latency_samples: 10,
                sweep: vec![],
                options: Options {
                    calibration: Some(secinfer::data::calibration_samples("mnist", 1000)?),
                    ..Options::default()
                },
                work_dir: work_dir.clone(),
                compare: false,
                pipelined: false,
            };
            let result = run_bench(cfg, None, None);
            let _ = std::fs::remove_dir_all(&work_dir);
            result
        }
    }
}
