//! The path from the miners' threads to the Stratum client. It is bounded, so that a flood of
//! shares (a pool that sets a tiny difficulty, a client stuck on a slow socket) cannot grow
//! memory without limit. A share that does not fit is counted and logged, never dropped
//! silently. A block is different: it waits up to [`BLOCK_WAIT`] for room, since one block is
//! worth more than every other share together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};

use super::work::Share;
use crate::log_limit::RateLimitedLog;

/// Shares waiting for the client: at the difficulty floor a CPU finds a few hundred a second,
/// so this is seconds of backlog, and a few MiB at most.
pub const SHARE_CHANNEL_CAPACITY: usize = 4096;

/// How long a miner thread waits for room before it drops a share that is a block.
pub const BLOCK_WAIT: Duration = Duration::from_secs(1);

/// A bounded share channel: the miners' end and the client's end.
pub fn share_channel(capacity: usize) -> (ShareSender, ShareReceiver) {
    share_channel_with_block_wait(capacity, BLOCK_WAIT)
}

/// [`share_channel`] with another wait for blocks (tests use a long one, so that a busy
/// machine cannot make them fail).
pub fn share_channel_with_block_wait(
    capacity: usize,
    block_wait: Duration,
) -> (ShareSender, ShareReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    (
        ShareSender {
            tx,
            dropped: dropped.clone(),
            log: Arc::default(),
            block_wait,
        },
        ShareReceiver { rx, dropped },
    )
}

/// The miners' end. Cheap to clone; every miner thread holds one.
#[derive(Clone, Debug)]
pub struct ShareSender {
    tx: mpsc::Sender<Share>,
    dropped: Arc<AtomicU64>,
    log: Arc<Mutex<RateLimitedLog>>,
    block_wait: Duration,
}

impl ShareSender {
    /// Hands `share` to the client without blocking (a block waits for room, up to a second).
    /// `false`: the share was dropped, and counted and logged.
    pub fn send(&self, share: Share) -> bool {
        let share = match self.tx.try_send(share) {
            Ok(()) => return true,
            Err(TrySendError::Full(share)) if share.is_block => match self.wait_for_room(share) {
                Ok(()) => return true,
                Err(share) => share,
            },
            Err(TrySendError::Full(share)) | Err(TrySendError::Closed(share)) => share,
        };
        self.drop_share(&share);
        false
    }

    /// Retries a block until the channel has room, the client is gone, or the wait is up.
    /// Miner threads are plain threads, so a short sleep here holds up no async task.
    fn wait_for_room(&self, mut share: Share) -> Result<(), Share> {
        let deadline = Instant::now() + self.block_wait;
        loop {
            match self.tx.try_send(share) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(s)) => return Err(s),
                Err(TrySendError::Full(s)) if Instant::now() >= deadline => return Err(s),
                Err(TrySendError::Full(s)) => share = s,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn drop_share(&self, share: &Share) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let why = if self.tx.is_closed() {
            "the Stratum client has stopped"
        } else {
            "the share channel is full (shares are found faster than they are submitted)"
        };
        if share.is_block {
            // Never rate-limited: an operator must see every lost block.
            tracing::error!(job = %share.job_id, nonce = format!("{:08x}", share.nonce), why, "A BLOCK WAS DROPPED before it could be submitted");
            return;
        }
        let admitted = self
            .log
            .lock()
            .map(|mut l| l.admit(Instant::now()))
            .unwrap_or(Some(0));
        if let Some(suppressed) = admitted {
            tracing::warn!(
                job = %share.job_id,
                why,
                dropped_total = total,
                suppressed,
                "share dropped"
            );
        }
    }

    /// Shares dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The client's end.
#[derive(Debug)]
pub struct ShareReceiver {
    rx: mpsc::Receiver<Share>,
    dropped: Arc<AtomicU64>,
}

impl ShareReceiver {
    pub async fn recv(&mut self) -> Option<Share> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Share> {
        self.rx.try_recv().ok()
    }

    /// Shares the miners could not put into the channel.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(nonce: u32, is_block: bool) -> Share {
        Share {
            generation: 1,
            job_id: "j".into(),
            extranonce1: vec![1],
            extranonce2: vec![0; 4],
            ntime: 0,
            nonce,
            version_bits: None,
            hash: [0; 32],
            difficulty: 1.0,
            is_block,
        }
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_growing() {
        let (tx, mut rx) = share_channel(4);
        let sent: Vec<bool> = (0..10).map(|n| tx.send(share(n, false))).collect();
        assert_eq!(sent.iter().filter(|&&s| s).count(), 4);
        assert_eq!(tx.dropped(), 6);
        assert_eq!(rx.dropped(), 6, "both ends see the count");
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv().map(|s| s.nonce)).collect();
        assert_eq!(got, vec![0, 1, 2, 3], "the first shares are kept, in order");
    }

    #[test]
    fn a_block_waits_for_room_that_the_client_makes() {
        let (tx, mut rx) = share_channel_with_block_wait(1, Duration::from_secs(600));
        assert!(tx.send(share(1, false)));
        // The client drains the channel only once the block is waiting on it.
        let waiting = std::thread::spawn(move || tx.send(share(2, true)));
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 2 && Instant::now() < deadline {
            if let Some(s) = rx.try_recv() {
                got.push(s.nonce);
            }
            std::thread::yield_now();
        }
        assert!(waiting.join().unwrap(), "the block was queued, not dropped");
        assert_eq!(got, vec![1, 2]);
        assert_eq!(rx.dropped(), 0);
    }

    #[test]
    fn shares_sent_after_the_client_stopped_are_counted() {
        let (tx, rx) = share_channel(8);
        drop(rx);
        assert!(!tx.send(share(1, false)));
        assert!(
            !tx.send(share(2, true)),
            "a block does not wait for a client that is gone"
        );
        assert_eq!(tx.dropped(), 2);
    }
}
