#!/usr/bin/env python3
"""PyTorch (eager, CPU) trains the same LLaMA as `egret train`, the same way: the token ids
`egret tokenize --file` wrote, the same batches (windows at offsets from egret's SplitMix64
sequence seeded by (seed, step)), HF initialisation, AdamW (torch defaults, weight decay)
after global-norm clipping at 1.0, linear warmup then cosine decay to a tenth.

  torch_train.py --config config.json --ids ids.json --steps N --batch B --seq T \
      --lr LR --warmup W --weight-decay WD --seed S --threads 2 --log torch.jsonl
Prints one JSON summary: final loss, mean loss of the last 10 steps, tokens/s.
"""
import argparse
import json
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

M64 = (1 << 64) - 1


def batch_at(data, step, seed, b, t):
    span = len(data) - (t + 1) + 1
    state = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03) & M64
    toks, tg = [], []
    for _ in range(b):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        off = (z ^ (z >> 31)) % span
        toks.append(data[off:off + t])
        tg.append(data[off + 1:off + t + 1])
    return torch.tensor(toks), torch.tensor(tg)


def lr_at(k, peak, warmup, total):
    if warmup > 0 and k <= warmup:
        return peak * k / warmup
    span = max(total - warmup, 1)
    done = min((k - warmup) / span, 1.0)
    lo = peak / 10
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * done))


def main():
    ap = argparse.ArgumentParser()
    for a, ty in [("config", str), ("ids", str), ("steps", int), ("batch", int), ("seq", int),
                  ("lr", float), ("warmup", int), ("weight-decay", float), ("seed", int),
                  ("threads", int), ("log", str)]:
        ap.add_argument("--" + a, type=ty, required=a in ("config", "ids"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads or 2)
    torch.manual_seed(a.seed or 0)
    cfg = json.load(open(a.config))
    cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)},
                      initializer_range=0.02)
    model = LlamaForCausalLM(cfg).float().train()
    data = json.load(open(a.ids))["ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=a.weight_decay)
    log = open(a.log, "w") if a.log else None
    losses, secs = [], 0.0
    for k in range(1, a.steps + 1):
        x, y = batch_at(data, k, a.seed, a.batch, a.seq)
        lr = lr_at(k, a.lr, a.warmup, a.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        if k > 1:
            secs += dt
        losses.append(float(loss))
        if log:
            log.write(json.dumps({"step": k, "loss": float(loss), "lr": lr,
                                  "tok_s": a.batch * a.seq / dt, "grad_norm": float(norm)}) + "\n")
    tail = losses[-10:]
    print(json.dumps({"loss": losses[-1], "loss_last10": sum(tail) / len(tail),
                      "tok_s": (a.steps - 1) * a.batch * a.seq / max(secs, 1e-9),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
