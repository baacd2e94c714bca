#!/usr/bin/env python3
"""The PyTorch + PEFT side of `ual bench step`: the same LLaMA shape (random weights), batch,
LoRA configuration and UAL loss, timed the same way, printed as the same JSON.

    pip install torch transformers peft
    python scripts/bench_torch.py --preset small [--device cpu|cuda] [--steps 5]
    python scripts/bench_torch.py --model HF_DIR --preset small   # a real model; the preset's batch

Presets must match `Preset::shape` in src/bench/step.rs.
"""
import argparse
import json
import resource
import time

import torch
import transformers
import peft

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, tied, batch, seq
    "tiny": (64, 172, 2, 4, 2, True, 8, 256),
    "small": (256, 688, 4, 4, 4, False, 4, 256),
    "125m": (768, 2048, 12, 12, 12, False, 4, 512),
    "1b": (2048, 5632, 22, 32, 4, False, 4, 512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ual_loss_sum(logits, labels, smoothing):
    """Σ over response tokens of cross_entropy(label_smoothing=ε of the token's sample)."""
    total = logits.new_zeros(())
    for eps in sorted(set(smoothing.tolist())):
        rows = (smoothing == eps) & (labels != -100)
        total = total + torch.nn.functional.cross_entropy(
            logits[rows], labels[rows], label_smoothing=eps, reduction="sum")
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small", choices=PRESETS)
    p.add_argument("--model", help="a Hugging Face directory instead of random weights (as `ual bench step --model`)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--base-dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    a = p.parse_args()

    hidden, inter, layers, heads, kv, tied, batch, seq = PRESETS[a.preset]
    batch, seq = a.batch_size or batch, a.seq_len or seq
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=max(seq, 2048),
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.base_dtype]
    if a.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        config = model.config
        hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        heads, kv, tied = config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings
        model = model.to(device=a.device, dtype=dtype)
    else:
        model = transformers.LlamaForCausalLM(config).to(device=a.device, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules=TARGETS))
    for n, p_ in model.named_parameters():
        if p_.requires_grad:
            p_.data = p_.data.float()  # LoRA factors train in f32, as ual's do
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    eps = torch.tensor([0.05 if b % 2 == 0 else 0.2 for b in range(batch)])
    ids, labels = ids.to(a.device), labels.to(a.device)
    # Next-token targets: position t predicts t + 1.
    targets = labels[:, 1:].reshape(-1)
    smoothing = eps[:, None].expand(batch, seq - 1).reshape(-1).to(a.device)
    count = int((targets != -100).sum())

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        with torch.autocast(a.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids).logits[:, :-1].reshape(-1, config.vocab_size)
        loss = ual_loss_sum(logits.float(), targets, smoothing) / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(a.warmup):
        step()
    sync()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = 0.0, float("nan")
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        seconds += time.perf_counter() - t
    tokens = batch * seq
    print(json.dumps(dict(
        engine=f"torch {torch.__version__} + transformers {transformers.__version__} + peft {peft.__version__}",
        preset=a.preset, device=a.device if a.device == "cpu" else torch.cuda.get_device_name(),
        shape=dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=config.vocab_size,
                   tie_word_embeddings=tied, batch_size=batch, seq_len=seq),
        options=dict(base_dtype=a.base_dtype, gradient_checkpointing=a.gradient_checkpointing,
                     lora_r=a.lora_r, warmup_steps=a.warmup, steps=a.steps,
                     threads=torch.get_num_threads()),
        parameters=parameters, trainable_parameters=trainable, tokens_per_step=tokens,
        seconds_per_step=seconds / a.steps, tokens_per_s=tokens * a.steps / seconds,
        peak_device_bytes=torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        final_loss=loss)))


if __name__ == "__main__":
    main()
