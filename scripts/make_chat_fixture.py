#!/usr/bin/env python3
"""Writes chat-template fixtures: two real chat templates (Llama-2-chat and ChatML) on the
Llama-2 tokenizer, a few conversations, and for each the token ids and loss mask that
transformers' own Jinja rendering gives.

Segments follow ual's rule (src/data/template.rs): assistant turn k is the text between
apply_chat_template(turns[:k], add_generation_prompt=True) and
apply_chat_template(turns[:k+1]); segment i covers tokens len(encode(text before i)) ..
len(encode(text through i)), encoded as apply_chat_template(tokenize=True) does (no added
special tokens).

    pip install transformers
    python scripts/make_chat_fixture.py
"""
import json
import pathlib
import shutil
import tempfile

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
OUT = ROOT / "tests" / "fixtures" / "chat"
TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf's template, as published.
    "llama2-chat": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    # ChatML, as Qwen and many others use it.
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": " Apple. "},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Pear."}],
]


def segments(tok, messages):
    out, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages[:k + 1], tokenize=False)
        assert prompt.startswith(done) and full.startswith(prompt)
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = tok.apply_chat_template(messages, tokenize=False)[len(done):]
    if rest:
        out.append((rest, False))
    return out


def encode(tok, segs):
    text, mask = "", []
    for seg, trains in segs:
        text += seg
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        mask += [trains] * max(0, n - len(mask))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = (mask + [segs[-1][1]] * len(ids))[:len(ids)]
    return text, ids, mask


def main():
    cases = []
    for name, template in TEMPLATES.items():
        config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (OUT / name).mkdir(parents=True, exist_ok=True)
        (OUT / name / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(TOKENIZER / "tokenizer.json", tmp)
            shutil.copy(OUT / name / "tokenizer_config.json", tmp)
            tok = AutoTokenizer.from_pretrained(tmp)
            for messages in CONVERSATIONS:
                text, ids, mask = encode(tok, segments(tok, messages))
                assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False), "same ids as HF"
                cases.append(dict(template=name, messages=messages, text=text, ids=ids, loss_mask=mask))
                print(name, repr(text[:70]), sum(mask), "of", len(ids), "tokens train")
    (OUT / "expected.json").write_text(json.dumps(dict(cases=cases), indent=1))


if __name__ == "__main__":
    main()
