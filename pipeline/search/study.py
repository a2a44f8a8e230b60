"""The Optuna side of finetune: storage, study identity, sampler, pruner, search space."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

import optuna
from optuna.trial import TrialState

from pipeline.code_digest import code_digest
from pipeline.params import Params
from pipeline.paths import EXCLUDED, FEATURES_DIR, HEAD_DIR


@dataclass(frozen=True)
class TrialConfig:
    k: int
    head_lr: float
    backbone_lr: float
    layer_decay: float
    weight_decay: float


def inputs_digest() -> str:
    """sha256 of what trials train on — every file extract cached, the trained head and the list of
    images the audit excluded — so a change in how they are computed (not only in params) starts a
    new study."""
    digest = hashlib.sha256()
    for path in sorted([*FEATURES_DIR.iterdir(), *HEAD_DIR.iterdir(), EXCLUDED]):
        digest.update(path.as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def study_name(params: Params, data_hash: str, inputs_hash: str) -> str:
    """Derived from everything that defines the search, so the same config continues one study
    and any change to the space, data, trial inputs or recipe starts a new one."""
    f = params.finetune
    identity = {
        "data": data_hash,
        "inputs": inputs_hash,
        "backbone": asdict(params.backbone),
        "image_size": params.data.image_size,
        "extract": {"views": params.extract.views, "precision": params.extract.precision},
        "space": {
            "max_unfreeze": f.max_unfreeze, "head_lr": f.head_lr,
            "backbone_lr_ratio": f.backbone_lr_ratio, "layer_decay": f.layer_decay,
            "weight_decay": f.weight_decay,
        },
        "recipe": {
            "epochs": f.epochs, "batch_size": f.batch_size, "label_smoothing": f.label_smoothing,
            "bn_train": f.bn_train, "pruner": f.pruner, "warmup": f.pruner_warmup_epochs,
            "precision": f.precision, "cache": f.cache, "compile": f.compile,
        },
        "train_head": asdict(params.train_head),
        "seed": params.seed,
        # the source of everything a trial runs: new code never reuses stale trials
        "code": code_digest("stages.finetune"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"finetune-{params.backbone.name}-{digest}"


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    f = params.finetune
    if f.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=f.pruner_warmup_epochs)
    if f.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, f.pruner_warmup_epochs),
                                              max_resource=f.epochs)
    return optuna.pruners.NopPruner()


def make_sampler(params: Params, slot: int = 0, worker: int = 0) -> optuna.samplers.BaseSampler:
    """TPE seeded by the trial slot it will fill (see next_slot), so a study resumed after a kill
    draws the same parameters as an unbroken one; parallel workers get distinct seeds. Random
    start-up trials: half the study, 1 to 4 (studies here are small).

    The first max_unfreeze + 1 slots each try another k, deepest first, so no depth goes
    untried because the random start-up happened to miss it (how deep to fine-tune matters more
    than any learning rate); their learning rates are still drawn at random.
    """
    seed = (params.seed + slot + 100_003 * worker) % 2**32  # NumPy seeds are 32-bit
    startup = max(1, min(4, params.finetune.n_trials // 2))
    with warnings.catch_warnings():  # multivariate TPE is "experimental" since Optuna 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
        if slot > params.finetune.max_unfreeze:
            return tpe
        return optuna.samplers.PartialFixedSampler({"k": params.finetune.max_unfreeze - slot}, tpe)


def _takes_a_slot(t: optuna.trial.FrozenTrial) -> bool:
    # a retry refills the slot of the trial it replaces; a surplus trial never ran
    return "failed_trial" not in t.system_attrs and not t.user_attrs.get("surplus")


def next_slot(s: optuna.Study) -> int:
    """The slot the next asked trial fills: its number in an unbroken sequential study.

    ask() first pops the oldest queued retry, which refills the slot of the trial it replaces —
    so the sampler must be seeded for that slot, even when the killed trial died before it drew
    any parameter (then the retry carries none and is sampled afresh, as in the unbroken study).
    """
    trials = s.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if waiting:
        return logical_number(s, min(waiting, key=lambda t: t._trial_id).number)
    return sum(_takes_a_slot(t) for t in trials)


def logical_number(s: optuna.Study, number: int) -> int:
    """The trial's number in an unbroken sequential study. A trial killed and retried (under a new
    Optuna number) keeps its slot, so its seed, and everything seeded from it, stay the same."""
    trials = s.get_trials(deepcopy=False)
    original = next(t for t in trials if t.number == number).system_attrs.get("failed_trial", number)
    return sum(_takes_a_slot(t) for t in trials if t.number < original)


def best_trial(s: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best COMPLETE trial; ties go to the earlier slot, whatever numbers retries got."""
    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError("no complete trial")
    return max(complete, key=lambda t: (t.value, -logical_number(s, t.number)))


def top_trials(s: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    """The n best COMPLETE trials, best first; ties go to the earlier slot."""
    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.value, logical_number(s, t.number)))[:n]


def config_of(trial: optuna.trial.FrozenTrial, params: Params) -> TrialConfig:
    """The TrialConfig a finished trial trained with (the same mapping as when it ran)."""
    return suggest(optuna.trial.FixedTrial(trial.params), params)


PARAMETERS = ("k", "head_lr", "backbone_lr_ratio", "layer_decay", "weight_decay")  # what suggest draws


def suggest(trial: optuna.Trial, params: Params) -> TrialConfig:
    f = params.finetune
    k = trial.suggest_int("k", 0, f.max_unfreeze)
    head_lr = trial.suggest_float("head_lr", *f.head_lr, log=True)
    ratio = trial.suggest_float("backbone_lr_ratio", *f.backbone_lr_ratio, log=True)
    decay = trial.suggest_float("layer_decay", *f.layer_decay)
    wd = trial.suggest_float("weight_decay", *f.weight_decay, log=True)
    return TrialConfig(k=k, head_lr=head_lr, backbone_lr=head_lr * ratio, layer_decay=decay,
                       weight_decay=wd)
