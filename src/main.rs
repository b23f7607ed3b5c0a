//! The `secinfer` command line: convert, bench, demo.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use secinfer::bench::{self, BenchConfig, Inputs};
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
        /// Inferences per round trip.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Inferences per offline (HE) batch, 1..=8192 (default: as many as
        /// fit 3 GiB of offline material).
        #[arg(long, value_name = "N")]
        offline_batch: Option<usize>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// With --dataset, layer bounds are calibrated on that data set unless
        /// this is given (then --input-bound applies to every layer).
        #[arg(long, conflicts_with = "calibrate")]
        no_calibrate: bool,
        #[command(flatten)]
        args: ConvertArgs,
    },
    /// The bundled MNIST CNN on MNIST test images, securely (bench with defaults).
    Demo {
        /// The first N test images (up to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn convert(model: &Path, output: &Path, options: &Options) -> anyhow::Result<()> {
    let converted = secinfer_converter::convert_file(model, options)?;
    let (server, client) = converted.write(output)?;
    println!(
        "{} SecureLinear ops in Z_2^{}:",
        converted.layers.len(),
        options.ring_bits
    );
    println!(
        "  {:>3}  {:<34} {:<15} {:>8} {:>5} {:>5}  {:>9}  folded",
        "op", "source", "kind", "|x| <=", "f_in", "f_w", "headroom"
    );
    for l in &converted.layers {
        let s = &l.spec;
        println!(
            "  {:>3}  {:<34} {:<15} {:>8} {:>5} {:>5}  {:>6.1} b  {}",
            s.op_id,
            format!("{} '{}'", s.source_op, s.source_node),
            s.kind.tag(),
            s.input_bound,
            s.input_frac_bits,
            s.weight_frac_bits,
            l.headroom_bits,
            l.folded.join(", ")
        );
    }
    if !converted.folded_constants.is_empty() {
        println!(
            "constant subgraphs evaluated: {}",
            converted.folded_constants.join(", ")
        );
    }
    for c in &converted.client_constants {
        println!("note: constant {c} stays in the client graph (not a linear layer's weight)");
    }
    println!("model digest {}", converted.digest);
    println!("wrote {} and {}", server.display(), client.display());
    Ok(())
}

fn bundled(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run_bench(cfg: BenchConfig, json: Option<&Path>) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let report = bench::run(&cfg, |p| match p {
        bench::Progress::Preprocessing { count } => {
            if tty {
                eprintln!();
            }
            eprintln!(
                "[{:>5.0} s] offline: HE preprocessing for {count} inferences (one batch of up to 8192)",
                started.elapsed().as_secs_f64()
            );
        }
        bench::Progress::Predicted { done, total } => {
            if tty {
                eprint!("\r{done}/{total} predictions");
                if done == total {
                    eprintln!();
                }
            }
        }
    })?;
    println!("{}", report.summary());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
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
            batch,
            offline_batch,
            json,
            no_calibrate,
            mut args,
        } => {
            if let Some(b) = offline_batch {
                if !(1..=secinfer_tract_ext::MAX_BATCH).contains(&b) {
                    anyhow::bail!(
                        "--offline-batch {b}: an offline batch holds 1..={} inferences",
                        secinfer_tract_ext::MAX_BATCH
                    );
                }
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
                options: args.options()?,
                work_dir: work_dir.clone(),
            };
            let result = run_bench(cfg, json.as_deref());
            let _ = std::fs::remove_dir_all(&work_dir);
            result
        }
        Command::Demo { limit } => {
            let model = bundled("onnx-models/mnist_cnn.onnx");
            let work_dir = work_dir(&model);
            println!(
                "secinfer demo: the bundled MNIST CNN on the first {limit} MNIST test images.\n\
                 Client and server run in one process; the offline phase (lattice HE, about 6 minutes \n\
                 per batch of up to 8192 images on 2 cores) comes first, then the online predictions.\n"
            );
            let cfg = BenchConfig {
                model,
                inputs: Inputs::Dataset("mnist".into()),
                limit: Some(limit),
                batch: 100,
                offline_batch: None,
                options: Options {
                    calibration: Some(secinfer::data::calibration_samples("mnist", 1000)?),
                    ..Options::default()
                },
                work_dir: work_dir.clone(),
            };
            let result = run_bench(cfg, None);
            let _ = std::fs::remove_dir_all(&work_dir);
            result
        }
    }
}
