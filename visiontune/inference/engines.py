"""Inference engines for the frozen trunk: the engine matters more than any trick on a CPU.

Floors measured here (lite0, 112 px, 4,000 images, decode included; bench/results/fmnist_speed.md of
2026-11-24): torch fp32 NCHW 215 img/s, torch fp32 channels-last 285, onnxruntime fp32 (default session
options) 453, torch channels-last + bf16 autocast 492. onnxruntime computes the same fp32 function as torch (differences ~1e-5), so its
features keep accuracy; bf16 is faster still but cost 0.2-0.5 accuracy points, so it is opt-in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.device import CPU, Device, DeviceForward, Precision
from visiontune.distributed import world
from visiontune.errors import UsageError
from visiontune.files import written_whole
from visiontune.names import ENGINES, default_engine, onnxruntime_available  # noqa: F401  (re-exported)

Forward = Callable[[torch.Tensor], torch.Tensor]

#: Trunk time relative to torch fp32 channels-last: lets `--budget` time the trunk once in torch and predict the
#: other engines without exporting every cut first. torch-bf16 from the floors of a bench-speed run (2026-11-23:
#: 268 / 473 img/s); onnxruntime remeasured with its parallel sessions (2026-11-26, caching 2,000 Fashion-MNIST
#: files at 112 px to blocks.5, decode included, two rounds: torch 259 / 307, onnxruntime 709 / 745 img/s; one
#: 2-thread session 630 / 642 in the same sitting).
RELATIVE_TRUNK_TIME = {"torch": 1.0, "onnxruntime": 283 / 727, "torch-bf16": 268 / 473}


def export_onnx(module: nn.Module, input_size: int, path: Path) -> Path:
    """Export `module` (eval mode, dynamic batch) to ONNX atomically; reuse the file if present."""
    if path.exists():
        return path
    with written_whole(path) as tmp, torch.no_grad():
        torch.onnx.export(
            module.eval(),
            torch.zeros(1, 3, input_size, input_size),
            str(tmp),
            input_names=["images"],
            output_names=["outputs"],
            dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}},
            dynamo=False,
        )
    return path


def compile_forward(module: nn.Module, engine: str, input_size: int, onnx_path: Path | None = None,
                    device: Device = CPU) -> Forward:
    """A function images -> outputs running `module` on `engine` (inputs NCHW float32, any layout).

    On a GPU (`device`) the torch engines run there (torch-bf16: autocast, bf16 or the GPU's fp16) and
    outputs come back to the CPU; onnxruntime stays a CPU engine wherever it is asked for."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    module = module.eval()
    if device.accelerated and engine != "onnxruntime":
        return DeviceForward(module, Precision(device, engine == "torch-bf16"))
    if engine == "torch":
        return module
    if engine == "torch-bf16":

        def bf16(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(images).float()

        return bf16
    if not onnxruntime_available():
        raise UsageError("engine onnxruntime needs `pip install onnx onnxruntime`; or use --engine torch")
    if onnx_path is None:
        import tempfile

        onnx_path = Path(tempfile.mkdtemp()) / "module.onnx"
    return OnnxRuntimeForward(export_onnx(module, input_size, onnx_path), input_size)


class OnnxRuntimeForward:
    """onnxruntime over a batch: one single-threaded session per core, in a pool of as many threads that take
    the batch's chunks as they come free (a session releases the GIL while it runs, and no thread waits for
    another that lost time to the decoding thread); a single image goes to one session that uses every core,
    for latency.

    Why: onnxruntime's intra-op threads synchronise after every operator, and lite0's many small depthwise
    operators leave them waiting. Measured on 2 cores, lite0, model only, threads sleeping when idle (img/s,
    2026-11-26): 112 px one 2-thread session 560-590 at its best chunk vs two 1-thread sessions 786-802
    (chunks 2-8); 224 px 175 vs 228 (chunk 1). Outputs are bitwise the same as one session's (the thread
    count does not change any operator's arithmetic; checked, max difference 0.0)."""

    def __init__(self, path: Path, input_size: int):
        import onnxruntime as ort

        self._ort, self.path, self.input_size = ort, str(path), input_size
        self.workers = parallel_sessions(Path(path).stat().st_size)  # single-threaded sessions a batch may use
        # single-threaded sessions on every core leave no idle gaps between operators for a low-priority
        # decoding thread to fill: it would starve until each batch ends (see stream_outputs)
        self.keeps_cores_busy = self.workers >= 2
        self.whole = ort.InferenceSession(self.path, onnxruntime_options(), providers=["CPUExecutionProvider"])
        self._local = threading.local()  # each pool thread's own single-threaded session, made on first use
        self.pool = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.numpy()  # any layout: each piece is made contiguous NCHW float32 in its own pool thread
        if len(array) == 1 or self.workers < 2:
            return torch.from_numpy(_run_chunked(self.whole, array, onnxruntime_chunk(self.input_size)))
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxruntime")
        chunk = onnxruntime_chunk(self.input_size, threads=1)
        pieces = self.pool.map(self._run_piece, [array[i : i + chunk] for i in range(0, len(array), chunk)])
        return torch.from_numpy(np.concatenate(list(pieces)))

    def _run_piece(self, piece: np.ndarray) -> np.ndarray:
        session = getattr(self._local, "session", None)
        if session is None:
            options = onnxruntime_options()
            options.intra_op_num_threads = 1
            session = self._local.session = self._ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        return _run(session, piece)


def _run(session, piece: np.ndarray) -> np.ndarray:
    return session.run(None, {"images": np.ascontiguousarray(piece, dtype=np.float32)})[0]


def _run_chunked(session, array: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([_run(session, array[i : i + chunk]) for i in range(0, len(array), chunk)])


#: What the single-threaded sessions' copies of the weights may take together (each session holds its own).
SESSION_WEIGHTS_BUDGET = 1 << 30


def parallel_sessions(model_bytes: int = 0) -> int:
    """How many single-threaded sessions share a batch: one per thread torch may use (its default is the
    number of physical cores), at most 8, and no more copies of the weights than fit in
    SESSION_WEIGHTS_BUDGET (lite0's 17 MB allows all 8; a 350 MB ViT-B gets 3); one when several processes
    share the machine (each keeps to its share of the cores with one session)."""
    if world().shared:
        return 1
    return max(1, min(torch.get_num_threads(), 8, SESSION_WEIGHTS_BUDGET // max(model_bytes, 1)))


def onnxruntime_chunk(input_size: int, threads: int = 0) -> int:
    """How many images a session runs at once: its per-image cost is lowest for small batches, whose
    activations stay in the CPU's caches. Measured on 2 cores, lite0, model only, threads sleeping when
    idle (img/s at batch 1/4/8/16/32): one session on both cores, 224 px 233/255/236/216/196; 112 px
    462/740/822/778/705. Single-threaded sessions, two in parallel (2026-11-26, batch 1/2/4/8/16): 224 px
    228/215/202/200/180; 112 px 730/795/802/786/728."""
    if threads == 1:
        return 1 if input_size > 160 else 4
    return 4 if input_size > 160 else 8


def onnxruntime_options():
    """Session options for visiontune's own sessions: quiet, and with idle threads that sleep instead of
    spinning, so the low-priority decoding thread (loader.prefetch) gets the cycles between operators."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if world().shared:  # several processes on one machine: each keeps to its share of the cores
        options.intra_op_num_threads = torch.get_num_threads()
    return options
