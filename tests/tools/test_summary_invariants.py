"""Every figure of the summary agrees with the others, on a set of plans that includes SSD-bound ones."""
import re

import pytest
import torch

import ratel
from ratel.tools.presets import build_model, resolve
from ratel.tools.summary import LANES, predicted_breakdown, step_figures


def _plans(tmp):
    from helpers import batches, make_model
    model = make_model("gpt", layers=4)
    ids = batches(1)[0][0]
    for policy in ("auto", "recompute", "keep"):
        yield f"tiny {policy}", ratel.explain(model, "1GiB", (ids,), device="cpu", activations=policy)
    yield "tiny clip + accumulate", ratel.explain(model, "1GiB", (ids,), device="cpu", accumulate=4, max_grad_norm=1.0)
    yield "tiny states on SSD", ratel.explain(model, ratel.Budget(gpu="1GiB", host="3MiB", ssd_dir=str(tmp)), (ids,),
                                              device="cpu")
    big = build_model(resolve("gpt-1.3b"), torch.bfloat16)
    seq = torch.zeros(4, 1024, dtype=torch.long)
    yield "1.3B SSD-bound", ratel.explain(big, ratel.Budget(gpu="24GiB", host="8GiB", ssd_dir=str(tmp)), (seq,),
                                          device="cuda", hardware=ratel.HardwareProfile.h100())


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    return list(_plans(tmp_path_factory.mktemp("ssd")))


def test_no_lane_is_busier_than_the_step(plans):
    assert any(p.memory.ssd_total for _, p in plans)
    for name, plan in plans:
        figures = step_figures(plan)
        for lane in LANES:
            busy = sum(f.seconds[lane] for f in figures)
            assert busy <= plan.times.total * (1 + 1e-9), f"{name}: {lane} busy {busy} > step {plan.times.total}"
        text = ratel.summary(plan)
        lanes = text.split("Time by lane", 1)[1].split("\n\n", 1)[0]
        for share in re.findall(r"([0-9.]+)%", lanes):
            assert float(share) <= 100.0, f"{name}: a lane busy {share}% of the step"


def test_each_step_is_bound_by_its_busiest_lane(plans):
    for name, plan in plans:
        for f in step_figures(plan):
            if f.bound:
                assert f.seconds[f.bound] == max(f.seconds.values()), (name, f.step, f.bound, f.seconds)


def test_counts_are_never_negative_and_the_step_adds_up(plans):
    for name, plan in plans:
        for f in step_figures(plan):
            assert min(f.nbytes.values()) >= 0 and min(f.transfers.values()) >= 0 and f.gpu >= 0
        split = predicted_breakdown(plan)
        assert min(split.values()) >= 0
        assert split["compute"] + split["copy stalls"] + split["optimizer tail"] == pytest.approx(plan.times.total)
        assert "-1" not in ratel.summary(plan).split("Activations", 1)[-1].splitlines()[0], name


def test_a_plan_for_the_cpu_names_no_gpu(plans):
    for name, plan in plans:
        if plan.device == "cpu":
            assert "GPU" not in ratel.summary(plan), name
