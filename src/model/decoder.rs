//! One decoder for every family idlerig runs (see [`super::config`] for the options that
//! make it Llama, Qwen2/3, Phi-3 or Gemma 2/3): pre-norm transformer blocks with rotary
//! embeddings, grouped-query attention and a gated MLP (Touvron et al., "LLaMA", 2023).
//!
//! Unlike candle-transformers' models, one forward pass takes several sequences at different
//! positions: their tokens are flattened into one `[tokens, hidden]` matrix for every matmul
//! (where batching pays), and only attention runs per sequence against that sequence's cache,
//! through one of two bodies: [`super::paged::attention`] (CPU) or [`super::dense`].

use candle_core::{DType, Device, Tensor};

use super::cache::{DenseBudget, SeqCache};
use super::config::{Activation, ModelConfig};
use super::dense::{attention_mask, dense_attention, Heads, RopeTensors};
use super::paged::attend::AttnPath;
use super::paged::attention::PagedItem;
use super::paged::{paged_attention, AttnParams, KvGeometry, KvPool};
use super::quant::Linear;
use super::residual_norm::{add_rms_norm, rms_norm};
use super::rope::Rope;
use super::suspend::{StepKey, Suspended};
use super::swiglu::SwiGlu;
use super::weights::Weights;
use super::ModelError;

/// One sequence's part of a batched step: the tokens to run (a whole prompt, a chunk of it,
/// or one decoded token) and its cache, whose length is the position of the first of them.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// The rotation of one kind of layer, in both forms: tables for the paged body, tensors for
/// the dense one.
struct LayerRope {
    tables: Rope,
    tensors: RopeTensors,
}

struct Attention {
    /// Q, K and V stacked: one product, split by columns.
    qkv: Linear,
    /// Their biases side by side (Qwen2).
    qkv_bias: Option<Tensor>,
    /// Per-head RMS norm weights of Q and K (Qwen3, Gemma 3).
    qk_norm: Option<(Tensor, Tensor)>,
    o: Linear,
    heads: Heads,
    params: AttnParams,
    /// Index into the decoder's rotations: 0 global, 1 windowed layers' own.
    rope: usize,
}

impl Attention {
    fn load(w: &mut Weights, i: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
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
        let fused = (format!("blk.{i}.attn_qkv"), String::new());
        let qkv = if w.has_gguf_tensor(&format!("{}.weight", fused.0)) {
            // Phi-3: one matrix, rows already Q, K, V.
            w.linear(&[(&fused.0, &fused.1, [q_out + 2 * kv_out, hidden])])?
        } else {
            w.linear(&[
                (&q.0, &q.1, [q_out, hidden]),
                (&k.0, &k.1, [kv_out, hidden]),
                (&v.0, &v.1, [kv_out, hidden]),
            ])?
        };
        let bias = |name: &str, len: usize, w: &mut Weights| {
            w.optional_vector(&format!("{name}.bias"), len)
        };
        let qkv_bias = match (
            bias(&q.0, q_out, w)?,
            bias(&k.0, kv_out, w)?,
            bias(&v.0, kv_out, w)?,
        ) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            (None, None, None) => None,
            _ => {
                return Err(ModelError::Metadata(format!(
                    "layer {i} has biases for some of Q, K and V but not all"
                )))
            }
        };
        let qk_norm = if cfg.qk_norm {
            Some((
                w.vector(
                    &format!("blk.{i}.attn_q_norm.weight"),
                    &format!("model.layers.{i}.self_attn.q_norm.weight"),
                    cfg.head_dim,
                )?,
                w.vector(
                    &format!("blk.{i}.attn_k_norm.weight"),
                    &format!("model.layers.{i}.self_attn.k_norm.weight"),
                    cfg.head_dim,
                )?,
            ))
        } else {
            None
        };
        let windowed = cfg.layer_is_windowed(i);
        Ok(Self {
            qkv,
            qkv_bias,
            qk_norm,
            o: w.linear(&[(&o.0, &o.1, [hidden, q_out])])?,
            heads: Heads {
                q: cfg.num_heads,
                kv: cfg.num_kv_heads,
                dim: cfg.head_dim,
            },
            params: AttnParams {
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                window: if windowed { cfg.sliding_window } else { None },
            },
            rope: usize::from(windowed && cfg.local_rope.is_some()),
        })
    }

    /// `x` is `[tokens, hidden]` for all sequences, each item's rows in turn; `masks` holds
    /// each item's mask for this layer's kind (dense layout), built once per step.
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        batch: &mut [BatchItem<'_>],
        rope: &LayerRope,
        pool: Option<&mut KvPool>,
        masks: &[Option<Tensor>],
        eps: f32,
    ) -> candle_core::Result<Tensor> {
        let mut qkv = self.qkv.forward(x)?;
        if let Some(b) = &self.qkv_bias {
            qkv = qkv.broadcast_add(b)?;
        }
        let Heads { q: h, kv, dim } = self.heads;
        let rows = qkv.dim(0)?;
        if let Some((qn, kn)) = &self.qk_norm {
            // RMS over each head's vector, before the rotation.
            let norm = |m: Tensor, heads: usize, w: &Tensor| -> candle_core::Result<Tensor> {
                let m = m.contiguous()?.reshape((rows * heads, dim))?;
                candle_nn::ops::rms_norm(&m, w, eps)?.reshape((rows, heads * dim))
            };
            let q = norm(qkv.narrow(1, 0, h * dim)?, h, qn)?;
            let k = norm(qkv.narrow(1, h * dim, kv * dim)?, kv, kn)?;
            qkv = Tensor::cat(&[q, k, qkv.narrow(1, (h + kv) * dim, kv * dim)?], 1)?;
        }
        if let Some(pool) = pool {
            let mut data = qkv.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let items: Vec<PagedItem<'_>> = batch
                .iter()
                .map(|b| PagedItem {
                    blocks: &b.cache.paged,
                    pos: b.cache.len,
                    tokens: b.tokens.len(),
                })
                .collect();
            let out = paged_attention(pool, layer, &rope.tables, self.params, &items, &mut data);
            let out = Tensor::from_vec(out, (rows, h * dim), x.device())?;
            return self.o.forward(&out);
        }
        let q = qkv.narrow(1, 0, h * dim)?;
        let k = qkv.narrow(1, h * dim, kv * dim)?;
        let v = qkv.narrow(1, (h + kv) * dim, kv * dim)?;
        let mut items: Vec<(usize, &mut SeqCache)> = batch
            .iter_mut()
            .map(|b| (b.tokens.len(), &mut *b.cache))
            .collect();
        let out = dense_attention(
            layer,
            self.heads,
            self.params,
            &rope.tensors,
            (&q, &k, &v),
            &mut items,
            masks,
        )?;
        self.o.forward(&out)
    }
}

struct Mlp {
    /// Gate and up stacked: one product, split by columns.
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
    activation: Activation,
}

impl Mlp {
    fn load(w: &mut Weights, i: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
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
        let gate_up = if w.has_gguf_tensor(&format!("{}.weight", gate.0)) || !w.is_gguf() {
            w.linear(&[
                (&gate.0, &gate.1, [inter, hidden]),
                (&up.0, &up.1, [inter, hidden]),
            ])?
        } else {
            // Phi-3: `ffn_up` holds the gate's rows, then the up projection's.
            w.linear(&[(&up.0, &up.1, [2 * inter, hidden])])?
        };
        Ok(Self {
            gate_up,
            down: w.linear(&[(&down.0, &down.1, [hidden, inter])])?,
            intermediate: cfg.intermediate_size,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        if self.activation == Activation::Silu
            && gate_up.device().is_cpu()
            && gate_up.dtype() == DType::F32
        {
            let path = AttnPath::for_isa(crate::model::quant::Isa::best());
            let act = gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu {
                inter: self.intermediate,
                path,
            })?;
            return self.down.forward(&act);
        }
        let gate = gate_up.narrow(1, 0, self.intermediate)?;
        let up = gate_up.narrow(1, self.intermediate, self.intermediate)?;
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // candle's `gelu` is the tanh approximation, as ggml's.
            Activation::GeluTanh => gate.gelu()?,
        };
        self.down.forward(&(gate * up)?)
    }
}

struct DecoderLayer {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
    /// Norms of the attention's and the MLP's outputs (Gemma).
    post_norms: Option<(Tensor, Tensor)>,
}

impl DecoderLayer {
    fn load(w: &mut Weights, i: usize, cfg: &ModelConfig) -> Result<Self, ModelError> {
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
            post_norms: if cfg.post_norms {
                Some((
                    w.vector(
                        &format!("blk.{i}.post_attention_norm.weight"),
                        &format!("model.layers.{i}.post_attention_layernorm.weight"),
                        cfg.hidden_size,
                    )?,
                    w.vector(
                        &format!("blk.{i}.post_ffw_norm.weight"),
                        &format!("model.layers.{i}.post_feedforward_layernorm.weight"),
                        cfg.hidden_size,
                    )?,
                ))
            } else {
                None
            },
        })
    }
}

/// The decoder: embeddings, layers, final norm and output head.
pub struct Decoder {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    /// The global layers' rotation, then the windowed layers' own where they have one.
    ropes: Vec<LayerRope>,
    device: Device,
    /// The CPU pool that runs every step when our kernels are in use: candle's own
    /// operations then run on it too, so one set of threads serves the whole forward pass.
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// The paged KV cache (CPU); `None`: dense per-sequence caches.
    kv: Option<KvPool>,
    /// The dense caches' admission budget (`--kv-cache-mb`); `None`: paged, or no limit.
    dense: Option<DenseBudget>,
    /// The last interrupted step, until it resumes or another is interrupted.
    suspended: Option<Suspended>,
    /// Layers run since start (a resumed step runs only the rest): for tests and figures.
    layers_run: u64,
}

impl Decoder {
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
            KvPool::new(geo, blocks.max(1))
        });
        let embed_dtype = embed.dtype();
        let ropes = std::iter::once(&cfg.rope)
            .chain(&cfg.local_rope)
            .map(|r| {
                let tables = Rope::new(r, cfg.head_dim, cfg.context_length);
                let tensors = RopeTensors::new(&tables, device, embed_dtype)?;
                Ok(LayerRope { tables, tensors })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
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
            ropes,
            norm: w.vector("output_norm.weight", "model.norm.weight", cfg.hidden_size)?,
            embed,
            layers,
            lm_head,
            cfg,
            device: device.clone(),
            pool,
            suspended: None,
            layers_run: 0,
        })
    }

    pub fn config(&self) -> &ModelConfig {
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
        self.forward_interruptible(batch, &|| false)
    }

    /// As [`forward`](Self::forward), asking `interrupt` before each layer's attention and
    /// its MLP: when it says yes the step stops with [`ModelError::Interrupted`] and no cache
    /// grows. The layers it finished are kept (their keys and values lie past each cache's
    /// length): the same step, run again before its caches change, resumes at the layer it
    /// stopped before.
    pub fn forward_interruptible(
        &mut self,
        batch: &mut [BatchItem<'_>],
        interrupt: &(dyn Fn() -> bool + Sync),
    ) -> Result<Tensor, ModelError> {
        match self.pool.clone() {
            Some(pool) => pool.install(|| self.forward_here(batch, interrupt)),
            None => self.forward_here(batch, interrupt),
        }
    }

    fn forward_here(
        &mut self,
        batch: &mut [BatchItem<'_>],
        interrupt: &(dyn Fn() -> bool + Sync),
    ) -> Result<Tensor, ModelError> {
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
        // Only a step that was paused is looked for (the key copies every item's tokens).
        let resume = if self.suspended.is_some() {
            let key = StepKey::of(batch);
            self.suspended.take_if(|s| s.key == key)
        } else {
            None
        };
        let eps = self.cfg.rms_norm_eps as f32;
        // The dense layout's masks, once per step for each kind of layer (global, windowed).
        let (mut masks, mut windowed_masks) = (Vec::new(), Vec::new());
        if self.kv.is_none() {
            for b in batch.iter() {
                let (t, pos) = (b.tokens.len(), b.cache.len());
                masks.push(attention_mask(t, pos, None, &self.device)?);
                if let Some(w) = self.cfg.sliding_window {
                    windowed_masks.push(attention_mask(t, pos, Some(w), &self.device)?);
                }
            }
        }
        let (first_layer, mut x, mut h) = match resume {
            Some(s) => (s.layer, s.x, s.h),
            None => {
                let x = self.embed_tokens(batch)?;
                // Each residual add runs in one pass with the norm that follows it (the
                // next layer's, or the MLP's).
                let h = match self.layers.first() {
                    Some(first) => rms_norm(&x, &first.attn_norm, eps)?,
                    None => x.clone(),
                };
                (0, x, h)
            }
        };
        for (i, layer) in self.layers.iter().enumerate().skip(first_layer) {
            if interrupt() {
                self.suspended = Some(Suspended::of(batch, i, x, h));
                return Err(ModelError::Interrupted);
            }
            self.layers_run += 1;
            let layer_masks = if layer.attn.params.window.is_some() {
                &windowed_masks
            } else {
                &masks
            };
            let rope = &self.ropes[layer.attn.rope];
            let mut a =
                layer
                    .attn
                    .forward(i, &h, batch, rope, self.kv.as_mut(), layer_masks, eps)?;
            if let Some((post_attn, _)) = &layer.post_norms {
                a = rms_norm(&a, post_attn, eps)?;
            }
            if interrupt() {
                // Resumed at this layer's start: its attention runs again and writes the same
                // keys and values.
                self.suspended = Some(Suspended::of(batch, i, x, h));
                return Err(ModelError::Interrupted);
            }
            let (sum, normed) = add_rms_norm(&x, &a, &layer.mlp_norm, eps)?;
            x = sum;
            let mut m = layer.mlp.forward(&normed)?;
            if let Some((_, post_mlp)) = &layer.post_norms {
                m = rms_norm(&m, post_mlp, eps)?;
            }
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = add_rms_norm(&x, &m, &next.attn_norm, eps)?,
                None => x = (x + m)?,
            }
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
        let x = rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(match self.cfg.final_softcap {
            Some(c) => ((logits / f64::from(c))?.tanh()? * f64::from(c))?,
            None => logits,
        })
    }

    /// The embeddings of every item's tokens, one row each.
    fn embed_tokens(&self, batch: &[BatchItem<'_>]) -> Result<Tensor, ModelError> {
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let x = self.embed.index_select(&ids, 0)?;
        Ok(match self.cfg.embed_scale {
            Some(scale) => (x * f64::from(scale))?,
            None => x,
        })
    }

    /// Decoder layers run since the model was loaded.
    pub fn layers_run(&self) -> u64 {
        self.layers_run
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
            (Some(pool), _) => pool.reserve(&mut cache.paged, len),
            (None, Some(budget)) => budget.reserve(cache, len),
            (None, None) => true,
        }
    }

    /// Empties `cache` and gives its blocks back to the pool.
    pub fn kv_release(&mut self, cache: &mut SeqCache) {
        if let Some(pool) = &mut self.kv {
            pool.release(&mut cache.paged);
        }
        if let Some(budget) = &mut self.dense {
            budget.release(cache);
        }
        cache.layers.iter_mut().for_each(|l| *l = None);
        cache.len = 0;
        cache.generation += 1;
    }

    /// Fills an empty `cache` from the prefix cache with what it holds of `tokens`; returns
    /// the number of tokens taken (always fewer than `tokens.len()`).
    pub fn kv_match_prefix(&mut self, cache: &mut SeqCache, tokens: &[u32]) -> usize {
        if cache.len > 0 {
            return 0;
        }
        match &mut self.kv {
            Some(pool) => {
                cache.len = pool.match_prefix(&mut cache.paged, tokens);
                cache.len
            }
            None => 0,
        }
    }

    /// Offers the full blocks of `cache` to the prefix cache; `tokens` are the sequence's
    /// tokens, at least `cache.len()` of them.
    pub fn kv_commit(&mut self, cache: &mut SeqCache, tokens: &[u32]) {
        if let Some(pool) = &mut self.kv {
            pool.commit(&mut cache.paged, &tokens[..cache.len.min(tokens.len())]);
        }
    }

    /// Blocks in use and in all, and tokens per block, of the paged pool or the dense
    /// budget (counted in the same 16-token blocks).
    pub fn kv_usage(&self) -> Option<(usize, usize, usize)> {
        let per_block = super::paged::BLOCK_TOKENS;
        match (&self.kv, &self.dense) {
            (Some(pool), _) => {
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
