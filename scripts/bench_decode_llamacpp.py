"""llama.cpp's counterpart of `ual bench decode` (through llama-cpp-python): greedy decoding of
one prompt from a GGUF file, the same JSON fields (time to the first token, tokens/s).

    pip install llama-cpp-python
    python3 scripts/bench_decode_llamacpp.py --model FILE.gguf [--new-tokens N] [--threads T]

As the ual bench: one warm-up call, one call for a single token, one timed call; EOS does not
end the sequence (the tokens are drawn whatever they are). Batch 1 only.
"""

import argparse
import json
import os
import time

import llama_cpp

PROMPT = "Natalia sold clips to 48 of her friends in April"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    prompt = llm.tokenize(a.prompt.encode())

    def decode(n):
        llm.reset()
        start = time.perf_counter()
        made = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            made += 1
            if made == n:
                break
        seconds = time.perf_counter() - start
        assert made == n
        return seconds

    decode(a.new_tokens)
    first = decode(1)
    seconds = decode(a.new_tokens)
    print(json.dumps({
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {a.threads} threads",
        "model": a.model,
        "batch_size": 1,
        "prompt_tokens": len(prompt),
        "new_tokens": a.new_tokens,
        "time_to_first_token_s": first,
        "tokens_per_s": a.new_tokens / seconds,
        "tokens_per_s_per_sequence": a.new_tokens / seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
