"""Packed SFT rows: causal attention forward + backward through the dense block mask (SDPA, our backend order)
against torch's variable-length flash kernel (megatron_patch.attention.packed_varlen_attention), at Qwen2.5 shapes.

    python -m benchmarks.packed_attention [--sizes 0.5B 1.5B 7B] [--seq-lens 2048 4096] [--tokens 16384]

Rows are filled with samples of 64 to 1,024 tokens (seeded), the rest of a row is padding, as the SFT packer does.
TFLOP/s count only the work inside samples: 3.5 * 2 * 2 * heads * d * sum(len^2) / 2. "host" is the launch
time per call on the CPU (what bounds a step at small micro-batches): try --seq-lens 256 --tokens 512.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel


from benchmarks.cuda_timing import attention_shape_sweep, gpu_and_host_ms

from megatron_patch.attention import BACKEND_PRIORITY, packed_varlen_attention
from megatron_patch.data.providers import packed_attention_mask, packed_seq_params_for


def packed_segments(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        ids, sample = [], 0
        while True:
            length = int(torch.randint(64, 1025, (1,), generator=generator))
            if len(ids) + length > seq:
                break
            ids += [sample] * length
            sample += 1
        rows.append(ids + [sample] * (seq - len(ids)))
    return torch.tensor(rows)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    for size_name, size, seq, batch in attention_shape_sweep(__doc__):
        segments = packed_segments(batch, seq, generator)
        params = packed_seq_params_for(segments, "cpu")
        lengths = params.cu_seqlens_q.diff().double()
        flops = 3.5 * 2 * 2 * size.num_attention_heads * size.head_dim * float((lengths ** 2).sum()) / 2
        params = packed_seq_params_for(segments, "cuda")

        def make(heads):
            return torch.randn(seq, batch, heads, size.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True)

        q, k, v = make(size.num_attention_heads), make(size.num_query_groups), make(size.num_query_groups)
        allowed = ~packed_attention_mask(segments.cuda())
        scale = size.head_dim ** -0.5

        def block_mask_step():
            with sdpa_kernel(BACKEND_PRIORITY, set_priority=True):
                out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)),
                                                     attn_mask=allowed, scale=scale, enable_gqa=True)
            out.backward(torch.ones_like(out))

        def varlen_step():
            out = packed_varlen_attention(q, k, v, params, scale)
            out.backward(torch.ones_like(out))

        for name, step in (("block mask (SDPA)", block_mask_step), ("varlen flash", varlen_step)):
            ms, host = gpu_and_host_ms(step, reps=10)
            print(f"{size_name:5s} s={seq} b={batch} samples={len(lengths)} {name:18s} {ms:8.2f} ms "
                  f"{flops / ms / 1e9:6.1f} TFLOP/s  host {host:6.2f} ms", flush=True)

if __name__ == "__main__":
    main()
