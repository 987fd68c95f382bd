import pytest
import torch

import ratel
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
        self.device_grads = {}

    def on_ssd(self, group):
        return False

    def params_on_ssd(self, group):
        return False

    def on_gpu(self, group):
        return False

    def scattered(self, group):
        return False

    def landing_numel(self, group):
        return group.numel

    def host_copies_current(self):
        pass

    def state_range(self, group):
        return 0, group.numel

    def host_states(self, group):
        i = group.index
        return self.master[i], self.exp_avg[i], self.exp_avg_sq[i]

    def grad_of(self, group):
        return self.grad_staging[group.index]

    def grad_consumed(self, group):
        self.consumed = getattr(self, "consumed", 0) + 1


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
    # Half an update cycle is applied: the optimizer refuses to go on, every time, and says what to do.
    for _ in range(2):
        with pytest.raises(ratel.RatelError, match="failed earlier .*resume from the last checkpoint"):
            opt.submit(store.groups[0], None)
    opt.close()       # what was raised is not raised again


def test_a_failure_nobody_saw_is_raised_by_close():
    store = _Store(_group())
    store.grad_staging[0] = torch.ones(3)
    opt = CPUOptimizer(store, AdamW())
    opt.submit(store.groups[0], None)
    with pytest.raises(RuntimeError, match="CPU optimizer failed"):
        opt.close()


def _segments_store(numel=6):
    store = _Store(_group(numel))
    store.grad_staging[0] = torch.randn(numel)
    return store


def test_accumulation_sums_micro_batches_and_updates_once():
    store = _segments_store()
    grads = [torch.randn(6) for _ in range(3)]
    opt = CPUOptimizer(store, AdamW(lr=0.1, weight_decay=0.0), accumulate=3)
    for g in grads:
        opt.begin_backward()
        store.grad_staging[0].copy_(g)
        opt.submit(store.groups[0], None)
        opt.wait(0)
        opt.end_backward()
    opt.finish_cycle()
    ref = torch.zeros(6, requires_grad=True)
    ref.grad = grads[0].clone() + grads[1] + grads[2]
    torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0, fused=True).step()
    assert torch.equal(store.master[0], ref.detach()) and store.steps[0].item() == 1
    opt.close()


def test_clipping_scales_by_the_global_norm_and_skips_non_finite():
    store = _segments_store()
    opt = CPUOptimizer(store, AdamW(lr=0.1, weight_decay=0.0), max_grad_norm=0.5)
    grad = store.grad_staging[0].clone()
    opt.begin_backward()
    opt.submit(store.groups[0], None)
    opt.request_update(store.groups[0])     # the plan's optimizer_step, after the last gradient
    opt.end_backward()
    opt.finish_cycle()
    ref = torch.zeros(6, requires_grad=True)
    ref.grad = grad.clone()
    norm = torch.nn.utils.clip_grad_norm_([ref], 0.5)
    torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0, fused=True).step()
    assert opt.grad_norm == norm.item()
    assert torch.equal(store.master[0], ref.detach())
    before = store.master[0].clone()
    store.grad_staging[0][2] = float("nan")
    opt.begin_backward()
    opt.submit(store.groups[0], None)
    opt.request_update(store.groups[0])     # the plan's optimizer_step, after the last gradient
    opt.end_backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.finish_cycle()
    assert torch.equal(store.master[0], before) and store.steps[0].item() == 1 and opt.skipped_steps == 1
    opt.close()


def test_segments_update_with_their_own_hyper_parameters():
    from ratel.runtime.optimizer import Hyper
    store = _segments_store()
    grad = store.grad_staging[0].clone()
    opt = CPUOptimizer(store, AdamW(), segments={0: ((0, 2, 0), (2, 6, 1))})
    opt.begin_backward([Hyper(0.1, 0.9, 0.999, 1e-8, 0.0), Hyper(0.01, 0.8, 0.99, 1e-6, 0.5)])
    store.master[0].fill_(1.0)
    opt.submit(store.groups[0], None)
    opt.end_backward()
    opt.finish_cycle()
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    a.grad, b.grad = grad[:2].clone(), grad[2:].clone()
    torch.optim.AdamW([{"params": [a], "lr": 0.1, "weight_decay": 0.0},
                       {"params": [b], "lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.5}],
                      fused=True).step()
    assert torch.equal(store.master[0], torch.cat([a.detach(), b.detach()]))
    opt.close()
