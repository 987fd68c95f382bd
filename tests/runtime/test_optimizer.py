import threading

import pytest
import torch

from ratel.ir import ParamGroup
from ratel.runtime.optimizer import AdamW, CPUOptimizer, adamw_update


def test_adamw_update_equals_torch_adamw():
    torch.manual_seed(0)
    p = torch.randn(1000)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, fused=True)
    m, v, step = torch.zeros(1000), torch.zeros(1000), torch.zeros(())
    for _ in range(5):
        g = torch.randn(1000)
        ref.grad = g.clone()
        opt.step()
        step += 1
        adamw_update(p, g, m, v, step, AdamW(lr=1e-2, weight_decay=0.1))
    assert torch.allclose(p, ref.detach(), rtol=1e-6, atol=1e-7)


def test_bf16_gradients_and_compute_copy():
    p = torch.randn(64)
    out = torch.empty(64, dtype=torch.bfloat16)
    g = torch.randn(64).bfloat16()
    ref = p.clone()
    m, v = torch.zeros(64), torch.zeros(64)
    adamw_update(p, g, m, v, torch.ones(()), AdamW(lr=1e-2), out=out)
    torch._fused_adamw_([ref], [g.float()], [torch.zeros(64)], [torch.zeros(64)], [], [torch.ones(())], lr=1e-2,
                        beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)
    assert torch.allclose(p, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(out, p.bfloat16())


def test_hyperparameters_are_validated():
    for bad in (dict(lr=-1), dict(betas=(1.0, 0.9)), dict(eps=-1e-8)):
        with pytest.raises(ValueError, match="AdamW"):
            AdamW(**bad)


class _Store:
    def __init__(self, group):
        self.groups = (group,)
        n = group.numel
        self.master = {0: torch.zeros(n)}
        self.exp_avg = {0: torch.zeros(n)}
        self.exp_avg_sq = {0: torch.zeros(n)}
        self.grad_staging = {0: torch.ones(n)}
        self.compute = {0: self.master[0]}
        self.steps = {0: torch.zeros(())}

    def on_ssd(self, group):
        return False

    def params_on_ssd(self, group):
        return False


def _group(numel=8):
    return ParamGroup(0, "g", ("w",), ((numel,),), (0,), numel, torch.float32, (0,), True)


def test_worker_updates_and_wait_blocks_until_done():
    store = _Store(_group())
    opt = CPUOptimizer(store, AdamW(lr=0.1, weight_decay=0.0))
    opt.submit(store.groups[0], None)
    opt.wait(0)
    assert torch.allclose(store.master[0], torch.full((8,), -0.1))   # Adam's first step moves by lr
    assert store.steps[0].item() == 1
    opt.close()


def test_worker_errors_surface_on_the_training_thread():
    store = _Store(_group())
    store.grad_staging[0] = torch.ones(3)   # wrong size: the update fails on the worker
    opt = CPUOptimizer(store, AdamW())
    opt.submit(store.groups[0], None)
    with pytest.raises(RuntimeError, match="CPU optimizer failed"):
        opt.wait_all()
    opt.close()
