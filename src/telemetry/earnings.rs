//! The honest answer to "is the mining worth the electricity?": expected revenue from a
//! hashrate at the network's difficulty and the coin's price, against the power the device
//! draws while it mines. Pure arithmetic on inputs the operator gives (there is no network
//! here to fetch them).

/// When the miner may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MineWhen {
    /// Whenever the device is idle, whatever the power costs (free or surplus power, heat
    /// reuse, the demo pool).
    Always,
    /// Only while the estimated revenue exceeds the power cost (a profit switch). With
    /// mainnet figures no CPU or GPU is profitable at SHA-256d, so this mode stops mining
    /// after a short measurement.
    Profitable,
}

use serde::Serialize;

/// Hashes per difficulty-1 share: a block at difficulty D takes D × 2³² hashes on average.
const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;
const SECONDS_PER_DAY: f64 = 86_400.0;

/// What the estimate is made from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EarningsInputs {
    pub power_price_usd_kwh: f64,
    pub mining_watts: f64,
    pub btc_price_usd: f64,
    pub network_difficulty: f64,
    pub block_reward_btc: f64,
    /// USD per PH/s per day; when set it replaces price × reward ÷ difficulty.
    pub hashprice_usd_ph_day: Option<f64>,
    /// Whether the pool pays at all (the embedded pool does not).
    pub pool_pays: bool,
}

/// Figures per day of mining at a measured hashrate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Earnings {
    /// The hashrate the estimate is for: the average while mining.
    pub hashrate_hs: f64,
    /// USD per PH/s per day that the inputs give.
    pub hashprice_usd_ph_day: f64,
    /// What this hashrate would earn per day on a paying pool (before pool fees).
    pub revenue_usd_day: f64,
    /// What the pool in use pays per day: zero on the embedded pool.
    pub payout_usd_day: f64,
    pub power_cost_usd_day: f64,
    /// Payout minus power cost.
    pub net_usd_day: f64,
    /// The electricity price at which this hashrate would break even on a paying pool.
    pub break_even_usd_kwh: f64,
    /// The power cost per day divided by the revenue per day: how many times over the
    /// power costs more than the coins are worth (infinite when nothing is mined).
    pub cost_to_revenue: f64,
}

impl EarningsInputs {
    /// USD per PH/s per day.
    pub fn hashprice_usd_ph_day(&self) -> f64 {
        self.hashprice_usd_ph_day.unwrap_or_else(|| {
            1e15 * SECONDS_PER_DAY * self.block_reward_btc * self.btc_price_usd
                / (self.network_difficulty * HASHES_PER_DIFFICULTY)
        })
    }

    pub fn estimate(&self, hashrate_hs: f64) -> Earnings {
        let hashprice = self.hashprice_usd_ph_day();
        let revenue = hashrate_hs.max(0.0) / 1e15 * hashprice;
        let kwh_per_day = self.mining_watts * 24.0 / 1000.0;
        let power = kwh_per_day * self.power_price_usd_kwh;
        let payout = if self.pool_pays { revenue } else { 0.0 };
        Earnings {
            hashrate_hs,
            hashprice_usd_ph_day: hashprice,
            revenue_usd_day: revenue,
            payout_usd_day: payout,
            power_cost_usd_day: power,
            net_usd_day: payout - power,
            break_even_usd_kwh: if kwh_per_day > 0.0 {
                revenue / kwh_per_day
            } else {
                f64::INFINITY
            },
            cost_to_revenue: if revenue > 0.0 {
                power / revenue
            } else {
                f64::INFINITY
            },
        }
    }
}

/// What deferred work (flex requests, batch lines) is worth at the operator's price
/// (`--deferred-price`, USD per million tokens, prompt and generated together), set beside
/// mining: both fill the gaps, and this says which fills them better.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DeferredValue {
    pub price_usd_per_mtok: f64,
    /// Tokens of deferred work (prompt and generated) since start.
    pub tokens: u64,
    /// Device seconds spent on deferred work (known when the arbiter runs, that is with
    /// mining on).
    pub device_s: Option<f64>,
    /// Tokens per second of deferred device time.
    pub tokens_per_s: Option<f64>,
    /// What the deferred work so far is worth.
    pub value_usd_total: f64,
    /// What a whole day of gaps filled with deferred work is worth at that rate: compare with
    /// the mining revenue per day of mining.
    pub value_usd_day: Option<f64>,
    /// The same device's power per day (the mining watts: a busy device), when known.
    pub power_cost_usd_day: Option<f64>,
    pub net_usd_day: Option<f64>,
}

impl DeferredValue {
    /// `device_s`: the arbiter's deferred seconds; `power`: watts and USD per kWh.
    pub fn estimate(
        price_usd_per_mtok: f64,
        tokens: u64,
        device_s: Option<f64>,
        power: Option<(f64, f64)>,
    ) -> Self {
        let value = |t: f64| t / 1e6 * price_usd_per_mtok;
        // Under a second of deferred work says too little about the rate.
        let tokens_per_s = device_s.filter(|&s| s >= 1.0).map(|s| tokens as f64 / s);
        let value_usd_day = tokens_per_s.map(|r| value(r * SECONDS_PER_DAY));
        let power_cost_usd_day = power.map(|(watts, usd_kwh)| watts * 24.0 / 1000.0 * usd_kwh);
        Self {
            price_usd_per_mtok,
            tokens,
            device_s,
            tokens_per_s,
            value_usd_total: value(tokens as f64),
            value_usd_day,
            power_cost_usd_day,
            net_usd_day: value_usd_day.zip(power_cost_usd_day).map(|(v, p)| v - p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mainnet_nov_2025() -> EarningsInputs {
        EarningsInputs {
            power_price_usd_kwh: 0.15,
            mining_watts: 700.0,
            btc_price_usd: 90_000.0,
            network_difficulty: 152e12,
            block_reward_btc: 3.15,
            hashprice_usd_ph_day: None,
            pool_pays: true,
        }
    }

    #[test]
    fn hashprice_from_difficulty_matches_the_published_figure() {
        // Nov 2025: difficulty ~152 T, BTC ~$90k, ~3.15 BTC per block; hashprice was quoted at
        // $35-45 per PH/s per day.
        let hp = mainnet_nov_2025().hashprice_usd_ph_day();
        assert!((37.0..38.0).contains(&hp), "{hp}");
        // The network's hashrate implied by the difficulty: D × 2^32 / 600 s ≈ 1.09 ZH/s, and
        // the whole network earns 144 blocks a day.
        let network_hs = 152e12 * HASHES_PER_DIFFICULTY / 600.0;
        let whole = mainnet_nov_2025().estimate(network_hs).revenue_usd_day;
        assert!((whole / (144.0 * 3.15 * 90_000.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn an_h100_at_seven_gh_loses_money_at_mainnet_figures() {
        let e = mainnet_nov_2025().estimate(7e9);
        assert!((e.revenue_usd_day - 7e9 / 1e15 * 37.5).abs() < 2e-5);
        assert!(e.revenue_usd_day < 0.01, "well under a cent a day");
        assert!((e.power_cost_usd_day - 2.52).abs() < 1e-9);
        assert!(e.net_usd_day < -2.5);
        assert!(e.break_even_usd_kwh < 1e-4);
        assert!(e.cost_to_revenue > 5000.0);
    }

    #[test]
    fn the_embedded_pool_pays_nothing_and_hashprice_overrides() {
        let mut i = mainnet_nov_2025();
        i.pool_pays = false;
        i.hashprice_usd_ph_day = Some(50.0);
        i.mining_watts = 0.0;
        let e = i.estimate(2e15);
        assert_eq!(e.revenue_usd_day, 100.0);
        assert_eq!(e.payout_usd_day, 0.0);
        assert_eq!(e.net_usd_day, 0.0);
        assert!(e.break_even_usd_kwh.is_infinite());
    }

    #[test]
    fn deferred_tokens_are_valued_per_day_of_device_time() {
        // 50 tok/s for 100 s at $0.50 per million tokens, on a 700 W device at $0.15/kWh.
        let d = DeferredValue::estimate(0.5, 5_000, Some(100.0), Some((700.0, 0.15)));
        assert_eq!(d.tokens_per_s, Some(50.0));
        assert!((d.value_usd_total - 0.0025).abs() < 1e-12);
        let day = d.value_usd_day.unwrap();
        assert!((day - 50.0 * 86_400.0 / 1e6 * 0.5).abs() < 1e-9, "{day}");
        assert!((d.power_cost_usd_day.unwrap() - 2.52).abs() < 1e-9);
        assert!((d.net_usd_day.unwrap() - (day - 2.52)).abs() < 1e-9);
        // The same device mining earns under a cent a day: deferred work fills gaps better.
        assert!(day > mainnet_nov_2025().estimate(7e9).revenue_usd_day * 100.0);
    }

    #[test]
    fn without_enough_deferred_time_there_is_no_rate() {
        let d = DeferredValue::estimate(0.5, 10, Some(0.2), None);
        assert_eq!(
            (d.tokens_per_s, d.value_usd_day, d.net_usd_day),
            (None, None, None)
        );
        let d = DeferredValue::estimate(0.5, 10, None, Some((10.0, 0.1)));
        assert_eq!(d.value_usd_day, None);
        assert!(d.power_cost_usd_day.is_some());
    }
}
