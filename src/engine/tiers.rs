//! Which tier of work the engine's next step runs: the one scheduling decision between
//! interactive and deferred work, kept pure so that every case is tested.
//!
//! Interactive work runs whenever there is any, running or waiting. Deferred work (flex
//! requests and batch lines) runs only in steps with no interactive work at all, so an
//! interactive request never shares a step with it, never waits behind a deferred prompt
//! chunk longer than one layer, and finds deferred sequences paused (their KV blocks kept
//! until the pool needs them) rather than in its way.

use super::ServiceTier;

/// What the engine knows at a step boundary, by tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierLoad {
    /// Interactive sequences in the running set.
    pub interactive_running: usize,
    /// Interactive requests not yet admitted (no room for them yet), or still in the channel.
    pub interactive_waiting: usize,
    pub deferred_running: usize,
    /// Interactive requests admitted by the HTTP layer and not yet submitted.
    pub interactive_arriving: bool,
}

/// The tier the next step runs, or `None` when nothing runs.
pub fn step_tier(load: TierLoad) -> Option<ServiceTier> {
    if load.interactive_running > 0 {
        Some(ServiceTier::Interactive)
    } else if load.interactive_waiting > 0 || load.interactive_arriving {
        // Waiting without running (not admitted yet), or still being parsed: deferred work
        // does not take the step (or the cores) it is about to need.
        None
    } else if load.deferred_running > 0 {
        Some(ServiceTier::Deferred)
    } else {
        None
    }
}

/// Whether a request of `tier` asking for `n` places may join the running set now.
/// Interactive requests count only interactive places (paused deferred sequences give theirs
/// up); deferred requests count every place, and wait while any interactive request waits.
pub fn may_admit(
    tier: ServiceTier,
    n: usize,
    load: TierLoad,
    running_total: usize,
    max_running: usize,
) -> bool {
    match tier {
        ServiceTier::Interactive => {
            load.interactive_running == 0 || load.interactive_running + n <= max_running
        }
        ServiceTier::Deferred => {
            load.interactive_waiting == 0
                && (running_total == 0 || running_total + n <= max_running)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServiceTier::*;

    fn load(ir: usize, iw: usize, dr: usize) -> TierLoad {
        TierLoad {
            interactive_running: ir,
            interactive_waiting: iw,
            deferred_running: dr,
            interactive_arriving: false,
        }
    }

    #[test]
    fn interactive_work_takes_every_step_it_has() {
        assert_eq!(step_tier(load(1, 0, 0)), Some(Interactive));
        assert_eq!(step_tier(load(1, 0, 5)), Some(Interactive));
        assert_eq!(step_tier(load(2, 3, 5)), Some(Interactive));
    }

    #[test]
    fn deferred_work_runs_only_in_the_gaps() {
        assert_eq!(step_tier(load(0, 0, 3)), Some(Deferred));
        assert_eq!(
            step_tier(load(0, 1, 3)),
            None,
            "an interactive request about to be admitted: deferred waits"
        );
        assert_eq!(step_tier(load(0, 0, 0)), None);
        let arriving = TierLoad {
            interactive_arriving: true,
            ..load(0, 0, 3)
        };
        assert_eq!(
            step_tier(arriving),
            None,
            "a request being parsed: deferred waits"
        );
        assert_eq!(
            step_tier(TierLoad {
                interactive_running: 1,
                ..arriving
            }),
            Some(Interactive)
        );
    }

    #[test]
    fn interactive_admission_ignores_paused_deferred_places() {
        let l = load(1, 1, 8);
        assert!(may_admit(Interactive, 1, l, 9, 8));
        assert!(
            !may_admit(Interactive, 8, l, 9, 8),
            "interactive places are full"
        );
        assert!(
            may_admit(Interactive, 16, load(0, 1, 8), 8, 8),
            "a first request always fits"
        );
    }

    #[test]
    fn deferred_admission_waits_for_interactive_and_for_room() {
        assert!(may_admit(Deferred, 1, load(0, 0, 0), 0, 8));
        assert!(
            may_admit(Deferred, 9, load(0, 0, 0), 0, 8),
            "alone it always fits"
        );
        assert!(
            !may_admit(Deferred, 1, load(0, 1, 0), 0, 8),
            "interactive waits"
        );
        assert!(may_admit(Deferred, 2, load(2, 0, 4), 6, 8));
        assert!(!may_admit(Deferred, 3, load(2, 0, 4), 6, 8), "no room");
    }
}
