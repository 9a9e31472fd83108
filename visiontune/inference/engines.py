"""Inference engines for the frozen trunk: the engine matters more than any trick on a CPU.

Floors measured here (lite0, 112 px, 4,000 images, decode included; bench/results/fmnist_speed.md of
2026-11-24): torch fp32 NCHW 215 img/s, torch fp32 channels-last 285, onnxruntime fp32 (default session
options) 453, torch channels-last + bf16 autocast 492. onnxruntime computes the same fp32 function as torch (differences ~1e-5), so its
features keep accuracy; bf16 is faster still but cost 0.2-0.5 accuracy points, so it is opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.distributed import world
from visiontune.errors import UsageError
from visiontune.files import written_whole
from visiontune.names import ENGINES, default_engine, onnxruntime_available  # noqa: F401  (re-exported)

Forward = Callable[[torch.Tensor], torch.Tensor]

#: Trunk time relative to torch fp32 channels-last, from the floors of an earlier bench-speed run (2026-11-23:
#: 268 / 451 / 473 img/s; the 2026-11-24 run's --budget rows finished within -13..+5 % with them): lets `--budget` time the trunk once in torch and predict the other engines
#: without exporting every cut first.
RELATIVE_TRUNK_TIME = {"torch": 1.0, "onnxruntime": 268 / 451, "torch-bf16": 268 / 473}


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


def compile_forward(module: nn.Module, engine: str, input_size: int, onnx_path: Path | None = None) -> Forward:
    """A function images -> outputs running `module` on `engine` (inputs NCHW float32, any layout)."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    module = module.eval()
    if engine == "torch":
        return module
    if engine == "torch-bf16":

        def bf16(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(images).float()

        return bf16
    if not onnxruntime_available():
        raise UsageError("engine onnxruntime needs `pip install onnx onnxruntime`; or use --engine torch")
    import onnxruntime as ort

    if onnx_path is None:
        import tempfile

        onnx_path = Path(tempfile.mkdtemp()) / "module.onnx"
    session = ort.InferenceSession(
        str(export_onnx(module, input_size, onnx_path)), onnxruntime_options(), providers=["CPUExecutionProvider"]
    )

    chunk = onnxruntime_chunk(input_size)

    def run(images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.contiguous().numpy(), dtype=np.float32)
        parts = [session.run(None, {"images": array[i : i + chunk]})[0] for i in range(0, len(array), chunk)]
        return torch.from_numpy(np.concatenate(parts))

    return run


def onnxruntime_chunk(input_size: int) -> int:
    """How many images onnxruntime runs at once: its per-image cost is lowest for small batches, whose
    activations stay in the CPU's caches. Measured on 2 cores, lite0, model only, threads sleeping when
    idle (img/s at batch 1/4/8/16/32): 224 px 233/255/236/216/196; 112 px 462/740/822/778/705."""
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
