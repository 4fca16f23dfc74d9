//! Run-time budgets: how much memory a plan's values may take, per tensor and alive at
//! once, how many iterations one `Loop` may run, and how long a run may take.
//!
//! A model file's own size is bounded when it is read (`cellgraph_ir::onnx::Limits`); a
//! shape computed at run time (an `Expand` to a shape read from an input, a `Loop` that
//! grows a scan output every trip, a batch of 5,000) is bounded here. Before a kernel
//! runs, the plan predicts its outputs' sizes from the inputs it actually got (the op's
//! own shape rule, given every input's shape and value) and asks the [`Meter`]; values
//! are counted while they live. Exceeding a budget is a [`crate::Error::Budget`] naming
//! the node, the op, what was asked and the limit — never an abort for lack of memory.
//! Besides the configured limits, an ask of 64 MiB or more is checked against what the
//! process can still get: its address-space limit (`ulimit -v`) and the machine's
//! available memory (Linux `/proc`; elsewhere only the configured limits apply).

use std::cell::Cell;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// The limits a run stays within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Largest single value a kernel may make, in bytes.
    pub max_tensor_bytes: u64,
    /// Largest total of the values alive at once during a run (the inputs, every
    /// intermediate not yet freed, loops' accumulated scan outputs), in bytes. The
    /// model's weights are bounded when the model is read, not here.
    pub max_live_bytes: u64,
    /// Most iterations of one `Loop` (a `Scan` runs as many steps as its input has).
    pub max_loop_trips: u64,
    /// A wall-clock limit for one run; `None` for none.
    pub max_seconds: Option<f64>,
}

impl Default for Budget {
    /// Limits no real recurrent model comes near: 4 GiB per value, 16 GiB alive at once,
    /// 65,536 iterations of one `Loop` (a `Scan` runs as many steps as its input has),
    /// no deadline. (The process's address-space limit and
    /// the machine's available memory apply besides.)
    fn default() -> Budget {
        Budget {
            max_tensor_bytes: 4 << 30,
            max_live_bytes: 16 << 30,
            max_loop_trips: 1 << 16,
            max_seconds: None,
        }
    }
}

static PROCESS: RwLock<Option<Budget>> = RwLock::new(None);

impl Budget {
    /// The budget backends start with: the one given to [`Budget::set_process_default`],
    /// or [`Budget::default`]. A program (the CLI) sets it once from its flags, so that
    /// every plan it compiles — also those a Keras model compiles for itself — runs
    /// within it.
    pub fn process_default() -> Budget {
        match PROCESS.read() {
            Ok(b) => b.unwrap_or_default(),
            Err(poisoned) => poisoned.into_inner().unwrap_or_default(),
        }
    }

    /// Sets what [`Budget::process_default`] returns from now on.
    pub fn set_process_default(b: Budget) {
        match PROCESS.write() {
            Ok(mut g) => *g = Some(b),
            Err(poisoned) => *poisoned.into_inner() = Some(b),
        }
    }
}

/// Which budget a run exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// [`Budget::max_tensor_bytes`].
    TensorBytes,
    /// [`Budget::max_live_bytes`].
    LiveBytes,
    /// [`Budget::max_loop_trips`].
    LoopTrips,
    /// [`Budget::max_seconds`].
    Seconds,
    /// The process's address-space limit (`ulimit -v`) left less than asked.
    AddressSpace,
    /// The machine's available memory and free swap are less than asked.
    Memory,
}

impl Exceeded {
    /// The limit's name and where to change it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Exceeded::TensorBytes => "per-value limit (--max-tensor-bytes)",
            Exceeded::LiveBytes => "limit on values alive at once (--max-total-bytes)",
            Exceeded::LoopTrips => "Loop iteration limit (--max-loop-trips)",
            Exceeded::Seconds => "time limit (--max-seconds)",
            Exceeded::AddressSpace => "process's address-space limit (ulimit -v)",
            Exceeded::Memory => "machine's available memory (MemAvailable + SwapFree)",
        }
    }
}

/// Formats a byte count for messages: `4294967296 bytes (4.00 GiB)`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut unit = "";
    for u in UNITS {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = u;
    }
    if unit.is_empty() {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({x:.2} {unit})")
    }
}

/// What an ask over budget reports: which limit, the size asked (bytes, trips or
/// milliseconds) and the limit in the same unit, in words.
#[derive(Clone, Debug, PartialEq)]
pub struct Overrun {
    /// Which limit.
    pub exceeded: Exceeded,
    /// What was asked, in words (`a value of 4294967296 bytes (4.00 GiB)`).
    pub asked: String,
    /// The limit, in words.
    pub limit: String,
}

/// Asks below this size are not checked against the process's and the machine's memory
/// (reading `/proc` costs more than such an allocation).
const SYSTEM_CHECK_BYTES: u64 = 64 << 20;

/// The accounting of one run: the budget, the bytes of values alive now and at most,
/// and the deadline.
#[derive(Debug)]
pub struct Meter {
    budget: Budget,
    live: Cell<u64>,
    peak: Cell<u64>,
    deadline: Option<Instant>,
}

impl Meter {
    /// A meter for one run starting now.
    pub fn new(budget: Budget) -> Meter {
        let deadline = budget
            .max_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Instant::now() + Duration::from_secs_f64(s.min(1e9)));
        Meter {
            budget,
            live: Cell::new(0),
            peak: Cell::new(0),
            deadline,
        }
    }

    /// The budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Bytes of values alive now.
    pub fn live(&self) -> u64 {
        self.live.get()
    }

    /// The most bytes alive at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.get()
    }

    /// Checks that new values of `sizes` bytes may be made now (each within the
    /// per-value limit, all together within the live limit and what the process can
    /// still get). Nothing is counted: [`Meter::hold`] does that once they exist.
    pub fn ask(&self, sizes: &[u64]) -> Result<(), Overrun> {
        for &s in sizes {
            if s > self.budget.max_tensor_bytes {
                return Err(Overrun {
                    exceeded: Exceeded::TensorBytes,
                    asked: format!("a value of {}", bytes(s)),
                    limit: bytes(self.budget.max_tensor_bytes),
                });
            }
        }
        let total = sizes.iter().fold(0u64, |a, &s| a.saturating_add(s));
        let live = self.live.get();
        if live.saturating_add(total) > self.budget.max_live_bytes {
            return Err(Overrun {
                exceeded: Exceeded::LiveBytes,
                asked: format!("{} more with {} alive", bytes(total), bytes(live)),
                limit: bytes(self.budget.max_live_bytes),
            });
        }
        if total >= SYSTEM_CHECK_BYTES {
            if let Some((left, exceeded)) = system_headroom() {
                if total > left {
                    return Err(Overrun {
                        exceeded,
                        asked: format!("{} more", bytes(total)),
                        limit: format!("{} left", bytes(left)),
                    });
                }
            }
        }
        Ok(())
    }

    /// Counts `n` bytes of values that now exist.
    pub fn hold(&self, n: u64) {
        let live = self.live.get().saturating_add(n);
        self.live.set(live);
        if live > self.peak.get() {
            self.peak.set(live);
        }
    }

    /// Stops counting `n` bytes (values freed or handed out of the run).
    pub fn release(&self, n: u64) {
        self.live.set(self.live.get().saturating_sub(n));
    }

    /// Checks the live total after values were made whose size could not be predicted.
    pub fn check_live(&self) -> Result<(), Overrun> {
        let live = self.live.get();
        if live > self.budget.max_live_bytes {
            return Err(Overrun {
                exceeded: Exceeded::LiveBytes,
                asked: format!("{} alive", bytes(live)),
                limit: bytes(self.budget.max_live_bytes),
            });
        }
        Ok(())
    }

    /// Checks that a `Loop` may start iteration `trip` (0-based).
    pub fn trip(&self, trip: u64) -> Result<(), Overrun> {
        if trip >= self.budget.max_loop_trips {
            return Err(Overrun {
                exceeded: Exceeded::LoopTrips,
                asked: format!("more than {trip} iterations"),
                limit: format!("{} iterations", self.budget.max_loop_trips),
            });
        }
        self.time()
    }

    /// Checks the deadline.
    pub fn time(&self) -> Result<(), Overrun> {
        match (self.deadline, self.budget.max_seconds) {
            (Some(d), Some(s)) if Instant::now() > d => Err(Overrun {
                exceeded: Exceeded::Seconds,
                asked: "more time".into(),
                limit: format!("{s} s"),
            }),
            _ => Ok(()),
        }
    }
}

/// How many more bytes this process can allocate, and which bound says so: the
/// address-space limit less what is mapped, or the machine's available memory plus free
/// swap, whichever is smaller. `None` where `/proc` cannot tell.
pub fn system_headroom() -> Option<(u64, Exceeded)> {
    let address = address_space_left().map(|b| (b, Exceeded::AddressSpace));
    let memory = available_memory().map(|b| (b, Exceeded::Memory));
    match (address, memory) {
        (Some(a), Some(m)) => Some(if a.0 <= m.0 { a } else { m }),
        (a, m) => a.or(m),
    }
}

/// The address-space limit (`ulimit -v`) less the process's mapped size, when limited.
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse: no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let size = kib_field(&status, "VmSize:")?;
    Some(limit.saturating_sub(size))
}

/// `MemAvailable` plus `SwapFree` from `/proc/meminfo`.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = kib_field(&info, "MemAvailable:")?;
    let swap = kib_field(&info, "SwapFree:").unwrap_or(0);
    Some(avail.saturating_add(swap))
}

/// A `Name:   123 kB` field of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_over_each_limit_are_refused_and_named() {
        let m = Meter::new(Budget {
            max_tensor_bytes: 100,
            max_live_bytes: 150,
            max_loop_trips: 3,
            max_seconds: None,
        });
        assert!(m.ask(&[100]).is_ok());
        assert_eq!(m.ask(&[101]).unwrap_err().exceeded, Exceeded::TensorBytes);
        m.hold(100);
        assert_eq!(m.ask(&[60]).unwrap_err().exceeded, Exceeded::LiveBytes);
        assert!(m.ask(&[50]).is_ok());
        m.release(100);
        assert_eq!(m.live(), 0);
        assert_eq!(m.peak(), 100);
        assert!(m.trip(2).is_ok());
        let e = m.trip(3).unwrap_err();
        assert_eq!(e.exceeded, Exceeded::LoopTrips);
        assert_eq!(e.limit, "3 iterations");
    }

    #[test]
    fn a_passed_deadline_is_refused() {
        let m = Meter::new(Budget {
            max_seconds: Some(0.0),
            ..Budget::default()
        });
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(m.time().unwrap_err().exceeded, Exceeded::Seconds);
        assert!(Meter::new(Budget::default()).time().is_ok());
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(12), "12 bytes");
        assert_eq!(bytes(4 << 30), "4294967296 bytes (4.00 GiB)");
    }

    #[test]
    fn proc_fields_parse() {
        let t = "MemTotal:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(kib_field(t, "MemAvailable:"), Some(2048 * 1024));
        assert_eq!(kib_field(t, "SwapFree:"), None);
    }
}
