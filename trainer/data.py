"""Image folders: scan, check, split by content hash, and the datasets that feed training and evaluation.

Layout: root/<class>/<image>, any format OpenCV reads (grayscale and RGBA become RGB), any size.

- `scan_folder` reads every file once: its sha256 and whether it decodes. Unreadable files are
  listed and skipped; byte-identical files are grouped, and a file whose content appears under two
  classes is dropped as a label conflict.
- `check_dataset` reports what a person must know before training: class imbalance beyond 1:3,
  unreadable files, classes too small to split.
- `make_split` is stratified per class and keeps every content hash within one split; it is a
  pure function of the scan, the ratios and the seed. `save_split` / `load_split` keep it as JSON.
  A fine-tune's split (continual.dataset) may also have a `replay` part: earlier data it rehearses
  beside its new `train` samples, drawn afresh each epoch (TrainConfig.replay_per_epoch).
- `EvalDataset` preprocesses exactly as the worker does (worker.preprocess.decode_image, then
  `collate_eval` uses to_batch); `TrainDataset` decodes with the same function at a slightly
  larger size and applies torchvision v2 augmentations on uint8 tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import structlog
import torch

from worker.frames import FrameError, image_format
from worker.preprocess import decode_image, to_batch

log = structlog.get_logger("visionqueue.data")

SPLITS = ("train", "val", "test")
REPLAY = "replay"  # optional part: old samples a fine-tune rehearses (trainer.train draws from it per epoch)
DEFAULT_RATIOS = (0.6, 0.2, 0.2)
IMBALANCE_LIMIT = 3.0  # the tutorial's rule: classes should differ by no more than 1:3
MIN_PER_CLASS = 3  # one image in each of train, val and test
FEW_PER_CLASS = 20  # below this, a class trains and measures poorly: warn
SPLIT_FORMAT = "visionqueue-split"


class DataError(ValueError):
    """A data set that cannot be trained on as it is; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, POSIX separators
    label: int
    sha256: str


@dataclass
class Scan:
    root: Path
    classes: list[str]
    samples: list[Sample]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: int = 0  # files whose content another file of the same class already has
    conflicts: list[str] = field(default_factory=list)  # same content under different classes

    def counts(self) -> dict[str, int]:
        """Unique images (content hashes) per class."""
        seen: dict[int, set[str]] = defaultdict(set)
        for s in self.samples:
            seen[s.label].add(s.sha256)
        return {name: len(seen[i]) for i, name in enumerate(self.classes)}


# -- reading images -----------------------------------------------------------------------------
def image_bytes(data: bytes) -> bytes:
    """JPEG or PNG bytes the worker's decoder accepts: the file itself, or other formats re-encoded as PNG."""
    try:
        image_format(data)
        return data
    except FrameError:
        pass
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DataError("not an image OpenCV can decode")
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise DataError("could not re-encode as PNG")
    return buf.tobytes()


def read_image(path: Path) -> bytes:
    return image_bytes(path.read_bytes())


def _probe(data: bytes) -> None:
    """Decode as the worker would (small output: libjpeg's reduced decode keeps this cheap)."""
    try:
        decode_image(image_bytes(data), (16, 16))
    except FrameError as exc:
        raise DataError(str(exc)) from exc


# -- scanning -------------------------------------------------------------------------------------
def list_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: Path | str, class_names: Sequence[str] | None = None) -> Scan:
    """Read every file under root/<class>/ once: hash it and check it decodes.

    `class_names` fixes the label order (e.g. a model's classes); a folder that is not among
    them is an error, a class without a folder simply has no samples.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
    folders = list_classes(root)
    if class_names is None:
        classes = folders
    else:
        classes = list(class_names)
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(f"{root} has class folders the model does not know: {', '.join(unknown)}")
    if not classes:
        raise DataError(f"{root} has no class folders: expected root/<class>/<image files>")
    samples: list[Sample] = []
    unreadable: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
                _probe(data)
            except (OSError, DataError) as exc:
                unreadable.append((rel, str(exc)))
                continue
            samples.append(Sample(rel, label, hashlib.sha256(data).hexdigest()))
    labels_of: dict[str, set[int]] = defaultdict(set)
    for s in samples:
        labels_of[s.sha256].add(s.label)
    conflicting = {h for h, labels in labels_of.items() if len(labels) > 1}
    conflicts = sorted(s.path for s in samples if s.sha256 in conflicting)
    kept = [s for s in samples if s.sha256 not in conflicting]
    duplicates = len(kept) - len({s.sha256 for s in kept})
    scan = Scan(root, classes, kept, unreadable, duplicates, conflicts)
    for rel, reason in unreadable:
        log.warning("unreadable file skipped", path=rel, reason=reason)
    if conflicts:
        log.warning("identical images under different classes dropped", files=conflicts)
    return scan


# -- checks ---------------------------------------------------------------------------------------
@dataclass
class DataReport:
    counts: dict[str, int]
    imbalance: float
    warnings: list[str]
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_dataset(scan: Scan, min_per_class: int = MIN_PER_CLASS) -> DataReport:
    """Plain-language findings; `errors` mean training cannot start."""
    counts = scan.counts()
    warnings: list[str] = []
    errors: list[str] = []
    present = {k: v for k, v in counts.items() if v > 0}
    imbalance = max(present.values()) / min(present.values()) if present else 0.0
    if len(present) < 2:
        errors.append(f"need at least 2 classes with images, found {len(present)}: {counts}")
    if imbalance > IMBALANCE_LIMIT:
        big = max(present, key=present.__getitem__)
        small = min(present, key=present.__getitem__)
        warnings.append(
            f"class imbalance {imbalance:.1f}:1 ({big}: {present[big]}, {small}: {present[small]}) is beyond "
            f"1:{IMBALANCE_LIMIT:g}; consider --focal-loss or --balanced-sampling"
        )
    too_few = {k: v for k, v in counts.items() if v < min_per_class}
    if too_few:
        listed = ", ".join(f"{k} ({v})" for k, v in too_few.items())
        errors.append(
            f"classes with too few images to split into train/val/test (need {min_per_class} distinct "
            f"images each): {listed}; add images or remove the folder"
        )
    few = {k: v for k, v in counts.items() if min_per_class <= v < FEW_PER_CLASS}
    if few:
        warnings.append("classes with fewer than "
                        f"{FEW_PER_CLASS} images will train and measure poorly: "
                        + ", ".join(f"{k} ({v})" for k, v in few.items()))
    if scan.unreadable:
        shown = "; ".join(f"{p}: {r}" for p, r in scan.unreadable[:10])
        more = f" (and {len(scan.unreadable) - 10} more)" if len(scan.unreadable) > 10 else ""
        warnings.append(f"{len(scan.unreadable)} unreadable files skipped: {shown}{more}")
    if scan.conflicts:
        warnings.append(f"{len(scan.conflicts)} files with identical content under different classes dropped: "
                        + ", ".join(scan.conflicts[:10]))
    if scan.duplicates:
        warnings.append(f"{scan.duplicates} duplicate files (same content, same class) kept together in one split")
    return DataReport(counts, round(imbalance, 3), warnings, errors)


# -- splitting ------------------------------------------------------------------------------------
@dataclass
class Split:
    root: Path
    classes: list[str]
    seed: int
    ratios: tuple[float, float, float]
    parts: dict[str, list[Sample]]

    def __getitem__(self, name: str) -> list[Sample]:
        return self.parts[name]

    def counts(self) -> dict[str, dict[str, int]]:
        return {part: dict(Counter(self.classes[s.label] for s in samples)) for part, samples in self.parts.items()}

    def fit_samples(self) -> list[Sample]:
        """What the model is fitted on: train and the replay part, if any (int8 calibration sees both)."""
        return [*self.parts["train"], *self.parts.get(REPLAY, [])]


T = TypeVar("T")


def balanced_subset(items: Sequence[T], n: int, seed: int, label: Callable[[T], int]) -> list[T]:
    """Up to n items, as evenly spread over labels as the data allows (a seeded draw)."""
    by_class: dict[int, list[T]] = defaultdict(list)
    for item in items:
        by_class[label(item)].append(item)
    rng = random.Random(seed)
    for group in by_class.values():
        rng.shuffle(group)
    picked: list[T] = []
    while len(picked) < n and any(by_class.values()):
        for key in sorted(by_class):
            if by_class[key] and len(picked) < n:
                picked.append(by_class[key].pop())
    return picked


def _part_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) sizes for n groups: rounded shares, val and test at least 1 when n >= 3."""
    total = sum(ratios)
    n_val = round(n * ratios[1] / total)
    n_test = round(n * ratios[2] / total)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = n - n_val - n_test
    if n_train < 1 and n >= 3:
        n_train, n_val = 1, n - 1 - n_test
    return n_train, n_val, n_test


def make_split(scan: Scan, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0) -> Split:
    """Stratified split by content hash: identical files always share a split; same inputs, same split."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"split ratios must be three non-negative numbers, got {ratios}")
    by_class: dict[int, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for s in scan.samples:
        by_class[s.label][s.sha256].append(s)
    parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in range(len(scan.classes)):
        groups = by_class.get(label, {})
        hashes = sorted(groups)
        order = np.random.default_rng([seed, label]).permutation(len(hashes))
        hashes = [hashes[i] for i in order]
        n_train, n_val, _ = _part_sizes(len(hashes), ratios)
        for i, h in enumerate(hashes):
            part = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            parts[part].extend(sorted(groups[h], key=lambda s: s.path))
    for part in parts.values():
        part.sort(key=lambda s: (s.label, s.path))
    return Split(scan.root, list(scan.classes), seed, tuple(float(r) for r in ratios), parts)


def save_split(split: Split, path: Path | str) -> None:
    doc = {
        "format": SPLIT_FORMAT,
        "version": 1,
        "root": str(Path(split.root).resolve()),
        "seed": split.seed,
        "ratios": list(split.ratios),
        "classes": split.classes,
        "counts": split.counts(),
        "splits": {part: [[s.path, s.label, s.sha256] for s in samples] for part, samples in split.parts.items()},
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_split(path: Path | str, root: Path | str | None = None) -> Split:
    """A saved split; `root` overrides the data folder it was made from (e.g. after a move)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != SPLIT_FORMAT:
        raise DataError(f"{path} is not a split file")
    parts = {part: [Sample(p, int(label), h) for p, label, h in rows] for part, rows in doc["splits"].items()}
    return Split(Path(root or doc["root"]), list(doc["classes"]), int(doc["seed"]),
                 tuple(doc["ratios"]), parts)


def all_samples(scan: Scan) -> Split:
    """A 'split' whose test part is every sample: for evaluating on another data set."""
    samples = sorted(scan.samples, key=lambda s: (s.label, s.path))
    return Split(scan.root, list(scan.classes), 0, (0.0, 0.0, 1.0), {"train": [], "val": [], "test": samples})


# -- datasets -------------------------------------------------------------------------------------
class EvalDataset(torch.utils.data.Dataset):
    """(RGB uint8 HWC array at the model's input size, label): exactly the worker's decode."""

    def __init__(self, root: Path | str, samples: Sequence[Sample], input_size: Sequence[int]) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        s = self.samples[i]
        return decode_image(read_image(self.root / s.path), self.input_size), s.label


def collate_eval(
    batch: list[tuple[np.ndarray, int]], mean: Sequence[float], std: Sequence[float], pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch, strict=True)
    return to_batch(list(images), list(mean), list(std), pad_to=pad_to), torch.tensor(labels, dtype=torch.long)


def eval_loader(
    dataset: EvalDataset, mean: Sequence[float], std: Sequence[float], batch_size: int = 32,
    pad_to: int | None = None, workers: int = 0,
) -> torch.utils.data.DataLoader:
    def collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_eval(batch, mean, std, pad_to)

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate)


TRAIN_DECODE_SCALE = 1.25  # decode training images a little larger than the input, then crop
CACHE_LIMIT_BYTES = 2 << 30


class TrainDataset(torch.utils.data.Dataset):
    """Decoded with OpenCV (squashed like the worker, at 1.25x the input), augmented as uint8 CHW tensors.

    Decoded images are cached in memory when they fit in `cache_limit` bytes (the set is read once).
    """

    def __init__(self, root: Path | str, samples: Sequence[Sample], input_size: Sequence[int],
                 transform: Callable[[torch.Tensor], torch.Tensor], cache_limit: int = CACHE_LIMIT_BYTES) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        h, w = int(input_size[0]), int(input_size[1])
        self.decode_size = (math.ceil(h * TRAIN_DECODE_SCALE), math.ceil(w * TRAIN_DECODE_SCALE))
        self.transform = transform
        per_image = self.decode_size[0] * self.decode_size[1] * 3
        self._cache: dict[int, torch.Tensor] | None = {} if per_image * len(self.samples) <= cache_limit else None

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def _load(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rgb = decode_image(read_image(self.root / self.samples[i].path), self.decode_size)
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
        if self._cache is not None:
            self._cache[i] = tensor
        return tensor

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._load(i)), self.samples[i].label
