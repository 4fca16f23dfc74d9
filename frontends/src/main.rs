//! The `cellgraph` command-line tool.

use cellgraph::cli::{run, Cli};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
