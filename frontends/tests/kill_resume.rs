//! Durable training: a training child process killed at random moments, many times, and
//! once aborted halfway through writing a checkpoint, always leaves a newest complete
//! checkpoint that loads, and resuming ends with exactly the weights and accuracy of an
//! uninterrupted run (same seed, CPU).

use cellgraph::keras::checkpoint::list_checkpoints;
use cellgraph::keras::{History, Loss, Metric, Optimizer};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ARGS: [&str; 9] = [
    "mnist",
    "--limit",
    "128",
    "--epochs",
    "5",
    "--batch-size",
    "32",
    "--seed",
    "5",
];

fn run_to_end(out: &Path, extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_cellgraph"))
        .args(ARGS)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run cellgraph mnist");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or_default().to_string()
}

fn weights(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("model/weights"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// The newest checkpoint must load into a fresh model (not just some older one).
fn newest_checkpoint_loads(dir: &Path) -> Option<usize> {
    let newest = list_checkpoints(&dir.join("checkpoints")).pop()?;
    let mut m = cellgraph::mnist::guide_model(false, 5).unwrap();
    m.compile(
        Optimizer::adam(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[Metric::Accuracy],
    );
    let mut h = History::default();
    let epoch = m.load_checkpoint(&newest.1, &mut h).unwrap_or_else(|e| {
        panic!(
            "newest checkpoint {} does not load: {e}",
            newest.1.display()
        )
    });
    assert_eq!(epoch, newest.0);
    assert_eq!(h.get("loss").map(<[f64]>::len), Some(epoch));
    Some(epoch)
}

#[test]
fn killed_training_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let want = run_to_end(&reference, &[]);
    let full = t0.elapsed();

    let out = tmp.path().join("killed");
    // First, a crash halfway through writing the checkpoint of epoch 2: the partial file
    // stays a temporary one and the checkpoint of epoch 1 is the newest, and loads.
    let status = Command::new(env!("CARGO_BIN_EXE_cellgraph"))
        .args(ARGS)
        .arg("--out")
        .arg(&out)
        .args(["--resume", "--fault-abort-in-checkpoint", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run cellgraph");
    assert!(!status.success(), "the checkpoint-write fault did not fire");
    assert_eq!(newest_checkpoint_loads(&out), Some(1));
    let partial = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
    assert!(partial, "the aborted write left no partial temporary file");

    // Then kills at random moments between 2 % and 20 % of a full run: at least the first
    // three runs cannot finish the 7 epochs left before they are killed.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut frac = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        0.02 + (rng % 1000) as f64 / 1000.0 * 0.18
    };
    let (mut kills, mut finished) = (0, None);
    for _ in 0..12 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellgraph"))
            .args(ARGS)
            .arg("--out")
            .arg(&out)
            .arg("--resume")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cellgraph");
        let budget = full.mul_f64(frac());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > budget {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match status {
            Some(s) => {
                assert!(s.success(), "a resumed run failed");
                let mut text = String::new();
                use std::io::Read;
                child
                    .stdout
                    .take()
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                finished = Some(text);
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
        newest_checkpoint_loads(&out);
    }
    let text = match finished {
        Some(t) => t,
        None => run_to_end(&out, &["--resume"]),
    };
    eprintln!("1 abort during a checkpoint write, then {kills} kills (full run {full:?})");
    assert!(kills >= 3, "the child was killed {kills} times");
    assert_eq!(last_line(&text), last_line(&want));
    assert_eq!(weights(&out), weights(&reference), "final weights differ");
}
