//! Work handed from a busy thread to an idle one between two steps of a recurrence.
//!
//! [`super::rnn::run`] gives each thread whole blocks of batch rows to run through every
//! step, with no synchronisation per step. Two equal blocks on two cores rarely finish
//! together on a shared machine (on the dev VM the first finished 8–20% of the run before
//! the second: medians of a timing probe on the issue-9 workloads), and the first thread
//! then idles. Rows never interact, so the idle thread
//! asks the owner of the block with the most work left for part of its rows; the owner
//! answers between two steps (one relaxed load per step when nobody asks) and hands over
//! those rows' states, and the two go on apart.
//!
//! Each running block has a [`Slot`] on a shared [`Board`]. A slot's state goes
//! `RUNNING → ASKED` (one asker, by compare-and-swap) `→ ANSWERED` (the owner, with its
//! answer in the slot) `→ RUNNING` (the asker, having taken it), and `RUNNING → DONE` when
//! the owner finishes; an owner that finishes while asked declines first, so an asker
//! never waits on a finished block.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const RUNNING: u8 = 0;
const ASKED: u8 = 1;
const ANSWERED: u8 = 2;
const DONE: u8 = 3;

/// A running block, seen by the threads that may ask for part of it.
pub(crate) struct Slot<P> {
    state: AtomicU8,
    /// The work the owner could still give away (rows × steps left; 0 when it cannot
    /// split): askers go to the slot with the most.
    work: AtomicUsize,
    answer: Mutex<Option<P>>,
}

impl<P> Slot<P> {
    /// Whether a thread waits for an answer (the owner checks between steps).
    pub(crate) fn asked(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ASKED
    }

    /// The owner's answer to the thread that asked: part of its work, or `None`.
    pub(crate) fn answer(&self, part: Option<P>) {
        *lock(&self.answer) = part;
        self.state.store(ANSWERED, Ordering::Release);
    }

    /// The owner's work that it could still give away.
    pub(crate) fn set_work(&self, work: usize) {
        self.work.store(work, Ordering::Relaxed);
    }

    /// The owner is done: declines a pending question and retires the slot.
    pub(crate) fn finish(&self) {
        self.set_work(0);
        loop {
            match self
                .state
                .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(ASKED) => self.answer(None),
                // The asker has not taken the answer yet.
                Err(_) => wait(),
            }
        }
    }
}

/// The running blocks of one recurrent op.
pub(crate) struct Board<P> {
    slots: Mutex<Vec<Arc<Slot<P>>>>,
}

impl<P> Board<P> {
    /// An empty board.
    pub(crate) fn new() -> Board<P> {
        Board {
            slots: Mutex::new(Vec::new()),
        }
    }

    /// A slot for a block with `work` to give away (see [`Slot::set_work`]).
    pub(crate) fn register(&self, work: usize) -> Arc<Slot<P>> {
        let slot = Arc::new(Slot {
            state: AtomicU8::new(RUNNING),
            work: AtomicUsize::new(work),
            answer: Mutex::new(None),
        });
        lock(&self.slots).push(slot.clone());
        slot
    }

    /// Part of the running block with the most work to give away, waiting for its
    /// owner's next step; `None` once no block has any.
    pub(crate) fn take(&self) -> Option<P> {
        loop {
            let victim = lock(&self.slots)
                .iter()
                .filter(|s| s.work.load(Ordering::Relaxed) > 0)
                .max_by_key(|s| s.work.load(Ordering::Relaxed))
                .cloned()?;
            if victim
                .state
                .compare_exchange(RUNNING, ASKED, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                // Finished, or another thread is asking it: look again.
                wait();
                continue;
            }
            while victim.state.load(Ordering::Acquire) != ANSWERED {
                wait();
            }
            let part = lock(&victim.answer).take();
            victim.state.store(RUNNING, Ordering::Release);
            if part.is_some() {
                return part;
            }
            // Declined: its owner set its work to 0 first, so it is not asked again.
        }
    }
}

/// The lock even if a thread panicked holding it (the data is a plain hand-over).
fn lock<V>(m: &Mutex<V>) -> MutexGuard<'_, V> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pause in a wait for another thread (which answers within one of its steps).
fn wait() {
    std::hint::spin_loop();
    std::thread::yield_now();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asker_gets_a_part_or_none_and_never_waits_on_a_finished_block() {
        let board = Board::<usize>::new();
        let slot = board.register(10);
        std::thread::scope(|s| {
            let asker = s.spawn(|| board.take());
            // The owner answers between its steps.
            while !slot.asked() {
                std::thread::yield_now();
            }
            slot.set_work(0);
            slot.answer(Some(7));
            assert_eq!(asker.join().expect("asker"), Some(7));
        });
        // Work 0: nobody is asked.
        assert_eq!(board.take(), None);
        // Asked while finishing: the owner declines, the asker returns.
        slot.set_work(5);
        std::thread::scope(|s| {
            let asker = s.spawn(|| board.take());
            while !slot.asked() {
                std::thread::yield_now();
            }
            slot.finish();
            assert_eq!(asker.join().expect("asker"), None);
        });
        assert_eq!(board.take(), None);
    }
}
