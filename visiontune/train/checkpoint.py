"""Exact-resume checkpoints: model, optimizer, scheduler, the callbacks' named state dicts (averaged
weights, early stopping's best), RNG state and the position in the epoch — without pickle.

Tensors go to ``checkpoints/last.safetensors``, everything else (counters, optimizer hyper-parameters,
scheduler state, history) to ``checkpoints/last.json``. Both are written to temporary names and renamed,
the JSON last and naming the tensor file's id, so a kill at any moment leaves the previous consistent
pair or the new one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from visiontune.backbones.providers import file_digest, read_safetensors
from visiontune.errors import ArtifactError
from visiontune.files import fault_point, write_bytes_whole, write_text_whole


@dataclass
class Position:
    """Where a phase stands: `epoch` epochs done and `step` optimizer steps into the next one."""

    phase: str
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    metrics_lines: int = 0  # lines of metrics.jsonl written when this checkpoint was taken
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # early stopping counters, SWA count, ...


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _nested_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    position: Position,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parts: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write the pair atomically (see module docstring); `parts` are named state dicts (the callbacks')."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = _flat_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    for name, state in (parts or {}).items():
        tensors.update({f"part.{name}.{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensor_id = uuid.uuid4().hex
    old = {p for p in folder.glob("last-*.safetensors")}
    final = folder / f"last-{tensor_id}.safetensors"
    data = save(tensors, metadata={"id": tensor_id})
    write_bytes_whole(final, data)
    digest = hashlib.sha256(data).hexdigest()
    meta = {
        "id": tensor_id,
        "sha256": digest,  # a truncated or bit-flipped file is refused on resume, never half-used
        "position": asdict(position),
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "parts": sorted(parts or {}),
    }
    write_text_whole(folder / "last.json", json.dumps(meta))  # names the new tensors only once they are whole
    fault_point("checkpoint")
    for path in old:
        path.unlink(missing_ok=True)


@dataclass
class Checkpoint:
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    parts: dict[str, dict[str, torch.Tensor]]  # named state dicts of the callbacks
    rng: torch.Tensor

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The last consistent checkpoint in `folder`, or None when there is none (read as tensors only)."""
    meta_path = folder / "last.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    weights = folder / f"last-{meta['id']}.safetensors"
    if not weights.exists() or ("sha256" in meta and file_digest(weights) != meta["sha256"]):
        raise ArtifactError(f"{weights}: the checkpoint is missing or damaged (its checksum does not match what was "
                            "written), so the run cannot resume from it exactly. Start a new run with the same "
                            "command (config.yaml in the run folder has its settings).")
    tensors = read_safetensors(weights, refuse=ArtifactError)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return Checkpoint(
        position=Position(**meta["position"]),
        model=part("model."),
        optimizer=_nested_optimizer(tensors, meta["optimizer"]),
        scheduler=meta["scheduler"],
        parts={name: part(f"part.{name}.") for name in meta.get("parts", [])},
        rng=tensors["rng.torch"],
    )
