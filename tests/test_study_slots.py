"""Trials are seeded by their slot, so a study resumed after a kill draws what an unbroken one would."""

import optuna
from conftest import ROOT
from optuna.trial import TrialState

from pipeline.params import load_params
from pipeline.search import storage, study


def test_a_trial_killed_before_drawing_parameters_is_retried_in_its_own_slot(tmp_path):
    """SIGKILL between ask() and the first suggest leaves a FAIL trial with no parameters: its
    retry must still be sampled as slot 0 (the fault suite caught it drawing slot 1's)."""
    params = load_params(ROOT / "params.yaml")
    s = optuna.create_study(storage=storage.make_storage(f"sqlite:///{tmp_path}/optuna.db"),
                            direction="maximize")
    killed = s.ask()
    s.tell(killed, state=TrialState.FAIL)
    storage.close_and_retry(s, s.trials[0])  # what the next run does for a dead worker's trial
    assert study.next_slot(s) == 0

    s.sampler = study.make_sampler(params, study.next_slot(s))
    retry = s.ask()
    assert retry.number == 1 and study.logical_number(s, retry.number) == 0
    unbroken = optuna.create_study(direction="maximize", sampler=study.make_sampler(params, 0))
    assert study.suggest(retry, params) == study.suggest(unbroken.ask(), params)
    assert retry.params["k"] == params.finetune.max_unfreeze  # slot 0 tries the deepest k


def test_a_trial_killed_between_two_draws_is_retried_as_the_unbroken_trial(tmp_path):
    """SIGKILL between two suggests leaves a FAIL trial with some parameters: a retry that fixed
    those and drew the rest would draw them out of the slot's sequence (the fault suite's
    `dvc repro` SIGKILLs caught a different weight_decay). Its retry draws them all again, as
    slot 0, so the study is the unbroken one's."""
    params = load_params(ROOT / "params.yaml")
    s = optuna.create_study(storage=storage.make_storage(f"sqlite:///{tmp_path}/optuna.db"),
                            direction="maximize")
    s.sampler = study.make_sampler(params, 0)
    killed = s.ask()
    f = params.finetune
    killed.suggest_int("k", 0, f.max_unfreeze)
    killed.suggest_float("head_lr", *f.head_lr, log=True)  # ...and no further: killed here
    s.tell(killed, state=TrialState.FAIL)
    storage.close_and_retry(s, s.trials[0])

    s.sampler = study.make_sampler(params, study.next_slot(s))
    retry = s.ask()
    assert study.logical_number(s, retry.number) == 0
    unbroken = optuna.create_study(direction="maximize", sampler=study.make_sampler(params, 0))
    assert study.suggest(retry, params) == study.suggest(unbroken.ask(), params)
    assert set(retry.params) == set(study.PARAMETERS)


def test_a_new_trial_takes_the_next_slot(tmp_path):
    params = load_params(ROOT / "params.yaml")
    s = optuna.create_study(storage=storage.make_storage(f"sqlite:///{tmp_path}/optuna.db"),
                            direction="maximize")
    for expected in range(3):
        assert study.next_slot(s) == expected
        s.sampler = study.make_sampler(params, expected)
        trial = s.ask()
        study.suggest(trial, params)
        s.tell(trial, 0.5)


def test_each_local_worker_keeps_its_share_of_the_device_for_resident_inputs(monkeypatch):
    """`finetune --workers 4` with finetune.workers: 1 in params: four processes share the device,
    so each keeps a quarter of the resident share, not all of it (the helpers learn the count
    from the environment finetune gives them)."""
    import torch

    from pipeline.devices import RESIDENT_SHARE, Runtime, worker_slots
    from pipeline.model.engine import ResidentInputs
    from pipeline.search import loop

    params = load_params(ROOT / "params.yaml")
    assert params.finetune.workers == 1 and params.finetune.cache
    env = loop.helper_env(worker_slots(4, []), 1)  # one device (several GPUs: the next test)
    assert env[loop.LOCAL_WORKERS_ENV] == "4"
    monkeypatch.setattr(Runtime, "free_bytes", lambda self: 2**30)
    inputs = ResidentInputs(Runtime(torch.device("cpu"), None), int(env[loop.LOCAL_WORKERS_ENV]))
    inputs.get(0, lambda k: ())
    assert inputs.budget == int(RESIDENT_SHARE / 4 * 2**30)


def test_local_workers_spread_over_the_gpus_of_a_machine_with_several(monkeypatch):
    """`finetune --workers 4` on two GPUs: two processes on each, each keeping half of its GPU's
    resident share, the helpers pinned by CUDA_VISIBLE_DEVICES to the parent's own names for
    them; on the CPU or one GPU nothing is pinned and all four share the device."""
    from pipeline import devices
    from pipeline.search import loop

    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("PIPELINE_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_gpus() == ["0", "1"]
    # a UUID list with an entry CUDA could not use: device_count() says it kept two
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb,GPU-gone")
    gpus = devices.visible_gpus()
    assert gpus == ["GPU-aa", "GPU-bb"]
    monkeypatch.setenv("PIPELINE_DEVICE", "cpu")
    assert devices.visible_gpus() == []

    slots = devices.worker_slots(4, gpus)
    assert [(s.gpu, s.sharing) for s in slots] == [("GPU-aa", 2), ("GPU-bb", 2), ("GPU-aa", 2), ("GPU-bb", 2)]
    envs = [loop.helper_env(slots, i) for i in (1, 2, 3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["GPU-bb", "GPU-aa", "GPU-bb"]
    assert [e[loop.LOCAL_WORKERS_ENV] for e in envs] == ["2", "2", "2"]
    assert [e["PIPELINE_WORKER_ID"] for e in envs] == ["1", "2", "3"]
    uneven = devices.worker_slots(3, gpus)  # finetune itself shares the first GPU with helper 2
    assert [(s.gpu, s.sharing) for s in uneven] == [("GPU-aa", 2), ("GPU-bb", 1), ("GPU-aa", 2)]

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for one_device in ([], ["0"]):
        slots = devices.worker_slots(4, one_device)
        assert all(s.gpu is None and s.sharing == 4 for s in slots)
        assert "CUDA_VISIBLE_DEVICES" not in loop.helper_env(slots, 3)
