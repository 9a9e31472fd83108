"""Issue J's teaching views: hand-made kernels beside learned filters, and the head's initialisation."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torch import nn

import visiontune as vt
from conftest import write_class_folders
from visiontune.evaluation.visualize import classic_responses
from visiontune.train.phases import init_output_layer


def test_classic_kernels_do_what_their_names_say():
    step = np.zeros((32, 32), np.float32)
    step[:, 16:] = 255.0  # one vertical edge
    out = classic_responses(step)
    assert np.abs(out["Sobel x (vertical edges)"]).max() > 500 and np.abs(out["Sobel y (horizontal edges)"]).max() < 1e-3
    assert np.abs(out["blur"][:, 14:18]).max() < 255 and out["blur"][0, 0] == 0  # edges softened, flat parts kept
    np.testing.assert_allclose(out["sharpen"][:, :14], 0, atol=1e-4)


def test_head_init_choices(tmp_path):
    layer = nn.Linear(1280, 10)
    init_output_layer(layer, "zero", 0)
    assert torch.count_nonzero(layer.weight) == 0
    init_output_layer(layer, "xavier", 0)
    first = layer.weight.detach().clone()
    assert first.abs().max() <= (6 / 1290) ** 0.5 and first.std() > 0
    init_output_layer(layer, "xavier", 0)
    assert torch.equal(first, layer.weight)  # drawn from the run's seed
    init_output_layer(layer, "kaiming", 0)
    assert layer.weight.abs().max() <= (6 / 1280) ** 0.5 and torch.count_nonzero(layer.bias) == 0

    data = write_class_folders(tmp_path / "data", per_class=10)
    vt.fit(data, out=tmp_path / "run", img_size=64, report=False, epochs=2, head="linear", head_init="kaiming")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["head_init"] == "kaiming" and plan["why"]["head_init"] == "set by you"


def test_kernels_demo_draws_your_image_the_kernels_and_the_first_filters(tmp_path):
    from conftest import run_cli

    data = write_class_folders(tmp_path / "data", per_class=10)
    vt.fit(data, out=tmp_path / "run", img_size=64, report=False, epochs=1, head="linear")
    image = sorted((data / "red").iterdir())[0]
    out = run_cli("show", str(tmp_path / "run"), "--kernels-demo", str(image), "--out", str(tmp_path / "k.png"))
    assert out.returncode == 0, out.stderr
    picture = Image.open(tmp_path / "k.png")
    assert picture.size[0] > 600 and picture.size[1] > 300
