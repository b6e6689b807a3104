//! Rotary position embeddings (Su et al., "RoFormer", 2021): the cos/sin tables of one
//! [`RopeConfig`], computed once here for both cache layouts, so that the paged attention and
//! the dense path rotate by the same angles.

use super::config::RopeConfig;

/// cos and sin of every position's angles, `[context][head_dim / 2]`, and how pairs are
/// formed.
pub struct Rope {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    pub(super) half: usize,
    pub(super) interleaved: bool,
}

impl Rope {
    /// The tables for `context` positions of heads of `head_dim`: angle `i` at position `p`
    /// is `p · position_scale · θ^(−2i/d) / freq_factors[i]`, and cos and sin carry `mscale`.
    pub fn new(cfg: &RopeConfig, head_dim: usize, context: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                let factor = cfg.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                cfg.position_scale / (cfg.theta.powf(2.0 * i as f32 / head_dim as f32) * factor)
            })
            .collect();
        let (mut cos, mut sin) = (Vec::with_capacity(context * half), Vec::new());
        sin.reserve(context * half);
        for p in 0..context {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos() * cfg.mscale);
                sin.push(a.sin() * cfg.mscale);
            }
        }
        Self {
            cos,
            sin,
            half,
            interleaved: cfg.interleaved,
        }
    }

    /// Rotates one head's vector `x` for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let (cos, sin) = (
            &self.cos[pos * self.half..(pos + 1) * self.half],
            &self.sin[pos * self.half..(pos + 1) * self.half],
        );
        for i in 0..self.half {
            let (a, b) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + self.half)
            };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * cos[i] - xb * sin[i];
            x[b] = xa * sin[i] + xb * cos[i];
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(theta: f32) -> RopeConfig {
        RopeConfig {
            theta,
            interleaved: false,
            position_scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
        }
    }

    /// Llama 3.1's factors divide the frequencies, linear scaling divides the positions, and
    /// `mscale` stretches the rotated vector: each checked against the formula by hand.
    #[test]
    fn factors_scaling_and_mscale_enter_the_angles_as_ggml_has_them() {
        let plain = Rope::new(&cfg(10_000.0), 8, 64);
        let mut scaled = cfg(10_000.0);
        scaled.freq_factors = Some(vec![1.0, 2.0, 4.0, 8.0]);
        scaled.position_scale = 0.25;
        scaled.mscale = 1.5;
        let r = Rope::new(&scaled, 8, 64);
        for p in [1usize, 7, 63] {
            for i in 0..4 {
                let angle =
                    p as f32 * 0.25 / (10_000f32.powf(2.0 * i as f32 / 8.0) * (1 << i) as f32);
                assert!((r.cos[p * 4 + i] - 1.5 * angle.cos()).abs() < 1e-5);
                assert!((r.sin[p * 4 + i] - 1.5 * angle.sin()).abs() < 1e-5);
                let angle = p as f32 / 10_000f32.powf(2.0 * i as f32 / 8.0);
                assert!((plain.sin[p * 4 + i] - angle.sin()).abs() < 1e-5);
            }
        }
        assert_eq!(r.positions(), 64);
    }
}
