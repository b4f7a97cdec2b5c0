"""Causal attention forward + backward through each scaled_dot_product_attention backend, at Qwen2.5 shapes, in the
layout our core attention hands it ([s, b, heads, d] permuted to [b, heads, s, d]).

    python -m benchmarks.attention_backends [--sizes 0.5B 1.5B 7B] [--seq-lens 2048 4096] [--tokens 16384]

GQA: the flash, memory-efficient and math backends take K/V with fewer heads (enable_gqa); for a backend that
refuses that, K/V are expanded to the query heads first (the expand is part of the timing, as it would be in
training). FLOPs: forward 2 * 2 * b * heads * s^2 * d / 2 (causal), backward 2.5x the forward.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


from benchmarks.cuda_timing import attention_shape_sweep, time_ms


BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_step(q, k, v, backend, expand_kv: bool):
    with sdpa_kernel([backend]):
        if expand_kv and k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    out.backward(torch.ones_like(out))


def main() -> None:
    for size_name, size, seq, batch in attention_shape_sweep(__doc__):

        def make(heads):
            t = torch.randn(seq, batch, heads, size.head_dim, device="cuda", dtype=torch.bfloat16)
            return t.permute(1, 2, 0, 3).requires_grad_()

        q, k, v = make(size.num_attention_heads), make(size.num_query_groups), make(size.num_query_groups)
        flops = 3.5 * 2 * 2 * batch * size.num_attention_heads * seq * seq * size.head_dim / 2
        for name, backend in BACKENDS.items():
            for expand in (False, True):
                try:
                    ms = time_ms(lambda: attention_step(q, k, v, backend, expand), reps=10)
                except RuntimeError as error:
                    print(f"{size_name:5s} s={seq} b={batch} {name:9s} expand_kv={expand!s:5s} "
                          f"unavailable: {str(error).splitlines()[0][:90]}", flush=True)
                    continue
                print(f"{size_name:5s} s={seq} b={batch} {name:9s} expand_kv={expand!s:5s} {ms:8.2f} ms "
                      f"{flops / ms / 1e9:6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
