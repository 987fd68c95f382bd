"""Rates of the CPU work accumulation and clipping add: fp32 += bf16 gradient sums, per-parameter norms,
and the native AdamW with a bf16 or an fp32 gradient (G elements/s, median of 5, 200M elements)."""
import statistics
import sys
import time

import torch

from ratel.runtime.cpu_adam import accumulate_, adamw_step

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000_000
print("threads", torch.get_num_threads())
g16 = torch.randn(n).to(torch.bfloat16)
acc = torch.randn(n)
master, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
out = torch.empty(n, dtype=torch.bfloat16)
shape = (n // 4096, 4096)


def rate(label, fn):
    fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    print(f"{label:<44} {n / statistics.median(ts) / 1e9:6.2f} G/s")


rate("acc.add_(bf16 grad)", lambda: acc.add_(g16))
rate("acc.copy_(bf16 grad)", lambda: acc.copy_(g16))
rate("accumulate_ (native) acc += bf16 grad", lambda: accumulate_(acc, g16, copy=False))
rate("vector_norm(bf16 grad)", lambda: torch.linalg.vector_norm(g16.view(shape), 2.0))
rate("vector_norm(fp32 grad)", lambda: torch.linalg.vector_norm(acc.view(shape), 2.0))
rate("vector_norm(bf16 grad, dtype=float32)", lambda: torch.linalg.vector_norm(g16.view(shape), 2.0, dtype=torch.float32))
step = [1]


def adam(grad, scale=1.0):
    step[0] += 1
    adamw_step(master, grad, m, v, step[0], lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, out=out,
               grad_scale=scale)


rate("adamw native bf16 grad -> bf16 out", lambda: adam(g16))
rate("adamw native bf16 grad, grad_scale 0.5", lambda: adam(g16, 0.5))
rate("adamw native fp32 grad -> bf16 out", lambda: adam(acc))
rate("adamw native fp32 grad, grad_scale 0.5", lambda: adam(acc, 0.5))
