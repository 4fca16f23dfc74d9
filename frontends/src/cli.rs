//! The `cellgraph` command line: `mnist` (the main job), `inspect`, `convert`, `run`,
//! `bench` and `conformance onnx|keras`.

use crate::ir::onnx::Model;
use crate::ir::{print_graph, to_dot, verify, NodeKind};
use clap::{Parser, Subcommand};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Errors of the command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Reading, checking or writing a model failed.
    #[error("{path}: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<crate::ir::Error>,
    },
    /// Writing an output file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The command line asks for something cellgraph cannot do.
    #[error("{0}")]
    Usage(String),
    /// Compiling or running a model failed.
    #[error("{0}")]
    Run(String),
}

impl CliError {
    fn model(path: &Path, source: crate::ir::Error) -> CliError {
        CliError::Model {
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }
}

/// cellgraph: recurrent neural networks in Rust.
#[derive(Debug, Parser)]
#[command(name = "cellgraph", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Resource limits for model files (checked before anything is allocated).
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The `--help` heading of the global `--max-*` flags: they follow each subcommand's own
/// options instead of mixing with them.
const LIMITS_HEADING: &str = "Limits (every command)";

/// `--max-*` flags: the limits every input file (ONNX, Keras, `.npy`, IDX) and every run
/// stays within (defaults: 4 GiB per tensor, 16 GiB in all, subgraphs 32 deep, a million
/// nodes, 8 GiB files, 65,536 iterations of one Loop, no time limit).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Largest single tensor, in bytes: read from a file or made at run time.
    #[arg(long, global = true, value_name = "BYTES", help_heading = LIMITS_HEADING)]
    pub max_tensor_bytes: Option<u64>,
    /// Largest total of a file's tensors, and of the values alive at once at run time,
    /// in bytes.
    #[arg(long, global = true, value_name = "BYTES", help_heading = LIMITS_HEADING)]
    pub max_total_bytes: Option<u64>,
    /// Deepest nesting of subgraphs.
    #[arg(long, global = true, value_name = "N", help_heading = LIMITS_HEADING)]
    pub max_nesting: Option<usize>,
    /// Most nodes, counting nested graphs.
    #[arg(long, global = true, value_name = "N", help_heading = LIMITS_HEADING)]
    pub max_nodes: Option<usize>,
    /// Largest model file, in bytes.
    #[arg(long, global = true, value_name = "BYTES", help_heading = LIMITS_HEADING)]
    pub max_file_bytes: Option<u64>,
    /// Most iterations of one Loop at run time (a Scan runs as many steps as its input
    /// has).
    #[arg(long, global = true, value_name = "N", help_heading = LIMITS_HEADING)]
    pub max_loop_trips: Option<u64>,
    /// Wall-clock limit of one run of a model (inference or one training step), in
    /// seconds.
    #[arg(long, global = true, value_name = "SECONDS", help_heading = LIMITS_HEADING)]
    pub max_seconds: Option<f64>,
}

impl LimitArgs {
    /// The import limits these flags set (defaults elsewhere).
    pub fn limits(&self) -> crate::ir::onnx::Limits {
        let mut l = crate::ir::onnx::Limits::default();
        if let Some(v) = self.max_tensor_bytes {
            l.max_tensor_bytes = v;
        }
        if let Some(v) = self.max_total_bytes {
            l.max_total_bytes = v;
        }
        if let Some(v) = self.max_nesting {
            l.max_nesting = v;
        }
        if let Some(v) = self.max_nodes {
            l.max_nodes = v;
        }
        if let Some(v) = self.max_file_bytes {
            l.max_file_bytes = v;
        }
        l
    }

    /// The run-time budget these flags set (defaults elsewhere).
    pub fn budget(&self) -> crate::backends::Budget {
        let mut b = crate::backends::Budget::default();
        if let Some(v) = self.max_tensor_bytes {
            b.max_tensor_bytes = v;
        }
        if let Some(v) = self.max_total_bytes {
            b.max_live_bytes = v;
        }
        if let Some(v) = self.max_loop_trips {
            b.max_loop_trips = v;
        }
        b.max_seconds = self.max_seconds;
        b
    }

    /// Refuses limits that mean nothing: a deadline that is not a positive number of
    /// seconds, or a zero size, count or depth.
    fn check(&self) -> Result<(), CliError> {
        if let Some(s) = self.max_seconds {
            if !(s.is_finite() && s > 0.0) {
                return Err(CliError::Usage(format!(
                    "--max-seconds {s}: give a positive number of seconds"
                )));
            }
        }
        for (flag, v) in [
            ("--max-tensor-bytes", self.max_tensor_bytes),
            ("--max-total-bytes", self.max_total_bytes),
            ("--max-file-bytes", self.max_file_bytes),
            ("--max-loop-trips", self.max_loop_trips),
            ("--max-nesting", self.max_nesting.map(|v| v as u64)),
            ("--max-nodes", self.max_nodes.map(|v| v as u64)),
        ] {
            if v == Some(0) {
                return Err(CliError::Usage(format!(
                    "{flag} 0 would refuse everything: give a positive limit"
                )));
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The limits of the command being run (set by [`run`] from the flags).
    static LIMITS: std::cell::RefCell<crate::ir::onnx::Limits> =
        std::cell::RefCell::new(crate::ir::onnx::Limits::default());
}

/// A CPU backend within the command's budget (set as the process default by [`run`]).
fn cpu_backend(r: crate::backends::cpu::Recurrent) -> crate::backends::cpu::CpuBackend {
    crate::backends::cpu::CpuBackend::new(r)
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job: train the Keras guide's MNIST model (rows as sequences:
    /// LSTM(64) → BatchNormalization → Dense(10)) on the bundled 10,000 digits, print its
    /// summary, a progress line per epoch and a test digit with its prediction; save the
    /// model, its inference ONNX graph and the loss/accuracy curves.
    Mnist {
        /// A folder with the full MNIST (`train-images-idx3-ubyte[.gz]`, ...) instead of
        /// the bundled subset.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Training epochs.
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        /// Batch size.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// The optimizer (Keras defaults: Adam lr 0.001, SGD lr 0.01, RMSprop lr 0.001).
        #[arg(long, value_enum, default_value = "adam")]
        optimizer: OptimizerArg,
        /// Override the optimizer's learning rate.
        #[arg(long)]
        learning_rate: Option<f32>,
        /// `lstm` (the LSTM layer) or `rnn-lstmcell` (RNN(LSTMCell(64))).
        #[arg(long, value_enum, default_value = "lstm")]
        cell: CellArg,
        /// Seed for weights, shuffling and dropout.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long, default_value = "mnist-out")]
        out: PathBuf,
        /// Train on the first N training digits (validate on the first N/4 test digits,
        /// at least one); N at least 1.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Write a checkpoint (weights, optimizer state, epoch, history and the run's
        /// configuration) after every epoch, atomically; default OUT/checkpoints. A
        /// folder that already holds checkpoints is refused without --resume.
        #[arg(long, value_name = "DIR")]
        checkpoint_dir: Option<PathBuf>,
        /// Resume from the newest complete checkpoint (none yet: start at epoch 1).
        /// Refused, changing no file, when the checkpoints were written by another
        /// configuration (cell, optimizer, learning rate, batch size, seed, data or
        /// limit) or when checkpoints exist but none loads.
        #[arg(long)]
        resume: bool,
        /// The backends: `cpu`, or `subset` (the test-only backend first, the CPU for
        /// the nodes it refuses; slower, for showing placement in training).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Test fault: abort while writing the checkpoint of epoch E.
        #[arg(long, hide = true, value_name = "E")]
        fault_abort_in_checkpoint: Option<usize>,
    },
    /// Print a model. An ONNX file: opset imports, inputs and outputs with shapes,
    /// parameter count, and the IR text (one line per node). A Keras model: its
    /// `summary()` and the IR graph it lowers to. Both list each recurrent node's
    /// backend decision (fused or loop, and why).
    Inspect {
        /// The `.onnx` file (or a `.json` file written by `convert`), or a Keras model: a
        /// Keras 3 `model.json`, or a folder holding one (with `weights/NNN.npy`).
        file: PathBuf,
        /// Also write the graph in Graphviz DOT to this file (`-` for standard output,
        /// instead of the text form).
        #[arg(long, value_name = "PATH")]
        dot: Option<PathBuf>,
        /// A Keras model with no `weights/` folder: build it with fresh random weights
        /// instead of refusing it.
        #[arg(long)]
        random_weights: bool,
        /// Also print where each node of an ONNX model runs on these backends (the
        /// first that accepts it, the CPU for the rest) and why not on the others.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
    },
    /// Read a model and write it again from the IR: `.onnx`, or `.json` for the serde form.
    Convert {
        /// The input (`.onnx`, or `.json` written by this command).
        input: PathBuf,
        /// The output (`.onnx` or `.json`).
        output: PathBuf,
    },
    /// Run an ONNX model on `.npy` inputs and write each output as `<name>.npy`.
    Run {
        /// The model.
        model: PathBuf,
        /// An input: `NAME=FILE.npy` (once per graph input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Where to write the outputs.
        #[arg(long, value_name = "DIR")]
        output_dir: PathBuf,
        /// How LSTM/GRU/RNN run.
        #[arg(long, value_enum, default_value = "fused")]
        recurrent: RecurrentArg,
        /// The backends: `cpu`, or `subset` (the test-only backend first, the CPU for
        /// the nodes it refuses).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
    },
    /// Time the engine (the CPU backend, or a backend list with --backend). With no MODEL, the standard workloads W1 LSTM B64 T28 I28 H64,
    /// W2 LSTM B64 T100 I512 H512, W3 GRU (reset-after) at W2's size, W4 bidirectional W1:
    /// inference of the ONNX layer and a training step (the layer + Dense(10), sparse
    /// cross-entropy from logits, backward, SGD update), each with median/min/max ms,
    /// GFLOP/s, threads and peak memory. With a MODEL, inference of that ONNX model on
    /// deterministic inputs of its declared shapes (last line `median_ms: X`).
    Bench {
        /// An ONNX model to time instead of the standard workloads.
        model: Option<PathBuf>,
        /// Timed runs per workload (after one warm-up).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// How LSTM/GRU/RNN run.
        #[arg(long, value_enum, default_value = "fused")]
        recurrent: RecurrentArg,
        /// Size for symbolic or unknown dimensions of a MODEL's inputs.
        #[arg(long, default_value_t = 1)]
        dim: usize,
        /// Also write each standard workload as `<name>.onnx` here (for peers such as
        /// onnxruntime to time the same models).
        #[arg(long, value_name = "DIR")]
        export_dir: Option<PathBuf>,
        /// Print one JSON object per workload instead of a table.
        #[arg(long)]
        json: bool,
        /// Time Keras models (`LSTM` + `Dense`, B64 T28 I28 H64 and B64 T100 I512 H512)
        /// on the loop path and on the fused path the selector raises them to:
        /// inference and training step (forward + backward), with loop/fused ratios.
        #[arg(long, conflicts_with = "model")]
        keras: bool,
        /// Worker threads of the parallel kernels (default: one per core).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Only this standard workload (`W1` … `W4`, or its name); repeatable.
        #[arg(long = "workload", value_name = "ID", conflicts_with_all = ["model", "keras"])]
        workloads: Vec<String>,
        /// Only this step of the standard workloads; repeatable (default: both).
        #[arg(long = "step", value_enum, conflicts_with_all = ["model", "keras"])]
        steps: Vec<BenchStep>,
        /// The backends: `cpu`, or `subset` (the test-only backend first, the CPU for
        /// the nodes it refuses): a MODEL, the standard workloads' layers and training
        /// steps, and the Keras workloads run on that list.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
    },
    /// Run conformance suites. Prints `PASS <case>` or `FAIL <case>: <reason>` per case,
    /// then `N passed, M failed`; exits 1 if anything failed.
    Conformance {
        /// Which suite format.
        #[command(subcommand)]
        suite: Suite,
    },
}

/// Conformance suite formats.
#[derive(Debug, Subcommand)]
pub enum Suite {
    /// ONNX backend-test cases: each PATH is a case folder (`model.onnx` and
    /// `test_data_set_*/{input,output}_<j>.pb`) or a folder of such.
    Onnx {
        /// Case folders, or folders holding case folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// How LSTM/GRU/RNN run: fused kernels or Scan loops.
        #[arg(long, value_enum, default_value = "fused")]
        recurrent: RecurrentArg,
        /// The backends: `cpu`, or `subset` (the test-only backend first, the CPU for
        /// the nodes it refuses).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Relative tolerance.
        #[arg(long, default_value_t = 1e-3)]
        rtol: f64,
        /// Absolute tolerance.
        #[arg(long, default_value_t = 1e-7)]
        atol: f64,
    },
    /// Keras reference cases: each PATH is a case folder (`model.json`, `meta.json`,
    /// `weights/`, `inputs/`, `outputs/`, ...) or a folder of such. Compares the summary,
    /// outputs, stateful call sequences, losses and, where the case stores them, the
    /// gradient of every trainable weight (per tensor: max|got − want| ≤ 1e-7 +
    /// 1e-4·max|want| unless the case's meta sets `grad_atol`/`grad_rtol`; a stored
    /// gradient that is all zeros must be declared in `disconnected_grads`).
    Keras {
        /// Case folders, or folders holding case folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The backends: `cpu`, or `subset` (the test-only backend first, the CPU for
        /// the nodes it refuses).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
    },
}

/// `--optimizer` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OptimizerArg {
    /// Adam.
    Adam,
    /// Stochastic gradient descent.
    Sgd,
    /// RMSprop.
    Rmsprop,
}

/// `--cell` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CellArg {
    /// `LSTM(64)`.
    Lstm,
    /// `RNN(LSTMCell(64))`.
    RnnLstmcell,
}

/// `--recurrent` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RecurrentArg {
    /// Fused kernels.
    Fused,
    /// Scan loops over the cell's primitive ops.
    Loop,
}

impl From<RecurrentArg> for crate::backends::cpu::Recurrent {
    fn from(r: RecurrentArg) -> Self {
        match r {
            RecurrentArg::Fused => crate::backends::cpu::Recurrent::Fused,
            RecurrentArg::Loop => crate::backends::cpu::Recurrent::Loop,
        }
    }
}

/// `cellgraph run`: feeds `.npy` inputs by name, writes outputs as `.npy`.
pub fn run_model(
    model: &Path,
    inputs: &[String],
    out_dir: &Path,
    recurrent: crate::backends::cpu::Recurrent,
) -> Result<(), CliError> {
    run_model_on(model, inputs, out_dir, recurrent, BackendArg::Cpu)
}

/// [`run_model`] on a backend list: `backend`'s backends first, the CPU for the rest.
pub fn run_model_on(
    model: &Path,
    inputs: &[String],
    out_dir: &Path,
    recurrent: crate::backends::cpu::Recurrent,
    backend_arg: BackendArg,
) -> Result<(), CliError> {
    use crate::backends::Data;
    let m = load(model)?;
    let g = &m.graph;
    let names: Vec<String> = g
        .input_values()
        .iter()
        .map(|&v| g.value(v).name.clone())
        .collect();
    let types = g.input_types();
    let mut given: Vec<Option<Data>> = vec![None; names.len()];
    for spec in inputs {
        let (name, file) = spec
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--input {spec:?}: expected NAME=FILE.npy")))?;
        let k = names.iter().position(|n| n == name).ok_or_else(|| {
            CliError::Usage(format!(
                "--input {name:?}: the model has no input of that name (inputs: {})",
                names.join(", ")
            ))
        })?;
        if given[k].is_some() {
            return Err(CliError::Usage(format!("--input {name:?} is given twice")));
        }
        let limits = LIMITS.with(|l| l.borrow().clone());
        let t = crate::npy::read_with(Path::new(file), types[k].dtype(), &limits)
            .map_err(|e| CliError::Usage(format!("--input {name:?}: {e}")))?;
        given[k] = Some(Data::Tensor(t));
    }
    let missing: Vec<&str> = names
        .iter()
        .zip(&given)
        .filter(|(_, g)| g.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(CliError::Usage(format!(
            "missing --input for: {}",
            missing.join(", ")
        )));
    }
    let backend = cpu_backend(recurrent);
    let selected = crate::backends::passes::select::select(
        &backend.after(&backend_arg.before_cpu()),
        g,
        recurrent == crate::backends::cpu::Recurrent::Fused,
    )
    .map_err(|e| CliError::Run(format!("{}: {e}", model.display())))?;
    let mut plan = backend
        .compile_after(&selected.graph, &backend_arg.before_cpu())
        .map_err(|e| CliError::Run(format!("{}: {e}", model.display())))?;
    let outs = plan
        .run(given.into_iter().flatten().collect())
        .map_err(|e| CliError::Run(format!("{}: {e}", model.display())))?;
    std::fs::create_dir_all(out_dir).map_err(|source| CliError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let names: Vec<&str> = g
        .outputs()
        .iter()
        .map(|&v| g.value(v).name.as_str())
        .collect();
    for ((d, name), file) in outs.iter().zip(&names).zip(output_files(&names)) {
        let t = d.tensor().map_err(|e| {
            CliError::Usage(format!(
                "output {name:?}: {e}; only tensors can be written as .npy"
            ))
        })?;
        let path = out_dir.join(file);
        crate::npy::write(&path, t).map_err(CliError::Run)?;
        println!(
            "{name}: {} {:?} -> {}",
            t.dtype(),
            t.shape(),
            path.display()
        );
    }
    Ok(())
}

/// The `.npy` file name of each output: its name with every character outside
/// `[A-Za-z0-9-_.]` replaced by `_`; when two names (or an empty one and another) come
/// out the same, a `~N` suffix keeps them apart (`a_b.npy`, `a_b~2.npy`), compared
/// without case so that case-insensitive file systems keep them apart too. Names that
/// would be hidden or special (`.`, `..`, empty) become `output_K`.
pub fn output_files(names: &[&str]) -> Vec<String> {
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(names.len());
    for (k, name) in names.iter().enumerate() {
        let mut safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if safe.is_empty() || safe.starts_with('.') {
            safe = format!("output_{k}");
        }
        let mut file = format!("{safe}.npy");
        let mut n = 2;
        while !taken.insert(file.to_ascii_lowercase()) {
            file = format!("{safe}~{n}.npy");
            n += 1;
        }
        files.push(file);
    }
    files
}

fn bench_keras(runs: usize, json: bool, backend: BackendArg) -> Result<(), CliError> {
    let rows = crate::bench::bench_keras(runs, &backend.before_cpu()).map_err(CliError::Run)?;
    if !json {
        println!(
            "{:<38} {:>13} {:>14} {:>11}  (runs: {runs}, medians)",
            "keras model (LSTM + Dense)", "loop_ms", "fused_ms", "loop/fused"
        );
    }
    for r in rows {
        let ratio = r.looped.median_ms / r.fused.median_ms;
        if json {
            println!(
                "{{\"workload\": \"{}\", \"loop_ms\": {:.4}, \"fused_ms\": {:.4}, \"ratio\": {:.3}, \"runs\": {runs}}}",
                r.name, r.looped.median_ms, r.fused.median_ms, ratio
            );
        } else {
            println!(
                "{:<38} {:>13.3} {:>14.3} {:>10.2}x",
                r.name, r.looped.median_ms, r.fused.median_ms, ratio
            );
        }
    }
    Ok(())
}

/// What `cellgraph bench` times for each standard workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStep {
    /// Inference of the ONNX layer.
    Inference,
    /// A Keras training step (layer + `Dense(10)`, cross-entropy, SGD update).
    Train,
}

/// `cellgraph bench`'s options for the standard workloads.
struct BenchOpts<'a> {
    runs: usize,
    recurrent: crate::backends::cpu::Recurrent,
    export_dir: Option<&'a Path>,
    json: bool,
    workloads: &'a [String],
    steps: &'a [BenchStep],
    backend: BackendArg,
}

fn bench_one_model(
    path: &Path,
    runs: usize,
    recurrent: crate::backends::cpu::Recurrent,
    dim: usize,
    backend: BackendArg,
) -> Result<(), CliError> {
    let m = load(path)?;
    let t = crate::bench::bench_model_on(&m, recurrent, runs, dim, &backend.before_cpu())
        .map_err(|e| CliError::Run(format!("{}: {e}", path.display())))?;
    let peak = t.peak_mib.map_or("-".into(), |p| format!("{p:.1}"));
    println!(
        "model: {}  runs: {}  threads: {}  min_ms: {:.3}  max_ms: {:.3}  peak_mib: {peak}",
        path.display(),
        t.runs,
        rayon::current_num_threads(),
        t.min_ms,
        t.max_ms
    );
    println!("median_ms: {:.3}", t.median_ms);
    Ok(())
}

fn bench(o: &BenchOpts<'_>) -> Result<(), CliError> {
    use crate::bench::{bench_train, bench_workload, Workload};
    let threads = rayon::current_num_threads();
    let all = Workload::standard();
    for want in o.workloads {
        if !all
            .iter()
            .any(|w| w.id.eq_ignore_ascii_case(want) || w.name == *want)
        {
            let known: Vec<&str> = all.iter().map(|w| w.id).collect();
            return Err(CliError::Run(format!(
                "no workload {want:?} (the workloads: {})",
                known.join(", ")
            )));
        }
    }
    let steps: &[BenchStep] = if o.steps.is_empty() {
        &[BenchStep::Inference, BenchStep::Train]
    } else {
        o.steps
    };
    if !o.json {
        println!(
            "{:<3} {:<26} {:<9} {:>10} {:>10} {:>10} {:>8} {:>7} {:>9}  (recurrent: {:?}, runs: {})",
            "", "workload", "step", "median_ms", "min_ms", "max_ms", "GFLOP/s", "threads", "peak_MiB",
            o.recurrent, o.runs
        );
    }
    for w in all {
        let chosen = o.workloads.is_empty()
            || o.workloads
                .iter()
                .any(|x| w.id.eq_ignore_ascii_case(x) || w.name == *x);
        if !chosen {
            continue;
        }
        if let Some(dir) = o.export_dir {
            std::fs::create_dir_all(dir).map_err(|source| CliError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            save(
                &Model::new(w.graph()),
                &dir.join(format!("{}.onnx", w.name)),
            )?;
        }
        for &step in steps {
            let (t, flops, label) = match step {
                BenchStep::Inference => (
                    bench_workload(&w, o.recurrent, o.runs, &o.backend.before_cpu()),
                    w.flops(),
                    "inference",
                ),
                BenchStep::Train => (
                    bench_train(&w, o.recurrent, o.runs, &o.backend.before_cpu()),
                    w.train_flops(),
                    "train",
                ),
            };
            let t = t.map_err(|e| CliError::Run(format!("{} {label}: {e}", w.name)))?;
            let gflops = flops / (t.median_ms * 1e-3) / 1e9;
            let peak = t.peak_mib.map_or("-".into(), |p| format!("{p:.1}"));
            if o.json {
                println!(
                    "{{\"id\": \"{}\", \"workload\": \"{}\", \"step\": \"{label}\", \"median_ms\": {:.4}, \"min_ms\": {:.4}, \"max_ms\": {:.4}, \"gflops\": {:.2}, \"runs\": {}, \"threads\": {threads}, \"peak_mib\": {}, \"recurrent\": \"{:?}\"}}",
                    w.id,
                    w.name,
                    t.median_ms,
                    t.min_ms,
                    t.max_ms,
                    gflops,
                    t.runs,
                    t.peak_mib.map_or("null".into(), |p| format!("{p:.1}")),
                    o.recurrent
                );
            } else {
                println!(
                    "{:<3} {:<26} {:<9} {:>10.3} {:>10.3} {:>10.3} {:>8.1} {:>7} {:>9}",
                    w.id, w.name, label, t.median_ms, t.min_ms, t.max_ms, gflops, threads, peak
                );
            }
        }
    }
    Ok(())
}

/// Sets the worker threads of the process's parallel kernels (rayon's global pool and
/// matrixmultiply's `MATMUL_NUM_THREADS`); must run before any kernel does.
fn set_threads(n: usize) -> Result<(), CliError> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n == 0 {
        return Err(CliError::Usage("--threads 0: give at least 1".into()));
    }
    if n > 4 * cores {
        return Err(CliError::Usage(format!(
            "--threads {n}: this machine has {cores} cores; more than {} threads only slow the kernels down",
            4 * cores
        )));
    }
    std::env::set_var("MATMUL_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| {
            CliError::Run(format!(
                "--threads {n}: could not start the worker threads: {e}"
            ))
        })
}

/// `--backend` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// The CPU backend.
    Cpu,
    /// The test-only `subset` backend (f32 elementwise ops and 2-D MatMul, in its own
    /// buffers) with the CPU for every other node: shows per-node placement and copies
    /// between backends; not for speed.
    Subset,
}

impl BackendArg {
    /// The backends placed before the CPU (the fallback, which runs every op): the one
    /// place the command line maps a backend name to backends.
    pub fn before_cpu(self) -> Vec<std::sync::Arc<dyn crate::backends::Device>> {
        match self {
            BackendArg::Cpu => Vec::new(),
            BackendArg::Subset => vec![std::sync::Arc::new(crate::backends::subset::SubsetBackend)],
        }
    }
}

/// What a command asks the process to exit with.
pub type ExitCode = i32;

/// Runs a parsed command line; returns the exit status (0, or 1 when a conformance
/// run had failures).
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    cli.limits.check()?;
    LIMITS.with(|l| *l.borrow_mut() = cli.limits.limits());
    crate::backends::Budget::set_process_default(cli.limits.budget());
    match cli.command {
        Command::Bench {
            model,
            runs,
            recurrent,
            dim,
            export_dir,
            json,
            keras,
            threads,
            workloads,
            steps,
            backend,
        } => {
            if runs == 0 {
                return Err(CliError::Usage(
                    "--runs 0: give at least 1 timed run".into(),
                ));
            }
            if dim == 0 {
                return Err(CliError::Usage(
                    "--dim 0: symbolic dimensions need a size of at least 1".into(),
                ));
            }
            if let Some(n) = threads {
                set_threads(n)?;
            }
            if keras {
                bench_keras(runs, json, backend)?;
            } else if let Some(path) = model.as_deref() {
                bench_one_model(path, runs, recurrent.into(), dim, backend)?;
            } else {
                bench(&BenchOpts {
                    runs,
                    recurrent: recurrent.into(),
                    export_dir: export_dir.as_deref(),
                    json,
                    workloads: &workloads,
                    steps: &steps,
                    backend,
                })?;
            }
            Ok(0)
        }
        Command::Run {
            model,
            inputs,
            output_dir,
            recurrent,
            backend,
        } => {
            run_model_on(&model, &inputs, &output_dir, recurrent.into(), backend)?;
            Ok(0)
        }
        Command::Conformance {
            suite:
                Suite::Onnx {
                    paths,
                    recurrent,
                    backend,
                    rtol,
                    atol,
                },
        } => {
            let recurrent = recurrent.into();
            let tol = crate::conformance::Tolerance { rtol, atol };
            let before = backend.before_cpu();
            run_suite(&paths, crate::conformance::find_cases, |case| {
                crate::conformance::run_case_on(case, recurrent, tol, &before)
                    .map(|()| String::new())
            })
        }
        Command::Conformance {
            suite: Suite::Keras { paths, backend },
        } => {
            let before = backend.before_cpu();
            run_suite(&paths, crate::keras::conformance::find_cases, |case| {
                crate::keras::conformance::run_case_on(case, &before).map(|r| {
                    let mut line = format!(" ({})", r.checked.join(", "));
                    if !r.skipped.is_empty() {
                        line += &format!("; skipped: {}", r.skipped.join(", "));
                    }
                    line
                })
            })
        }
        Command::Mnist {
            data,
            epochs,
            batch_size,
            optimizer,
            learning_rate,
            cell,
            seed,
            out,
            limit,
            checkpoint_dir,
            resume,
            backend,
            fault_abort_in_checkpoint,
        } => {
            use crate::keras::Optimizer;
            let mut opt = match optimizer {
                OptimizerArg::Adam => Optimizer::adam(),
                OptimizerArg::Sgd => Optimizer::sgd(),
                OptimizerArg::Rmsprop => Optimizer::rmsprop(),
            };
            if let Some(lr) = learning_rate {
                if !(lr > 0.0 && lr.is_finite()) {
                    return Err(CliError::Usage(format!(
                        "--learning-rate {lr}: must be a positive number"
                    )));
                }
                match &mut opt {
                    Optimizer::Adam { learning_rate, .. }
                    | Optimizer::SGD { learning_rate, .. }
                    | Optimizer::RMSprop { learning_rate, .. } => *learning_rate = lr,
                }
            }
            for (flag, v) in [
                ("--epochs", Some(epochs)),
                ("--batch-size", Some(batch_size)),
                ("--limit", limit),
            ] {
                if v == Some(0) {
                    return Err(CliError::Usage(format!("{flag} 0: it must be at least 1")));
                }
            }
            let opts = crate::mnist::JobOptions {
                data,
                epochs,
                batch_size,
                optimizer: opt,
                rnn_lstmcell: matches!(cell, CellArg::RnnLstmcell),
                seed,
                checkpoint_dir: Some(checkpoint_dir.unwrap_or_else(|| out.join("checkpoints"))),
                out,
                limit,
                resume,
                abort_in_checkpoint: fault_abort_in_checkpoint,
                limits: LIMITS.with(|l| l.borrow().clone()),
                backends: backend.before_cpu(),
            };
            crate::mnist::main_job(&opts).map_err(CliError::Run)?;
            Ok(0)
        }
        Command::Inspect {
            file,
            dot,
            random_weights,
            backend,
        } => {
            if is_keras(&file) {
                let text = inspect_keras(&file, random_weights)?;
                print!("{text}");
                return Ok(0);
            }
            let m = load(&file)?;
            match dot.as_deref() {
                Some(p) if p == Path::new("-") => print!("{}", to_dot(&m.graph)),
                Some(p) => {
                    std::fs::write(p, to_dot(&m.graph)).map_err(|source| CliError::Io {
                        path: p.to_path_buf(),
                        source,
                    })?;
                    print!("{}", inspect_text(&file, &m));
                    println!("DOT graph written to {}", p.display());
                }
                None => print!("{}", inspect_text(&file, &m)),
            }
            if let Some(b) = backend {
                print!("{}", placement_report(&m.graph, b)?);
            }
            Ok(0)
        }
        Command::Convert { input, output } => {
            let ext = output
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if !matches!(ext.as_deref(), Some("onnx" | "json")) {
                return Err(CliError::Usage(format!(
                    "{}: the output's extension says what to write: .onnx (ONNX) or .json (the IR's JSON form)",
                    output.display()
                )));
            }
            let m = load(&input)?;
            save(&m, &output)?;
            println!(
                "wrote {} ({} ops, {} parameters)",
                output.display(),
                m.graph.op_count(),
                m.graph.parameter_count()
            );
            Ok(0)
        }
    }
}

fn is_json(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Loads a model from `.onnx` or (with the `serde` feature) `.json`, and verifies it.
pub fn load(path: &Path) -> Result<Model, CliError> {
    let wrap = |source| CliError::model(path, source);
    if is_keras(path) {
        return Err(CliError::Usage(format!(
            "{}: is a Keras model; this command reads ONNX models (.onnx) and the IR JSON \
             that `cellgraph convert` writes (`cellgraph inspect` reads Keras models)",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(CliError::Usage(format!(
            "{}: is a folder, expected an .onnx file (or IR .json); a Keras model folder \
             needs a model.json",
            path.display()
        )));
    }
    let m = if is_json(path) {
        load_json(path)?
    } else {
        Model::load_with(path, &LIMITS.with(|l| l.borrow().clone())).map_err(|e| match e {
            crate::ir::Error::Io { path, source } => CliError::Io { path, source },
            other => wrap(other),
        })?
    };
    verify(&m.graph).map_err(wrap)?;
    let unread = unread_values(&m.graph);
    if !unread.is_empty() {
        eprintln!(
            "warning: {}: no node reads {} (a missing edge?)",
            path.display(),
            unread
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(m)
}

#[cfg(feature = "serde")]
fn load_json(path: &Path) -> Result<Model, CliError> {
    let limits = LIMITS.with(|l| l.borrow().clone());
    let io = |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limits.max_file_bytes {
        return Err(CliError::Usage(format!(
            "{}: the file has {len} bytes, more than the limit of {} (--max-file-bytes)",
            path.display(),
            limits.max_file_bytes
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let m = Model::from_json(&text).map_err(|source| match source {
        crate::ir::Error::Json(msg) => CliError::Usage(format!(
            "{}: not the IR JSON that `cellgraph convert MODEL.onnx OUT.json` writes: {msg}",
            path.display()
        )),
        other => CliError::model(path, other),
    })?;
    check_limits(&m.graph, &limits, 0, &mut 0, &mut 0)
        .map_err(|msg| CliError::Usage(format!("{}: {msg}", path.display())))?;
    Ok(m)
}

/// Checks a graph read from IR JSON against the limits an ONNX file is read within:
/// nesting, node count, each initializer's and all initializers' bytes.
#[cfg(feature = "serde")]
fn check_limits(
    g: &crate::ir::Graph,
    limits: &crate::ir::onnx::Limits,
    depth: usize,
    nodes: &mut usize,
    total: &mut u64,
) -> Result<(), String> {
    if depth > limits.max_nesting {
        return Err(format!(
            "graph {:?} is nested {depth} deep, more than the limit of {} (--max-nesting)",
            g.name, limits.max_nesting
        ));
    }
    for n in g.node_ids() {
        *nodes += 1;
        if *nodes > limits.max_nodes {
            return Err(format!(
                "more than {} nodes (--max-nodes)",
                limits.max_nodes
            ));
        }
        match &g.node(n).kind {
            NodeKind::Initializer { tensor, .. }
            | NodeKind::Input {
                default: Some(tensor),
            } => {
                let b = (tensor.len() as u64).saturating_mul(tensor.dtype().size_of() as u64);
                let name = &g.node(n).name;
                if b > limits.max_tensor_bytes {
                    return Err(format!(
                        "tensor {name:?} has {b} bytes, more than the limit of {} (--max-tensor-bytes)",
                        limits.max_tensor_bytes
                    ));
                }
                *total = total.saturating_add(b);
                if *total > limits.max_total_bytes {
                    return Err(format!(
                        "the tensors up to {name:?} take {total} bytes, more than the limit of {} (--max-total-bytes)",
                        limits.max_total_bytes
                    ));
                }
            }
            NodeKind::Op(op) => {
                for (_, body) in op.subgraphs() {
                    check_limits(body, limits, depth + 1, nodes, total)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The graph inputs and initializers of `g` that nothing reads: no node, no graph
/// output, no subgraph by name. Legal, but in a hand-edited file usually a lost edge.
pub fn unread_values(g: &crate::ir::Graph) -> Vec<String> {
    fn outer_names(g: &crate::ir::Graph, into: &mut std::collections::HashSet<String>) {
        for n in g.node_ids() {
            if let Some(op) = g.node(n).op() {
                for (_, body) in op.subgraphs() {
                    for &o in body.outers() {
                        into.insert(body.node(o).name.clone());
                    }
                    outer_names(body, into);
                }
            }
        }
    }
    let mut by_name = std::collections::HashSet::new();
    outer_names(g, &mut by_name);
    let mut unread = Vec::new();
    let sources = g.input_values().into_iter().chain(
        g.initializers()
            .iter()
            .map(|&n| crate::ir::ValueRef { node: n, slot: 0 }),
    );
    for v in sources {
        let name = &g.value(v).name;
        if g.users(v).is_empty() && !g.outputs().contains(&v) && !by_name.contains(name) {
            unread.push(name.clone());
        }
    }
    unread.sort();
    unread.dedup();
    unread
}

#[cfg(not(feature = "serde"))]
fn load_json(_: &Path) -> Result<Model, CliError> {
    Err(CliError::Usage(
        "JSON needs cellgraph built with the `serde` feature".into(),
    ))
}

/// Writes a model as `.onnx` or (with the `serde` feature) `.json`.
pub fn save(m: &Model, path: &Path) -> Result<(), CliError> {
    let bytes = if is_json(path) {
        json_bytes(m, path)?
    } else {
        m.to_bytes()
    };
    std::fs::write(path, bytes).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(feature = "serde")]
fn json_bytes(m: &Model, path: &Path) -> Result<Vec<u8>, CliError> {
    m.to_json()
        .map(String::into_bytes)
        .map_err(|source| CliError::model(path, source))
}

#[cfg(not(feature = "serde"))]
fn json_bytes(_: &Model, _: &Path) -> Result<Vec<u8>, CliError> {
    Err(CliError::Usage(
        "JSON needs cellgraph built with the `serde` feature".into(),
    ))
}

/// Runs the cases found under `paths`: `PASS <name><detail>` or `FAIL <name>: <reason>`
/// per case, then `N passed, M failed`; exit status 1 when anything failed or nothing ran.
fn run_suite(
    paths: &[PathBuf],
    find: impl Fn(&Path) -> Vec<PathBuf>,
    run_one: impl Fn(&Path) -> Result<String, String>,
) -> Result<ExitCode, CliError> {
    let mut cases = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(CliError::Usage(format!(
                "{}: no such file or folder",
                p.display()
            )));
        }
        cases.extend(find(p));
    }
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_one(case) {
            Ok(detail) => {
                passed += 1;
                println!("PASS {name}{detail}");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed > 0 || cases.is_empty() { 1 } else { 0 })
}

/// Whether `path` is a Keras model: a folder with `model.json`, or a `.json` file whose
/// top level has Keras's `class_name`.
pub fn is_keras(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("model.json").is_file();
    }
    if path.extension().is_some_and(|e| e == "json") {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                return v.get("class_name").is_some();
            }
        }
    }
    false
}

/// `cellgraph inspect` on a Keras model: its summary, then the IR graph it lowers to
/// (inference, unknown sizes taken as 1) with how each recurrent layer runs. A model
/// without weights is refused unless `random_weights`.
pub fn inspect_keras(path: &Path, random_weights: bool) -> Result<String, CliError> {
    let keras_err = |e: crate::keras::KerasError| CliError::Usage(e.to_string());
    let options = crate::keras::LoadOptions {
        limits: LIMITS.with(|l| l.borrow().clone()),
        random_weights,
    };
    let model = crate::keras::load_model_with(path, &options).map_err(keras_err)?;
    let mut s = format!("keras model: {}\n", path.display());
    s += &model.summary();
    let sig: Vec<(crate::ir::DType, Vec<usize>)> = model
        .input_shapes()
        .iter()
        .map(|shape| {
            (
                crate::ir::DType::F32,
                shape.iter().map(|d| d.unwrap_or(1)).collect(),
            )
        })
        .collect();
    let g = model.to_graph(&sig).map_err(keras_err)?;
    let _ = writeln!(
        s,
        "IR graph (inference; inputs {:?}, unknown sizes taken as 1):",
        sig.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()
    );
    s += &recurrent_report(&g);
    s += &print_graph(&g);
    Ok(s)
}

/// The text `cellgraph inspect` prints for an ONNX (or IR JSON) model.
pub fn inspect_text(path: &Path, m: &Model) -> String {
    let g = &m.graph;
    let mut s = String::new();
    let _ = writeln!(s, "model: {}", path.display());
    let _ = writeln!(
        s,
        "ir_version: {}  producer: {} {}",
        m.ir_version, m.producer_name, m.producer_version
    );
    let opsets: Vec<String> = g
        .opsets()
        .iter()
        .map(|(d, v)| format!("{} {v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    let _ = writeln!(s, "opset imports: {}", opsets.join(", "));
    let _ = writeln!(s, "inputs:");
    for v in g.input_values() {
        let val = g.value(v);
        let _ = writeln!(s, "  {} : {}", val.name, val.ty);
    }
    let _ = writeln!(s, "outputs:");
    for &v in g.outputs() {
        let val = g.value(v);
        let _ = writeln!(s, "  {} : {}", val.name, val.ty);
    }
    let trainable: u64 = g
        .initializers()
        .iter()
        .filter_map(|&n| match &g.node(n).kind {
            NodeKind::Initializer {
                tensor,
                trainable: true,
            } => Some(tensor.len() as u64),
            _ => None,
        })
        .sum();
    let _ = writeln!(
        s,
        "parameters: {} ({} in trainable initializers)",
        g.parameter_count(),
        trainable
    );
    let _ = writeln!(s, "ops: {}", g.op_count());
    s += &recurrent_report(g);
    let _ = writeln!(s, "graph:");
    s.push_str(&print_graph(g));
    s
}

/// Where every top-level node of `g` runs on `backend`'s list (the CPU last), after the
/// selector's fused/loop choice: one line per node, with each refusal's reason.
pub fn placement_report(g: &crate::ir::Graph, backend: BackendArg) -> Result<String, CliError> {
    let mut list = backend.before_cpu();
    list.push(std::sync::Arc::new(cpu_backend(
        crate::backends::cpu::Recurrent::Fused,
    )));
    let selected = crate::backends::passes::select::select(&list, g, true)
        .map_err(|e| CliError::Run(format!("select: {e}")))?;
    let names: Vec<&str> = list.iter().map(|d| d.name()).collect();
    let placed = crate::backends::placed::place(&selected.graph, &list)
        .map_err(|e| CliError::Run(format!("placement: {e}")))?;
    let mut s = format!("placement (backends {}):\n", names.join(", "));
    for p in placed {
        let _ = writeln!(s, "  {p}");
    }
    Ok(s)
}

/// The selector's decision for every recurrent node of `g` on the CPU backend: one line
/// per `Scan` loop or recurrent op, `LSTM → fused cpu` or `loop: <why>`.
pub fn recurrent_report(g: &crate::ir::Graph) -> String {
    let cpu: std::sync::Arc<dyn crate::backends::Device> =
        std::sync::Arc::new(cpu_backend(crate::backends::cpu::Recurrent::Fused));
    let mut s = String::new();
    match crate::backends::passes::select::select(&[cpu], g, true) {
        Ok(sel) if sel.choices.is_empty() => {
            let _ = writeln!(s, "recurrent nodes: none");
        }
        Ok(sel) => {
            let _ = writeln!(s, "recurrent nodes (backend cpu):");
            for c in &sel.choices {
                let _ = writeln!(s, "  {c}");
            }
        }
        Err(e) => {
            let _ = writeln!(s, "recurrent nodes: the selector failed: {e}");
        }
    }
    s
}
