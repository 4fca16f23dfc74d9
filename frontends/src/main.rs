//! The `cellgraph` command-line tool.

use cellgraph::cli::{run, Cli};
use clap::Parser;

// The kernels allocate and free buffers of megabytes per op and per step; glibc's
// malloc hands those back to the kernel and page-faults them in again every time
// (17% of a W1 training step's profile). mimalloc keeps them: the W1 training step's
// `LSTMGrad` went from 17 ms to 10 ms (docs/PERFORMANCE.md). A library cannot choose the
// allocator for its users; programs embedding cellgraph can do the same.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
