//! The flag that stops a miner, and the clock its latency is measured on. Raising it is a few
//! atomic stores, so the HTTP layer can do it the moment a request arrives, before any message
//! is scheduled. A GPU miner also gives it a [`HostWord`]: a word in host memory that the
//! device reads while its kernel runs (host-mapped pinned memory on CUDA), which every raise
//! writes too, so a running kernel sees the raise without the host doing anything else.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// A word that a device reads while it mines: 1 means stop.
pub trait HostWord: Send + Sync {
    fn word(&self) -> &AtomicU32;
}

/// The flag that stops the miner. It remembers when it was raised, so the miner can report
/// how long it took to yield.
#[derive(Clone, Default)]
pub struct PreemptFlag(Arc<FlagInner>);

#[derive(Default)]
struct FlagInner {
    raised: AtomicBool,
    raised_at_ns: AtomicU64,
    device: OnceLock<Arc<dyn HostWord>>,
}

impl std::fmt::Debug for PreemptFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreemptFlag")
            .field("raised", &self.is_raised())
            .field("device_word", &self.0.device.get().is_some())
            .finish()
    }
}

/// Nanoseconds since the first call in this process: a clock all threads share.
pub fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

impl PreemptFlag {
    /// Stops the miner. The time is written before the flag, so whoever sees the flag raised
    /// also sees when; every store is sequentially consistent, so a raise that races with
    /// [`PreemptFlag::lower`] or [`PreemptFlag::sync_device`] leaves the device word raised.
    pub fn raise(&self) {
        let now = monotonic_ns();
        if !self.0.raised.load(Ordering::SeqCst) {
            self.0.raised_at_ns.store(now, Ordering::SeqCst);
        }
        // A lower between the look above and here would leave the flag raised with an older
        // raise's time: whoever turns it from down to up writes the time again.
        if !self.0.raised.swap(true, Ordering::SeqCst) {
            self.0.raised_at_ns.store(now, Ordering::SeqCst);
        }
        if let Some(w) = self.0.device.get() {
            w.word().store(1, Ordering::SeqCst);
        }
    }

    pub fn is_raised(&self) -> bool {
        self.0.raised.load(Ordering::SeqCst)
    }

    /// Lets the miner run again (the miner's `resume` calls it).
    pub(crate) fn lower(&self) {
        self.0.raised.store(false, Ordering::SeqCst);
        self.sync_device();
    }

    /// Brings the device word in line with the flag: lowered first, then raised again if a
    /// raise came in meanwhile (a raiser sets the flag before the word, so one of the two
    /// writes the final 1).
    pub(crate) fn sync_device(&self) {
        if let Some(w) = self.0.device.get() {
            if !self.is_raised() {
                w.word().store(0, Ordering::SeqCst);
                if self.is_raised() {
                    w.word().store(1, Ordering::SeqCst);
                }
            } else {
                w.word().store(1, Ordering::SeqCst);
            }
        }
    }

    /// Mirrors the flag into `word` from now on. A flag drives one device: a second word is
    /// refused (returns false).
    pub fn mirror_to(&self, word: Arc<dyn HostWord>) -> bool {
        let fresh = self.0.device.set(word).is_ok();
        if fresh {
            self.sync_device();
        }
        fresh
    }

    pub(crate) fn raised_at_ns(&self) -> u64 {
        self.0.raised_at_ns.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Word(AtomicU32);
    impl HostWord for Word {
        fn word(&self) -> &AtomicU32 {
            &self.0
        }
    }

    #[test]
    fn the_device_word_follows_the_flag() {
        let flag = PreemptFlag::default();
        flag.raise();
        let word = Arc::new(Word(AtomicU32::new(0)));
        assert!(flag.mirror_to(word.clone()));
        assert_eq!(word.0.load(Ordering::SeqCst), 1, "mirrored as raised");
        flag.lower();
        assert_eq!(word.0.load(Ordering::SeqCst), 0);
        flag.raise();
        assert_eq!(word.0.load(Ordering::SeqCst), 1);
        assert!(flag.raised_at_ns() > 0);
        assert!(!flag.mirror_to(Arc::new(Word(AtomicU32::new(0)))));
    }

    #[test]
    fn a_raise_racing_a_lower_never_leaves_the_word_down_under_a_raised_flag() {
        let word = Arc::new(Word(AtomicU32::new(0)));
        let flag = PreemptFlag::default();
        flag.mirror_to(word.clone());
        for _ in 0..2000 {
            let (a, b) = (flag.clone(), flag.clone());
            let t = std::thread::spawn(move || a.lower());
            b.raise();
            t.join().unwrap();
            if flag.is_raised() {
                assert_eq!(word.0.load(Ordering::SeqCst), 1);
            }
            flag.raise();
        }
    }
}
