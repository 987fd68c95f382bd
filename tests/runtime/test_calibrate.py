"""calibrate.with_disk: the SSD folders' rates, measured once per file system and cached, on a GPU's profile
(the CPU profile keeps its nominal figures unless asked), with nothing left in the user's folder; detect: a
GPU machine's profile cached per host, card and the CPU AdamW's threads."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ratel.ir.hardware import HardwareProfile
from ratel.runtime import calibrate


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """detect on a 'cuda:0' this machine need not have: a private cache, a named card, no CUDA RNG to fork."""
    import contextlib
    monkeypatch.setattr(calibrate, "CACHE", tmp_path / "hardware.json")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.random, "fork_rng", lambda *args, **kwargs: contextlib.nullcontext())


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A private cache, and measure_disk with 8 MiB requests, recording each call's folders and stream."""
    monkeypatch.setattr(calibrate, "CACHE", tmp_path / "cache" / "hardware.json")
    monkeypatch.delenv("RATEL_MEASURE_DISK", raising=False)
    calls = []
    measure = calibrate.measure_disk

    def small(dirs, nbytes, **stream):
        calls.append((list(dirs), stream))
        return measure(dirs, 8 << 20, **stream)

    monkeypatch.setattr(calibrate, "measure_disk", small)
    return calls


def test_measure_disk_gives_three_rates_and_leaves_nothing_behind(tmp_path):
    rates = calibrate.measure_disk([str(tmp_path)], 4 << 20)
    assert set(rates) == {"read", "write", "both"} and all(r > 0 for r in rates.values())
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_profile_takes_the_folders_rates_measured_once_per_file_system(counted, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    gpu = HardwareProfile.h100()
    measured = calibrate.with_disk(gpu, str(first))
    assert len(counted) == 1
    # a stream of requests, as a step moves the disk for tens of seconds: one request is a burst
    assert counted[0][1]["requests"] > 1
    cached = json.loads(calibrate.CACHE.read_text())
    (rates,) = [v for k, v in cached.items() if "|disk|" in k]
    assert measured.ssd_read_gbps == rates["read"] / 1e9 and measured.ssd_write_gbps == rates["write"] / 1e9
    assert measured.ssd_both_gbps == rates["both"] / 1e9
    assert measured.gpu_tflops == gpu.gpu_tflops                  # only the disk's figures change
    again = calibrate.with_disk(gpu, str(second))                  # another folder on the same file system
    assert len(counted) == 1 and again == measured
    assert list(first.iterdir()) == [] and list(second.iterdir()) == []


def test_the_cpu_profile_keeps_its_nominal_rates_unless_asked(counted, tmp_path, monkeypatch):
    cpu = HardwareProfile.cpu()
    assert calibrate.with_disk(cpu, str(tmp_path)) == cpu and not counted
    assert calibrate.with_disk(HardwareProfile.h100(), None) == HardwareProfile.h100()    # no SSD folder
    monkeypatch.setenv("RATEL_MEASURE_DISK", "0")
    assert calibrate.with_disk(HardwareProfile.h100(), str(tmp_path)) == HardwareProfile.h100()
    monkeypatch.setenv("RATEL_MEASURE_DISK", "1")
    asked = calibrate.with_disk(cpu, str(tmp_path))
    assert len(counted) == 1
    (rates,) = [v for k, v in json.loads(calibrate.CACHE.read_text()).items() if "|disk|" in k]
    assert asked.ssd_write_gbps == rates["write"] / 1e9


def test_a_profile_measured_with_other_cpu_threads_is_measured_again(monkeypatch, fake_gpu):
    """The CPU AdamW's rate depends on the threads it runs on (one fewer than the process's torch threads):
    a profile cached by a process with 4 threads must not price the update of one with 16."""
    measured = []

    def measure_cuda(device):
        measured.append(torch.get_num_threads())
        return dataclasses.replace(HardwareProfile.h100(), cpu_adam_gparams=float(torch.get_num_threads()))

    monkeypatch.setattr(calibrate, "measure_cuda", measure_cuda)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert calibrate.detect("cuda:0").cpu_adam_gparams == 3.0
        assert calibrate.detect("cuda:0").cpu_adam_gparams == 3.0       # cached
        torch.set_num_threads(2)
        assert calibrate.detect("cuda:0").cpu_adam_gparams == 2.0       # not the 3-thread figure
    finally:
        torch.set_num_threads(threads)
    assert measured == [3, 2]


def test_a_profile_cached_before_a_field_was_added_is_measured_again(monkeypatch, fake_gpu):
    """A cache written before the profile measured host DRAM sharing lacks those fields: taking it would price
    copies and updates as if alone, so detect measures again."""
    measured = dataclasses.replace(HardwareProfile.h100(), h2d_shared_gbps=34.0, cpu_adam_shared_gparams=3.9)
    calls = []
    monkeypatch.setattr(calibrate, "measure_cuda", lambda device: calls.append(device) or measured)
    assert calibrate.detect("cuda:0") == dataclasses.replace(measured, cpu_adam_kernel=calibrate.cpu_adam_kernel())
    data = json.loads(calibrate.CACHE.read_text())
    (key, old), = data.items()
    for field in ("h2d_shared_gbps", "cpu_adam_shared_gparams"):
        del old[field]
    calibrate.CACHE.write_text(json.dumps(data))
    assert calibrate.detect("cuda:0").h2d_shared_gbps == 34.0
    assert len(calls) == 2
    calibrate.detect("cuda:0")
    assert len(calls) == 2              # the complete profile is taken from the cache


def test_side_by_side_times_the_updates_that_ran_wholly_beside_the_copies():
    """Host DRAM sharing is measured with the update on a thread of its own, as the runtime's optimizer runs:
    the copies' rate over their whole window, the update's from its steps inside that window."""
    import time
    update_steps = []

    def update(step):
        update_steps.append(step)
        time.sleep(0.02)

    copy_rate, update_rate = calibrate.side_by_side(lambda: time.sleep(0.01), 10**6, 20, update, 10**6)
    assert 0 < copy_rate <= 10**6 / 0.01 / 1e9               # at most 20 copies of 10 ms in the window
    assert 0 < update_rate <= 10**6 / 0.02 / 1e9
    assert update_steps == list(range(100, 100 + len(update_steps)))   # steps count up, past the rate's own
    assert len(update_steps) >= 3
    # An update slower than the copies' whole window never runs wholly beside them: not measured.
    assert calibrate.side_by_side(lambda: None, 10**6, 2, lambda step: time.sleep(0.2), 10**6) == (0.0, 0.0)
