"""PyTorch side of the GPU check (bench/gpu-check.sh), on the lent GPU machine.

Makes SmolLM2-135M-shaped weights (Hugging Face LlamaForCausalLM with SmolLM2-135M's
configuration, seeded random initialisation, f32) into WEIGHTS_DIR for egret to load, then
times on the same GPU: torch.matmul 4096^3 (bf16, and f32 with and without TF32), SDPA
causal attention (16 heads x 4096 tokens x head 128; bf16 flash and f32, and its forward
and backward in bf16), HF greedy
generation (64-token prompt, 64 new tokens, f32) and one AdamW training step (batch 1 x 256,
f32). Prints one JSON object per line; the last line holds HF's greedy ids.
"""
import sys
import time

import torch
import transformers

from torch_timing import ATTN_FLOPS, DEV, T, bench, emit, matmul, sdpa

out_dir = sys.argv[1]
dev = DEV
torch.manual_seed(0)

cfg = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, hidden_act="silu",
)
model = transformers.LlamaForCausalLM(cfg).float()
model.save_pretrained(out_dir, safe_serialization=True)
model = model.to(dev).eval()

for dtype, tf32 in [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]:
    matmul(dtype, tf32)

for dtype in [torch.bfloat16, torch.float32]:
    sdpa(dtype)
t, flops = T, ATTN_FLOPS

# The same attention's forward and backward (bf16, as egret's tensor-core backward reads
# its operands); FlashAttention's flops: the backward 2.5 times the forward's.
q, k, v, do = (torch.randn(1, 16, t, 128, device=dev, dtype=torch.bfloat16) for _ in range(4))
for x in (q, k, v):
    x.requires_grad_(True)
f = torch.nn.functional.scaled_dot_product_attention


def fwd_bwd():
    o = f(q, k, v, is_causal=True)
    torch.autograd.grad(o, (q, k, v), do)


s = bench(fwd_bwd)
emit(check="torch", what="sdpa causal h16 t4096 d128 bfloat16 forward+backward", seconds=s,
     tflops=flops * 3.5 / s / 1e12)
del q, k, v, do

ids = torch.tensor([[(i * 7919 + 13) % cfg.vocab_size for i in range(64)]], device=dev)
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids)
    torch.cuda.synchronize()
    prefill = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    gen = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
decode = 63 / max(total - 64 / prefill, 1e-9)
emit(check="torch", what="hf smollm2 f32", prefill_tok_s=prefill, decode_tok_s=decode)

xs = torch.tensor([[(i * 7919 + 13) % cfg.vocab_size for i in range(256)]], device=dev)
with torch.no_grad():
    emit(check="torch", what="hf loss of the train-step batch at init",
         loss=model(xs, labels=xs).loss.item())
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, cfg.vocab_size, (1, 257), device=dev)


def step():
    opt.zero_grad(set_to_none=True)
    loss = model(x[:, :-1], labels=x[:, 1:].contiguous()).loss
    loss.backward()
    opt.step()


s = bench(step, reps=10)
emit(check="torch", what="train step smollm2 f32 1x256", seconds=s, tok_s=256 / s)
emit(check="torch", what="hf greedy ids", ids=gen[0, 64:].tolist())
