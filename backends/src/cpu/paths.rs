//! Which paths the fused recurrent kernels took, counted on the thread that ran them.
//!
//! The kernels choose a path per call from the sizes, the thread count and the cell's
//! attributes (one block or blocks of rows on threads, the one-pass gate kernel of the
//! standard cell, the joined `[Wᵀ; Rᵀ]` product, a backward from saved activations or
//! recomputing). Tests read these counts to show that a configuration reached the path
//! it is meant to test; a few increments per call, none per step. The counts belong to
//! the thread that called the kernel (a plan runs its nodes on the calling thread, or on
//! the pool thread of `ThreadPool::install`), so tests running side by side do not see
//! each other's counts.

use std::cell::Cell;

/// Kernel paths taken on this thread since the last [`take`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Fused forward runs for inference (`LSTM`/`GRU`/`RNN` and their masked forms).
    pub forward: usize,
    /// Of those, the runs whose blocks of batch rows ran on several threads.
    pub forward_threaded: usize,
    /// Rows a running block handed to an idle thread between two steps.
    pub row_splits: usize,
    /// Inference directions that ran the one-pass gate kernel of the standard cell.
    pub one_pass_directions: usize,
    /// Inference directions that multiplied `[Wᵀ; Rᵀ]` as one matrix per step.
    pub joint_directions: usize,
    /// Training forwards that kept their activations for the backward.
    pub saving_forward: usize,
    /// Backward runs from a saved forward's activations (the pair ran).
    pub paired_backward: usize,
    /// Backward runs that recomputed the forward.
    pub recomputing_backward: usize,
    /// Training passes (a direction's forward or backward) over blocks of rows on
    /// several threads.
    pub threaded_training_passes: usize,
    /// Training directions that ran the plain LSTM/GRU steps (σ/tanh, no clip,
    /// peepholes zero, reset-after GRU): one-pass forward kept for the backward.
    pub plain_training_directions: usize,
}

thread_local! {
    static COUNTS: Cell<PathCounts> = Cell::new(PathCounts::default());
}

/// Adds to this thread's counts.
pub(crate) fn count(f: impl FnOnce(&mut PathCounts)) {
    COUNTS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// This thread's counts since the last call, which resets them.
pub fn take() -> PathCounts {
    COUNTS.with(|c| c.replace(PathCounts::default()))
}
