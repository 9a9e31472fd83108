"""Does torch.compile pay on this CPU? Times training steps of the two phases with and without it.

Cached phase: lite0's last block + head on blocks.6 input maps (batch 64, 112 px -> 4x4x192).
Fine-tuning: the whole lite0 on 112 px images (batch 32). Compile time is reported separately; the
question is whether (compile time + steps) beats eager for the steps a default run takes.

    .venv/bin/python bench/compile_check.py     # ~3 min; writes bench/results/compile_check.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from visiontune.backbones.cuts import Tail
from visiontune.backbones.registry import create_backbone


def time_steps(module, make_batch, steps: int) -> tuple[float, float]:
    """(seconds of the first step, mean seconds of the next `steps`)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    x, y = make_batch()
    started = time.perf_counter()
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    opt.step()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    return first, (time.perf_counter() - started) / steps


def main() -> None:
    results = {}
    for name, cut, batch, steps in (("cached tail (blocks.6)", "blocks.6", 64, 40), ("fine-tune (whole model)", None, 32, 8)):
        for compiled in (False, True):
            backbone = create_backbone(num_classes=10, img_size=112)
            model = backbone.model.train()
            if cut:
                module = Tail(model, cut)
                make = lambda: (torch.randn(64, 192, 4, 4).contiguous(memory_format=torch.channels_last), torch.randint(10, (64,)))  # noqa: E731
            else:
                module = model.to(memory_format=torch.channels_last)
                make = lambda: (torch.randn(batch, 3, 112, 112).contiguous(memory_format=torch.channels_last), torch.randint(10, (batch,)))  # noqa: E731
            if compiled:
                module = torch.compile(module)
            first, per_step = time_steps(module, make, steps)
            key = f"{name}, {'compiled' if compiled else 'eager'}"
            results[key] = {"first_step_s": round(first, 3), "step_s": round(per_step, 4)}
            print(key, results[key], flush=True)
    out = Path(__file__).resolve().parent / "results" / "compile_check.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
