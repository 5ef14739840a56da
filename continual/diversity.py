"""Which captured frames a person labels next: uncertainty alone, or uncertainty plus diversity.

Labels are the scarce resource, so the choice is made where the labelling budget is spent
(`python -m continual.review export --budget N --select …`), not at capture: capture keeps
filtering cheaply per station (worker/sample_feed.py: uncertainty, an audit share, image-hash
dedup), and this module picks among everything captured, across all stations.

  uncertainty              the `budget` lowest-confidence frames (confidence as served at capture)
  uncertainty+diversity    a pool of the `pool_factor` x budget most uncertain frames, then k-center
                           greedy (the core-set selection of Sener & Savarese, 2018) inside it in the
                           current model's embedding space: each pick is the pool frame farthest from
                           everything picked or already labelled. Two stations filming the same scene
                           (or one camera repeating itself beyond what a 64-bit image hash catches)
                           give near-identical embeddings, and only one of them is labelled.

Embeddings are the model's penultimate features (the head's input, via continual.fewshot's hook),
centred on the embedded set's mean and L2-normalised (SimpleShot's CL2N: ReLU features all share
one orthant, so uncentred they all look alike).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .store import SampleStore, StoredSample

STRATEGIES = ("uncertainty", "uncertainty+diversity")
ALIASES = {"diverse": "uncertainty+diversity"}  # the review CLI's short name
POOL_FACTOR = 3

Embed = Callable[[Sequence[StoredSample]], np.ndarray]


def kcenter_greedy(embeddings: np.ndarray, k: int, already_selected: Sequence[int] = (),
                   weights: np.ndarray | None = None) -> list[int]:
    """Indices of `k` rows of `embeddings` (n, d), picked one at a time, each the row farthest (Euclidean)
    from the rows already chosen and from `already_selected` (indices of rows that count as chosen —
    frames labelled before — and are never returned). With `weights` (n,), a row's distance is multiplied
    by its weight (e.g. its uncertainty), so of two equally novel frames the less certain one wins.

    Deterministic: the first pick without `already_selected` is the row farthest from the mean (times its
    weight), and ties go to the lowest index. Fewer than `k` rows left: all of them."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    chosen = np.zeros(n, dtype=bool)
    centres = [int(i) for i in already_selected]
    chosen[centres] = True
    # Distance of each row to its nearest centre, kept up to date one pick at a time: O(n·d) per pick.
    min_dist = np.full(n, np.inf)
    for c in centres:
        min_dist = np.minimum(min_dist, np.linalg.norm(x - x[c], axis=1))
    if not centres and n:
        # No centre yet: "farthest from the mean" (times the weight) starts at an extreme, as a random
        # start would on average, but reproducibly.
        min_dist = np.linalg.norm(x - x.mean(0), axis=1)
    picks: list[int] = []
    while len(picks) < k and not chosen.all():
        i = int(np.argmax(np.where(chosen, -np.inf, min_dist * w)))
        picks.append(i)
        chosen[i] = True
        d = np.linalg.norm(x - x[i], axis=1)
        # The distance to the mean was only a stand-in for the first pick: replace it, never min with it.
        min_dist = np.minimum(min_dist, d) if centres or len(picks) > 1 else d
    return picks


def uncertainty(sample: StoredSample) -> float:
    """1 - the served confidence. A frame without one (no prediction recorded) counts as certain: nothing
    says it is hard, and the audit share already covers frames the model was sure about."""
    return 1.0 - sample.confidence if sample.confidence is not None else 0.0


def by_uncertainty(samples: Sequence[StoredSample]) -> list[StoredSample]:
    """Most uncertain first; ties in capture order (the order `samples` came in), so runs agree."""
    return sorted(samples, key=uncertainty, reverse=True)


def select(samples: Sequence[StoredSample], budget: int, strategy: str = "uncertainty", embed: Embed | None = None,
           already_labelled: Sequence[StoredSample] = (), pool_factor: float = POOL_FACTOR,
           weighted: bool = False) -> list[StoredSample]:
    """At most `budget` of `samples` to label, by `strategy` (STRATEGIES, or "diverse").

    uncertainty+diversity needs `embed` (e.g. `embedder(artifact)`); `already_labelled` frames (labelled,
    not yet trained on) count as picked, so nothing close to them is asked for again. `weighted` multiplies
    each pool frame's distance by its uncertainty (off by default: the pool is already the uncertain end)."""
    strategy = ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; one of {', '.join(STRATEGIES)} or diverse")
    if budget <= 0:
        return []
    ranked = by_uncertainty(samples)
    if strategy == "uncertainty":
        return ranked[:budget]
    pool = ranked[: max(budget, round(pool_factor * budget))]
    if len(pool) <= budget:
        return pool
    if embed is None:
        raise ValueError("uncertainty+diversity needs an embedding function (continual.diversity.embedder)")
    labelled = list(already_labelled)
    emb = embed([*labelled, *pool])
    weights = np.array([1.0] * len(labelled) + [uncertainty(s) for s in pool]) if weighted else None
    picks = kcenter_greedy(emb, budget, already_selected=range(len(labelled)), weights=weights)
    return [pool[i - len(labelled)] for i in picks]


def embedder(artifact: Path | str, batch_size: int = 64) -> Embed:
    """Stored samples -> (n, d) centred, L2-normalised penultimate features of the model at `artifact`
    (an artifact folder with its float weights: `python -m worker.registry fetch VERSION DIR --float`).
    The model is loaded once; images are decoded exactly as the worker decodes them."""
    from trainer.data import Sample
    from worker.artifact import load_float_model, read_manifest

    from .fewshot import _unit, features_and_logits

    manifest = read_manifest(artifact)
    model = load_float_model(artifact, manifest)

    def embed(samples: Sequence[StoredSample]) -> np.ndarray:
        if not samples:
            return np.zeros((0, 0), np.float32)
        # Absolute image paths under root "/": the store's files are read where they are.
        feats, _ = features_and_logits(model, Path("/"), [Sample(str(s.path.resolve()), 0, s.sha256)
                                                          for s in samples], manifest, batch_size)
        return _unit(feats - feats.mean(0))

    return embed


def for_review(store: SampleStore, strategy: str, budget: int | None, model: Path | str | None) -> list[StoredSample]:
    """What `python -m continual.review export --select STRATEGY --budget N [--model DIR]` exports: `budget`
    (default: all) of the store's unlabelled frames, across all stations. Labels given but not yet trained on
    count as picked for the diversity term. ValueError says what is missing."""
    strategy = ALIASES.get(strategy, strategy)
    samples = store.unlabeled()
    budget = len(samples) if budget is None else budget
    embed = None
    if strategy == "uncertainty+diversity":
        if model is None:
            raise ValueError("--select diverse embeds frames with the current model: pass --model DIR, an artifact "
                             "folder with float weights (python -m worker.registry fetch VERSION DIR --float)")
        embed = embedder(model)
    return select(samples, budget, strategy, embed=embed,
                  already_labelled=store.new_labels() if embed is not None else ())
