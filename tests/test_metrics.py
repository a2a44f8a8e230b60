import numpy as np

from pipeline.model.metrics import classification_report, confusion_matrix


def test_confusion_and_report():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    report = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report["accuracy"] == 4 / 6
    assert report["per_class"]["b"]["precision"] == 2 / 3
    assert report["per_class"]["b"]["recall"] == 1.0
    assert report["per_class"]["c"]["recall"] == 0.5
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert abs(report["macro_f1"] - np.mean(f1)) < 1e-9


def test_absent_class_does_not_count_in_macro_f1():
    report = classification_report([0, 1], [0, 1], ["a", "b", "c"])
    assert report["macro_f1"] == 1.0
