"""The runtime as a whole: a profiled step records every lane."""
import ratel
from helpers import batches, make_model


def test_profiled_step_records_compute_copies_and_optimizer():
    engine = ratel.compile(make_model("gpt", layers=3), budget="1GiB", example_inputs=(batches(1)[0][0],),
                           device="cpu", progress=False)
    engine.profile = True
    ids, labels = batches(1)[0]
    engine.backward(engine(ids, labels=labels).loss)
    engine.step()
    record = engine.last_step
    plan = engine.plan
    engine.close()
    lanes = {s.lane for s in record.spans}
    assert {"compute", "h2d", "d2h", "optimizer"} <= lanes
    computes = [s.label for s in record.spans if s.lane == "compute"]
    assert computes == [f"{p} {plan.units[s.unit].name}" for s, p in
                        ((s, s.phase.value) for s in plan.steps)]
    assert all(0 <= s.start <= s.end <= record.wall for s in record.spans)
    updates = [s for s in record.spans if s.lane == "optimizer"]
    assert len(updates) == sum(g.trainable for g in plan.groups)
    assert len(record.gpu_peak_by_step) == len(plan.steps)
