"""The training playbook, trick by trick: each test fails if its trick silently does nothing.

Most run the real loop (train/loop.py) on a real timm tail over synthetic cached activations, so they
take milliseconds to a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from visiontune.backbones.cuts import Tail
from visiontune.backbones.groups import group_learning_rates, layer_groups, param_groups
from visiontune.train.batch_size import memory_fit_batch_size, search_batch_size
from visiontune.train.checkpoint import load_checkpoint
from visiontune.train.loop import balanced_sample_weights, epoch_order, run_phase
from visiontune.task.losses import class_weights, focal_loss, make_loss, mix_batch
from visiontune.train.lr_find import lr_find, suggest_lr
from visiontune.train.phases import cached_phase, predict_cached
from visiontune.train.plan import Plan
from visiontune.train.schedules import make_optimizer, make_schedule


def make_plan(**changes) -> Plan:
    base = dict(
        recipe="head", cut="pooled", views=0, img_size=64, batch_size=16, epochs=6, lr=1e-2, head_dropout=0.0,
        weight_decay=1e-4, finetune_epochs=0, finetune_lr=1e-3, unfreeze_groups=0, bn_freeze=True, lr_mult=10.0,
        engine="torch", valid_fraction=0.2, seed=0,
    )
    return Plan(**{**base, **changes})


@pytest.fixture(scope="module")
def model():
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)


def separable(n_per_class=30, dim=1280, classes=3, seed=0, spread=1.0, shape=None):
    """Gaussian classes around fixed centres (the same for every seed: seeds draw new samples)."""
    centres = np.random.default_rng(1234).normal(0, 1, size=(classes, dim))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, size=(len(y), dim))
    x = x.astype(np.float32)
    if shape is not None:
        x = x.reshape(len(y), *shape)
    return x, y


def pooled_run(model, plan, log=None, x=None, y=None, checkpoints=None, resume=None):
    """Train the classifier of `model` on separable pooled features; returns (tail, history, records)."""
    torch.manual_seed(plan.seed)
    if x is None:
        x, y = separable()
    xv, yv = separable(10, seed=1)
    tail = Tail(model, plan.cut, dropout=plan.head_dropout)
    records = []
    phase = cached_phase(tail, [x], y, xv, yv, plan)
    history = run_phase(phase, plan, log or records.append, checkpoints, resume, lambda: len(records))
    return tail, history, records


# -- layer groups and discriminative learning rates --------------------------------------------------


def test_discriminative_rates_run_from_lr_over_mult_squared_to_lr(model):
    rates = group_learning_rates(9, 1e-2, 10)
    assert rates[0] == pytest.approx(1e-4) and rates[-2] == pytest.approx(1e-3) and rates[-1] == 1e-2
    assert all(a < b for a, b in zip(rates, rates[1:]))
    groups = param_groups(model, 1e-2, 10)
    names = layer_groups(model)
    assert names[0] == ["bn1.bias", "bn1.weight", "conv_stem.weight"] or "conv_stem.weight" in names[0]
    assert names[-1] == ["classifier.bias", "classifier.weight"]
    assert [g["lr"] for g in groups][0] == pytest.approx(1e-4) and groups[-1]["lr"] == 1e-2


# -- schedules and optimizers -------------------------------------------------------------------------


def lr_trace(name, epochs=6, steps=10, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [p], "lr": 1.0}], "sgd", 0.0)
    sched = make_schedule(opt, name, epochs, steps, **kw)
    trace = []
    for _ in range(epochs * steps):
        trace.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return trace


def test_schedules_have_their_shapes():
    one = lr_trace("onecycle")
    assert one[0] < 0.1 and max(one) == pytest.approx(1.0, abs=0.01) and one[-1] < 0.01
    assert abs(int(np.argmax(one)) - 18) <= 1  # 30 % of 60 steps
    cos = lr_trace("cosine", warmup_epochs=1)
    assert cos[0] < 0.01 and cos[10] == pytest.approx(1.0, abs=1e-6) and cos[-1] < 0.01
    sgdr = lr_trace("sgdr", sgdr_cycle=1, sgdr_mult=2)
    restarts = [i for i in range(1, 60) if sgdr[i] > sgdr[i - 1] + 0.5]
    assert restarts == [10, 30]  # cycle 1: 10 steps, cycle 2: 20 steps (x2)
    assert set(lr_trace("constant")) == {1.0}


def test_sgd_has_nesterov_momentum_and_weight_decay():
    opt = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], "sgd", 5e-4)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 5e-4
    assert isinstance(make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], "adamw", 1e-2), torch.optim.AdamW)


# -- losses ------------------------------------------------------------------------------------------


def test_label_smoothing_penalises_overconfidence():
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    target = torch.tensor([0])
    assert make_loss("ce")(logits, target) < 1e-6
    smoothed = make_loss("ce", label_smoothing=0.3)(logits, target)
    assert smoothed > 1.0  # 0.2 of the target mass sits on classes at -20 logits


def test_focal_loss_is_ce_at_gamma_zero_and_downweights_easy_examples():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    assert focal_loss(logits, target, 0.0) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)
    easy = focal_loss(logits[:1], target[:1], 2.0) / F.cross_entropy(logits[:1], target[:1])
    hard = focal_loss(logits[1:], target[1:], 2.0) / F.cross_entropy(logits[1:], target[1:])
    assert easy < 0.05 and hard > 0.3  # (1 - p)^2: 0.008 vs 0.39


def test_balanced_class_weights_and_sampler_equalise_classes():
    labels = np.array([0] * 90 + [1] * 10)
    weights = class_weights(labels, 2, "balanced")
    assert weights[1] / weights[0] == pytest.approx(9.0)
    assert class_weights(labels, 2, "none") is None
    order, _ = epoch_order(len(labels), 0, 0, balanced_sample_weights(labels))
    share = float((labels[order.numpy()] == 1).mean())
    assert 0.35 < share < 0.65  # without the sampler: 0.10


def test_class_weights_raise_minority_recall(model):
    rng = np.random.default_rng(0)

    def overlapping(n_major, n_minor):  # two overlapping 2-D classes inside 1280-D pooled features
        y = np.array([0] * n_major + [1] * n_minor)
        x = np.zeros((len(y), 1280), dtype=np.float32)
        x[:, :2] = rng.normal(0, 1, size=(len(y), 2)) + y[:, None] * 1.5
        return x, y

    x, y = overlapping(270, 30)
    xt, yt = overlapping(900, 100)
    recalls = {}
    for mode in ("none", "balanced"):
        tail, _, _ = pooled_run(model, make_plan(class_weights=mode, epochs=8), x=x, y=y)
        pred = predict_cached(tail, xt).argmax(1).numpy()
        recalls[mode] = float((pred[yt == 1] == 1).mean())
    assert recalls["balanced"] > recalls["none"] + 0.1, recalls


def test_mixup_and_cutmix_mix_inputs_and_targets():
    torch.manual_seed(1)
    x = torch.arange(4, dtype=torch.float32).view(4, 1).repeat(1, 6)
    y = torch.tensor([0, 1, 2, 3])
    mixed, soft = mix_batch(x, y, 4, mixup=1.0, cutmix=0.0)
    assert torch.allclose(soft.sum(1), torch.ones(4)) and (soft.max(1).values < 1).any()
    assert not torch.equal(mixed, x)
    maps = torch.zeros(4, 2, 8, 8)
    maps[1] = 1.0
    torch.manual_seed(3)
    cut, soft = mix_batch(maps, y, 4, mixup=0.0, cutmix=1.0)
    pasted = (cut != maps).float().mean()
    assert pasted > 0 and torch.allclose(soft.sum(1), torch.ones(4))
    same, hard = mix_batch(x, y, 4, mixup=0.0, cutmix=1.0)  # pooled vectors cannot be cut
    assert torch.equal(same, x) and torch.equal(hard.argmax(1), y)


# -- regularisation and averaging on the real loop ------------------------------------------------


def test_label_smoothing_lowers_the_trained_heads_confidence(model):
    plain, _, _ = pooled_run(model, make_plan())
    x, _ = separable()
    p_plain = predict_cached(plain, x).softmax(-1).max(1).values.mean()
    smooth, _, _ = pooled_run(model, make_plan(label_smoothing=0.2))
    p_smooth = predict_cached(smooth, x).softmax(-1).max(1).values.mean()
    assert p_plain > 0.99 and p_smooth < p_plain - 0.02  # target mass 0.87 with 0.2 over 3 classes


def test_head_dropout_is_active_in_training_only(model):
    tail = Tail(model, "pooled", dropout=0.5)
    torch.nn.init.normal_(model.get_classifier().weight)
    x = torch.randn(4, 1280)
    tail.train()
    assert not torch.equal(tail(x), tail(x))
    tail.eval()
    assert torch.equal(tail(x), tail(x))


def test_early_stopping_stops_and_restores_the_best_epoch(model):
    _, history, records = pooled_run(model, make_plan(lr=30.0, epochs=12, early_stop=2, schedule="constant"))
    assert len(history) < 12 and "stopped_early" in history[-1]
    best = min(r["valid_loss"] for r in history)
    assert records[-1]["kind"] == "restored-best" and records[-1]["valid_loss"] == pytest.approx(best)


def test_ema_weights_are_the_moving_average_of_the_steps(model):
    snapshots = []

    def log(record):
        if record.get("kind") == "step":
            snapshots.append(model.get_classifier().weight.detach().clone())

    decay = 0.9
    pooled_run(model, make_plan(ema=decay, eval_every=1, epochs=2), log=log)
    expected = snapshots[0]
    for w in snapshots[1:]:
        expected = decay * expected + (1 - decay) * w
    final = model.get_classifier().weight.detach()
    assert torch.allclose(final, expected, atol=1e-6)
    assert not torch.allclose(final, snapshots[-1], atol=1e-4)


def test_swa_averages_the_last_epochs(model):
    snapshots = []

    def log(record):
        if record.get("kind") is None and "epoch" in record:
            snapshots.append((record["epoch"], model.get_classifier().weight.detach().clone()))

    pooled_run(model, make_plan(swa=True, swa_start=0.5, epochs=6), log=log)
    averaged = torch.stack([w for epoch, w in snapshots if epoch > 3]).mean(0)
    assert torch.allclose(model.get_classifier().weight.detach(), averaged, atol=1e-6)


def blocks_problem(model):
    x, y = separable(16, dim=192 * 2 * 2, shape=(192, 2, 2))
    xv, yv = separable(4, dim=192 * 2 * 2, seed=1, shape=(192, 2, 2))
    return x, y, xv, yv


def test_bn_freeze_keeps_running_statistics_fixed(model):
    x, y, xv, yv = blocks_problem(model)
    bn = model.blocks[6][0].bn1
    for freeze in (True, False):
        before = bn.running_mean.clone()
        tail = Tail(model, "blocks.6")
        plan = make_plan(cut="blocks.6", epochs=2, bn_freeze=freeze)
        run_phase(cached_phase(tail, [x], y, xv, yv, plan), plan, lambda r: None)
        moved = not torch.equal(bn.running_mean, before)
        assert moved is (not freeze)


def test_swa_recomputes_tail_batchnorm_and_leaves_the_trunk(model):
    x, y, xv, yv = blocks_problem(model)
    tail = Tail(model, "blocks.6")
    plan = make_plan(cut="blocks.6", epochs=3, bn_freeze=False, swa=True, swa_start=0.3)
    trunk_before = model.blocks[0][0].bn1.running_mean.clone()
    seen = {}

    def log(record):
        if record.get("epoch") == 3 and "kind" not in record:
            seen["last_epoch"] = model.blocks[6][0].bn1.running_var.clone()

    run_phase(cached_phase(tail, [x], y, xv, yv, plan), plan, log)
    assert not torch.allclose(model.blocks[6][0].bn1.running_var, seen["last_epoch"])
    assert torch.equal(model.blocks[0][0].bn1.running_mean, trunk_before)


def test_bf16_autocast_changes_the_arithmetic_but_still_learns(model):
    _, plain, _ = pooled_run(model, make_plan(epochs=3))
    _, amp, _ = pooled_run(model, make_plan(epochs=3, amp=True))
    assert plain[0]["train_loss"] != amp[0]["train_loss"]
    assert amp[-1]["valid_accuracy"] >= 0.9


# -- LR finder, batch size ---------------------------------------------------------------------------


def test_lr_suggestion_rule_is_not_fooled_by_an_early_spike():
    lrs = list(np.logspace(-6, 1, 100))
    losses = [2.0 - 1.5 * math.exp(-((math.log10(lr) + 2) ** 2)) for lr in lrs]  # bowl at 1e-2
    losses = [v if lr < 1 else v + 10 for lr, v in zip(lrs, losses)]
    losses[3] += 8.0  # an early spike, then a steep "fall"
    suggestion, _ = suggest_lr(lrs, losses)
    assert 5e-4 < suggestion < 3e-3  # a tenth of the minimum near 1e-2


def test_lr_finder_on_the_real_loop_restores_the_weights(model):
    x, y = separable(dim=2, spread=1.0)  # overlapping classes: large rates make the loss jump
    x = np.pad(x, ((0, 0), (0, 1278)))
    xv, yv = separable(5, seed=1)
    tail = Tail(model, "pooled")
    plan = make_plan()
    phase = cached_phase(tail, [x], y, xv, yv, plan)
    before = model.get_classifier().weight.detach().clone()
    found = lr_find(phase, plan, steps=60)
    assert torch.equal(model.get_classifier().weight.detach(), before)
    assert found.losses[0] == pytest.approx(math.log(3), abs=1e-3)  # zero-initialised head
    assert min(found.smoothed) < 0.5 * found.smoothed[0] and 1e-5 < found.suggestion < 1.0


def test_batch_size_search_halves_or_doubles_while_it_improves():
    scores = {16: 0.84, 32: 0.86, 64: 0.85, 128: 0.80, 256: 0.70}
    best, tried = search_batch_size(lambda b: scores[b], start=128, smallest=16, largest=256)
    assert best == 32 and set(tried) == {16, 32, 64, 128, 256}
    best, _ = search_batch_size(lambda b: {64: 0.5, 128: 0.9, 256: 0.6}[b], start=128)
    assert best == 128


def test_memory_fit_batch_size_follows_the_budget(model):
    small, info = memory_fit_batch_size(model, 64, budget_bytes=10**9)
    assert info["per_image_bytes"] > 10**5
    fixed, per = info["fixed_bytes"], info["per_image_bytes"]
    eight, _ = memory_fit_batch_size(model, 64, budget_bytes=fixed + 8 * per + per // 2)
    assert eight == 8
    assert small >= 8


# -- exact resume ----------------------------------------------------------------------------------


def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(model, tmp_path):
    plan = make_plan(checkpoint_every=3, mixup=0.2, head_dropout=0.3, epochs=3)
    full, _, full_records = pooled_run(model, plan)
    expected = model.get_classifier().weight.detach().clone()

    class Crash(Exception):
        pass

    steps = []

    def crashing_log(record):
        steps.append(record)
        if len(steps) == 2:  # dies after the second epoch's record, then again mid-run
            raise Crash

    with pytest.raises(Crash):
        pooled_run(model, plan, log=crashing_log, checkpoints=tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.position.epoch == 1 and checkpoint.position.step > 0  # mid-epoch 2
    torch.nn.init.normal_(model.get_classifier().weight)  # a fresh process would not have the weights
    _, history, _ = pooled_run(model, plan, resume=checkpoint)
    assert torch.equal(model.get_classifier().weight.detach(), expected)
    assert history[-1]["valid_loss"] == full_records[-1]["valid_loss"]


def test_torch_compile_trains_the_same_model(model):
    _, eager, _ = pooled_run(model, make_plan(epochs=2))
    _, compiled, _ = pooled_run(model, make_plan(epochs=2, compile=True))
    assert compiled[-1]["valid_loss"] == pytest.approx(eager[-1]["valid_loss"], rel=1e-3, abs=1e-5)


def test_onecycle_takes_any_number_of_steps():
    """torch's OneCycleLR divides by (pct_start * total - 1): 5 steps at 0.2 crashed a tiny fine-tuning."""
    for total in range(1, 12):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = make_schedule(optimizer, "onecycle", 1, total, pct_start=0.2)
        for _ in range(total):
            optimizer.step()
            schedule.step()


def test_a_mid_epoch_resume_logs_the_objectives_means_over_the_whole_epoch(model, tmp_path):
    """An objective's own logs (train_<name>) are summed per step; a resumed epoch carries the sums of the steps
    before the checkpoint (it once restarted them at zero and still divided by the whole epoch's steps)."""
    from visiontune.train.objectives import OBJECTIVES, Objective, register_objective

    @register_objective("test-logs-one")
    class LogsOne(Objective):
        def loss(self, module, batch):
            return torch.nn.functional.cross_entropy(module(batch["x"]), batch["y"]), {"one": 1.0}

    try:
        plan = make_plan(checkpoint_every=3, epochs=2, objective="test-logs-one")
        _, _, full_records = pooled_run(model, plan)
        assert [r["train_one"] for r in full_records] == [1.0, 1.0]

        class Crash(Exception):
            pass

        def crashing_log(record):
            raise Crash

        with pytest.raises(Crash):
            pooled_run(model, plan, log=crashing_log, checkpoints=tmp_path)
        checkpoint = load_checkpoint(tmp_path)
        assert checkpoint.position.epoch == 0 and checkpoint.position.step > 0  # mid-epoch 1
        _, history, _ = pooled_run(model, plan, resume=checkpoint)
        assert [r["train_one"] for r in history] == [1.0, 1.0]
    finally:
        OBJECTIVES.pop("test-logs-one", None)


def test_callbacks_that_would_overwrite_each_others_weights_are_refused():
    """--ema and --ssl mean-teacher each leave their own weights in the module's place at the end: together
    the teacher silently overwrote the average. The loop's callback protocol refuses them with one line."""
    from visiontune.errors import UsageError
    from visiontune.semi.mean_teacher import TeacherUpdate
    from visiontune.train.callbacks import default_callbacks

    with pytest.raises(UsageError, match="--ema 0.99 and --ssl mean-teacher .* keep one of them"):
        default_callbacks(make_plan(ema=0.99), None, [TeacherUpdate(None)])
    with pytest.raises(UsageError, match="--swa and --ssl mean-teacher"):
        default_callbacks(make_plan(swa=True), None, [TeacherUpdate(None)])
    assert default_callbacks(make_plan(), None, [TeacherUpdate(None)])  # the teacher alone
    assert default_callbacks(make_plan(ema=0.99), None, [])  # the average alone


def test_each_method_declares_its_own_rampup_and_the_flag_wins():
    """FixMatch ramps up nothing (its threshold does that job), the other methods 0.3 of the steps; --rampup
    overrides either (the method once told a user's value from the default by reading the plan's 'why' text)."""
    import numpy as np

    from visiontune.semi.fixmatch import FixMatch
    from visiontune.semi.pseudo import PseudoLabel
    from visiontune.task.kinds import SingleLabel
    from visiontune.train.objectives import ObjectiveSetup

    def rampup(method, **changes):
        return method(ObjectiveSetup(make_plan(**changes), SingleLabel(), np.arange(3), 3)).rampup

    assert rampup(FixMatch) == 0.0 and rampup(PseudoLabel) == 0.3
    assert rampup(FixMatch, rampup=0.2) == 0.2 and rampup(PseudoLabel, rampup=0.1) == 0.1
