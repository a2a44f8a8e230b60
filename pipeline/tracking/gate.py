"""Pure: the promotion gate. A challenger replaces the champion only when it is significantly
better on the same test images: an exact one-sided McNemar test on per-image correctness, plus a
minimum accuracy gain."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    n: int  # test images both models were scored on
    challenger_accuracy: float
    champion_accuracy: float | None
    only_challenger_right: int  # discordant pairs: b
    only_champion_right: int  # c
    p_value: float | None  # P(at least b of b+c discordant pairs favour the challenger | no difference)
    significance: float
    min_gain: float

    def as_tags(self) -> dict[str, str]:
        return {f"gate.{k}": ("" if v is None else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Decision:
        """The decision recorded on a registry version (the inverse of as_tags)."""
        kinds = {f.name: f.type for f in fields(cls)}

        def parse(name: str, text: str):
            if text == "" and "None" in kinds[name]:
                return None
            if kinds[name] == "bool":
                return text == "True"
            if kinds[name] == "str":
                return text
            return int(text) if kinds[name] == "int" else float(text)

        return cls(**{name: parse(name, tags[f"gate.{name}"]) for name in kinds})


def mcnemar_exact_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value: binomial tail P(X >= b), X ~ Bin(b + c, 1/2)."""
    if b + c == 0:
        return 1.0  # no discordant pair: no evidence either way
    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def decide(
    challenger_correct: np.ndarray | None,
    champion_correct: np.ndarray | None,
    significance: float,
    min_gain: float,
    without_champion: str = "no comparable champion",
) -> Decision:
    """challenger_correct / champion_correct: per-image booleans on the same test images.

    champion_correct None means there is no comparable champion (`without_champion` says why):
    the challenger is promoted.
    """
    challenger = np.asarray(challenger_correct, dtype=bool)
    accuracy = float(challenger.mean()) if len(challenger) else 0.0
    if champion_correct is None:
        return Decision(True, without_champion, len(challenger), accuracy, None, 0, 0, None,
                        significance, min_gain)
    champion = np.asarray(champion_correct, dtype=bool)
    if champion.shape != challenger.shape:
        raise ValueError("champion and challenger must be scored on the same images")
    b = int((challenger & ~champion).sum())
    c = int((~challenger & champion).sum())
    p = mcnemar_exact_p(b, c)
    champion_accuracy = float(champion.mean()) if len(champion) else 0.0
    gain = accuracy - champion_accuracy
    if p >= significance:
        promote, reason = False, f"not significant (p={p:.4g} >= {significance})"
    elif gain < min_gain:
        promote, reason = False, f"gain {gain:+.4f} below the minimum {min_gain}"
    else:
        promote, reason = True, f"significantly better (p={p:.4g}, gain {gain:+.4f})"
    return Decision(promote, reason, len(challenger), accuracy, champion_accuracy, b, c, p,
                    significance, min_gain)
