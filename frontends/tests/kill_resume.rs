//! Durable training: a training child process killed across the whole run (in start-up,
//! mid-epoch after it wrote checkpoints of its own, at random moments, right after its last
//! checkpoint while it writes the model), and once aborted halfway through writing a
//! checkpoint, always leaves a newest complete checkpoint that loads, and resuming ends
//! with exactly the weights and accuracy of an uninterrupted run (same seed, CPU).

use cellgraph::keras::checkpoint::list_checkpoints;
use cellgraph::keras::{History, Loss, Metric, Optimizer};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EPOCHS: usize = 8;
const ARGS: [&str; 9] = [
    "mnist",
    "--limit",
    "384",
    "--epochs",
    "8",
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

/// The newest checkpoint epoch in `out/checkpoints` (0: none).
fn newest(out: &Path) -> usize {
    list_checkpoints(&out.join("checkpoints"))
        .last()
        .map_or(0, |c| c.0)
}

fn spawn(out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cellgraph"))
        .args(ARGS)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cellgraph")
}

/// Waits until `ready` holds or the child exits (then `Err(status)`), polling every ms;
/// panics past `limit` (a hung child).
fn wait_for(
    child: &mut Child,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Err(s);
        }
        assert!(start.elapsed() < limit, "a child ran past {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// When a run is killed.
#[derive(Clone, Copy, Debug)]
enum Moment {
    /// At this fraction of the start-up (before the first epoch ends).
    StartUp(f64),
    /// After the child wrote a checkpoint of its own, this fraction of an epoch later.
    MidEpoch(f64),
    /// At this fraction of the time the child's remaining work takes.
    Anywhere(f64),
    /// As soon as the checkpoint of the last epoch exists: the child is writing the model,
    /// the ONNX file and the curves.
    AtTheEnd,
}

/// Epoch timestamps of an uninterrupted run: (time to the first checkpoint, time per
/// epoch after it, total).
fn timed_reference(out: &Path) -> (Duration, Duration, Duration, String) {
    let t0 = Instant::now();
    let mut child = spawn(out, &[]);
    let mut seen = [None; EPOCHS + 1];
    let status = loop {
        let e = newest(out);
        if e > 0 && seen[e].is_none() {
            seen[e] = Some(t0.elapsed());
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let total = t0.elapsed();
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(status.success(), "the reference run failed:\n{text}");
    let first = seen[1].expect("the first checkpoint was seen");
    let last = seen[EPOCHS].unwrap_or(total);
    let epoch = (last - first) / (EPOCHS as u32 - 1);
    (first.saturating_sub(epoch), epoch, total, text)
}

#[test]
fn killed_training_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let (startup, epoch, full, want) = timed_reference(&reference);
    eprintln!("reference: start-up {startup:?}, {epoch:?} per epoch, {full:?} in all");
    assert_eq!(newest(&reference), EPOCHS);
    let limit = full * 20 + Duration::from_secs(20);

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

    // Then kills across the run. Each plan's moment is measured from what the child has
    // done (its own checkpoints), not from a guess of the start-up time.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut unit = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 1000) as f64 / 1000.0
    };
    let plans = [
        Moment::StartUp(0.2 + 0.6 * unit()),
        Moment::MidEpoch(0.2 + 0.6 * unit()),
        Moment::Anywhere(0.5 * unit()),
        Moment::StartUp(0.2 + 0.6 * unit()),
        Moment::MidEpoch(0.1 * unit()),
        Moment::Anywhere(0.5 * unit()),
        Moment::MidEpoch(0.5 + 0.4 * unit()),
        Moment::AtTheEnd,
    ];
    let mut log = Vec::new();
    let (mut past_a_checkpoint, mut in_startup, mut at_end) = (0, 0, 0);
    for mut plan in plans {
        let before = newest(&out);
        if matches!(plan, Moment::MidEpoch(_)) && before + 1 >= EPOCHS {
            // No epoch is left after the child's next checkpoint: kill it in start-up.
            plan = Moment::StartUp(0.5);
        }
        let t0 = Instant::now();
        let mut child = spawn(&out, &["--resume"]);
        let waited = match plan {
            Moment::StartUp(f) => {
                wait_for(&mut child, limit, || t0.elapsed() >= startup.mul_f64(f))
            }
            Moment::MidEpoch(f) => {
                wait_for(&mut child, limit, || newest(&out) > before).and_then(|()| {
                    let t1 = Instant::now();
                    wait_for(&mut child, limit, || t1.elapsed() >= epoch.mul_f64(f))
                })
            }
            Moment::Anywhere(f) => {
                let left = startup + epoch * (EPOCHS - before) as u32;
                wait_for(&mut child, limit, || t0.elapsed() >= left.mul_f64(f))
            }
            Moment::AtTheEnd => wait_for(&mut child, limit, || newest(&out) == EPOCHS),
        };
        match waited {
            Ok(()) => {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            Err(s) => panic!("{plan:?}: the child exited ({s}) before its kill moment"),
        }
        let after = newest(&out);
        log.push(format!("{plan:?}: epochs {before} -> {after}"));
        assert_eq!(
            newest_checkpoint_loads(&out),
            Some(after),
            "after a kill ({plan:?})"
        );
        match plan {
            Moment::StartUp(_) if after == before => in_startup += 1,
            Moment::AtTheEnd => at_end += 1,
            _ => {}
        }
        if after > before && !matches!(plan, Moment::AtTheEnd) {
            past_a_checkpoint += 1;
        }
    }
    let text = run_to_end(&out, &["--resume"]);
    eprintln!(
        "1 abort during a checkpoint write, then {} kills:\n  {}",
        log.len(),
        log.join("\n  ")
    );
    assert!(
        in_startup >= 1,
        "no kill landed in start-up (before the child's first epoch ended): {log:?}"
    );
    assert!(
        past_a_checkpoint >= 3,
        "fewer than 3 killed runs got past a checkpoint of their own: {log:?}"
    );
    assert_eq!(at_end, 1, "the kill after the last checkpoint: {log:?}");
    assert!(
        text.contains("resumed from"),
        "the last run did not resume:\n{text}"
    );
    assert_eq!(last_line(&text), last_line(&want));
    assert_eq!(weights(&out), weights(&reference), "final weights differ");
}
