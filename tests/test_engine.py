from collections import Counter

import numpy as np
import torch
from torch import nn

from pipeline.devices import Runtime
from pipeline.model.engine import ArraySource, ResidentInputs, ResidentSource, epoch_view_order, train


class RecordingSource(ArraySource):
    """Records which view of which item each training batch read."""

    def __init__(self, array, labels):
        super().__init__(array, labels)
        self.reads = []

    def batch(self, indices, views):
        self.reads += list(zip(indices.tolist(), views.tolist(), strict=True))
        return super().batch(indices, views)


def test_epoch_view_order_walks_a_permutation_of_the_views_per_item():
    order = epoch_view_order(np.random.default_rng(0), n=50, views=4)
    assert order.shape == (50, 4)
    assert all(sorted(row) == [0, 1, 2, 3] for row in order.tolist())
    assert len({tuple(row) for row in order.tolist()}) > 1  # items do not share one order


def test_training_sees_every_cached_view_of_every_item_once_per_views_epochs():
    n, views, dim = 24, 3, 5
    generator = torch.Generator().manual_seed(0)
    train_source = RecordingSource(torch.randn(n, views, dim, generator=generator).numpy(),
                                   np.arange(n) % 2)
    val_source = ArraySource(torch.randn(8, 1, dim, generator=generator).numpy(), np.arange(8) % 2)
    model = nn.Linear(dim, 2)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), train_source, val_source,
          epochs=2 * views, batch_size=5, runtime=Runtime(torch.device("cpu"), None), seed=1)
    first, second = train_source.reads[: n * views], train_source.reads[n * views :]
    # views epochs: each (item, view) exactly once; then the same walk again
    assert Counter(first) == Counter({(i, v): 1 for i in range(n) for v in range(views)})
    assert Counter(second) == Counter(first)


def test_an_ensemble_checkpoint_predicts_its_members_mean_probabilities(tmp_path):
    """The shipped fine-tuned model: M seeds' top blocks on one frozen bottom. Saved and loaded
    as a checkpoint, it returns what averaging its members' probabilities by hand gives."""
    import copy

    from pipeline.model.backbones import build_backbone
    from pipeline.model.checkpoints import load_classifier, save_checkpoint
    from pipeline.model.heads import EnsembleClassifier, Head, TopModel

    torch.manual_seed(0)
    backbone = build_backbone("tf_efficientnet_lite0", "none").eval()
    k, classes = 2, 3
    members = []
    for _ in range(2):
        top = copy.deepcopy(TopModel.top_of(backbone, Head(backbone.num_features, classes, 0.0), k))
        with torch.no_grad():
            for p in top.parameters():
                p.add_(0.05 * torch.randn_like(p))  # members differ, as seeds would make them
        members.append(top.eval())
    ensemble = EnsembleClassifier(copy.deepcopy(backbone), members).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cut = backbone.forward_blocks(x, 0, len(backbone.blocks) - k)
        by_hand = torch.stack([torch.softmax(m(cut), dim=1) for m in members]).mean(0)
        assert torch.allclose(torch.softmax(ensemble(x), dim=1), by_hand, atol=1e-6)
        assert not torch.allclose(torch.softmax(members[0](cut), dim=1), by_hand, atol=1e-4)

    config = {"backbone": "tf_efficientnet_lite0", "backbone_weights": "none", "num_features": backbone.num_features,
              "dropout": 0.0, "classes": ["a", "b", "c"], "image_size": 64, "input_config": {}, "k": k,
              "members": [{"seed": 1}, {"seed": 2}]}
    save_checkpoint(tmp_path, ensemble.state_dict(), config)
    loaded, _ = load_classifier(tmp_path)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(loaded(x), dim=1), by_hand, atol=1e-6)


def test_a_resident_source_gathers_the_same_batches_and_trains_the_same_model():
    """ResidentSource (the cache held on the device; RAM here) is a faster reader of the same
    array: identical batches, labels and training history as the memmap reader."""
    n, views, dim = 30, 2, 6
    generator = torch.Generator().manual_seed(2)
    array = torch.randn(n, views, dim, generator=generator).to(torch.float16).numpy()
    labels = np.arange(n) % 3
    positions = np.array([p for p in range(n) if p % 7])  # a subset, as audit exclusion leaves
    cpu = Runtime(torch.device("cpu"), None)
    mapped = ArraySource(array, labels, positions)
    resident = mapped.resident(cpu)
    assert isinstance(resident, ResidentSource) and len(resident) == len(mapped) == len(positions)
    idx, chosen = np.array([4, 0, 9, 2]), np.array([1, 0, 1, 1])
    assert torch.equal(resident.batch(idx, chosen), mapped.batch(idx, chosen))
    assert torch.equal(resident.batch(idx, None), mapped.batch(idx, None))
    assert torch.equal(resident.targets(idx), mapped.targets(idx))
    assert mapped.resident(cpu, share=0.0) is mapped  # nothing fits: stays a memmap reader

    def history(source):
        torch.manual_seed(0)
        model = nn.Linear(dim, 3)
        val = ArraySource(array[:8], labels[:8])
        _, out = train(model, torch.optim.AdamW(model.parameters(), lr=0.05), source, val, epochs=4,
                       batch_size=7, runtime=cpu, seed=3)
        return [vars(r) for r in out]

    assert history(resident) == history(mapped)


def test_inference_batch_size_is_the_number_given_or_chosen_for_the_device():
    cpu = Runtime(torch.device("cpu"), None)
    assert cpu.inference_batch_size(48) == 48
    assert cpu.inference_batch_size("auto") == 64


def k_sources(k: int, train_rows: int = 10):
    """A k's (train, val) cached inputs as float16 memmap-like arrays: 12 bytes a train row
    (2 views), 6 a val row; values that tell the k apart."""
    rng = np.random.default_rng(k)
    train_array = rng.normal(size=(train_rows, 2, 3)).astype(np.float16)
    val_array = rng.normal(size=(5, 1, 3)).astype(np.float16)
    return (ArraySource(train_array, np.arange(train_rows) % 2),
            ArraySource(val_array, np.arange(5) % 2, positions=np.arange(5)))


def test_resident_inputs_stay_within_their_budget_letting_the_least_recently_used_k_go(monkeypatch):
    """A study moving between k keeps at most its budget on the device: 1,600 bytes free and
    one process give a quarter, 400 bytes; each k takes 150 (120 train + 30 val), so two fit."""
    monkeypatch.setattr(Runtime, "free_bytes", lambda self: 1600)
    inputs = ResidentInputs(Runtime(torch.device("cpu"), None), sharing=1)
    asked = []

    def sources(k):
        asked.append(k)
        return k_sources(k)

    first = inputs.get(1, sources)
    assert inputs.budget == 400 and all(isinstance(s, ResidentSource) for s in first)
    assert inputs.get(1, sources) is first and asked == [1]  # held: not read again
    inputs.get(2, sources)
    inputs.get(3, sources)  # 450 bytes with k=1 and 2: k=1, the least recently used, goes
    assert list(inputs.held) == [2, 3] and inputs.held_bytes() == 300
    inputs.get(2, sources)
    inputs.get(1, sources)  # k=3 is now the least recently used
    assert list(inputs.held) == [2, 1] and inputs.loads == 4 and asked == [1, 2, 3, 1]

    # a held k's batches are the memmap's, view for view
    train_held, _ = inputs.held[1]
    train_source, _ = k_sources(1)
    indices, views = np.array([7, 0, 3]), np.array([1, 0, 1])
    assert torch.equal(train_held.batch(indices, views), train_source.batch(indices, views))
    assert torch.equal(train_held.targets(indices), train_source.targets(indices))

    too_large = inputs.get(4, lambda k: k_sources(k, train_rows=40))  # 510 bytes alone
    assert all(isinstance(s, ArraySource) for s in too_large)  # read from the host, nothing let go
    assert list(inputs.held) == [2, 1]


def test_processes_sharing_the_device_split_the_budget(monkeypatch):
    monkeypatch.setattr(Runtime, "free_bytes", lambda self: 1600)
    inputs = ResidentInputs(Runtime(torch.device("cpu"), None), sharing=4)
    assert all(isinstance(s, ArraySource) for s in inputs.get(1, k_sources))  # 150 > 100 bytes
    assert inputs.budget == 100 and not inputs.held
