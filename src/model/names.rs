//! The decoder's tensor names, written once: Hugging Face's (safetensors, PEFT) and GGUF's
//! (llama.cpp), side by side.

use super::llama::PROJECTIONS;

/// The Hugging Face prefix of decoder layer `i`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// Tensors outside the layers: (Hugging Face, GGUF).
const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];

/// A layer's modules: (Hugging Face, GGUF), the projections in [`PROJECTIONS`] order.
const IN_LAYER: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    (PROJECTIONS[0], "attn_q"),
    (PROJECTIONS[1], "attn_k"),
    (PROJECTIONS[2], "attn_v"),
    (PROJECTIONS[3], "attn_output"),
    (PROJECTIONS[4], "ffn_gate"),
    (PROJECTIONS[5], "ffn_up"),
    (PROJECTIONS[6], "ffn_down"),
];

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
    let (_, g) = IN_LAYER.iter().find(|(h, _)| *h == inner)?;
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
    let (h, _) = IN_LAYER.iter().find(|(_, g)| *g == inner)?;
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
