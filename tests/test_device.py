"""The device layer (visiontune/device.py) on a CPU-only machine: GPUs, their names and free memory faked by
replacing the module's probe; out-of-memory errors injected. The same code paths then run for real with
`--device cpu` (and, on a GPU machine, `make gpu-check`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from visiontune import device as devices
from visiontune.backbones.cuts import Tail
from visiontune.backbones.registry import create_backbone
from visiontune.cache.features import feature_key
from visiontune.errors import UsageError
from visiontune.train.loop import run_phase
from visiontune.train.objectives import Supervised, split_batch
from visiontune.train.phases import cached_phase

GIB = 2**30


class FakeProbe:
    """A machine with `count` CUDA GPUs (named, with free memory) and optionally Apple's MPS."""

    def __init__(self, count=0, free=80 * GIB, total=141 * GIB, bf16=True, mps=False):
        self.count, self.free, self.total, self.bf16, self.mps = count, free, total, bf16, mps

    def cuda_count(self):
        return self.count

    def cuda_name(self, index):
        return f"NVIDIA Fake {index}"

    def cuda_memory(self, index):
        return self.free, self.total

    def cuda_bf16(self, index):
        return self.bf16

    def mps_available(self):
        return self.mps


@pytest.fixture
def machine(monkeypatch):
    def fake(**kwargs):
        monkeypatch.setattr(devices, "probe", FakeProbe(**kwargs))
    return fake


def test_auto_takes_cuda_then_mps_then_cpu(machine):
    machine(count=2)
    chosen = devices.choose("auto")
    assert chosen.spec == "cuda:0" and chosen.accelerated
    assert "NVIDIA Fake 0 (cuda:0), 80.0 of 141.0 GiB free" in chosen.describe() and "CUDA GPU is present" in chosen.why
    assert devices.choose("auto", local_rank=1).spec == "cuda:1"  # each process of a job: its own GPU
    machine(count=0, mps=True)
    assert devices.choose("auto").spec == "mps"
    machine(count=0)
    assert devices.choose("auto").spec == "cpu" and "no CUDA GPU" in devices.choose("auto").why
    assert devices.choose("cpu").kind == "cpu"


@pytest.mark.parametrize("spec, count, message", [
    ("cuda:3", 2, "this machine has 2 CUDA GPUs (cuda:0-cuda:1)"),
    ("cuda", 0, "this machine has no CUDA GPU"),
    ("cuda:x", 1, "write cuda:N"),
    ("mps", 0, "MPS) backend is not available"),
    ("tpu", 0, "choose auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_that_is_not_there_is_one_clear_line(machine, spec, count, message):
    machine(count=count)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        devices.choose(spec)
    assert "\n" not in str(caught.value)


def test_gpus_lists_are_parsed_and_checked(machine):
    machine(count=4)
    assert devices.parse_gpus("all") == [0, 1, 2, 3]
    assert devices.parse_gpus("0,1,3") == [0, 1, 3]
    assert devices.visible_devices_env([0, 1, 3]) == {"CUDA_VISIBLE_DEVICES": "0,1,3"}
    for text, message in (("0,7", "GPU 7 does not exist; this machine has 4"), ("a,b", "GPU numbers separated"),
                          ("1,1", "named twice"), (",", "at least one")):
        with pytest.raises(UsageError, match=message):
            devices.parse_gpus(text)
    machine(count=0)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        devices.parse_gpus("all")


def test_cli_gpus_on_a_machine_without_one_fails_in_one_line(class_folders, tmp_path):
    done = subprocess.run([sys.executable, "-m", "visiontune", "train", str(class_folders), "--gpus", "0,1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert "--gpus 0,1: this machine has no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_nccl_only_when_every_local_process_has_a_gpu(machine, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    machine(count=2)
    assert devices.distributed_backend() == "nccl"
    machine(count=1)
    assert devices.distributed_backend() == "gloo"


def test_precision_follows_the_device(machine):
    machine(count=1, bf16=True)
    gpu = devices.choose("cuda")
    assert devices.Precision(gpu, True).name == "bf16" and devices.Precision(gpu, False).name == "fp32"
    assert devices.mixed_by_default(gpu)[0] is True
    machine(count=1, bf16=False)  # an older GPU: fp16 with a gradient scaler
    old = devices.choose("cuda")
    assert devices.Precision(old, True).name == "fp16" and "gradient scaler" in devices.mixed_by_default(old)[1]
    assert devices.mixed_by_default(devices.CPU)[0] is False  # CPU bf16 stays opt-in (--amp)
    assert devices.Precision(devices.CPU, True).name == "bf16"


def test_the_cache_key_names_the_numeric_path_on_a_gpu_and_stays_as_it_was_on_cpu(machine):
    backbone = create_backbone(num_classes=3, img_size=64)
    cpu_key = feature_key(backbone, engine="torch")
    assert "device" not in cpu_key and "numeric" not in cpu_key  # existing CPU caches stay valid
    machine(count=1, bf16=True)
    gpu = devices.choose("cuda")
    bf16 = feature_key(backbone, engine="torch-bf16", device=gpu)
    fp32 = feature_key(backbone, engine="torch", device=gpu)
    assert (bf16["device"], bf16["numeric"], fp32["numeric"]) == ("cuda", "bf16", "fp32")
    machine(count=1, bf16=False)
    fp16 = feature_key(backbone, engine="torch-bf16", device=devices.choose("cuda"))
    assert fp16["numeric"] == "fp16"
    assert len({str(k) for k in (cpu_key, bf16, fp32, fp16)}) == 4  # rows of different precision never mix
    assert feature_key(backbone, engine="onnxruntime", device=gpu) == feature_key(backbone, engine="onnxruntime")


def test_trunk_batches_are_sized_from_free_memory(machine):
    machine(count=1, free=80 * GIB)
    assert devices.inference_batch(devices.choose("cuda"), 224, 64) == 512
    machine(count=1, free=1 * GIB)  # a quarter of 1 GiB at 400 B/pixel at 224 px holds 13 images
    assert devices.inference_batch(devices.choose("cuda"), 224, 64) == 8
    assert devices.inference_batch(devices.CPU, 224, 64) == 64
    assert devices.loader_workers(devices.CPU, 1) == 1


def oom() -> Exception:
    error = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return error("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_out_of_memory_forward_is_retried_in_halves():
    module = torch.nn.Linear(4, 2).eval()
    forward = devices.DeviceForward(module, devices.Precision(devices.CPU, False))
    halved = []
    forward.on_halve = halved.append
    real = forward._forward

    def small_only(images):
        if len(images) > 8:
            raise oom()
        return real(images)

    forward._forward = small_only
    x = torch.randn(30, 4)
    with torch.no_grad():
        expected = module(x)
    assert torch.allclose(forward(x), expected, atol=1e-6)
    assert forward.limit == 7 and halved == [15, 7]
    assert torch.allclose(forward(x), expected, atol=1e-6) and halved == [15, 7]  # later calls start at 7

    def always(images):
        raise oom()

    forward._forward = always
    with pytest.raises(Exception, match="out of memory"):
        forward(x)  # down to one image, then the error stands
    forward._forward = lambda images: (_ for _ in ()).throw(ValueError("not memory"))
    with pytest.raises(ValueError):
        forward(x)  # other errors are not retried


def test_split_batch_keeps_every_item_once():
    batch = {"x": torch.arange(10), "y": torch.arange(10), "u": torch.arange(30)}
    pieces = split_batch(batch, 4)
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert torch.equal(torch.cat([p["u"] for p in pieces]), batch["u"])
    assert split_batch(batch, 1) == [batch]


def _phase(plan_changes=None):
    from test_playbook import make_plan, separable

    plan = make_plan(batch_size=32, epochs=2, device="cpu", **(plan_changes or {}))
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    x, y = separable()
    xv, yv = separable(10, seed=1)
    tail = Tail(model, "pooled")
    return tail, cached_phase(tail, [x], y, xv, yv, plan), plan


def test_an_out_of_memory_step_halves_into_accumulated_slices_and_carries_on(monkeypatch):
    tail, phase, plan = _phase()
    run_phase(phase, plan, lambda r: None)
    reference = {k: v.clone() for k, v in tail.model.state_dict().items()}

    tail, phase, plan = _phase()
    real = Supervised.loss
    calls = {"big": 0}

    def tight_memory(self, module, batch):
        if len(batch["x"]) > 16:  # a batch of 32 does not fit; 16 does
            calls["big"] += 1
            raise oom()
        return real(self, module, batch)

    monkeypatch.setattr(Supervised, "loss", tight_memory)
    records = []
    run_phase(phase, plan, records.append)
    assert calls["big"] == 1  # said once: later steps start in slices
    assert all(r.get("micro_batches") == 2 for r in records)
    for key, value in tail.model.state_dict().items():  # the same effective batch: the same training
        assert torch.allclose(value, reference[key], atol=1e-4), key


def test_mixed_precision_training_runs_end_to_end_on_cpu(class_folders, tmp_path):
    import visiontune as vt

    clf = vt.fit(class_folders, out=tmp_path / "run", img_size=64, epochs=2, report=False, amp=True, device="cpu",
                 cache_dir=str(tmp_path / "cache"))
    plan = (tmp_path / "run" / "plan.json").read_text()
    assert '"amp": true' in plan and '"device": "cpu"' in plan
    assert clf.metrics["accuracy"] >= 0.5


def test_the_plan_prints_the_device_and_why(class_folders, tmp_path):
    import json

    import visiontune as vt

    vt.fit(class_folders, out=tmp_path / "run", img_size=64, epochs=1, report=False, cache_dir=str(tmp_path / "cache"))
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["device"] == "cpu" and "CPU" in plan["why"]["device"] and "no CUDA GPU" in plan["why"]["device"]
    assert plan["amp"] is False and "opt-in" in plan["why"]["amp"]


def test_a_gpu_plan_turns_on_mixed_precision_and_the_torch_trunk(machine, monkeypatch):
    from visiontune.pipeline.prepare import choose_device

    monkeypatch.setattr(devices, "configure", lambda device, deterministic: "not bit-reproducible (faked)")
    monkeypatch.setattr(devices, "bind_process", lambda device: None)
    machine(count=1)
    device, changes = choose_device({})
    assert device.spec == "cuda:0" and changes["device"] == "cuda:0"
    assert changes["amp"] is True and changes["engine"] == "torch-bf16"
    assert "NVIDIA Fake 0" in changes["why"]["device"] and "onnxruntime is the CPU's engine" in changes["why"]["engine"]
    _, chosen = choose_device({"amp": False, "engine": "onnxruntime"})  # what the user set stands
    assert "amp" not in chosen and "engine" not in chosen


def test_following_brings_cpu_inputs_to_the_module_and_back():
    module = torch.nn.Linear(3, 2)
    assert devices.following(module) is module  # on the CPU nothing wraps it
    assert devices.move({"x": torch.ones(2), "n": 3}, devices.CPU)["n"] == 3
    assert devices.device_of(module).kind == "cpu"
    assert np.allclose(devices.following(module)(torch.ones(1, 3)).detach().numpy(), module(torch.ones(1, 3)).detach().numpy())


def test_rows_held_on_the_device_train_exactly_like_rows_read_from_the_store(tmp_path):
    """The GPU's resident rows (phases.DeviceRows) are the store's fp16 rows: training on them, here held on the
    CPU device, gives the same weights bit for bit as gathering from the cache batch by batch."""
    from test_playbook import make_plan, separable

    from visiontune.train.phases import DeviceRows, _gather_views, resident

    x, y = separable()
    x = x.astype(np.float16).astype(np.float32)  # what a cached row holds
    xv, yv = separable(10, seed=1)
    weights = []
    for rows in (x, DeviceRows(x, torch.device("cpu"))):
        plan = make_plan(batch_size=16, epochs=2, device="cpu")
        torch.manual_seed(0)
        tail = Tail(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3), "pooled")
        run_phase(cached_phase(tail, [rows], y, xv, yv, plan), plan, lambda r: None)
        weights.append(tail.model.get_classifier().weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    held = DeviceRows(x, torch.device("cpu"))
    picked = np.array([5, 1, 5])
    assert torch.equal(_gather_views([held, held], picked, np.array([0, 1, 0])), torch.from_numpy(x[picked]))
    assert resident([x], devices.CPU) == [x]  # the CPU keeps reading rows as they are
