//! The GPU miner's bookkeeping, pure and device-free: a [`Sweep`] walks one unit of work's
//! nonce space in [`Segment`]s of one launch each, never past 2³², and a segment keeps each
//! block's own next wave. After a launch, [`Segment::absorb`] advances every block to the
//! wave it reported and keeps exactly the candidates of the waves it finished in that launch:
//! waves redone after a pre-emption or a full candidate buffer are counted once, and a
//! candidate the kernel found in a wave it did not finish is dropped here and found again
//! when that wave runs.

use thiserror::Error;

use super::job::GpuJob;
use super::launcher::{Geometry, Launch, LaunchResult};

/// Nonces in a header.
pub const NONCE_SPACE: u64 = 1 << 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SweepError {
    #[error("the device reported {got} blocks' progress for {want} blocks")]
    BlockCount { got: usize, want: usize },
    #[error("block {block} reported wave {got}, outside {from}..={to}")]
    Progress {
        block: usize,
        got: u32,
        from: u32,
        to: u32,
    },
}

/// Nonces `start + 0..count` and each block's next wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub start: u32,
    pub count: u64,
    pub end_wave: u32,
    pub progress: Vec<u32>,
    geometry: Geometry,
}

/// What one launch added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Absorbed {
    /// Candidates of finished waves, each once, ascending.
    pub candidates: Vec<u32>,
    /// Nonces hashed in finished waves.
    pub hashed: u64,
    /// The candidate buffer overflowed: some waves will be rescanned.
    pub overflowed: bool,
}

impl Segment {
    /// `count ≥ 1` nonces from `start`, with `start + count ≤ 2³²`.
    pub fn new(start: u64, count: u64, geometry: Geometry) -> Self {
        assert!(
            count >= 1 && start + count <= NONCE_SPACE,
            "a segment stays inside the nonce space"
        );
        let threads = u64::from(geometry.threads());
        Self {
            start: start as u32,
            count,
            end_wave: count.div_ceil(threads) as u32,
            progress: vec![0; geometry.blocks as usize],
            geometry,
        }
    }

    /// The largest offset from `start`.
    pub fn last(&self) -> u32 {
        (self.count - 1) as u32
    }

    pub fn is_done(&self) -> bool {
        self.progress.iter().all(|&p| p >= self.end_wave)
    }

    /// The launch that continues this segment: every block from its own next wave.
    pub fn launch<'a>(&'a self, job: &'a GpuJob, every: u32) -> Launch<'a> {
        Launch {
            job,
            start: self.start,
            last: self.last(),
            end_wave: self.end_wave,
            resume: &self.progress,
            every: every.max(1),
        }
    }

    /// Nonces that block `b` hashes in waves `from..to` (the last wave may be partial).
    pub fn nonces_in(&self, b: u32, from: u32, to: u32) -> u64 {
        let (threads, per_block) = (
            u64::from(self.geometry.threads()),
            u64::from(self.geometry.threads_per_block),
        );
        let first_offset = u64::from(b) * per_block;
        // Waves 0..full have all of the block's offsets in the segment.
        let full = if self.count >= first_offset + per_block {
            (self.count - first_offset - per_block) / threads + 1
        } else {
            0
        };
        let (from, to) = (u64::from(from), u64::from(to));
        let mut n = (full.clamp(from, to) - from) * per_block;
        if (from..to).contains(&full) {
            n += self
                .count
                .saturating_sub(full * threads + first_offset)
                .min(per_block);
        }
        n
    }

    /// Takes a finished launch's result. Nothing changes when the result is malformed.
    pub fn absorb(&mut self, result: &LaunchResult) -> Result<Absorbed, SweepError> {
        let blocks = self.progress.len();
        if result.progress.len() != blocks {
            return Err(SweepError::BlockCount {
                got: result.progress.len(),
                want: blocks,
            });
        }
        for (block, (&got, &from)) in result.progress.iter().zip(&self.progress).enumerate() {
            if got < from || got > self.end_wave {
                return Err(SweepError::Progress {
                    block,
                    got,
                    from,
                    to: self.end_wave,
                });
            }
        }
        let threads = u64::from(self.geometry.threads());
        let per_block = u64::from(self.geometry.threads_per_block);
        let mut candidates: Vec<u32> = result
            .candidates
            .iter()
            .copied()
            .filter(|&nonce| {
                let off = u64::from(nonce.wrapping_sub(self.start));
                if off >= self.count {
                    return false;
                }
                let wave = (off / threads) as u32;
                let block = ((off % threads) / per_block) as usize;
                (self.progress[block]..result.progress[block]).contains(&wave)
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let hashed = (0..blocks)
            .map(|b| self.nonces_in(b as u32, self.progress[b], result.progress[b]))
            .sum();
        self.progress.copy_from_slice(&result.progress);
        Ok(Absorbed {
            candidates,
            hashed,
            overflowed: result.found as usize > result.candidates.len(),
        })
    }
}

/// One unit of work's nonce space (2³², or less in tests), a segment at a time.
#[derive(Debug, Clone)]
pub struct Sweep {
    space: u64,
    segment_nonces: u64,
    geometry: Geometry,
    next_start: u64,
    current: Option<Segment>,
}

impl Sweep {
    /// Segments of `waves_per_launch` full waves.
    pub fn new(space: u64, waves_per_launch: u32, geometry: Geometry) -> Self {
        Self {
            space: space.clamp(1, NONCE_SPACE),
            segment_nonces: u64::from(waves_per_launch.max(1)) * u64::from(geometry.threads()),
            geometry,
            next_start: 0,
            current: None,
        }
    }

    /// The segment to launch next (the unfinished one, else a new one), or `None` once the
    /// whole space is done.
    pub fn segment(&mut self) -> Option<&mut Segment> {
        if self.current.as_ref().is_none_or(Segment::is_done) {
            self.current = None;
            if self.next_start < self.space {
                let count = self.segment_nonces.min(self.space - self.next_start);
                self.current = Some(Segment::new(self.next_start, count, self.geometry));
                self.next_start += count;
            }
        }
        self.current.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        blocks: 3,
        threads_per_block: 4,
    };

    /// Every offset of the segment, by (block, wave), the slow way.
    fn owner(off: u64) -> (usize, u32) {
        let t = u64::from(G.threads());
        (((off % t) / 4) as usize, (off / t) as u32)
    }

    #[test]
    fn nonces_in_counts_every_offset_once() {
        for count in [1u64, 5, 12, 13, 40, 47] {
            let s = Segment::new(100, count, G);
            for b in 0..3u32 {
                for from in 0..=s.end_wave {
                    for to in from..=s.end_wave {
                        let slow = (0..count)
                            .filter(|&o| {
                                let (ob, w) = owner(o);
                                ob == b as usize && (from..to).contains(&w)
                            })
                            .count() as u64;
                        assert_eq!(
                            s.nonces_in(b, from, to),
                            slow,
                            "count {count} b {b} {from}..{to}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn absorb_keeps_only_candidates_of_finished_waves_and_each_once() {
        let mut s = Segment::new(1000, 40, G); // 4 waves of 12, the last with 4 offsets
        let nonce = |block: u64, wave: u64, t: u64| 1000 + (wave * 12 + block * 4 + t) as u32;
        let first = LaunchResult {
            // Block 0 finished 2 waves, block 1 none, block 2 all.
            progress: vec![2, 0, 4],
            candidates: vec![
                nonce(0, 0, 1),
                nonce(0, 2, 0),
                nonce(1, 0, 3),
                nonce(2, 2, 3),
                nonce(0, 0, 1),
            ],
            found: 5,
        };
        let a = s.absorb(&first).unwrap();
        assert_eq!(a.candidates, vec![nonce(0, 0, 1), nonce(2, 2, 3)]);
        // Block 2's last wave holds offsets 36..40 only: its own are 44..48, past the end.
        assert_eq!(a.hashed, 2 * 4 + 3 * 4);
        assert!(!a.overflowed);
        let second = LaunchResult {
            progress: vec![4, 4, 4],
            candidates: vec![nonce(0, 0, 1), nonce(0, 2, 0), nonce(1, 0, 3)],
            found: 9,
        };
        let b = s.absorb(&second).unwrap();
        assert_eq!(b.candidates, vec![nonce(1, 0, 3), nonce(0, 2, 0)]);
        assert!(b.overflowed);
        assert!(s.is_done());
        assert_eq!(a.hashed + b.hashed, 40);
    }

    #[test]
    fn a_malformed_result_changes_nothing() {
        let mut s = Segment::new(0, 40, G);
        s.absorb(&LaunchResult {
            progress: vec![1, 1, 1],
            ..Default::default()
        })
        .unwrap();
        let before = s.clone();
        for bad in [vec![1, 1], vec![0, 1, 1], vec![1, 5, 1]] {
            assert!(s
                .absorb(&LaunchResult {
                    progress: bad,
                    ..Default::default()
                })
                .is_err());
            assert_eq!(s, before);
        }
    }

    #[test]
    fn a_sweep_covers_the_space_and_never_passes_2_pow_32() {
        let g = Geometry {
            blocks: 132 * 4,
            threads_per_block: 256,
        };
        let mut sweep = Sweep::new(NONCE_SPACE, 4096, g);
        let mut covered = 0u64;
        while let Some(seg) = sweep.segment() {
            assert_eq!(u64::from(seg.start), covered);
            let end = u64::from(seg.start) + seg.count;
            assert!(end <= NONCE_SPACE);
            // The last offset a thread may try is inside the segment's waves.
            assert!(u64::from(seg.end_wave) * u64::from(g.threads()) >= seg.count);
            covered = end;
            let done = vec![seg.end_wave; g.blocks as usize];
            seg.absorb(&LaunchResult {
                progress: done,
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(covered, NONCE_SPACE);
    }
}
