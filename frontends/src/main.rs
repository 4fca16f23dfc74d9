//! The `cellgraph` command-line tool.

use cellgraph::cli::{run, Cli};
use clap::Parser;

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
