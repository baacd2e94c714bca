//! The LLaMA-family decoder: embeddings, RMSNorm, rotate-half RoPE, grouped-query causal
//! attention, a SwiGLU MLP and a tied or untied LM head. Mistral (sliding window) and Qwen2
//! (q/k/v bias) are the same network with different switches in [`ModelConfig`].

use burn::module::{Module, Param, ParamId};
use burn::nn::{Embedding, Linear, RmsNorm};

use super::lora::LoraLinear;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Int, Tensor};

use super::attention;
use super::config::ModelConfig;
use super::rope::RotaryHalf;

/// Self-attention with `num_key_value_heads` shared by groups of query heads.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl Attention {
    /// `x: [batch, len, hidden]` → `[batch, len, hidden]`, causal, within a sliding `window` if
    /// there is one.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<2>, Tensor<2>),
        window: Option<usize>,
    ) -> Tensor<3> {
        let q = self.heads(self.q_proj.forward(x.clone()), self.num_heads);
        let k = self.heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let v = self.heads(self.v_proj.forward(x), self.num_kv_heads);
        let q = RotaryHalf::apply(q, &rope.0, &rope.1);
        let k = self.repeat_kv(RotaryHalf::apply(k, &rope.0, &rope.1));
        let v = self.repeat_kv(v);
        self.project(attention::causal(q, k, v, window))
    }

    /// Attention for `n` new tokens whose keys and values join `cache` at slots
    /// `start..start + n`; `mask: [batch, 1, n, start + n]` is additive over the cached slots.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<4>, Tensor<4>),
        mask: &Tensor<4>,
        cache: &mut LayerCache,
        start: usize,
    ) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let q = self.heads(self.q_proj.forward(x.clone()), self.num_heads);
        let k = self.heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let v = self.heads(self.v_proj.forward(x), self.num_kv_heads);
        let q = RotaryHalf::apply_batched(q, &rope.0, &rope.1);
        let k = RotaryHalf::apply_batched(k, &rope.0, &rope.1);
        let slots = [
            0..b,
            0..self.num_kv_heads,
            start..start + n,
            0..self.head_dim,
        ];
        cache.keys = cache.keys.clone().slice_assign(slots.clone(), k);
        cache.values = cache.values.clone().slice_assign(slots, v);
        let k = self.repeat_kv(cache.keys.clone().narrow(2, 0, start + n));
        let v = self.repeat_kv(cache.values.clone().narrow(2, 0, start + n));
        self.attend(
            q,
            k,
            v,
            mask.clone().expand([b, self.num_heads, n, start + n]),
        )
    }

    /// softmax(q·kᵀ/√d + mask)·v, heads merged and projected.
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4>) -> Tensor<3> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + mask;
        self.project(softmax(scores, 3).matmul(v))
    }

    /// `[batch, heads, len, head_dim]` → heads merged and projected, `[batch, len, hidden]`.
    fn project(&self, context: Tensor<4>) -> Tensor<3> {
        let [b, _, s, _] = context.dims();
        let context = context
            .swap_dims(1, 2)
            .reshape([b, s, self.num_heads * self.head_dim]);
        self.o_proj.forward(context)
    }

    /// `[batch, len, heads * head_dim]` → `[batch, heads, len, head_dim]`.
    fn heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [b, s, _] = x.dims();
        x.reshape([b, s, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// Shares each key/value head with its group of query heads, as transformers' `repeat_kv`.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let group = self.num_heads / self.num_kv_heads;
        if group == 1 {
            return x;
        }
        let [b, kv, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, group, s, d])
            .reshape([b, kv * group, s, d])
    }
}

/// The rotary tables and the sliding window that all layers of one forward pass share.
#[derive(Debug, Clone)]
pub struct LayerContext {
    pub rope: (Tensor<2>, Tensor<2>),
    pub window: Option<usize>,
}

/// One layer's preallocated keys and values, `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub keys: Tensor<4>,
    pub values: Tensor<4>,
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<4>, Tensor<4>),
        mask: &Tensor<4>,
        cache: &mut LayerCache,
        start: usize,
    ) -> Tensor<3> {
        let h = x.clone()
            + self.self_attn.forward_cached(
                self.input_layernorm.forward(x),
                rope,
                mask,
                cache,
                start,
            );
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<2>, Tensor<2>),
        window: Option<usize>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, window);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// A LLaMA-family causal language model.
#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding matrix.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: RotaryHalf,
}

impl Llama {
    /// Final-norm hidden states `[batch, len, hidden]` for right-padded `ids: [batch, len]`.
    ///
    /// Right padding needs no padding mask: under the causal mask a real token never sees a later
    /// pad, and the pads' own outputs are ignored by every caller.
    pub fn hidden_states(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, s] = ids.dims();
        let context = self.layer_context(s, &ids.device());
        let mut x = self.embed_tokens.forward(ids);
        for layer in &self.layers {
            x = layer.forward(x, &context.rope, context.window);
        }
        self.norm.forward(x)
    }

    /// What every decoder layer of a forward pass over positions `0..len` shares.
    pub fn layer_context(&self, len: usize, device: &Device) -> LayerContext {
        LayerContext {
            rope: self.rope.tables(0, len, device),
            window: self.config.sliding_window,
        }
    }

    /// The LM head applied to hidden states of any leading shape `[.., hidden]`.
    pub fn logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(self.embedding_transposed::<D>()),
        }
    }

    /// The head as one `[hidden, vocab]` matrix (the embedding transposed when tied), or `None`
    /// when the head has a bias, which the fused linear loss does not take.
    pub fn head_weight(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            Some(head) if head.bias.is_some() => None,
            Some(head) => Some(head.weight.val()),
            None => Some(self.embed_tokens.weight.val().transpose()),
        }
    }

    /// Stores an untied head vocabulary-major (`[V, H]` memory seen as `[H, V]`), as a tied head
    /// already is, so that the fused head's vocabulary slices of it need no copy
    /// (`loss::linear`). Only worth it there: the CPU matmul is ~4 % slower on a `small` step
    /// with this layout. A full fine-tune's first optimizer step writes the head back row-major.
    pub fn with_vocab_major_head(mut self) -> Self {
        if let Some(head) = self.lm_head.take() {
            let weight = head.weight.map(|w| {
                let (device, tracked) = (w.device(), w.is_require_grad());
                let vocab_major = w.transpose().into_data();
                Tensor::from_data(vocab_major, &device)
                    .transpose()
                    .set_require_grad(tracked)
            });
            self.lm_head = Some(Linear { weight, ..head });
        }
        self
    }

    /// The embedding matrix as a `[1, .., hidden, vocab]` head weight.
    fn embedding_transposed<const D: usize>(&self) -> Tensor<D> {
        let w = self.embed_tokens.weight.val().transpose();
        let [h, v] = w.dims();
        let mut shape = [1usize; D];
        shape[D - 2] = h;
        shape[D - 1] = v;
        w.reshape(shape)
    }

    /// Final-norm hidden states `[batch, n, hidden]` of `n` new tokens stored at cache slots
    /// `start..start + n`, at rotary `positions` (row-major `[batch, n]`), under the additive
    /// `mask: [batch, 1, n, start + n]`.
    pub fn hidden_states_cached(
        &self,
        ids: Tensor<2, Int>,
        positions: &[usize],
        mask: &Tensor<4>,
        cache: &mut [LayerCache],
        start: usize,
    ) -> Tensor<3> {
        let [b, _] = ids.dims();
        let rope = self.rope.tables_at(positions, b, &ids.device());
        let mut x = self.embed_tokens.forward(ids);
        for (layer, layer_cache) in self.layers.iter().zip(cache) {
            x = layer.forward_cached(x, &rope, mask, layer_cache, start);
        }
        self.norm.forward(x)
    }

    /// Logits `[batch, len, vocab]` for right-padded `ids`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.logits(self.hidden_states(ids))
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.weight.val().device()
    }
}

/// Wraps a tensor as a parameter whose id is derived from its Hugging Face `name`.
///
/// Optimizer state is keyed by parameter id. Ids that follow from names, rather than from a
/// process-wide counter, let a restarted run hand its saved optimizer state back to the same
/// parameters, which is what makes `--resume` exact.
pub(crate) fn param<const D: usize>(name: &str, t: Tensor<D>) -> Param<Tensor<D>> {
    let mut param = Param::from_tensor(t);
    param.id = ParamId::from(stable_id(name));
    param
}

/// FNV-1a: a fixed hash, unlike std's randomly keyed one.
pub(crate) fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
