"""Adding a method that learns from extra images is one file: an ExtraMethod registered here appears in the
`--ssl` choices, trains through the CLI, and is one of `--ssl auto`'s trials — no edit inside visiontune."""

from __future__ import annotations

import json

import numpy as np
import pytest

import visiontune as vt
from visiontune import beyond, cli  # noqa: F401  (beyond imports semi/ and adapt/: the built-in methods register)
from visiontune.errors import UsageError
from visiontune.names import BUILTIN_METHODS
from visiontune.train.extra_methods import EXTRA_METHODS, ExtraMethod, methods_for, register_method
from visiontune.train.phases import train_cached
from conftest import COLOURS, make_image, write_class_folders


class CountingSupervised(ExtraMethod):
    """A toy method: the labelled tail's training, counted."""

    name, kinds, order = "test-counting", ("ssl",), 1000
    calls = 0

    def train(self, tail, cand, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        CountingSupervised.calls += 1
        return train_cached(tail, train_views, y_train, valid_x, y_valid, cand.plan, log, task=task, **run)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Registered for this module's tests only (pytest imports every test module before running any: a
    registration at import would make the toy one of every other test's auto trials)."""
    register_method(CountingSupervised)
    yield
    EXTRA_METHODS.pop(CountingSupervised.name, None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        make_image(list(COLOURS.values())[i % 3], rng).save(unlabelled / f"{i:03d}.png")
    return {"labelled": write_class_folders(root / "labelled", per_class=8), "unlabelled": unlabelled,
            "cache": root / "cache"}


def test_the_help_lists_exactly_the_built_in_methods():
    """--help lists the methods without importing torch (names.py); it must name what the registry holds."""
    for kind, names in BUILTIN_METHODS.items():
        assert tuple(m for m in methods_for(kind) if not m.startswith("test-")) == names


def test_a_registered_method_is_a_choice_trains_from_the_cli_and_is_an_auto_trial(folders, tmp_path):
    assert methods_for("ssl")[-1] == "test-counting" and "test-counting" not in methods_for("adapt")
    with pytest.raises(UsageError, match="test-counting or auto"):
        vt.fit(folders["labelled"], out=tmp_path / "refused", unlabeled=folders["unlabelled"], ssl="magic",
               cache_dir=folders["cache"])
    CountingSupervised.calls = 0
    common = ["--unlabeled", str(folders["unlabelled"]), "--img-size", "64", "--epochs", "2", "--cut", "pooled",
              "--extra-epochs", "1", "--no-report", "--cache-dir", str(folders["cache"])]
    assert cli.main(["train", str(folders["labelled"]), "--out", str(tmp_path / "run"), "--ssl", "test-counting", *common]) == 0
    assert CountingSupervised.calls == 1
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["ssl"] == "test-counting"
    assert cli.main(["train", str(folders["labelled"]), "--out", str(tmp_path / "auto"), "--ssl", "auto", *common]) == 0
    scores = json.loads((tmp_path / "auto" / "auto.json").read_text())["scores"]
    assert list(scores) == list(methods_for("ssl"))  # every registered method tried, in declared order
    assert CountingSupervised.calls >= 2  # its trial (and the run, if auto chose it)


def test_registering_a_method_of_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kinds must be among ssl, adapt"):
        register_method(type("Odd", (ExtraMethod,), {"name": "test-odd", "kinds": ("semi",)}))
    assert "test-odd" not in EXTRA_METHODS
