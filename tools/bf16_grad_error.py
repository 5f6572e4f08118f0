#!/usr/bin/env python3
"""How far PyTorch's own bf16 mixed precision lands from the float32 gradients of the tiny
fixtures: the yardstick for egret's bf16 (tensor-core) gradient test.

For each tiny model, runs LlamaForCausalLM under torch.autocast(bfloat16) (matmuls with bf16
operands, as egret's `--tensor-cores`) on the fixture's tokens, and prints the median and
worst relative L2 distance of its parameter gradients from tests/fixtures/tiny/<name>/
grads.safetensors (float32). Needs the reference venv of tools/make_fixtures.py:
  ~/.cache/egret/refvenv/bin/python tools/bf16_grad_error.py
"""
import json
import pathlib

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

TINY = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny"

for d in sorted(p for p in TINY.iterdir() if (p / "grads.safetensors").exists()):
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    toks = json.loads((d / "logits.json").read_text())["tokens"]
    ids = torch.tensor([toks])
    ref = load_file(str(d / "grads.safetensors"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    errs = sorted(
        ((p.grad.double() - ref[f"grad.{n}"].double()).norm()
         / ref[f"grad.{n}"].double().norm()).item()
        for n, p in model.named_parameters())
    print(f"{d.name}: torch autocast bf16 gradients, relative L2 to float32: "
          f"median {errs[len(errs) // 2]:.2e}, worst {errs[-1]:.2e}")
