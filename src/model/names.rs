//! The decoder's tensors, named once: Hugging Face's names (safetensors, PEFT) and GGUF's
//! (llama.cpp) side by side, and each projection's shape beside its names. Loading, saving,
//! PEFT I/O, LoRA and GGUF all read them from here.

use super::config::ModelConfig;

/// The token embedding.
pub const EMBED: &str = "model.embed_tokens";
/// The final norm.
pub const NORM: &str = "model.norm";
/// The untied output head.
pub const HEAD: &str = "lm_head";
/// A layer's norm before attention.
pub const INPUT_NORM: &str = "input_layernorm";
/// A layer's norm before the MLP.
pub const POST_ATTENTION_NORM: &str = "post_attention_layernorm";

/// The Hugging Face prefix of decoder layer `i`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// A width of the decoder, from its config.
#[derive(Debug, Clone, Copy)]
enum Width {
    Hidden,
    QueryHeads,
    KvHeads,
    Intermediate,
}

impl Width {
    fn of(self, c: &ModelConfig) -> usize {
        match self {
            Width::Hidden => c.hidden_size,
            Width::QueryHeads => c.num_attention_heads * c.head_dim,
            Width::KvHeads => c.num_key_value_heads * c.head_dim,
            Width::Intermediate => c.intermediate_size,
        }
    }
}

/// One of a layer's seven projections.
#[derive(Debug, Clone, Copy)]
pub struct Projection {
    /// Its Hugging Face name within the layer (`self_attn.q_proj`).
    pub hf: &'static str,
    /// Its GGUF name within the layer (`attn_q`).
    pub gguf: &'static str,
    input: Width,
    output: Width,
    /// Whether `attention_bias` (Qwen2) gives it a bias.
    attention_bias: bool,
}

impl Projection {
    /// PEFT's and LoRA's name for it (`q_proj`).
    pub fn module(&self) -> &'static str {
        self.hf.rsplit('.').next().expect("a name")
    }

    /// Its `[in, out]` and whether it has a bias, in a model of config `c`.
    pub fn shape(&self, c: &ModelConfig) -> (usize, usize, bool) {
        (
            self.input.of(c),
            self.output.of(c),
            self.attention_bias && c.attention_bias,
        )
    }
}

const fn projection(
    hf: &'static str,
    gguf: &'static str,
    input: Width,
    output: Width,
    attention_bias: bool,
) -> Projection {
    Projection {
        hf,
        gguf,
        input,
        output,
        attention_bias,
    }
}

/// A decoder layer's projections, in the order of [`super::llama::DecoderLayer::projections`].
pub const PROJECTIONS: [Projection; 7] = {
    use Width::*;
    [
        projection("self_attn.q_proj", "attn_q", Hidden, QueryHeads, true),
        projection("self_attn.k_proj", "attn_k", Hidden, KvHeads, true),
        projection("self_attn.v_proj", "attn_v", Hidden, KvHeads, true),
        projection("self_attn.o_proj", "attn_output", QueryHeads, Hidden, false),
        projection("mlp.gate_proj", "ffn_gate", Hidden, Intermediate, false),
        projection("mlp.up_proj", "ffn_up", Hidden, Intermediate, false),
        projection("mlp.down_proj", "ffn_down", Intermediate, Hidden, false),
    ]
};

/// Tensors outside the layers: (Hugging Face, GGUF).
const GLOBAL: [(&str, &str); 3] = [
    (EMBED, "token_embd"),
    (NORM, "output_norm"),
    (HEAD, "output"),
];

/// A layer's norms: (Hugging Face, GGUF).
const NORMS: [(&str, &str); 2] = [(INPUT_NORM, "attn_norm"), (POST_ATTENTION_NORM, "ffn_norm")];

/// A layer's modules: (Hugging Face, GGUF).
fn in_layer() -> impl Iterator<Item = (&'static str, &'static str)> {
    NORMS
        .into_iter()
        .chain(PROJECTIONS.iter().map(|p| (p.hf, p.gguf)))
}

/// The GGUF name of Hugging Face tensor `hf` (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`), if the decoder has it.
pub fn to_gguf(hf: &str) -> Option<String> {
    let (module, kind) = hf.rsplit_once('.')?;
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == module) {
        return Some(format!("{g}.{kind}"));
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (i, inner) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (_, g) = in_layer().find(|(h, _)| *h == inner)?;
    Some(format!("blk.{i}.{g}.{kind}"))
}

/// The Hugging Face name of GGUF tensor `gguf`, if the decoder has it.
pub fn to_hf(gguf: &str) -> Option<String> {
    let (module, kind) = gguf.rsplit_once('.')?;
    if let Some((h, _)) = GLOBAL.iter().find(|(_, g)| *g == module) {
        return Some(format!("{h}.{kind}"));
    }
    let rest = module.strip_prefix("blk.")?;
    let (i, inner) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (h, _) = in_layer().find(|(_, g)| *g == inner)?;
    Some(format!("{}.{h}.{kind}", layer(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.29.self_attn.q_proj.bias",
            "model.layers.7.mlp.down_proj.weight",
        ] {
            let g = to_gguf(hf).unwrap();
            assert_eq!(to_hf(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(
            to_gguf("model.layers.3.self_attn.o_proj.weight").unwrap(),
            "blk.3.attn_output.weight"
        );
        assert_eq!(to_hf("rope_freqs.weight"), None);
    }
}
