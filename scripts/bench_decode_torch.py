"""transformers' counterpart of `ual bench decode`: greedy decoding of one batch with the KV
cache, the same JSON fields (time to the first token, tokens/s, peak RSS).

    python3 scripts/bench_decode_torch.py --model DIR [--batch-size B] [--new-tokens N]
    python3 scripts/bench_decode_torch.py --preset 125m [--prompt-tokens P] ...

Like the ual bench: one warm-up call, one call for a single token, one timed call; no EOS ends
a sequence early (min_new_tokens = max_new_tokens). Threads: torch's default (all cores).
"""

import argparse
import json
import resource
import time

import torch
import transformers

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, tied (as src/bench/step.rs)
    "tiny": (64, 172, 2, 4, 2, True),
    "small": (256, 688, 4, 4, 4, False),
    "125m": (768, 2048, 12, 12, 12, False),
    "1b": (2048, 5632, 22, 32, 4, False),
}
PROMPT = "Natalia sold clips to 48 of her friends in April"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--preset", choices=PRESETS)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=100)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.preset:
        hidden, inter, layers, heads, kv, tied = PRESETS[a.preset]
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
            tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 32000, (1, a.prompt_tokens), generator=g)
        name = f"{a.preset} (random weights)"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(a.model)
        prompt = tokenizer(a.prompt, return_tensors="pt").input_ids
        name = a.model
    model.eval()
    ids = prompt.repeat(a.batch_size, 1)
    mask = torch.ones_like(ids)

    def decode(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, use_cache=True,
                                 pad_token_id=0)
        seconds = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + n
        return seconds

    decode(a.new_tokens)
    first = decode(1)
    seconds = decode(a.new_tokens)
    per_sequence = a.new_tokens / seconds
    print(json.dumps({
        "engine": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads",
        "model": name,
        "batch_size": a.batch_size,
        "prompt_tokens": ids.shape[1],
        "new_tokens": a.new_tokens,
        "time_to_first_token_s": first,
        "tokens_per_s": per_sequence * a.batch_size,
        "tokens_per_s_per_sequence": per_sequence,
        # The process's peak RSS (weights and the timed call; it is not reset between calls).
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_source": "process peak RSS (ru_maxrss)",
    }, indent=2))


if __name__ == "__main__":
    main()
