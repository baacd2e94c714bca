//! The LLaMA-family decoder: embeddings, RMSNorm, rotate-half RoPE, grouped-query causal
//! attention, a SwiGLU MLP and a tied or untied LM head. Mistral (sliding window) and Qwen2
//! (q/k/v bias) are the same network with different switches in [`ModelConfig`].

use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{DType, Device, Int, Tensor};

use super::config::ModelConfig;
use super::lora::{LoraLinear, SharedInput};
use super::names::{self, PROJECTIONS};
use super::rope::RotaryHalf;
use crate::ops::attention;

/// Self-attention with `num_key_value_heads` shared by groups of query heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// The query projection.
    pub q_proj: LoraLinear,
    /// The key projection.
    pub k_proj: LoraLinear,
    /// The value projection.
    pub v_proj: LoraLinear,
    /// The output projection.
    pub o_proj: LoraLinear,
    /// Query heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Key/value heads, each shared by `num_heads / num_kv_heads` query heads.
    #[module(skip)]
    pub num_kv_heads: usize,
    /// Width of one head.
    #[module(skip)]
    pub head_dim: usize,
}

impl Attention {
    /// `x: [batch, len, hidden]` → `[batch, len, hidden]`, causal, within a sliding `window` if
    /// there is one.
    pub fn forward(&self, x: Tensor<3>, context: &LayerContext) -> Tensor<3> {
        let LayerContext { rope, window } = context;
        let (q, k, v) = self.qkv(x);
        let q = RotaryHalf::apply(q, &rope.0, &rope.1);
        // Grouped keys and values go in as they are: the attention kernels share them.
        let k = RotaryHalf::apply(k, &rope.0, &rope.1);
        self.project(attention::causal(q, k, v, *window))
    }

    /// Attention for `n` new tokens whose keys and values join `cache` at slots
    /// `start..start + n`; `mask: [batch, 1, n, start + n]` is additive over the cached slots.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        step: &CachedStep,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        let CachedStep { rope, mask, start } = *step;
        let [b, n, _] = x.dims();
        let (q, k, v) = self.qkv(x);
        let q = RotaryHalf::apply_batched(q, &rope.0, &rope.1);
        let k = RotaryHalf::apply_batched(k, &rope.0, &rope.1);
        let slots = [
            0..b,
            0..self.num_kv_heads,
            start..start + n,
            0..self.head_dim,
        ];
        cache.write(slots, k, v);
        let k = self.repeat_kv(cache.keys.clone().narrow(2, 0, start + n));
        let v = self.repeat_kv(cache.values.clone().narrow(2, 0, start + n));
        self.attend(
            q,
            k,
            v,
            mask.clone().expand([b, self.num_heads, n, start + n]),
        )
    }

    /// The query, key and value heads of `x`, `[batch, heads, len, head_dim]`, before RoPE.
    fn qkv(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let x = SharedInput::new(x, &[&self.q_proj, &self.k_proj, &self.v_proj]);
        let q = self.heads(self.q_proj.forward_shared(&x), self.num_heads);
        let k = self.heads(self.k_proj.forward_shared(&x), self.num_kv_heads);
        let v = self.heads(self.v_proj.forward_shared(&x), self.num_kv_heads);
        (q, k, v)
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
    /// The rotary cos and sin tables, `[len, head_dim / 2]`.
    pub rope: (Tensor<2>, Tensor<2>),
    /// The sliding attention window, if the model has one.
    pub window: Option<usize>,
}

/// What every layer of one cached decoding step shares: `n` new tokens stored at cache slots
/// `start..start + n`, their rotary tables, and the additive `mask: [batch, 1, n, start + n]`.
#[derive(Debug, Clone, Copy)]
pub struct CachedStep<'a> {
    /// The rotary cos and sin tables of the new tokens' positions.
    pub rope: &'a (Tensor<4>, Tensor<4>),
    /// Additive over the cached slots.
    pub mask: &'a Tensor<4>,
    /// The first new token's slot.
    pub start: usize,
}

/// One layer's preallocated keys and values, `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Cached keys.
    pub keys: Tensor<4>,
    /// Cached values.
    pub values: Tensor<4>,
}

impl LayerCache {
    /// Writes `k` and `v` at `slots`. Each tensor is taken out of the cache first, so that its
    /// buffer has one owner and the backend writes the slots in place: a clone would make it
    /// copy the whole cache, every layer, every token.
    fn write(&mut self, slots: [std::ops::Range<usize>; 4], k: Tensor<4>, v: Tensor<4>) {
        let device = k.device();
        let take = |t: &mut Tensor<4>| std::mem::replace(t, Tensor::empty([0; 4], &device));
        self.keys = take(&mut self.keys).slice_assign(slots.clone(), k);
        self.values = take(&mut self.values).slice_assign(slots, v);
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The gate projection.
    pub gate_proj: LoraLinear,
    /// The up projection.
    pub up_proj: LoraLinear,
    /// The down projection.
    pub down_proj: LoraLinear,
}

impl Mlp {
    /// `x: [batch, len, hidden]` → `[batch, len, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = SharedInput::new(x, &[&self.gate_proj, &self.up_proj]);
        let gate = silu(self.gate_proj.forward_shared(&x));
        self.down_proj
            .forward(gate * self.up_proj.forward_shared(&x))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// The norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// The norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The feed-forward block.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer over `x: [batch, len, hidden]`, attending as `attend` does to the normed input:
    /// `h = x + attend(norm(x))`, then `h + mlp(norm(h))`. Whole sequences and cached decoding
    /// differ only in `attend`.
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        attend: impl FnOnce(&Attention, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        self.feed_forward(self.attention_residual_with(x, attend))
    }

    /// The layer over a whole sequence: causal attention within the `window`, if any.
    pub fn forward(&self, x: Tensor<3>, context: &LayerContext) -> Tensor<3> {
        self.feed_forward(self.attention_residual(x, context))
    }

    /// The layer's first half over a whole sequence: `h = x + attention(norm(x))`.
    pub fn attention_residual(&self, x: Tensor<3>, context: &LayerContext) -> Tensor<3> {
        self.attention_residual_with(x, |attention, h| attention.forward(h, context))
    }

    /// `x + attend(norm(x))`, attending as `attend` does.
    fn attention_residual_with(
        &self,
        x: Tensor<3>,
        attend: impl FnOnce(&Attention, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        x.clone() + attend(&self.self_attn, rms_norm(&self.input_layernorm, x))
    }

    /// The layer's second half, `h + mlp(norm(h))`. It acts on each position alone, so it may
    /// be run over any slice of the positions.
    pub fn feed_forward(&self, h: Tensor<3>) -> Tensor<3> {
        h.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, h))
    }

    /// The projections with their names in [`PROJECTIONS`] order.
    pub fn projections(&self) -> [(&'static str, &LoraLinear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let all = [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ];
        let mut names = PROJECTIONS.iter().map(|p| p.hf);
        all.map(|p| (names.next().expect("seven names"), p))
    }

    /// [`Self::projections`], mutably.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let all = [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ];
        let mut names = PROJECTIONS.iter().map(|p| p.hf);
        all.map(|p| (names.next().expect("seven names"), p))
    }
}

/// A LLaMA-family causal language model.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embeddings, `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// The final norm.
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding matrix.
    pub lm_head: Option<Linear>,
    /// The Hugging Face configuration the model was built from.
    #[module(skip)]
    pub config: ModelConfig,
    /// Rotary position embeddings.
    #[module(skip)]
    pub rope: RotaryHalf,
    /// The element type of the residual stream and the decoder's matmuls (a run's
    /// `precision`); the final norm's output, the head and the loss are f32 whatever it is.
    #[module(skip)]
    pub activations: DType,
}

/// A frozen embedding or head kept in its checkpoint's half type (`precision::Resolved`),
/// widened to f32 for one product: the head's products and the loss read f32. The copy lives
/// for the call only, so the model holds half the bytes between calls.
fn widened(weight: Tensor<2>) -> Tensor<2> {
    match weight.dtype() {
        DType::F32 => weight,
        _ => weight.cast(DType::F32),
    }
}

/// The mean of `t` along `dim` (kept as a size-1 dimension) in f32. A half tensor is widened a
/// block of rows at a time (32 MiB of f32), so that no f32 copy of it exists whole.
fn mean_f32(t: Tensor<2>, dim: usize) -> Tensor<2> {
    if t.dtype() == DType::F32 {
        return t.mean_dim(dim);
    }
    let [rows, cols] = t.dims();
    let block = ((1 << 23) / cols.max(1)).clamp(1, rows.max(1));
    let blocks = (0..rows).step_by(block).map(|start| {
        let len = block.min(rows - start);
        t.clone().narrow(0, start, len).cast(DType::F32)
    });
    match dim {
        // Row means: each block's rows are whole.
        1 => Tensor::cat(blocks.map(|b| b.mean_dim(1)).collect(), 0),
        // Column means: the blocks' column sums, added.
        _ => {
            let sum = blocks.map(|b| b.sum_dim(0)).reduce(|a, b| a + b);
            sum.expect("a tensor with rows").div_scalar(rows as f64)
        }
    }
}

/// RMSNorm with its statistics in f32 (a sum of squares over the hidden width overflows f16),
/// returned in the input's type.
fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return norm.forward(x);
    }
    norm.forward(x.cast(DType::F32)).cast(dtype)
}

impl Llama {
    /// Final-norm hidden states `[batch, len, hidden]` for right-padded `ids: [batch, len]`.
    ///
    /// Right padding needs no padding mask: under the causal mask a real token never sees a later
    /// pad, and the pads' own outputs are ignored by every caller.
    pub fn hidden_states(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, s] = ids.dims();
        let context = self.layer_context(s, &ids.device());
        let top = self.decoder_stack(ids, |_, layer, x| layer.forward(x, &context));
        self.final_norm(top)
    }

    /// The final norm of the last layer's output, in f32 whatever the activations' type: the
    /// head and the loss read f32 (see `activations`). Every path to the head goes through
    /// here, layer recomputation included.
    pub fn final_norm(&self, top: Tensor<3>) -> Tensor<3> {
        self.norm.forward(top.cast(DType::F32))
    }

    /// The decoder before its final norm: the embeddings of `ids`, then `layer(i, layer_i, x)`
    /// for each layer in order. Every forward pass (training, recomputation, cached decoding)
    /// runs through here, so a change to the network is made once.
    pub fn decoder_stack(
        &self,
        ids: Tensor<2, Int>,
        mut layer: impl FnMut(usize, &DecoderLayer, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let mut x = self.embed_tokens.forward(ids);
        if x.dtype() != self.activations {
            x = x.cast(self.activations);
        }
        self.layers
            .iter()
            .enumerate()
            .fold(x, |x, (i, l)| layer(i, l, x))
    }

    /// Every projection of the model with its Hugging Face path, e.g.
    /// `model.layers.0.self_attn.q_proj`.
    pub fn projections(&self) -> impl Iterator<Item = (String, &LoraLinear)> {
        self.layers.iter().enumerate().flat_map(|(i, layer)| {
            layer
                .projections()
                .map(|(name, p)| (format!("{}.{name}", names::layer(i)), p))
        })
    }

    /// [`Self::projections`], mutably.
    pub fn projections_mut(&mut self) -> impl Iterator<Item = (String, &mut LoraLinear)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, layer)| {
            layer
                .projections_mut()
                .map(|(name, p)| (format!("{}.{name}", names::layer(i)), p))
        })
    }

    /// What every decoder layer of a forward pass over positions `0..len` shares.
    pub fn layer_context(&self, len: usize, device: &Device) -> LayerContext {
        let (cos, sin) = self.rope.tables(0, len, device);
        let rope = match self.activations {
            DType::F32 => (cos, sin),
            half => (cos.cast(half), sin.cast(half)),
        };
        LayerContext {
            rope,
            window: self.config.sliding_window,
        }
    }

    /// The LM head applied to hidden states of any leading shape `[.., hidden]`.
    pub fn logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        match &self.lm_head {
            Some(head) => burn::tensor::module::linear(
                hidden,
                widened(head.weight.val()),
                head.bias.as_ref().map(|b| b.val()),
            ),
            None => self.tied_logits(hidden),
        }
    }

    /// `hidden · Eᵀ` for the tied head, computed as `(E · hiddenᵀ)ᵀ`: the `[V, H]` embedding
    /// stays the contiguous left operand, and only the `[rows, H]` hidden states and the
    /// `[rows, V]` result are transposed. The direct form made flex copy the whole transposed
    /// embedding on every call: 61% of a decoding step on SmolLM2 (49,152 × 576).
    fn tied_logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        let dims = hidden.dims();
        let h = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let flat: Tensor<2> = hidden.reshape([rows, h]);
        let embedding = widened(self.embed_tokens.weight.val());
        let vocab = embedding.dims()[0];
        let logits = embedding.matmul(flat.transpose()).transpose();
        let mut shape = dims;
        shape[D - 1] = vocab;
        logits.reshape(shape)
    }

    /// The head as one `[hidden, vocab]` matrix (the embedding transposed when tied), in the
    /// type it is stored in (the fused loss widens a half head a slice at a time), or `None`
    /// when the head has a bias, which the fused linear loss does not take.
    pub fn head_weight(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            Some(head) if head.bias.is_some() => None,
            Some(head) => Some(head.weight.val()),
            None => Some(self.embed_tokens.weight.val().transpose()),
        }
    }

    /// This model with its head in f32, for decoding. A head kept in a half type (see
    /// `precision::Resolved::kept_halves`) would otherwise be widened whole for every token:
    /// SmolLM2 from its f16 weights on a Q4_0 base decoded 16 tokens/s that way, against 37 from
    /// f32 weights. The f32 copy lives as long as the decoding does.
    pub fn with_f32_head(&self) -> Llama {
        let mut model = self.clone();
        match model.lm_head.take() {
            Some(head) => {
                let weight = head.weight.map(widened);
                model.lm_head = Some(Linear { weight, ..head });
            }
            None => {
                let weight = model.embed_tokens.weight.map(widened);
                model.embed_tokens = Embedding { weight };
            }
        }
        model
    }

    /// What the NLL's smoothing gap reads of the head (`loss::objective`), in f32, detached,
    /// and without a copy of the whole head: its mean over the vocabulary `[hidden, 1]` and
    /// its columns for `targets`, `[n, hidden]`. `None` when the head has a bias. (flex's
    /// `select` copies a strided tensor whole: each is read in its stored layout.)
    pub fn head_mean_and_columns(&self, targets: Tensor<1, Int>) -> Option<(Tensor<2>, Tensor<2>)> {
        let (mean, columns) = match &self.lm_head {
            Some(head) if head.bias.is_some() => return None,
            Some(head) => {
                let w = head.weight.val().detach();
                (mean_f32(w.clone(), 1), w.select(1, targets).transpose())
            }
            None => {
                let e = self.embed_tokens.weight.val().detach();
                (mean_f32(e.clone(), 0).transpose(), e.select(0, targets))
            }
        };
        Some((mean, widened(columns)))
    }

    /// Stores an untied head vocabulary-major (`[V, H]` memory seen as `[H, V]`), as a tied head
    /// already is, so that the fused head's vocabulary slices of it need no copy
    /// (`loss::linear`). Only worth it there: the CPU matmul is ~4 % slower on a `small` step
    /// with this layout. A full fine-tune's first optimizer step writes the head back row-major.
    pub fn with_vocab_major_head(mut self) -> Self {
        if let Some(head) = self.lm_head.take() {
            let weight = head.weight.map(|w| {
                let (device, tracked) = (w.device(), w.is_require_grad());
                let dtype = w.dtype();
                let vocab_major = w.transpose().into_data();
                Tensor::from_data(vocab_major, (&device, dtype))
                    .transpose()
                    .set_require_grad(tracked)
            });
            self.lm_head = Some(Linear { weight, ..head });
        }
        self
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
        let step = CachedStep {
            rope: &rope,
            mask,
            start,
        };
        let top = self.decoder_stack(ids, |i, layer, x| {
            layer.forward_with(x, |attention, h| {
                attention.forward_cached(h, &step, &mut cache[i])
            })
        });
        self.final_norm(top)
    }

    /// Logits `[batch, len, vocab]` for right-padded `ids`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.logits(self.hidden_states(ids))
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.val().device()
    }
}
