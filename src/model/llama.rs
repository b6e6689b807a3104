//! Llama-family decoder (Touvron et al., "LLaMA: Open and Efficient Foundation Language
//! Models", 2023): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP,
//! optionally tied input/output embeddings. Covers Llama 2/3, SmolLM/SmolLM2, TinyLlama.
//!
//! Unlike candle-transformers' llama, one forward pass takes several sequences at different
//! positions: their tokens are flattened into one `[tokens, hidden]` matrix for every matmul
//! (where batching pays), and only attention runs per sequence against that sequence's cache.

use candle_core::{DType, Device, Tensor};

use super::cache::{causal_mask, DenseBudget, SeqCache};
use super::paged::attention::PagedItem;
use super::paged::{paged_attention, KvGeometry, KvPool, Rope};
use super::quant::Linear;
use super::weights::Weights;
use super::ModelError;

/// Hyper-parameters of a llama-family model, read from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub context_length: usize,
    /// GGUF stores Q/K permuted for interleaved (GPT-J style) rotary pairs; Hugging Face
    /// checkpoints rotate the two halves of each head (GPT-NeoX style).
    pub rope_interleaved: bool,
}

/// Bounds a model file must keep: beyond them it is damaged or hostile, not just big.
const MAX_CONTEXT: usize = 1 << 24;
const MAX_VOCAB: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 18;
const MAX_LAYERS: usize = 1024;

impl LlamaConfig {
    /// Refuses a configuration no real model has, naming the field (in the file's own
    /// convention: GGUF metadata keys, or config.json's), before any tensor is read.
    pub fn validate(&self, gguf: bool) -> Result<(), ModelError> {
        let key = |g: &str, h: &str| {
            if gguf {
                format!("llama.{g}")
            } else {
                h.to_string()
            }
        };
        let bad = |k: String, v: &dyn std::fmt::Display, why: &str| {
            Err(ModelError::Metadata(format!("`{k}` = {v}: {why}")))
        };
        let heads = key("attention.head_count", "num_attention_heads");
        let kv = key("attention.head_count_kv", "num_key_value_heads");
        if self.num_heads == 0 || self.num_heads > MAX_WIDTH {
            return bad(heads, &self.num_heads, "needs at least one attention head");
        }
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(
                kv,
                &self.num_kv_heads,
                &format!("must divide the {} query heads", self.num_heads),
            );
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 || self.head_dim > MAX_WIDTH {
            let k = key("rope.dimension_count", "head_dim");
            return bad(
                k,
                &self.head_dim,
                "the head dimension must be even and positive (rotary pairs)",
            );
        }
        let checks = [
            (
                key("embedding_length", "hidden_size"),
                self.hidden_size,
                MAX_WIDTH,
            ),
            (
                key("feed_forward_length", "intermediate_size"),
                self.intermediate_size,
                MAX_WIDTH,
            ),
            (
                key("block_count", "num_hidden_layers"),
                self.num_layers,
                MAX_LAYERS,
            ),
            (
                key("context_length", "max_position_embeddings"),
                self.context_length,
                MAX_CONTEXT,
            ),
            (key("vocab_size", "vocab_size"), self.vocab_size, MAX_VOCAB),
        ];
        for (k, v, max) in checks {
            if v == 0 || v > max {
                return bad(k, &v, &format!("must be between 1 and {max}"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            let k = key("attention.layer_norm_rms_epsilon", "rms_norm_eps");
            return bad(k, &self.rms_norm_eps, "must be a positive number");
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                key("rope.freq_base", "rope_theta"),
                &self.rope_theta,
                "must be a positive number",
            );
        }
        Ok(())
    }
}

/// One sequence's part of a batched step: the tokens to run (a whole prompt, a chunk of it,
/// or one decoded token) and its cache, whose length is the position of the first of them.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RotaryEmbedding {
    /// Tables in `dtype`, the activations' type (rotation needs both in one type).
    fn new(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// Rotates `x` (`[1, heads, t, head_dim]`) whose first token sits at `pos`.
    fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(x, &cos, &sin)
        }
    }
}

struct Attention {
    /// Q, K and V stacked: one product, split by columns.
    qkv: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &mut Weights, i: usize, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let names = |gguf: &str, hf: &str| {
            (
                format!("blk.{i}.attn_{gguf}"),
                format!("model.layers.{i}.self_attn.{hf}_proj"),
            )
        };
        let (q, k, v, o) = (
            names("q", "q"),
            names("k", "k"),
            names("v", "v"),
            names("output", "o"),
        );
        let (hidden, q_out) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim);
        let kv_out = cfg.num_kv_heads * cfg.head_dim;
        Ok(Self {
            qkv: w.linear(&[
                (&q.0, &q.1, [q_out, hidden]),
                (&k.0, &k.1, [kv_out, hidden]),
                (&v.0, &v.1, [kv_out, hidden]),
            ])?,
            o: w.linear(&[(&o.0, &o.1, [hidden, q_out])])?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x` is `[tokens, hidden]` for all sequences, each item's rows in turn; `masks` holds
    /// each item's causal mask (dense layout), built once per step.
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        batch: &mut [BatchItem<'_>],
        rope: &RotaryEmbedding,
        paged: Option<(&mut KvPool, &Rope)>,
        masks: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        if let Some((pool, rope)) = paged {
            let qkv = self.qkv.forward(x)?;
            let rows = qkv.dim(0)?;
            let mut data = qkv.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let items: Vec<PagedItem<'_>> = batch
                .iter()
                .map(|b| PagedItem {
                    blocks: &b.cache.paged,
                    pos: b.cache.len,
                    tokens: b.tokens.len(),
                })
                .collect();
            let out = paged_attention(pool, layer, rope, &items, &mut data);
            let out = Tensor::from_vec(out, (rows, self.num_heads * self.head_dim), x.device())?;
            return self.o.forward(&out);
        }
        let qkv = self.qkv.forward(x)?;
        let (q_width, kv_width) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let q = qkv.narrow(1, 0, q_width)?;
        let k = qkv.narrow(1, q_width, kv_width)?;
        let v = qkv.narrow(1, q_width + kv_width, kv_width)?;
        let mut outputs = Vec::with_capacity(batch.len());
        let mut row = 0;
        for (item, mask) in batch.iter_mut().zip(masks) {
            let t = item.tokens.len();
            let pos = item.cache.len();
            let heads = |m: &Tensor, h: usize| -> candle_core::Result<Tensor> {
                m.narrow(0, row, t)?
                    .reshape((1, t, h, self.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let qs = rope.apply(&heads(&q, self.num_heads)?, pos)?;
            let ks = rope.apply(&heads(&k, self.num_kv_heads)?, pos)?;
            let vs = heads(&v, self.num_kv_heads)?;
            let (ck, cv) = item.cache.append(layer, &ks.squeeze(0)?, &vs.squeeze(0)?)?;
            outputs.push(self.attend(&qs.squeeze(0)?, &ck, &cv, mask.as_ref())?);
            row += t;
        }
        let out = if outputs.len() == 1 {
            outputs.pop().expect("one")
        } else {
            Tensor::cat(&outputs, 0)?
        };
        self.o.forward(&out)
    }

    /// Causal attention of `q` (`[heads, t, d]`) over the cache (`[kv_heads, pos + t, d]`,
    /// views into the sequence's buffers: neither K nor V is copied). Query heads sharing a
    /// KV head are folded into its rows, so grouped-query attention needs no copy of K or V
    /// per query head.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let t = q.dim(1)?;
        let groups = self.num_heads / self.num_kv_heads;
        let kv_len = k.dim(1)?;
        let q = q.reshape((self.num_kv_heads, groups * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((self.num_kv_heads, groups, t, kv_len))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((self.num_kv_heads, groups * t, kv_len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(v)?; // [kv_heads, groups * t, d]
        out.reshape((self.num_heads, t, self.head_dim))?
            .transpose(0, 1)?
            .reshape((t, self.num_heads * self.head_dim))
    }
}

struct Mlp {
    /// Gate and up stacked: one product, split by columns.
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Mlp {
    fn load(w: &mut Weights, i: usize, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let names = |gguf: &str, hf: &str| {
            (
                format!("blk.{i}.ffn_{gguf}"),
                format!("model.layers.{i}.mlp.{hf}_proj"),
            )
        };
        let (gate, up, down) = (
            names("gate", "gate"),
            names("up", "up"),
            names("down", "down"),
        );
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: w.linear(&[
                (&gate.0, &gate.1, [inter, hidden]),
                (&up.0, &up.1, [inter, hidden]),
            ])?,
            down: w.linear(&[(&down.0, &down.1, [hidden, inter])])?,
            intermediate: cfg.intermediate_size,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let gate = gate_up.narrow(1, 0, self.intermediate)?;
        let up = gate_up.narrow(1, self.intermediate, self.intermediate)?;
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

struct DecoderLayer {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(w: &mut Weights, i: usize, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        Ok(Self {
            attn_norm: w.vector(
                &format!("blk.{i}.attn_norm.weight"),
                &format!("model.layers.{i}.input_layernorm.weight"),
                cfg.hidden_size,
            )?,
            attn: Attention::load(w, i, cfg)?,
            mlp_norm: w.vector(
                &format!("blk.{i}.ffn_norm.weight"),
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                cfg.hidden_size,
            )?,
            mlp: Mlp::load(w, i, cfg)?,
        })
    }
}

/// The decoder: embeddings, layers, final norm and output head.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
    /// The CPU pool that runs every step when our kernels are in use: candle's own
    /// operations then run on it too, so one set of threads serves the whole forward pass.
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// The paged KV cache and its rotary tables (CPU); `None`: dense per-sequence caches.
    kv: Option<(KvPool, Rope)>,
    /// The dense caches' admission budget (`--kv-cache-mb`); `None`: paged, or no limit.
    dense: Option<DenseBudget>,
}

impl Llama {
    /// Builds the model from opened weights (see [`super::ModelFiles::open`]).
    /// `progress` hears the fraction loaded (0–1) after each layer. `kv_cache_mb` sizes the
    /// paged KV pool (CPU) or the dense caches' budget (CUDA, or `dense_kv`); 0: dense caches
    /// without a limit.
    pub(crate) fn load(
        mut w: Weights,
        device: &Device,
        kv_cache_mb: usize,
        dense_kv: bool,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self, ModelError> {
        let cfg = w.config().clone();
        let pool = w.pool();
        // The embeddings and the output head weigh about as much as a few layers.
        let steps = cfg.num_layers as f32 + 4.0;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let layer = DecoderLayer::load(&mut w, i, &cfg);
                progress((i + 1) as f32 / steps);
                layer
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (embed, lm_head) = w.embeddings()?;
        if embed.dims() != [cfg.vocab_size, cfg.hidden_size] {
            return Err(ModelError::Metadata(format!(
                "the token embeddings have shape {:?}; the configuration needs [{}, {}] (vocabulary × hidden)",
                embed.dims(),
                cfg.vocab_size,
                cfg.hidden_size
            )));
        }
        progress(1.0);
        let paged = device.is_cpu() && !dense_kv && kv_cache_mb > 0;
        let kv = paged.then(|| {
            let geo = KvGeometry {
                layers: cfg.num_layers,
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            };
            let blocks = (kv_cache_mb << 20) / geo.block_bytes();
            let rope = Rope::new(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.context_length,
                cfg.rope_interleaved,
            );
            (KvPool::new(geo, blocks.max(1)), rope)
        });
        let embed_dtype = embed.dtype();
        let dense = (!paged && kv_cache_mb > 0).then(|| {
            // K and V of every layer, in the activations' type.
            let bytes =
                cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * embed_dtype.size_in_bytes();
            DenseBudget::new(kv_cache_mb, bytes, cfg.context_length)
        });
        // Weights were uploaded on this thread; the engine runs on another. Wait until they
        // are on the device before anyone computes with them.
        device.synchronize()?;
        Ok(Self {
            kv,
            dense,
            rope: RotaryEmbedding::new(&cfg, device, embed_dtype)?,
            norm: w.vector("output_norm.weight", "model.norm.weight", cfg.hidden_size)?,
            embed,
            layers,
            lm_head,
            cfg,
            device: device.clone(),
            pool,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step for every item and returns the logits of each item's last token,
    /// `[items, vocab]` in f32. Each cache grows by its item's token count.
    /// With the paged cache, blocks the engine has not reserved are taken here; an
    /// exhausted pool is [`ModelError::KvCacheFull`].
    pub fn forward(&mut self, batch: &mut [BatchItem<'_>]) -> Result<Tensor, ModelError> {
        match self.pool.clone() {
            Some(pool) => pool.install(|| self.forward_here(batch)),
            None => self.forward_here(batch),
        }
    }

    fn forward_here(&mut self, batch: &mut [BatchItem<'_>]) -> Result<Tensor, ModelError> {
        for item in batch.iter() {
            if item.tokens.is_empty() {
                return Err(ModelError::Metadata("a batch item has no tokens".into()));
            }
            if item.cache.len() + item.tokens.len() > self.cfg.context_length {
                return Err(ModelError::Unsupported(format!(
                    "sequence of {} tokens exceeds the context window of {}",
                    item.cache.len() + item.tokens.len(),
                    self.cfg.context_length
                )));
            }
        }
        for item in batch.iter_mut() {
            let len = item.cache.len() + item.tokens.len();
            if !self.kv_reserve(item.cache, len) {
                return Err(ModelError::KvCacheFull);
            }
        }
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let masks = if self.kv.is_some() {
            vec![None; batch.len()]
        } else {
            batch
                .iter()
                .map(|b| causal_mask(b.tokens.len(), b.cache.len(), &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let paged = self.kv.as_mut().map(|(pool, rope)| (pool, &*rope));
            x = (x + layer
                .attn
                .forward(i, &h, batch, &self.rope, paged, &masks)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        let mut last_rows = Vec::with_capacity(batch.len());
        let mut row = 0u32;
        for item in batch.iter_mut() {
            row += item.tokens.len() as u32;
            last_rows.push(row - 1);
            item.cache.advance(item.tokens.len());
        }
        let last = Tensor::new(last_rows.as_slice(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// A fresh, empty cache for a new sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(if self.kv.is_some() {
            0
        } else {
            self.cfg.num_layers
        })
    }

    /// Makes room in `cache` for `len` tokens; `false` when the paged pool or the dense
    /// budget is exhausted. Dense caches without a budget always have room.
    pub fn kv_reserve(&mut self, cache: &mut SeqCache, len: usize) -> bool {
        match (&mut self.kv, &mut self.dense) {
            (Some((pool, _)), _) => pool.reserve(&mut cache.paged, len),
            (None, Some(budget)) => budget.reserve(cache, len),
            (None, None) => true,
        }
    }

    /// Empties `cache` and gives its blocks back to the pool.
    pub fn kv_release(&mut self, cache: &mut SeqCache) {
        if let Some((pool, _)) = &mut self.kv {
            pool.release(&mut cache.paged);
        }
        if let Some(budget) = &mut self.dense {
            budget.release(cache);
        }
        cache.layers.iter_mut().for_each(|l| *l = None);
        cache.len = 0;
    }

    /// Fills an empty `cache` from the prefix cache with what it holds of `tokens`; returns
    /// the number of tokens taken (always fewer than `tokens.len()`).
    pub fn kv_match_prefix(&mut self, cache: &mut SeqCache, tokens: &[u32]) -> usize {
        if cache.len > 0 {
            return 0;
        }
        match &mut self.kv {
            Some((pool, _)) => {
                cache.len = pool.match_prefix(&mut cache.paged, tokens);
                cache.len
            }
            None => 0,
        }
    }

    /// Offers the full blocks of `cache` to the prefix cache; `tokens` are the sequence's
    /// tokens, at least `cache.len()` of them.
    pub fn kv_commit(&mut self, cache: &mut SeqCache, tokens: &[u32]) {
        if let Some((pool, _)) = &mut self.kv {
            pool.commit(&mut cache.paged, &tokens[..cache.len.min(tokens.len())]);
        }
    }

    /// Blocks in use and in all, and tokens per block, of the paged pool or the dense
    /// budget (counted in the same 16-token blocks).
    pub fn kv_usage(&self) -> Option<(usize, usize, usize)> {
        let per_block = super::paged::BLOCK_TOKENS;
        match (&self.kv, &self.dense) {
            (Some((pool, _)), _) => {
                let total = pool.alloc.total();
                Some((total - pool.alloc.available(), total, per_block))
            }
            (None, Some(budget)) => {
                let (used, total) = budget.usage();
                Some((used, total, per_block))
            }
            (None, None) => None,
        }
    }
}
