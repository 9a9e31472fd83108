"""The recipe, chosen from the data the way competition winners choose it, printed with its reasons.

Seed rules (from the practitioners' notes): with little data (< 10k images) train only the top of the
network on frozen features, which is also what makes caching pay; with 10k-20k also the last blocks;
with more, fine-tune everything. Refinements measured on this machine (bench/RESULTS.md):

* data far from ImageNet (grayscale, or the backbone's ImageNet head is unsure of it) gains from
  retraining the last block as well, which costs little once its input maps are cached;
* with ``--budget``, the plan times a few batches and picks the most thorough recipe predicted to fit.

Every choice can be overridden, and the plan records which ones were.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace, MISSING, asdict, dataclass, field, fields

from typing import TYPE_CHECKING

from rich.table import Table

from visiontune.errors import UsageError
from visiontune.names import AUGMENTATIONS, BUILTIN_METHODS, DEVICE_HELP, ENGINE_CHOICES, HEADS, default_engine

if TYPE_CHECKING:  # the Plan's declarations build `train --help`, which must not load torch
    from visiontune.train.profile import DataProfile, SpeedProfile

SMALL_DATA = 10_000
IMBALANCED_BELOW = 0.5  # smallest class / largest class under this: the plan acts on the imbalance
HEAD_CHOICE_MAX = 1_000  # up to here `--head auto` tries the probe: a trial tail + its CV add ~60 % to the run
# (measured on fmnist-2k: 37 s -> 71 s, same accuracy); above it the retrained tail beat the probe on every bench set
MEDIUM_DATA = 20_000
FIXED_OVERHEAD_S = 4.0  # start-up, loading weights, writing the run: measured 3-5 s here


def setting(help: str, group: str = "", default=MISSING, flag: str = "", choices: tuple | None = None,
            auto: bool = False, metavar: str | None = None):
    """A plan field declared once: its default, help text and (with a `group`) its `visiontune train` flag,
    which cli.py generates from this declaration. `flag` renames the option; `auto` also accepts "auto"."""
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "auto": auto, "metavar": metavar}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


RECIPE, OPTIM, FREEZING, LOSS, MONITOR = "recipe (default: the plan)", "optimisation", "freezing", "loss and regularisation", "monitoring"
DEVICE = "device (GPU, CPU)"
BEYOND = "unlabelled and target-domain images (--unlabeled DIR / --target DIR)"


@dataclass
class Plan:
    """Everything the training loop needs to know, with a reason for each choice.

    Each field is declared once, with its help; fields with a group are `visiontune train` flags (None on
    the command line = the plan decides)."""

    recipe: str = setting("head | last-blocks | full")
    cut: str = setting("cached trunk ends here: pooled | blocks.K", RECIPE)
    views: int = setting("augmented cached views per training image, on top of the plain one", RECIPE)
    img_size: int = setting("input size in pixels", RECIPE)
    batch_size: int = setting("images per step: a number, or auto (validation + memory search)", OPTIM, auto=True)
    epochs: int = setting("epochs on cached activations", RECIPE)
    lr: float = setting("peak learning rate of the head, or auto (LR finder)", OPTIM, auto=True)
    head_dropout: float = setting("dropout before the classifier (never on conv layers)", LOSS)
    weight_decay: float = setting("AdamW/SGD weight decay", OPTIM)
    finetune_epochs: int = setting("fine-tuning epochs on images after the cached phase", RECIPE, flag="unfreeze")
    finetune_lr: float = setting("peak learning rate of the head when fine-tuning on images")
    unfreeze_groups: int = setting("layer groups trained in fine-tuning, from the top; -1 = all")
    bn_freeze: bool = setting("keep BatchNorm running statistics fixed while fine-tuning", FREEZING)
    lr_mult: float = setting("each layer group down learns this many times slower (differential LRs)", OPTIM)
    engine: str = setting("engine of the cached trunk pass (auto: the plan's, onnxruntime when installed)", RECIPE,
                          choices=ENGINE_CHOICES)
    valid_fraction: float = setting("held-out fraction when the data has no valid/ folder")
    seed: int = setting("seed of the split, the batches and the initialisation")
    budget_s: float | None = setting("wall-clock budget in seconds (--budget)", default=None)
    predicted_s: float | None = setting("predicted wall time of the run (with --budget)", default=None)
    # The training playbook (one flag each); the defaults are the measured recipe, "off" where a trick
    # did not pay on the bench.
    head: str = setting("classifier on the pooled features: linear (trained with the tail by the loop) | logreg | svm "
                        "(scikit-learn, C by cross-validation on the training images; the blocks stay pretrained) | mlp "
                        "(one hidden layer, trained with the tail) | auto (small data: linear or logreg, whichever scores "
                        "better on images carved from the training data)", RECIPE, "linear", choices=HEADS)
    head_init: str = setting("initialisation of a fresh classifier layer: zero (uniform predictions at step 0), xavier "
                             "or kaiming (random, scaled by fan-in/out)", LOSS, "zero", choices=("zero", "xavier", "kaiming"))
    balance: str = setting("imbalanced classes: logit-adjust (shift the classifier's biases by tau * log class prior, "
                           "towards balanced accuracy; tau chosen on images carved from the training data) | none (default: "
                           "logit-adjust when the smallest class has under half the largest's images)", LOSS, "none",
                           choices=("none", "logit-adjust"))
    balance_tau: float = setting("logit adjustment strength tau (1 = Bayes-optimal for balanced error if calibrated; "
                                 "default: chosen on images carved from the training data)", LOSS, 1.0)
    objective: str = setting("training method (a registered objective; see docs/architecture.md)", LOSS, "supervised")
    optimizer: str = setting("optimizer (sgd: Nesterov momentum 0.9)", OPTIM, "adamw", choices=("adamw", "sgd"))
    schedule: str = setting("learning-rate schedule", OPTIM, "onecycle", choices=("onecycle", "cosine", "sgdr", "constant"))
    warmup_epochs: float = setting("linear warm-up epochs (cosine/sgdr/constant; one-cycle warms up itself)", OPTIM, 0.0)
    sgdr_cycle: int = setting("epochs of SGDR's first cycle (0: a third of the epochs)", OPTIM, 0)
    sgdr_mult: int = setting("each SGDR cycle this many times longer than the last", OPTIM, 2)
    loss: str = setting("single-label loss: cross-entropy or focal", LOSS, "ce", choices=("ce", "focal"))
    label_smoothing: float = setting("label smoothing of the targets, in [0, 1)", LOSS, 0.0)
    focal_gamma: float = setting("focusing exponent of the focal loss", LOSS, 2.0)
    class_weights: str = setting("weigh each class's loss by n / (k * count)", LOSS, "none", choices=("none", "balanced"))
    sampler: str = setting("draw classes equally often (balanced) or as they come", LOSS, "random", choices=("random", "balanced"))
    aug: str = setting("augmentation preset (images and cached views)", LOSS, "light", choices=AUGMENTATIONS)
    mixup: float = setting("mixup Beta(alpha, alpha); 0.2-0.4 typical, 0 = off", LOSS, 0.0)
    cutmix: float = setting("cutmix Beta(alpha, alpha) (maps and images only); 1.0 typical, 0 = off", LOSS, 0.0)
    swa: bool = setting("stochastic weight averaging over the last epochs", LOSS, False)
    swa_start: float = setting("fraction of the epochs before SWA starts", LOSS, 0.75)
    swa_lr: float = setting("constant SWA learning rate (0: a tenth of each group's peak)", LOSS, 0.0)
    ema: float = setting("decay of an exponential moving average of the weights, e.g. 0.999; 0 = off", LOSS, 0.0)
    early_stop: int = setting("stop after this many epochs without improvement; 0 = off", LOSS, 0, metavar="PATIENCE")
    monitor: str = setting("what early stopping watches", LOSS, "valid_loss", choices=("valid_loss", "valid_accuracy"))
    eval_every: int = setting("also validate every N optimizer steps (metrics.jsonl, tb/); 0 = per epoch only", MONITOR, 0, metavar="STEPS")
    checkpoint_every: int = setting("also checkpoint every N optimizer steps; 0 = per epoch only", MONITOR, 0, metavar="STEPS")
    amp: bool = setting("mixed precision: autocast bf16 (fp16 with a gradient scaler on GPUs without bf16); default on "
                        "a GPU, opt-in on CPU", OPTIM, False)
    compile: bool = setting("torch.compile the training forward (pays only for long fine-tuning)", OPTIM, False)
    device: str = setting(DEVICE_HELP, DEVICE, "auto", metavar="DEVICE")
    deterministic: bool = setting("deterministic GPU kernels (cuDNN, cuBLAS): the same seed and GPU give identical "
                                  "metrics, a little slower; CPU runs are reproducible without it", DEVICE, False)
    freeze_to: str = setting("fine-tune from this layer group up, e.g. blocks.4 ('' = the recipe decides)", FREEZING, "")
    gradual: bool = setting("gradual unfreezing: one more layer group per fine-tuning epoch", FREEZING, False)
    upweight: str = setting("CSV of hard examples (visiontune hard-examples) drawn more often", LOSS, "", metavar="CSV")
    upweight_factor: float = setting("how many times as often the hard examples are drawn", LOSS, 3.0)
    task: str = setting("single-label | multi-label: chosen from the data (tags in the labels CSV)", default="single-label")
    ssl: str = setting(f"semi-supervised method on --unlabeled images: {' | '.join(BUILTIN_METHODS['ssl'])} | auto "
                       "(chosen on an inner split of the labelled training images)", BEYOND, "")
    adapt: str = setting(f"domain adaptation to --target images: {' | '.join(BUILTIN_METHODS['adapt'])} | auto "
                         "(chosen without target labels: MixVal on the target images)", BEYOND, "")
    extra_epochs: int = setting("passes over the unlabelled/target images, after a labelled-only warm start", BEYOND, 3)
    unlabeled_ratio: int = setting("unlabelled (or target) images per labelled image in a batch", BEYOND, 3)
    unlabeled_views: int = setting("augmented cached views per unlabelled/target image (a trunk pass each)", BEYOND, 1)
    threshold: float = setting("confidence a pseudo-label needs (pseudo, fixmatch, cotrain, self-train)", BEYOND, 0.95)
    unlabeled_weight: float = setting("weight of the unlabelled or adaptation loss once ramped up", BEYOND, 1.0)
    rampup: float = setting("fraction of the steps over which that weight ramps up (sigmoid); unset: the method's "
                            "own (0.3; FixMatch 0, as in its paper)", BEYOND, None)
    teacher_ema: float = setting("EMA decay of the mean teacher's weights", BEYOND, 0.99)
    tca_dim: int = setting("TCA/JDA: dimension of the subspace shared by source and target", BEYOND, 64)
    coral_shrink: float = setting("coral-cut: covariances shrunk by this x their mean variance on the diagonal "
                                  "(1 = the paper's +I on standardised features)", BEYOND, 1.0)
    fbeta: float = setting("multi-label: the decision thresholds maximise this F-beta", LOSS, 2.0)
    why: dict[str, str] = field(default_factory=dict)

    def chosen(self, why: dict[str, str], **changes) -> Plan:
        """A new plan with `changes` made and their reasons added to `why` (an automatic choice's result;
        this plan is left as it was)."""
        return replace(self, **changes, why={**self.why, **why})

    def freeze(self) -> Plan:
        """Make the plan final: once plan.json is written (pipeline/choices.py: decide_plan) a setting that
        changed would train a run its plan.json does not describe, so any later assignment raises. Trial
        plans derive new ones with `dataclasses.replace`, which are not final."""
        object.__setattr__(self, "_final", True)
        return self

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_final"):
            raise AttributeError(f"the plan is final (plan.json is written): {name} cannot change now; "
                                 "automatic choices belong in pipeline/choices.py, before it is written")
        super().__setattr__(name, value)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def table(self) -> Table:
        """The plan as a rich table with a 'why' column, printed before training. Playbook settings
        appear when chosen (by you or a search); the rest stay at their documented defaults."""
        table = Table(title="plan")
        table.add_column("setting")
        table.add_column("value", justify="right")
        table.add_column("why")
        for f in fields(self):
            if f.name == "why" or (f.name in PLAYBOOK_SETTINGS and f.name not in self.why):
                continue
            table.add_row(f.name, str(getattr(self, f.name)), self.why.get(f.name, ""))
        return table


#: Settings of the training playbook (issue C): the fields with a default, after the recipe's own.
PLAYBOOK_SETTINGS = {f.name for f in fields(Plan) if f.default is not MISSING} - {"budget_s", "predicted_s"}


def parse_duration(text: str | float | int | None) -> float | None:
    """'90s', '5m', '1h', '120' -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
    if not match:
        raise UsageError(f"cannot read the duration {text!r}; use e.g. 90s, 5m or 1h")
    value, unit = float(match.group(1)), (match.group(2) or "s")[0]
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


@dataclass(frozen=True)
class Candidate:
    """One cached recipe the budget search considers: where to cut, how many views, how many epochs."""

    cut: str
    views: int
    epochs: int


def candidates(cuts: list[str]) -> list[Candidate]:
    """Cached recipes from cheapest to most thorough (ordered by accuracy measured on the bench).

    Deeper cuts and more views keep paying on data far from ImageNet (the `--budget` rows of
    bench/results/fmnist_speed.md: each larger budget picks a deeper candidate and scores higher), so larger
    budgets go there.
    """
    found = [Candidate(cuts[0], 0, 30)]
    if len(cuts) > 1:
        found += [Candidate(cuts[1], 0, 10), Candidate(cuts[1], 2, 12)]
    if len(cuts) > 2:
        found += [Candidate(cuts[2], 0, 10), Candidate(cuts[2], 2, 12), Candidate(cuts[2], 4, 16)]
    if len(cuts) > 3:
        found += [Candidate(cuts[3], 2, 12), Candidate(cuts[3], 4, 16), Candidate(cuts[3], 8, 20)]
    return found


def caching_images(candidate: Candidate, data: DataProfile) -> int:
    """Trunk passes a cached recipe needs when nothing is cached yet: every view of every image."""
    return data.n_train * (1 + candidate.views) + data.n_valid


def predict_seconds(candidate: Candidate, data: DataProfile, speed: SpeedProfile,
                    uncached: Callable[[Candidate], int] | None = None) -> float:
    """Predicted wall time of a cached recipe: trunk pass over the views not cached yet (`uncached`
    counts them; all of them by default), then the tail's epochs."""
    passes = caching_images(candidate, data) if uncached is None else uncached(candidate)
    return FIXED_OVERHEAD_S + caching_seconds(candidate, passes, speed) + candidate.epochs * epoch_seconds(candidate.cut, data, speed)


def caching_seconds(candidate: Candidate, passes: int, speed: SpeedProfile) -> float:
    """`passes` trunk passes at the candidate's cut. The plain view decodes in a background thread while
    the trunk runs (data/loader.prefetch), so the slower of the two sets the pace; seeded augmented views
    decode inline, one after the other."""
    trunk = speed.trunk[candidate.cut]
    per_image = max(speed.decode, trunk) if candidate.views == 0 else speed.decode + trunk
    return passes * per_image


def epoch_seconds(cut: str, data: DataProfile, speed: SpeedProfile) -> float:
    """One epoch of the tail on cached rows, with its validation pass."""
    return data.n_train * speed.tail_train[cut] + data.n_valid * speed.tail_eval[cut]


def finetune_seconds(epochs: int, data: DataProfile, speed: SpeedProfile) -> float:
    """Fine-tuning on images: decode + forward + backward (about 3 forward passes) of the whole network per
    training image, decode + forward per validation image, each epoch. The trunk was timed on the cached
    pass's engine; fine-tuning runs in torch."""
    if epochs <= 0 or speed.full_forward_torch <= 0:
        return 0.0
    per_epoch = data.n_train * (speed.decode + 3 * speed.full_forward_torch) + data.n_valid * (
        speed.decode + speed.full_forward_torch)
    return epochs * per_epoch


#: Whole-network fine-tuning epochs a budget may add on a GPU: the size rule's count for large data.
FINETUNE_EPOCHS_MAX = 3


def finetune_for_budget(rest_s: float, data: DataProfile, speed: SpeedProfile) -> tuple[int, float, str]:
    """(epochs, seconds, why) of whole-network fine-tuning that the budget's rest `rest_s` pays for, after the
    cached recipe: on a GPU an epoch over the images costs little more than caching did, so a budget that
    has room fine-tunes everything (up to :data:`FINETUNE_EPOCHS_MAX` epochs, the size rule's count); none
    when one epoch does not fit or the whole network was not timed."""
    one = finetune_seconds(1, data, speed)
    if one <= 0:
        return 0, 0.0, ""
    epochs = int(min(FINETUNE_EPOCHS_MAX, rest_s // one))
    if epochs < 1:
        return 0, 0.0, ""
    return epochs, epochs * one, (f"the budget's rest ({rest_s:.0f}s) pays for {epochs} whole-network fine-tuning "
                                  f"epoch{'s' if epochs > 1 else ''} at {one:.0f}s each, timed on this device")


class BudgetTooSmall(UsageError):
    """Even one epoch of the cheapest recipe does not fit the budget."""

    def __init__(self, one_epoch_s: float, full_s: float):
        self.one_epoch_s, self.full_s = one_epoch_s, full_s
        super().__init__(f"even one epoch of the cheapest recipe is predicted at {one_epoch_s:.0f}s")


def choose_for_budget(
    budget_s: float, data: DataProfile, speed: SpeedProfile, cuts: list[str],
    uncached: Callable[[Candidate], int] | None = None,
) -> tuple[Candidate, float, str]:
    """The most thorough candidate predicted to fit `budget_s`, else the cheapest with fewer epochs;
    :class:`BudgetTooSmall` when not even one epoch of it fits."""
    options = [(c, predict_seconds(c, data, speed, uncached)) for c in candidates(cuts)]
    fitting = [(c, s) for c, s in options if s <= budget_s]
    if fitting:
        best, seconds = fitting[-1]
        return best, seconds, f"most thorough recipe predicted to fit {budget_s:.0f}s ({seconds:.0f}s)"
    cheapest, full = options[0]
    per_epoch = epoch_seconds(cheapest.cut, data, speed)
    fixed = full - cheapest.epochs * per_epoch
    epochs = int((budget_s - fixed) / per_epoch) if per_epoch > 0 else cheapest.epochs
    if epochs < 1:
        raise BudgetTooSmall(fixed + per_epoch, full)
    reduced = Candidate(cheapest.cut, 0, min(cheapest.epochs, epochs))
    seconds = predict_seconds(reduced, data, speed, uncached)
    return reduced, seconds, (f"below the cheapest full recipe ({full:.0f}s): {reduced.epochs} of its "
                              f"{cheapest.epochs} epochs fit ({seconds:.0f}s)")


def budget_advice(budget_s: float, spent_s: float, error: BudgetTooSmall) -> str:
    """What to do when a budget cannot be met: the smallest budget that can, and what the full cheapest
    recipe needs (never a negative number)."""
    smallest, full = _round_up(spent_s + error.one_epoch_s), _round_up(spent_s + error.full_s)
    text = (f"--budget {budget_s:.0f}s cannot be met: start-up, measuring and the report take {spent_s:.0f}s and "
            f"caching plus one epoch of the cheapest recipe {error.one_epoch_s:.0f}s more. ")
    if full > smallest:
        text += (f"Smallest feasible: --budget {smallest}s (one epoch, below the full recipe's accuracy); the "
                 f"cheapest full recipe needs --budget {full}s.")
    else:
        text += f"Smallest feasible: --budget {full}s (the cheapest full recipe)."
    return text + " A smaller --img-size shortens caching; without --budget the plan runs in full."


def _round_up(seconds: float, step: int = 5) -> int:
    return int(-(-seconds // step) * step)


def _batch_size(n_train: int) -> int:
    """64, or a smaller power of two giving at least 8 optimizer steps per epoch on tiny data."""
    size = 64
    while size > 8 and n_train / size < 8:
        size //= 2
    return size


def default_head(n_train: int, exclusive: bool = True) -> tuple[str, str]:
    """`auto` on small data with one class per image (the probe is a real contender there), else the trained
    tail; `exclusive` is the task's (:attr:`visiontune.task.kinds.Task.exclusive`)."""
    if not exclusive:
        return "linear", "multi-label: the tail's own sigmoid layer, trained by the loop"
    if n_train <= HEAD_CHOICE_MAX:
        return "auto", (f"{n_train} training images <= {HEAD_CHOICE_MAX:,}: the trained tail, or a cross-validated "
                        "logistic regression on the pooled features if it scores clearly better on images carved from "
                        "the training data")
    return "linear", f"{n_train} training images > {HEAD_CHOICE_MAX:,}: the tail trained by the loop"


def default_balance(data: DataProfile, exclusive: bool = True) -> tuple[str, str]:
    """Act on imbalance (logit adjustment, train/balance.py) when the smallest class is under half the largest;
    only where the classes exclude each other (one softmax to shift)."""
    ratio = data.smallest_to_largest
    if not exclusive:
        return "none", "multi-label: per-class thresholds decide each tag"
    if ratio >= IMBALANCED_BELOW:
        return "none", f"classes balanced enough (smallest/largest {ratio:.2f} >= {IMBALANCED_BELOW})"
    counts = data.class_counts or []
    return "logit-adjust", (f"imbalanced: smallest class {min(c for c in counts if c)} images, largest {max(counts)} "
                            f"({ratio:.2f} < {IMBALANCED_BELOW}): logits shifted towards balanced accuracy (each class's "
                            f"recall counts equally); tau chosen on images carved from the training data")


def epochs_for_remaining(remaining_s: float, planned: int, data: DataProfile, speed: SpeedProfile, cut: str) -> int:
    """Epochs that fill the budget's rest once caching is done (1 to 3x the planned number; at most the
    planned number for a linear head on pooled features, a convex fit that has converged by then: the
    Fashion-MNIST bench's 1.2x budget stretched it to 90 epochs and scored 0.8415, 30 epochs 0.8465).

    Caching time varies most (disk, decode, cache hits); re-deciding the epochs after it is what keeps
    a budgeted run within a few percent of its budget.
    """
    per_epoch = data.n_train * speed.tail_train[cut] + data.n_valid * speed.tail_eval[cut]
    most = planned if cut == "pooled" else 3 * planned  # backbones.cuts.POOLED (plan.py stays torch-free)
    return int(max(1, min(most, remaining_s // max(per_epoch, 1e-9))))


def choose_img_size(data: DataProfile, native_size: int) -> tuple[int, str]:
    """The input size and why: native, unless the source images are at most half of it."""
    if data.median_side is not None and data.median_side * 2 <= native_size:
        size = min(native_size, 112)
        return size, f"source images are small (median side {data.median_side}px): {size}px loses no detail"
    return native_size, "the backbone's native input size"


CHOICES = {f.name: f.metadata["choices"] for f in fields(Plan) if f.metadata.get("choices")}


def _check_choices(plan: Plan) -> None:
    for name, allowed in CHOICES.items():
        if getattr(plan, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(plan, name)!r}: choose from {', '.join(allowed)}")
    if not 0 <= plan.label_smoothing < 1:
        raise UsageError("--label-smoothing must be in [0, 1)")
    if not 0 <= plan.ema < 1:
        raise UsageError("--ema is a decay in [0, 1), e.g. 0.999")
    if plan.swa and plan.ema:
        raise UsageError("--swa and --ema both average the weights; choose one")
    from visiontune.task.kinds import task_named  # torch: only when a plan is checked, not for --help
    from visiontune.train.objectives import OBJECTIVES

    task_named(plan.task).check(plan)
    if plan.objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {plan.objective!r}; registered: {', '.join(sorted(OBJECTIVES))}")


def make_plan(
    data: DataProfile,
    native_size: int,
    cuts: list[str],
    overrides: dict | None = None,
    budget_s: float | None = None,
    speed: SpeedProfile | None = None,
    spent_s: float = 0.0,
    uncached: Callable[[Candidate], int] | None = None,
    exclusive: bool = True,
    finetune_in_budget: bool = False,
) -> Plan:
    """Choose the recipe from the data (and the budget); `overrides` (non-None values) win. `exclusive`: the
    task's classes exclude each other (:attr:`visiontune.task.kinds.Task.exclusive`). `finetune_in_budget`
    (a GPU): with --budget, whole-network fine-tuning epochs are added when the budget's rest pays for them
    (:func:`finetune_for_budget`).

    `spent_s` is the wall time the command has used already (start-up, profiling); the budget's rest
    is what the recipe may take.
    """
    why: dict[str, str] = {}
    n = data.n_train
    finetune_epochs, groups = 0, 0
    if n < SMALL_DATA:
        recipe = "head"
        choice = Candidate(cuts[0], 0, 30)
        why["recipe"] = f"{n} training images < {SMALL_DATA:,}: train the top only, on cached activations"
        if data.far_from_imagenet and len(cuts) > 1:
            recipe, choice = "last-blocks", Candidate(cuts[1], 0, 10)
            why["cut"] = (
                f"far from ImageNet (grayscale {data.grayscale:.0%}, ImageNet-head entropy "
                f"{data.imagenet_entropy}): retrain the last block too, on its cached input maps"
            )
    elif n < MEDIUM_DATA:
        recipe = "last-blocks"
        choice = Candidate(cuts[min(2, len(cuts) - 1)], 0, 10)
        why["recipe"] = f"{n} images in {SMALL_DATA:,}-{MEDIUM_DATA:,}: also train the last blocks (cached)"
    else:
        recipe, finetune_epochs, groups = "full", 3, -1
        choice = Candidate(cuts[0], 0, 30)
        why["recipe"] = f"{n} images >= {MEDIUM_DATA:,}: head on cached features, then fine-tune everything"
    why.setdefault("cut", "end of the trunk that runs once and is cached (pooled = classifier only)")
    predicted = None
    if budget_s is not None and speed is not None:
        try:
            choice, predicted, reason = choose_for_budget(budget_s - spent_s, data, speed, cuts, uncached)
        except BudgetTooSmall as err:
            raise UsageError(budget_advice(budget_s, spent_s, err)) from None
        predicted += spent_s
        recipe = "head" if choice.cut == cuts[0] else "last-blocks"
        finetune_epochs, groups = 0, 0
        why["recipe"] = why["cut"] = why["views"] = why["epochs"] = reason
        why["budget_s"] = "set by you (--budget)"
        if finetune_in_budget:
            finetune_epochs, extra_s, tuned = finetune_for_budget(budget_s - predicted, data, speed)
            if finetune_epochs:
                recipe, groups, predicted = "full", -1, predicted + extra_s
                why["recipe"] = why["finetune_epochs"] = f"{reason}; {tuned}"
    why.setdefault("views", "extra augmented views cost a trunk pass each; bench/results/playbook.md: --views 2 "
                            "alone -0.9 pt, with --aug standard +0.05 pt; not by default")
    why.setdefault("finetune_epochs", "follows the recipe")
    why["unfreeze_groups"] = "follows the recipe"

    img_size, why["img_size"] = choose_img_size(data, native_size)

    plan = Plan(
        recipe=recipe,
        cut=choice.cut,
        views=choice.views,
        img_size=img_size,
        batch_size=_batch_size(n),
        epochs=choice.epochs,
        lr=1e-2,
        head_dropout=0.2,
        weight_decay=1e-4,
        finetune_epochs=finetune_epochs,
        finetune_lr=1e-3,
        unfreeze_groups=groups,
        bn_freeze=True,
        lr_mult=10.0,
        engine=default_engine(),
        valid_fraction=0.2,
        seed=0,
        budget_s=budget_s,
        predicted_s=None if predicted is None else round(predicted, 1),
        why=why,
    )
    plan.head, why["head"] = default_head(n, exclusive)
    plan.balance, why["balance"] = default_balance(data, exclusive)
    why.setdefault("epochs", "cheap on cached activations; one-cycle schedule")
    why.setdefault("batch_size", "64 fits CPU caches; smaller for tiny data to keep >= 8 steps per epoch")
    why.setdefault("lr", "AdamW one-cycle peak for the classifier")
    why.setdefault("head_dropout", "dropout on the head only, never on conv layers")
    why.setdefault("finetune_lr", "peak for the head when fine-tuning on images")
    why.setdefault("bn_freeze", "pretrained BN statistics kept (bench/results/playbook.md: --no-bn-freeze -1.4 pt)")
    why.setdefault("lr_mult", "pretrained layers learn 10x slower than the head, the notes' discriminative rates "
                              "(bench/results/playbook.md: --lr-mult 1 +0.35 pt on the cached tail, within noise)")
    why.setdefault("engine", "fastest exact fp32 engine installed (onnxruntime 1.6x torch here); bf16 is opt-in")
    why.setdefault("valid_fraction", "stratified hold-out when no valid/ folder is given")
    why.setdefault("predicted_s", "from timed batches (with --budget)")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in {f.name for f in fields(plan)} or name == "why":
            raise UsageError(f"unknown plan setting {name!r}")
        current = getattr(plan, name)
        setattr(plan, name, value if current is None else type(current)(value))
        why[name] = "set by you"
    _check_choices(plan)
    if plan.cut not in cuts:
        raise UsageError(f"unknown cut {plan.cut!r}; choose from {', '.join(cuts)}")
    if (overrides or {}).get("finetune_epochs") and plan.recipe != "full":
        plan.recipe = "full"
        plan.unfreeze_groups = -1 if plan.unfreeze_groups == 0 else plan.unfreeze_groups
        why["recipe"] = "fine-tuning asked for (--unfreeze)"
    return plan
