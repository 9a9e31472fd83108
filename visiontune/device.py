"""Where tensors run and in what precision: the one module that asks torch about GPUs.

Everything else takes a :class:`Device` (chosen once per command by :func:`choose`) and asks it: where to
put a module or a batch (:func:`move`), which autocast and gradient scaler a step uses (:class:`Precision`),
how many images a trunk pass may hold at once (:func:`inference_batch`), whether an error was the GPU
running out of memory (:func:`is_out_of_memory`). Nothing outside this module calls ``torch.cuda``
(tests/test_architecture.py checks it), so the tests fake a GPU machine by replacing :data:`probe`.

Why one module: a CUDA line scattered through the loop, the cache and the server is how a CPU-only suite
stops covering GPU paths. Here the same functions run on CPU in the suite, with only the probe's answers
(is there a GPU, its name, its free memory, bf16 support) faked.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from visiontune.errors import UsageError
from visiontune.names import DEVICE_HELP  # noqa: F401  (re-exported: the flag's help, torch-free for --help)
GIB = 2**30


class Probe:
    """What this machine's accelerators are; the only code that calls ``torch.cuda`` / ``torch.backends.mps``.
    Tests replace the module's :data:`probe` with a fake of the same methods."""

    def cuda_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def cuda_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def cuda_memory(self, index: int) -> tuple[int, int]:
        """(free, total) bytes of GPU `index`."""
        return torch.cuda.mem_get_info(index)

    def cuda_bf16(self, index: int) -> bool:
        major, _ = torch.cuda.get_device_capability(index)
        return major >= 8  # Ampere and later compute bf16 natively; older cards emulate it slowly

    def mps_available(self) -> bool:
        backend = getattr(torch.backends, "mps", None)
        return bool(backend and backend.is_available())


probe = Probe()


@dataclass(frozen=True)
class Device:
    """One chosen device, with what the plan prints about it."""

    kind: str  # "cpu" | "cuda" | "mps"
    index: int | None = None
    name: str = "CPU"
    total_bytes: int | None = None
    free_bytes: int | None = None
    bf16: bool = True  # autocast can use bf16 here (else fp16 with a gradient scaler)
    why: str = ""

    @property
    def spec(self) -> str:
        """As --device spells it: cpu, cuda:0, mps."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.spec)

    @property
    def accelerated(self) -> bool:
        return self.kind != "cpu"

    def describe(self) -> str:
        """'NVIDIA H200 (cuda:0), 139.1 of 139.8 GiB free' / 'CPU, 2 cores'."""
        if self.kind == "cpu":
            return f"CPU, {os.cpu_count() or 1} cores"
        memory = ""
        if self.total_bytes:
            memory = f", {(self.free_bytes or 0) / GIB:.1f} of {self.total_bytes / GIB:.1f} GiB free"
        return f"{self.name} ({self.spec}){memory}"


CPU = Device("cpu", why="no GPU requested")


def _cuda(index: int, why: str) -> Device:
    count = probe.cuda_count()
    if index >= count:
        found = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU{'s' if count > 1 else ''} (cuda:0-cuda:{count - 1})"
        raise UsageError(f"--device cuda:{index}: this machine has {found}; pick one of them, or --device cpu")
    free, total = probe.cuda_memory(index)
    return Device("cuda", index, probe.cuda_name(index), total, free, probe.cuda_bf16(index), why)


def choose(spec: str | None = "auto", local_rank: int | None = None) -> Device:
    """The device `spec` names (see :data:`DEVICE_HELP`); in a job of several processes a CUDA device is the
    process's local rank (one GPU per process), unless `spec` names an index."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return Device("cpu", why="asked for (--device cpu)")
    if spec == "mps":
        if not probe.mps_available():
            raise UsageError("--device mps: Apple's Metal (MPS) backend is not available here; use --device cpu")
        return Device("mps", name="Apple GPU (MPS)", bf16=False, why="asked for (--device mps)")
    if spec == "cuda" or spec.startswith("cuda:"):
        if probe.cuda_count() == 0:
            raise UsageError(f"--device {spec}: this machine has no CUDA GPU (or this torch has no CUDA support); "
                             "use --device cpu")
        if spec == "cuda":
            return _cuda(local_rank or 0, "asked for (--device cuda)" + _rank_note(local_rank))
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device {spec}: write cuda:N with N a GPU number, e.g. cuda:0") from None
        return _cuda(index, f"asked for (--device {spec})")
    if spec != "auto":
        raise UsageError(f"--device {spec!r}: choose auto, cpu, cuda, cuda:N or mps")
    if probe.cuda_count():
        return _cuda(local_rank or 0, "auto: a CUDA GPU is present" + _rank_note(local_rank))
    if probe.mps_available():
        return Device("mps", name="Apple GPU (MPS)", bf16=False, why="auto: Apple's MPS backend is present")
    return Device("cpu", why="auto: no CUDA GPU or Apple MPS found")


def _rank_note(local_rank: int | None) -> str:
    return f" (process {local_rank} of this machine: its own GPU)" if local_rank else ""


def parse_gpus(text: str) -> list[int]:
    """`--gpus 0,1,3` or `--gpus all` -> the GPU indices, checked against this machine's GPUs."""
    count = probe.cuda_count()
    if count == 0:
        raise UsageError(f"--gpus {text}: this machine has no CUDA GPU; drop --gpus (or use --nproc N on CPU)")
    if text.strip().lower() == "all":
        return list(range(count))
    try:
        picked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus {text!r}: write GPU numbers separated by commas (e.g. 0,1,3) or all") from None
    if not picked:
        raise UsageError("--gpus: name at least one GPU (e.g. 0,1) or all")
    if len(set(picked)) != len(picked):
        raise UsageError(f"--gpus {text}: a GPU is named twice")
    missing = [i for i in picked if not 0 <= i < count]
    if missing:
        raise UsageError(f"--gpus {text}: GPU {missing[0]} does not exist; this machine has {count} "
                         f"(0-{count - 1})")
    return picked


def visible_devices_env(gpus: list[int]) -> dict[str, str]:
    """The environment that shows a job only `gpus` (each process then uses cuda:LOCAL_RANK)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpus)}


def distributed_backend() -> str:
    """NCCL when every process on this machine has a GPU of its own, else gloo."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    return "nccl" if probe.cuda_count() >= local else "gloo"


def collective_device() -> torch.device:
    """Where a tensor collective's tensors must live: NCCL reduces CUDA tensors (this process's GPU), gloo CPU
    ones."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bind_local_gpu(local_rank: int) -> None:
    """Before an NCCL group forms: this process's GPU is its local rank's (NCCL allocates on the current one)."""
    torch.cuda.set_device(local_rank)


def bind_process(device: Device) -> None:
    """Make `device` this process's current CUDA device (NCCL and cuDNN allocate there)."""
    if device.kind == "cuda":
        torch.cuda.set_device(device.index or 0)


def move(value: Any, device: Device, non_blocking: bool = True) -> Any:
    """`value` (a tensor, or a dict/list/tuple of them) on `device`; anything else as it is. From pinned host
    memory the copy overlaps compute (non_blocking)."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device.torch_device else value.to(device.torch_device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: move(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device, non_blocking) for v in value)
    return value


def device_of(module: torch.nn.Module) -> Device:
    """The device `module`'s parameters are on (inputs follow the module)."""
    for p in module.parameters():
        if p.device.type == "cpu":
            return CPU
        return Device(p.device.type, p.device.index)
    return CPU


def following(module: torch.nn.Module):
    """`module` as a function of CPU inputs with CPU outputs, wherever its parameters are (validation and
    prediction code written for the CPU then runs unchanged beside a module trained on a GPU)."""
    device = device_of(module)
    if not device.accelerated:
        return module

    def forward(x: torch.Tensor) -> torch.Tensor:
        return module(move(x, device)).float().cpu()

    return forward


@dataclass(frozen=True)
class Precision:
    """The numeric path of forward passes and training steps on one device.

    `mixed` turns on autocast: bf16 where the device computes it natively (CPU with --amp, Ampere and later
    GPUs), else fp16 with a gradient scaler (older GPUs: fp16 gradients underflow without one)."""

    device: Device
    mixed: bool

    @property
    def dtype(self) -> torch.dtype | None:
        if not self.mixed:
            return None
        return torch.bfloat16 if self.device.bf16 else torch.float16

    @property
    def name(self) -> str:
        """fp32 | bf16 | fp16: what the cache key and the plan record."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device.kind, dtype=self.dtype)

    def scaler(self):
        """A gradient scaler for fp16 training, else None."""
        if self.dtype is not torch.float16 or self.device.kind != "cuda":
            return None
        return torch.amp.GradScaler("cuda")


def mixed_by_default(device: Device) -> tuple[bool, str]:
    """(autocast on?, why): on a GPU mixed precision is the fast path with accuracy kept; on CPU bf16 is
    opt-in (it cost 0.2-0.5 accuracy points on the cached features, inference/engines.py)."""
    if device.kind == "cuda":
        dtype = "bf16" if device.bf16 else "fp16 with a gradient scaler (this GPU has no native bf16)"
        return True, f"GPU: autocast {dtype}, the tensor cores' fast path"
    if device.kind == "mps":
        return False, "MPS: fp32 (autocast on MPS is not reliable across torch versions)"
    return False, "bf16 autocast on CPU is opt-in (--amp)"


def configure(device: Device, deterministic: bool) -> str:
    """Set the kernels' determinism for this process; returns what the plan says about reproducibility.

    CPU runs are bit-reproducible as they are (the seed fixes everything). On a GPU cuDNN's autotuner and
    atomics make runs differ in the last bits unless --deterministic fixes the algorithms, which costs speed."""
    if device.kind != "cuda":
        return "same seed, same numbers on this device"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        return "asked for (--deterministic): deterministic cuDNN/cuBLAS kernels, same seed and GPU give identical metrics"
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ("GPU runs are not bit-reproducible (cuDNN picks the fastest kernels, TF32 matmuls); "
            "--deterministic for identical metrics")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device running out of memory (CUDA's own error, or the generic message MPS and
    older torch raise)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_memory(device: Device) -> None:
    """Give cached blocks back after an out-of-memory error, so the smaller retry finds them."""
    if device.kind == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: Device) -> None:
    """Wait for the device's queued work (timings must not stop the clock before the GPU finishes)."""
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)


def peak_memory(device: Device) -> int:
    """Bytes the process has held at most on `device` (0 on CPU)."""
    return int(torch.cuda.max_memory_allocated(device.index)) if device.kind == "cuda" else 0


#: Activation bytes one image holds in a frozen trunk's forward, per input pixel (lite0, bf16, measured as
#: peak allocation / (batch x pixels), rounded up): sizes trunk-pass batches from free memory.
TRUNK_BYTES_PER_PIXEL = 400
MAX_INFERENCE_BATCH = 512


def inference_batch(device: Device, input_size: int, default: int) -> int:
    """Images per trunk pass / prediction forward: `default` on CPU (caches like small batches); on a GPU
    the largest power of two up to 512 whose activations fit in a quarter of the free memory, so the GPU
    is never fed in slivers (512 is past where lite0's forward stops being launch-bound, and smaller
    batches keep the decoding processes' work flowing). An out-of-memory error still halves it
    (:func:`forward_in_halves`)."""
    if not device.accelerated or not device.free_bytes:
        return default
    per_image = TRUNK_BYTES_PER_PIXEL * input_size * input_size
    fits = max(1, device.free_bytes // 4 // per_image)
    size = 1
    while size * 2 <= min(fits, MAX_INFERENCE_BATCH):
        size *= 2
    return max(default, size) if fits >= default else size


def loader_workers(device: Device, asked: int) -> int:
    """Decoding processes: what was asked on CPU (the forward shares the cores); every core on a GPU
    machine, where decoding is what feeds the GPU."""
    if not device.accelerated:
        return asked
    return max(asked, os.cpu_count() or 1)


class DeviceForward:
    """images (CPU, any layout) -> outputs (CPU float32) of a module on a device, in `precision`.

    The module sits on the device in channels-last; inputs are copied without blocking; an out-of-memory
    error halves the batch for this and every later call (said once through `on_halve`). With
    :meth:`taking_pixels` it takes uint8 pixels and normalises them on the device: a quarter of the bytes
    to copy, and no float pass over every pixel on the CPU that feeds the GPU."""

    def __init__(self, module: torch.nn.Module, precision: Precision, on_halve=None):
        self.device, self.precision, self.on_halve = precision.device, precision, on_halve
        # a copy: the caller's module stays on the CPU (saving, exporting and the CPU engines read it there)
        self.module = copy.deepcopy(module).eval().to(self.device.torch_device, memory_format=torch.channels_last)
        self.limit: int | None = None  # the most images one forward may hold, once an out-of-memory error set it
        self.keeps_cores_busy = False  # the CPU only decodes: the decoding thread may use it at normal priority
        self.pixels: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, shift) on the device

    def taking_pixels(self, scale, shift) -> DeviceForward:
        """The same forward, for uint8 pixels: x * scale + shift (per channel, [3, 1, 1]) on the device."""
        twin = object.__new__(DeviceForward)
        twin.__dict__.update(self.__dict__)
        twin.pixels = (torch.as_tensor(scale).to(self.device.torch_device), torch.as_tensor(shift).to(self.device.torch_device))
        return twin

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.precision.autocast():
            x = move(images, self.device)
            if self.pixels is not None:
                x = x.float() * self.pixels[0] + self.pixels[1]
            out = self.module(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
        return out.float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return forward_in_halves(self._forward, images, self)


def forward_in_halves(forward, images: torch.Tensor, state: DeviceForward) -> torch.Tensor:
    """`forward(images)` in pieces of at most `state.limit` images, halving the limit whenever a piece runs
    out of device memory (down to one image, which then raises)."""
    limit = state.limit or len(images)
    while True:
        try:
            return torch.cat([forward(images[i : i + limit]) for i in range(0, len(images), limit)])
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_out_of_memory(error) or limit <= 1:
                raise
            release_memory(state.device)
            limit = max(1, limit // 2)
            state.limit = limit
            if state.on_halve is not None:
                state.on_halve(limit)
