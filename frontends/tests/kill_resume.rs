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
    let want = run_to_end(&reference, &[]);

    let out = tmp.path().join("killed");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |lo: u64, hi: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        lo + rng % (hi - lo)
    };
    let (mut kills, mut aborts, mut finished) = (0, 0, None);
    let deadline = Instant::now() + Duration::from_secs(240);
    for attempt in 0..25 {
        if Instant::now() > deadline {
            break;
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellgraph"));
        cmd.args(ARGS).arg("--out").arg(&out).arg("--resume");
        if attempt == 2 {
            // Abort halfway through writing the next checkpoint.
            let next_epoch = newest_checkpoint_loads(&out).unwrap_or(0) + 1;
            cmd.args(["--fault-abort-in-checkpoint", &next_epoch.to_string()]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cellgraph");
        // The fault run is left to abort by itself; the others die at a random moment.
        let budget = if attempt == 2 {
            Duration::from_secs(120)
        } else {
            Duration::from_millis(next(30, 2500))
        };
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > budget {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match status {
            Some(s) if s.success() => {
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
            Some(_) => aborts += 1,
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
    eprintln!("{kills} kills, {aborts} aborted runs (one during a checkpoint write)");
    assert!(kills >= 3, "the child was killed {kills} times");
    assert!(aborts >= 1, "the checkpoint-write fault did not fire");
    assert_eq!(last_line(&text), last_line(&want));
    assert_eq!(weights(&out), weights(&reference), "final weights differ");
}
