"""cuBLAS's bf16 matmul and SDPA's bf16 flash attention timed once more, after egret's steps
of the GPU check (bench/gpu-check.sh): the card's clocks drift over a call, so the goals'
ratios are given against PyTorch's figures from both ends of it."""
import torch

from torch_timing import matmul, sdpa

matmul(torch.bfloat16, label=" (again, after egret)")
sdpa(torch.bfloat16, label=" (again, after egret)")
