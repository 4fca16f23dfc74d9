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

/// `mi_option_purge_delay` in `mimalloc.h`'s `mi_option_e` (the sys crate names no
/// constant for it): how long freed memory waits before mimalloc gives it back to the
/// kernel, in milliseconds; -1 never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process. A training step frees and allocates again buffers
/// of tens of megabytes (W3's gate activations: 39 MB); handed back to the kernel after
/// mimalloc's default second, every step faulted them in again, zeroed page by page (W3
/// training: ~2,100 page faults and 4.3% of the profile in the kernel's `clear_page`
/// per step; with this, no faults after the first step). The cost: a process holds on
/// to its peak memory until it exits.
fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's options, which it reads when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The option number still names the purge delay: its default is 1,000 ms in
    /// mimalloc 3 (10 in mimalloc 2), a value no option next to it has.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads one of mimalloc's options.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert!(
            v == 1000 || v == 10,
            "option 15 is {v}, not mimalloc's purge delay"
        );
    }
}
