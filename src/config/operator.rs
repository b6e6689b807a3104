//! The operator's flags of `serve`: who may call the API, and the figures the earnings
//! estimate is made from.

use std::path::PathBuf;

use clap::Args;

use crate::telemetry::EarningsInputs;
pub use crate::telemetry::MineWhen;

/// API keys. `Debug` never shows them.
#[derive(Clone, Args)]
pub struct AccessArgs {
    /// API key that clients must send as `Authorization: Bearer KEY` on /v1/*. Repeat the flag
    /// (or comma-separate in the env var) for several keys. Without any key the API is open.
    #[arg(
        long = "api-key",
        env = "IDLERIG_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// File of API keys, one per line: `[NAME:]KEY [admin] [daily-tokens=N]` (usage is counted
    /// by NAME; `admin` may read /v1/usage; `daily-tokens` caps prompt + completion tokens per
    /// UTC day, answered 429 past it). Blank lines and lines starting with `#` are ignored.
    #[arg(long, env = "IDLERIG_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require a key on /metrics too. /health and the dashboard page stay open either way (the
    /// dashboard asks for a key when /v1/status needs one).
    #[arg(long, env = "IDLERIG_METRICS_REQUIRE_KEY")]
    pub metrics_require_key: bool,
    /// Publish per-key series on /metrics (`idlerig_api_key_*`, labelled by key NAME): on by
    /// itself with --metrics-require-key; without it, only with this flag, because an open
    /// /metrics would show anyone who uses the server and how much (/v1/usage needs an admin
    /// key for the same figures).
    #[arg(long, env = "IDLERIG_METRICS_PER_KEY")]
    pub metrics_per_key: bool,
}

impl AccessArgs {
    /// Whether /metrics carries the per-key series.
    pub fn publishes_per_key_metrics(&self) -> bool {
        self.metrics_require_key || self.metrics_per_key
    }
}

impl std::fmt::Debug for AccessArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessArgs")
            .field("api_keys", &format!("<{} redacted>", self.api_keys.len()))
            .field("api_key_file", &self.api_key_file)
            .field("metrics_require_key", &self.metrics_require_key)
            .field("metrics_per_key", &self.metrics_per_key)
            .finish()
    }
}

impl AccessArgs {
    /// Every key: the flags' and the file's. An unreadable file, or one with no key in it,
    /// is an error rather than an open server.
    pub fn keys(&self) -> Result<Vec<String>, String> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --api-key-file {}: {e}", path.display()))?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
            if keys.len() == before {
                return Err(format!(
                    "--api-key-file {} holds no key (one per line)",
                    path.display()
                ));
            }
        }
        Ok(keys)
    }
}

/// Inputs of the earnings estimate. There is no network here, so the market figures are
/// flags; the defaults were true in November 2025.
#[derive(Debug, Clone, Args)]
pub struct EarningsArgs {
    /// Electricity price in USD per kWh.
    #[arg(long, env = "IDLERIG_POWER_PRICE", default_value_t = 0.15)]
    pub power_price: f64,
    /// Power the device draws while mining, in watts (default: 10 W per CPU mining thread, a
    /// rough figure; measure yours at the wall).
    #[arg(long, env = "IDLERIG_MINING_WATTS")]
    pub mining_watts: Option<f64>,
    /// Bitcoin price in USD (default: November 2025).
    #[arg(long, env = "IDLERIG_BTC_PRICE", default_value_t = 90_000.0)]
    pub btc_price: f64,
    /// Bitcoin network difficulty (default: 152 T, November 2025).
    #[arg(long, env = "IDLERIG_NETWORK_DIFFICULTY", default_value_t = 152e12)]
    pub network_difficulty: f64,
    /// BTC per block: the 3.125 subsidy plus average fees (default: 3.15).
    #[arg(long, env = "IDLERIG_BLOCK_REWARD_BTC", default_value_t = 3.15)]
    pub block_reward_btc: f64,
    /// Hashprice in USD per PH/s per day; when given it replaces the three figures above.
    #[arg(long, env = "IDLERIG_HASHPRICE")]
    pub hashprice: Option<f64>,
    /// When to mine: `always`, or only while `profitable`. Default: `always` on the embedded
    /// pool (a demo that pays nothing either way), `profitable` on a real --pool.
    #[arg(long, env = "IDLERIG_MINE_WHEN", value_enum)]
    pub mine_when: Option<MineWhen>,
    /// What deferred work (flex requests, batch lines) is worth to you, in USD per million
    /// tokens (prompt and output together): the earnings table sets it beside mining. The
    /// default is a small model's batch price.
    #[arg(long, env = "IDLERIG_DEFERRED_PRICE", default_value_t = 0.05)]
    pub deferred_price: f64,
}

impl EarningsArgs {
    /// The estimate's inputs, with `--mining-watts` or else `default_watts` (the miner's own
    /// figure), on a pool that pays or not.
    pub fn inputs(&self, default_watts: f64, pool_pays: bool) -> EarningsInputs {
        EarningsInputs {
            power_price_usd_kwh: self.power_price.max(0.0),
            mining_watts: self.mining_watts.unwrap_or(default_watts).max(0.0),
            btc_price_usd: self.btc_price.max(0.0),
            network_difficulty: self.network_difficulty.max(1.0),
            block_reward_btc: self.block_reward_btc.max(0.0),
            hashprice_usd_ph_day: self.hashprice,
            pool_pays,
        }
    }

    /// The mode in force: the flag, else the default for the pool in use.
    pub fn mine_when(&self, local_pool: bool) -> MineWhen {
        self.mine_when.unwrap_or(if local_pool {
            MineWhen::Always
        } else {
            MineWhen::Profitable
        })
    }
}
