"""bench.measure on a CUDA device: NVML and allocator peaks see a 1 GiB tensor; the NVML handle is torch's device."""

import gc
import time

import pytest
import torch

from bench.measure import environment_stamp, gpu_unavailable_reason, nvml_handle_for, phase

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"),
]

GiB = 2**30


def test_phase_sees_one_gib_on_the_gpu():
    device = torch.device("cuda:0")
    assert gpu_unavailable_reason(device) is None
    torch.zeros(1, device=device)  # create the CUDA context before either phase
    torch.cuda.empty_cache()
    phases: dict = {}
    with phase(phases, "idle", device):
        time.sleep(0.1)
    gc.collect()  # tensors that earlier tests in this process left to the collector
    torch.cuda.empty_cache()
    held_before = torch.cuda.memory_allocated(device) / 2**20  # a phase's allocator peak counts what was held already
    with phase(phases, "alloc", device):
        x = torch.ones(GiB // 4, device=device)  # float32: exactly 1 GiB
        torch.cuda.synchronize(device)
        time.sleep(0.2)
    del x
    torch.cuda.empty_cache()
    idle, alloc = phases["idle"], phases["alloc"]
    assert alloc["gpu_reason"] is None
    assert alloc["gpu_nvml_source"] in ("process", "device_minus_baseline")
    assert alloc["gpu_nvml_peak_mb"] - idle["gpu_nvml_peak_mb"] >= 1024
    assert alloc["gpu_torch_allocated_peak_mb"] - held_before == pytest.approx(1024, rel=0.01)
    assert alloc["gpu_torch_reserved_peak_mb"] >= alloc["gpu_torch_allocated_peak_mb"]
    assert alloc["cpu_peak_rss_mb"] > 0


def test_nvml_handle_is_torchs_device():
    import pynvml

    props = torch.cuda.get_device_properties(0)
    handle = nvml_handle_for(torch.device("cuda:0"))
    assert pynvml.nvmlDeviceGetUUID(handle) in (f"GPU-{props.uuid}", f"MIG-{props.uuid}", str(props.uuid))
    nvml_name, torch_name = pynvml.nvmlDeviceGetName(handle), torch.cuda.get_device_name(0)
    assert nvml_name == torch_name or nvml_name in torch_name or torch_name in nvml_name  # MIG names add a profile


def test_environment_stamp_on_gpu():
    stamp = environment_stamp()
    assert stamp["gpu_driver"]
    assert stamp["cudnn"]
    assert stamp["gpu_name"] == torch.cuda.get_device_name(0)
    assert stamp["gpu_count"] >= 1


def test_a_phase_records_its_nvml_sampling_interval():
    device = torch.device("cuda:0")
    torch.zeros(1, device=device)
    phases: dict = {}
    with phase(phases, "sampled", device, interval_s=0.05):
        time.sleep(0.2)
    assert phases["sampled"]["gpu_nvml_source"] is not None
    assert phases["sampled"]["gpu_sample_interval_s"] == 0.05
