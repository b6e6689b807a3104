//! Which tier of work the engine's next step runs: the one scheduling decision between
//! interactive and deferred work, kept pure so that every case is tested.
//!
//! Interactive work runs whenever there is any, running or waiting; deferred work (flex
//! requests, batch lines, background responses) runs in the gaps, and gives way between two
//! layers to an interactive request that arrives. Under saturation there are no gaps, so
//! deferred work is owed a guaranteed share of the step time, `--deferred-min-share`, raised
//! the longer the oldest deferred request has waited; the share rides in interactive steps
//! (see `planning`). Without it a server kept busy by interactive clients would never finish
//! a batch.

use std::time::Duration;

use super::ServiceTier;

/// The most of the engine's time that aging can give deferred work while interactive work
/// waits: interactive users always keep at least half.
pub const MAX_DEFERRED_SHARE: f64 = 0.5;

/// Owed time banked at most: a deferred step that could not run (nothing deferred was
/// plannable) does not turn into a long burst later.
const MAX_CREDIT_SECS: f64 = 0.1;

/// The deferred tier's guaranteed share of step time, as a credit of seconds: interactive
/// steps taken while deferred work waits add to it, owed deferred steps spend it.
#[derive(Debug, Clone)]
pub struct DeferredShare {
    min_share: f64,
    aging: Duration,
    credit: f64,
}

impl DeferredShare {
    /// `min_share` of the time (0 turns the guarantee off: deferred work runs only in the
    /// gaps), doubled for every `aging` the oldest deferred request has waited, up to
    /// [`MAX_DEFERRED_SHARE`].
    pub fn new(min_share: f64, aging: Duration) -> Self {
        Self {
            min_share: min_share.clamp(0.0, MAX_DEFERRED_SHARE),
            aging: aging.max(Duration::from_millis(1)),
            credit: 0.0,
        }
    }

    /// Whether deferred work is guaranteed anything at all.
    pub fn enabled(&self) -> bool {
        self.min_share > 0.0
    }

    /// The share owed to deferred work whose oldest request has waited `waited`.
    pub fn share(&self, waited: Duration) -> f64 {
        let aged = self.min_share * (1.0 + waited.as_secs_f64() / self.aging.as_secs_f64());
        aged.min(MAX_DEFERRED_SHARE)
    }

    /// Whether deferred work is owed time now: the next interactive step takes deferred
    /// rows too.
    pub fn owed(&self) -> bool {
        self.enabled() && self.credit > 0.0
    }

    /// Accounts for a step: `interactive` of its time went to interactive work, `deferred` to
    /// deferred work owed its share (time in the gaps is free and not counted), and
    /// `oldest_deferred` is how long the oldest running deferred request has waited (`None`:
    /// no deferred work, so nothing is owed).
    pub fn record(
        &mut self,
        interactive: Duration,
        deferred: Duration,
        oldest_deferred: Option<Duration>,
    ) {
        let Some(waited) = oldest_deferred else {
            self.credit = 0.0;
            return;
        };
        let s = self.share(waited);
        let earned = interactive.as_secs_f64() * s / (1.0 - s);
        self.credit = (self.credit + earned).min(MAX_CREDIT_SECS) - deferred.as_secs_f64();
    }
}

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

/// The tier the next step runs, or `None` when nothing runs. (Deferred work owed its share
/// runs inside interactive steps, not instead of them.)
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
/// up); deferred requests count every place, and wait while any interactive request waits,
/// except that with a guaranteed share (`guaranteed`) one deferred request always runs:
/// its share needs something to run.
pub fn may_admit(
    tier: ServiceTier,
    n: usize,
    load: TierLoad,
    running_total: usize,
    max_running: usize,
    guaranteed: bool,
) -> bool {
    match tier {
        ServiceTier::Interactive => {
            load.interactive_running == 0 || load.interactive_running + n <= max_running
        }
        ServiceTier::Deferred => {
            (guaranteed && load.deferred_running == 0)
                || (load.interactive_waiting == 0
                    && (running_total == 0 || running_total + n <= max_running))
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
        assert!(may_admit(Interactive, 1, l, 9, 8, false));
        assert!(
            !may_admit(Interactive, 8, l, 9, 8, false),
            "interactive places are full"
        );
        assert!(
            may_admit(Interactive, 16, load(0, 1, 8), 8, 8, false),
            "a first request always fits"
        );
    }

    #[test]
    fn deferred_admission_waits_for_interactive_and_for_room() {
        assert!(may_admit(Deferred, 1, load(0, 0, 0), 0, 8, false));
        assert!(
            may_admit(Deferred, 9, load(0, 0, 0), 0, 8, false),
            "alone it always fits"
        );
        assert!(
            !may_admit(Deferred, 1, load(0, 1, 0), 0, 8, false),
            "interactive waits"
        );
        assert!(may_admit(Deferred, 2, load(2, 0, 4), 6, 8, false));
        assert!(
            !may_admit(Deferred, 3, load(2, 0, 4), 6, 8, false),
            "no room"
        );
    }

    /// Drives the policy as the engine does, with made-up step times: always interactive work
    /// running, interactive steps of `interactive_ms`; a step in which deferred work is owed
    /// takes deferred rows too, adding `deferred_ms`. The fraction of time deferred work got.
    fn simulate(
        share: &mut DeferredShare,
        steps: usize,
        interactive_ms: u64,
        deferred_ms: u64,
        waited: Duration,
    ) -> f64 {
        let (mut deferred, mut total) = (0.0, 0.0);
        for _ in 0..steps {
            assert_eq!(step_tier(load(4, 0, 1)), Some(Interactive));
            let d = if share.owed() { deferred_ms } else { 0 };
            let (i, d) = (
                Duration::from_millis(interactive_ms),
                Duration::from_millis(d),
            );
            share.record(i, d, Some(waited));
            total += (i + d).as_secs_f64();
            deferred += d.as_secs_f64();
        }
        deferred / total
    }

    #[test]
    fn under_saturation_deferred_work_gets_its_share_of_the_time() {
        let day = Duration::from_secs(86_400);
        for (interactive_ms, deferred_ms) in [(10, 10), (4, 60), (30, 2)] {
            let mut share = DeferredShare::new(0.05, day);
            let got = simulate(
                &mut share,
                20_000,
                interactive_ms,
                deferred_ms,
                Duration::ZERO,
            );
            assert!(
                (0.045..0.055).contains(&got),
                "{got} of the time for steps of {interactive_ms} / {deferred_ms} ms"
            );
        }
        // Deferred work that needs less than its share (one row beside many) rides in every
        // step.
        let mut share = DeferredShare::new(0.05, day);
        let got = simulate(&mut share, 1000, 30, 1, Duration::ZERO);
        assert!((got - 1.0 / 31.0).abs() < 1e-3, "{got}");
        let mut off = DeferredShare::new(0.0, day);
        assert_eq!(
            simulate(&mut off, 1000, 10, 10, Duration::ZERO),
            0.0,
            "0 turns it off"
        );
    }

    #[test]
    fn the_longer_deferred_work_waits_the_larger_its_share() {
        let aging = Duration::from_secs(60);
        let share = DeferredShare::new(0.05, aging);
        assert_eq!(share.share(Duration::ZERO), 0.05);
        assert!((share.share(aging) - 0.10).abs() < 1e-9);
        assert_eq!(
            share.share(Duration::from_secs(100_000)),
            MAX_DEFERRED_SHARE
        );
        let mut aged = DeferredShare::new(0.05, aging);
        let got = simulate(&mut aged, 20_000, 10, 10, aging * 3);
        assert!(
            (0.18..0.22).contains(&got),
            "{got}: a share of 20% after 3 agings"
        );
    }

    #[test]
    fn nothing_is_owed_without_deferred_work_and_credit_is_capped() {
        let ms = Duration::from_millis;
        let mut share = DeferredShare::new(0.05, Duration::from_secs(60));
        for _ in 0..100 {
            share.record(ms(10), Duration::ZERO, None);
        }
        assert!(!share.owed(), "no deferred work waited: nothing banked");
        share.record(ms(10), Duration::ZERO, Some(Duration::ZERO));
        assert!(share.owed());
        for _ in 0..10_000 {
            share.record(ms(10), Duration::ZERO, Some(Duration::ZERO));
        }
        share.record(Duration::ZERO, ms(150), Some(Duration::ZERO));
        assert!(
            !share.owed(),
            "banked credit is capped: a long wait is no burst"
        );
    }

    #[test]
    fn with_a_share_one_deferred_request_runs_whatever_waits() {
        assert!(may_admit(Deferred, 1, load(8, 4, 0), 8, 8, true));
        assert!(
            !may_admit(Deferred, 1, load(8, 4, 1), 9, 8, true),
            "one: the rest wait for room"
        );
        assert!(
            !may_admit(Deferred, 1, load(8, 4, 0), 8, 8, false),
            "without, it waits"
        );
    }
}
