"""The Optuna side of finetune: storage, study identity, sampler, pruner, search space."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass

import optuna
from optuna.trial import TrialState

from pipeline import interrupts
from pipeline.code_digest import code_digest
from pipeline.params import Params
from pipeline.paths import FEATURES_DIR, HEAD_DIR, mlruns_dir


@dataclass(frozen=True)
class TrialConfig:
    k: int
    head_lr: float
    backbone_lr: float
    layer_decay: float
    weight_decay: float


def storage_url() -> str:
    """OPTUNA_STORAGE (PostgreSQL URL for a team), else SQLite under the home mlruns/."""
    url = os.environ.get("OPTUNA_STORAGE")
    if url:
        return url
    mlruns_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns_dir() / 'optuna.db'}"


@interrupts.shield_methods
class RDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage; a SIGTERM cannot land half-way through one of its calls."""


@interrupts.shield_methods
class JournalStorage(optuna.storages.JournalStorage):
    """Optuna's JournalStorage; a SIGTERM cannot land half-way through one of its calls."""


def make_storage(url: str | None = None) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats: a killed worker's trial is failed and retried, not left RUNNING."""
    url = url or storage_url()
    if url.endswith(".log") or url.startswith("journal:"):
        path = url.removeprefix("journal:")
        return JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and documented
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=STALE_AFTER_SECONDS,
            heartbeat_stale_trial_callback=close_and_retry,
        )


def fail_stale_trials(s: optuna.Study) -> None:
    """Killed workers' trials: FAIL + retry (close_and_retry), not RUNNING forever.

    Trials of a dead process on this host are retried at once; others after the heartbeat's
    grace period. Retrying before any new trial is asked keeps a sequential study in slot order.
    """
    from pipeline import tracking

    for trial in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if tracking.process_gone(trial.user_attrs.get("worker", {})):
            try:
                if s._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    close_and_retry(s, trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(s)


def claim(trial: optuna.Trial) -> None:
    """Mark the trial as run by this process, so a successor on this host can tell it died."""
    from pipeline import tracking

    trial.set_user_attr("worker", tracking.process_tags())


HEARTBEAT_SECONDS = 2
STALE_AFTER_SECONDS = 8  # a trial silent this long has lost its worker (SIGKILL, crash, reboot)
with warnings.catch_warnings():  # "experimental" since Optuna 2.8; the documented way to retry
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)


def close_and_retry(s: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A stale trial: end its MLflow run KILLED (not RUNNING forever), enqueue a retry with the
    same parameters so no trial is lost."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        from pipeline import tracking

        client = tracking.client()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "killed_reason", "worker stopped heartbeating; trial retried")
            client.set_terminated(run_id, "KILLED")
    _retry(s, trial)


@contextlib.contextmanager
def heartbeat(s: optuna.Study, trial: optuna.Trial):
    """Record the trial's heartbeat every HEARTBEAT_SECONDS while it runs (what optimize() does
    for itself; our ask/tell loop must do it)."""
    storage = s._storage
    if not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial._trial_id)
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def inputs_digest() -> str:
    """sha256 of what trials train on — every file extract cached and the trained head — so a
    change in how they are computed (not only in params) starts a new study."""
    digest = hashlib.sha256()
    for path in sorted([*FEATURES_DIR.iterdir(), *HEAD_DIR.iterdir()]):
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
        "code": code_digest("finetune"),
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
    """The slot a new trial would fill: its number in an unbroken sequential study."""
    return sum(_takes_a_slot(t) for t in s.get_trials(deepcopy=False))


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


def suggest(trial: optuna.Trial, params: Params) -> TrialConfig:
    f = params.finetune
    k = trial.suggest_int("k", 0, f.max_unfreeze)
    head_lr = trial.suggest_float("head_lr", *f.head_lr, log=True)
    ratio = trial.suggest_float("backbone_lr_ratio", *f.backbone_lr_ratio, log=True)
    decay = trial.suggest_float("layer_decay", *f.layer_decay)
    wd = trial.suggest_float("weight_decay", *f.weight_decay, log=True)
    return TrialConfig(k=k, head_lr=head_lr, backbone_lr=head_lr * ratio, layer_decay=decay,
                       weight_decay=wd)
