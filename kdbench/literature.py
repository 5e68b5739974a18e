"""Published top-1 numbers from the literature, next to kdbench's cells.

``kdbench/references/literature-cifar100.csv`` (a copy of the curated table in
``shared/reference/literature``) holds 464 numbers read from the README of the CRD
(RepDistiller), DKD and DOT (mdistiller), DIST and logit-standardisation (LS) repositories, and
from torchdistill's ImageNet benchmark, each with its source, repository, commit, file and
protocol. Names are written as each source prints them (``wrn-40-2``, ``WRN-40-2``,
``Wrn_40_2``, ``ResNet-8x4``, ``SHN-V2``, ``MN-V2``, ...). This module is the one place that
maps them to kdbench's names:

* :data:`MODELS`: every model spelling -> the kdbench zoo model of that architecture (the
  RepDistiller/mdistiller CIFAR definitions kdbench reproduces), or ``None`` for nets kdbench
  has no model for (ImageNet-only nets, the LS ViT students).
* :data:`METHODS`: every method spelling -> kdbench's method-set name (the ``ref_method`` /
  label convention of kdbench's recipes: ``KD``, ``CRD+KD``, ``MLLD`` for MLKD, ``DOT`` for
  KD trained with DOT, ``KD+LS`` for KD with logit standardisation, ``teacher``, ``student``);
  a method kdbench does not have keeps its own name. :data:`SOURCE_METHODS` holds the names
  that mean something only within one source (LS's "KD+Ours" is KD+LS).
* :data:`DATASETS`: the CSV's datasets -> the kdbench dataset whose cells they are compared
  with. Only CIFAR-100 is: the Tiny-ImageNet numbers are of mdistiller's own Tiny-ImageNet
  nets (``mv2_tinyimagenet``, an ImageNet ResNet-18), and kdbench has no ImageNet dataset.

A spelling missing from these tables is an error when the CSV is read (:func:`load`), never a
silently dropped row. ``top1`` is parsed as printed: ``75.61``, ``74.43±0.24`` (mean and the
source's spread) or ``N/A`` (the source prints no number; shown as such).

Which published rows belong to a leaderboard cell (:func:`pair_models`, :func:`method_name`):

* the dataset: the records' kdbench dataset (``spec.dataset.name``) through :data:`DATASETS`;
* the pair, each side on its own: the model's kdbench name (``spec.model.name`` of the student
  record, and of the teacher record it names by ``teacher_id``) when it is a zoo model the
  literature names (a value of :data:`MODELS`). For any other model (a generic plugin such as
  ``wrn`` with depth and widen factor, ``timm``, one's own) the pair's ``ref_teacher`` /
  ``ref_student`` is used, when it is a spelling :data:`MODELS` knows, but only when the
  recipe's ``[reference]`` names no paper ``table``: with a table those are the paper's names.
  A ref name that contradicts a zoo model's name is reported under the table; the trained
  model's name counts;
* the row: the method set's ``ref_method``, else its label, through :data:`METHODS` (so
  "MLKD" and "MLLD", "KD+DOT" and "DOT" are the same row); the teacher row is the teacher
  objective the recipe marks ``ref_teacher = true`` (the published teachers are CE-trained),
  as for the paper's numbers.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from kdbench.api import UserError

CSV_PATH = "references/literature-cifar100.csv"
COLUMNS = ("source", "repo", "commit", "file", "dataset", "setting", "teacher", "student",
           "method", "top1", "protocol")

# ------------------------------------------------------------------------------ the names
# kdbench's CIFAR zoo (`kdbench list`): every kdbench name is also a spelling of itself.
ZOO = ("wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1", "resnet8", "resnet14", "resnet20",
       "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "resnet18",
       "resnet34", "resnet50", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2",
       "shufflenetv1", "shufflenetv2")

MODELS: dict[str, str | None] = {
    **{name: name for name in ZOO},
    # RepDistiller README (CRD): wrn-40-2, resnet32x4, ResNet50 (resnetv2 Bottleneck [3,4,6,3]),
    # MobileNetV2 (= mobile_half, width 0.5: kdbench's mobilenetv2), ShuffleNetV1/V2.
    "wrn-40-2": "wrn_40_2", "wrn-16-2": "wrn_16_2", "wrn-40-1": "wrn_40_1", "wrn-16-1": "wrn_16_1",
    "ResNet50": "resnet50", "MobileNetV2": "mobilenetv2",
    "ShuffleNetV1": "shufflenetv1", "ShuffleNetV2": "shufflenetv2",
    # RepDistiller / mdistiller model_dict keys (what recipes often write as ref names).
    "ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2", "mobile_half": "mobilenetv2",
    # mdistiller README (DKD, DOT): WRN-40-2, ResNet32x4, VGG13, MobileNet-V2, ShuffleNet-V1.
    "WRN-40-2": "wrn_40_2", "WRN-16-2": "wrn_16_2", "WRN-40-1": "wrn_40_1", "WRN-16-1": "wrn_16_1",
    "ResNet20": "resnet20", "ResNet32": "resnet32", "ResNet56": "resnet56",
    "ResNet110": "resnet110", "ResNet8x4": "resnet8x4", "ResNet32x4": "resnet32x4",
    "ResNet18": "resnet18", "ResNet34": "resnet34",
    "VGG8": "vgg8", "VGG13": "vgg13",
    "MobileNet-V2": "mobilenetv2", "ShuffleNet-V1": "shufflenetv1", "ShuffleNet-V2": "shufflenetv2",
    # LS README: Wrn_40_2, MN-V2, SHN-V2.
    "Wrn_40_2": "wrn_40_2", "Wrn_16_2": "wrn_16_2", "Wrn_40_1": "wrn_40_1",
    "MN-V2": "mobilenetv2", "SHN-V1": "shufflenetv1", "SHN-V2": "shufflenetv2",
    # DIST README (CIFAR table): ResNet-56, ResNet-8x4, ResNet-50 (its CIFAR ResNet50: the
    # 79.34 teacher is RepDistiller's).
    "ResNet-20": "resnet20", "ResNet-32": "resnet32", "ResNet-56": "resnet56",
    "ResNet-110": "resnet110", "ResNet-8x4": "resnet8x4", "ResNet-32x4": "resnet32x4",
    "ResNet-50": "resnet50",
    # No kdbench model: ImageNet-only spellings (torchvision/timm nets) and the LS ViT students.
    "ResNet-18": None, "ResNet-34": None, "ResNet-101": None, "ResNet-152": None,
    "ResNet-50-SB": None, "Swin-L": None, "Swin-T": None, "EfficientNet-B0": None,
    "MobileNet V1": None, "MobileNet-V1": None, "MobileNet V2": None,
    "DeiT-Tiny": None, "T2T-ViT-7": None, "PiT-Tiny": None, "PVT-Tiny": None,
}

# kdbench's method-set names (the recipes' ref_method/label convention).
KDBENCH_METHODS = ("teacher", "student", "KD", "FitNet", "AT", "SP", "CC", "VID", "RKD", "PKT",
                   "AB", "FT", "FSP", "NST", "CRD", "CRD+KD", "OFD", "ReviewKD", "DKD", "DIST",
                   "CTKD", "MLLD", "DOT", "KD+LS", "CTKD+LS", "DKD+LS", "MLLD+LS", "DIST+LS")

METHODS: dict[str, str] = {
    **{name: name for name in KDBENCH_METHODS},
    "MLKD": "MLLD",  # Jin et al. CVPR 2023; kdbench's plugin is `mlld`
    "KD+DOT": "DOT",  # mdistiller: KD trained with the DOT optimiser
    "KD (T=4)": "KD",  # DIST README's KD column
    "KR": "ReviewKD",  # "knowledge review" (torchdistill's name for ReviewKD)
    "KD w/ LS": "KD+LS",  # torchdistill's name for KD with logit standardisation
    "MLKD+LS": "MLLD+LS",
    # Methods kdbench has no plugin for keep their own names.
    "ECCV2022": "ECCV2022",  # the LS README's ViT baseline column
    "Tf-KD": "Tf-KD", "SSKD": "SSKD", "L2": "L2", "PAD-L2": "PAD-L2", "ICKD": "ICKD",
    "SRD": "SRD", "DIST+": "DIST+",
}

# Names that mean something only in one source (by source key).
SOURCE_METHODS: dict[str, dict[str, str]] = {
    "LS": {"KD+Ours": "KD+LS", "CTKD+Ours": "CTKD+LS", "DKD+Ours": "DKD+LS",
           "MLKD+Ours": "MLLD+LS"},
}

DATASETS: dict[str, str | None] = {
    "CIFAR-100": "cifar100",
    "Tiny-ImageNet": None,  # mdistiller's own Tiny-ImageNet nets, not kdbench's zoo
    "ImageNet": None,  # kdbench has no ImageNet dataset
}

# What each source's README and scripts say about how its numbers were obtained (from the
# CSV's protocol column and shared/reference/literature/README.md), in the leaderboard's words.
# (epoch reported, runs, precision, teachers)
PROTOCOLS: dict[str, tuple[str, str, str, str]] = {
    "CRD": ("last (train_student.py: \"the results reported in the paper/README is from the "
            "last epoch\")", "not stated", "fp32 (no autocast in RepDistiller's loops)",
            "RepDistiller's released checkpoints (ckpt_epoch_240)"),
    "DKD": ("not stated; mdistiller's trainer logs the best test accuracy (best_acc)",
            "not stated", "fp32 (no autocast in mdistiller's trainer)",
            "mdistiller's released CIFAR teachers (ckpt_epoch_240)"),
    "DOT": ("not stated; mdistiller's trainer logs the best test accuracy (best_acc)",
            "not stated", "fp32 (no autocast in mdistiller's trainer)",
            "mdistiller's released CIFAR teachers (ckpt_epoch_240)"),
    "LS": ("not stated; of the 54 logs its README links, 5 values equal the log's best test "
           "accuracy, none the last epoch (\"reported vs logged may differ: average operation\")",
           "not stated (most logs hold one run)",
           "not stated (code built on mdistiller; CTKD rows on RepDistiller)",
           "mdistiller's released CIFAR teachers"),
    "DIST": ("not stated", "mean±std over an unstated number of runs", "not stated",
             "not stated (its vanilla accuracies are printed in parentheses)"),
}
UNSTATED = ("not stated", "not stated", "not stated", "not stated")


class LiteratureError(UserError):
    pass


# ------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class Published:
    """One published number, as printed, with the kdbench names it maps to."""

    line: int  # line in the CSV (header = 1)
    source: str  # e.g. "CRD (Tian et al. ICLR 2020)"
    key: str  # short source key: "CRD"
    repo: str
    commit: str
    file: str
    dataset: str
    setting: str
    teacher: str  # as printed
    student: str
    method: str
    top1: str  # as printed: "75.61", "74.43±0.24", "N/A"
    mean: float | None  # None for N/A
    spread: float | None  # the ± part, when printed
    protocol: str
    kdbench_dataset: str | None
    teacher_model: str | None
    student_model: str | None
    method_name: str  # kdbench's method-set name

    @property
    def epochs(self) -> int | None:
        """The epoch count the protocol column states, if it states one."""
        m = re.search(r"(\d+)\s*ep\b", self.protocol)
        return int(m.group(1)) if m else None


_TOP1 = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:±\s*(\d+(?:\.\d+)?))?\s*$")


def parse_top1(text: str) -> tuple[float | None, float | None]:
    """``"75.61"`` -> (75.61, None); ``"74.43±0.24"`` -> (74.43, 0.24); ``"N/A"`` ->
    (None, None). Anything else is a ValueError."""
    if text.strip().upper() == "N/A":
        return None, None
    m = _TOP1.match(text)
    if not m:
        raise ValueError(f"top1 {text!r} is neither a number, mean±spread nor N/A")
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


def source_key(source: str) -> str:
    """"CRD (Tian et al. ICLR 2020)" -> "CRD"."""
    return source.split(" (", 1)[0].strip()


def model_name(spelling: str) -> str | None:
    """The kdbench model a literature spelling names (None: kdbench has none). KeyError for a
    spelling the table does not know."""
    return MODELS[spelling]


_METHODS_FOLDED = {k.casefold(): v for k, v in METHODS.items()}


def method_name(spelling, source: str | None = None) -> str | None:
    """kdbench's method-set name for a method spelling (a CSV name, a recipe's ref_method or a
    method set's label; case-insensitive), or None when no table knows it."""
    if not isinstance(spelling, str) or not spelling:
        return None
    own = SOURCE_METHODS.get(source_key(source), {}) if source else {}
    if spelling in own:
        return own[spelling]
    return METHODS.get(spelling) or _METHODS_FOLDED.get(spelling.casefold())


class Literature:
    """The parsed CSV: rows, and lookups by source, dataset, pair and method."""

    def __init__(self, rows: list[Published], path: str):
        self.rows, self.path = rows, path
        self.sources: dict[str, str] = {}  # key -> full source name, in CSV order
        for r in rows:
            self.sources.setdefault(r.key, r.source)
        self._index: dict[tuple, list[Published]] = {}
        for r in rows:
            if r.kdbench_dataset and r.teacher_model and r.student_model:
                k = (r.source, r.kdbench_dataset, r.teacher_model, r.student_model, r.method_name)
                self._index.setdefault(k, []).append(r)

    def resolve(self, names) -> list[str]:
        """Full source names for a recipe's ``literature`` list (short keys like "CRD" or full
        names, case-insensitive). ValueError naming the unknown ones and the valid keys."""
        if isinstance(names, str):
            names = [names]
        by_fold = {k.casefold(): v for k, v in self.sources.items()}
        by_fold.update({v.casefold(): v for v in self.sources.values()})
        out, unknown = [], []
        for n in names:
            full = by_fold.get(str(n).strip().casefold())
            if full is None:
                unknown.append(n)
            elif full not in out:
                out.append(full)
        if unknown:
            raise ValueError(f"unknown literature source{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; use one of "
                             f"{', '.join(self.sources)} (the source column of {self.path})")
        return out

    def lookup(self, source: str, dataset: str | None, teacher: str | None,
               student: str | None, method: str | None) -> Published | None:
        """The number one source prints for one kdbench cell (a source that prints one number
        twice, e.g. in a table and a figure, gives the first row), or None."""
        if not (dataset and teacher and student and method):
            return None
        rows = self._index.get((source, dataset, teacher, student, method))
        return rows[0] if rows else None

    def covers(self, source: str, dataset: str | None, teacher: str | None,
               student: str | None) -> bool:
        """Whether a source has any number for this pair."""
        return any(k[:4] == (source, dataset, teacher, student) for k in self._index)


def load(file: str | Path | None = None) -> Literature:
    """Parse the literature CSV (the one shipped with kdbench unless ``file``). A row whose
    names no table here knows, or whose top1 does not parse, is a LiteratureError naming the
    file, line and column."""
    if file is None:
        return _load_default()
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LiteratureError(f"{path}: cannot read the literature CSV ({exc.strerror})") from None
    return _parse(text, str(path))


@lru_cache(maxsize=1)
def _load_default() -> Literature:
    text = resources.files("kdbench").joinpath(CSV_PATH).read_text(encoding="utf-8")
    return _parse(text, f"kdbench/{CSV_PATH}")


def _parse(text: str, where: str) -> Literature:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise LiteratureError(f"{where}: no column {', '.join(missing)} (expected the columns "
                              f"{','.join(COLUMNS)})")
    rows = []
    for raw in reader:
        line = reader.line_num
        fix = "add the spelling to kdbench/literature.py"
        if None in raw or any(v is None for v in raw.values()):
            n = len(COLUMNS) + len(raw.get(None) or []) - sum(v is None for v in raw.values())
            raise LiteratureError(f"{where}:{line}: {n} fields, expected {len(COLUMNS)} "
                                  f"({','.join(COLUMNS)}); quote a field that holds a comma")

        def bad(column, what):
            return LiteratureError(f"{where}:{line}: {column} {raw[column]!r} {what}")

        if raw["dataset"] not in DATASETS:
            raise bad("dataset", f"is not in DATASETS ({fix} DATASETS)")
        for col in ("teacher", "student"):
            if raw[col] not in MODELS:
                raise bad(col, f"is not a model spelling kdbench knows ({fix} MODELS)")
        own = SOURCE_METHODS.get(source_key(raw["source"]), {})
        method = own.get(raw["method"]) or METHODS.get(raw["method"])  # exact spellings only
        if method is None:
            raise bad("method", f"is not a method spelling kdbench knows ({fix} METHODS or "
                      "SOURCE_METHODS)")
        try:
            mean, spread = parse_top1(raw["top1"])
        except ValueError as exc:
            raise LiteratureError(f"{where}:{line}: {exc} (write e.g. 75.61, 74.43±0.24 or "
                                  "N/A)") from None
        dataset = DATASETS[raw["dataset"]]
        rows.append(Published(
            line=line, source=raw["source"], key=source_key(raw["source"]), repo=raw["repo"],
            commit=raw["commit"], file=raw["file"], dataset=raw["dataset"],
            setting=raw["setting"], teacher=raw["teacher"], student=raw["student"],
            method=raw["method"], top1=raw["top1"].strip(), mean=mean, spread=spread,
            protocol=raw["protocol"], kdbench_dataset=dataset,
            teacher_model=MODELS[raw["teacher"]] if dataset else None,
            student_model=MODELS[raw["student"]] if dataset else None, method_name=method))
    seen: dict[tuple, Published] = {}
    for r in rows:  # a source printing two numbers for one cell would make a Δ ambiguous
        if not (r.kdbench_dataset and r.teacher_model and r.student_model):
            continue
        k = (r.source, r.kdbench_dataset, r.teacher_model, r.student_model, r.method_name)
        first = seen.setdefault(k, r)
        if first.top1 != r.top1:
            raise LiteratureError(
                f"{where}:{r.line}: {r.source} prints {r.top1} for {r.teacher}→{r.student} "
                f"{r.method}, and {first.top1} on line {first.line} for the same kdbench cell; "
                "keep the number the source means")
    return Literature(rows, where)


def resolve_sources(names) -> list[str]:
    """Full names of the shipped CSV's sources for a recipe's ``[reference] literature``."""
    return load().resolve(names)


# --------------------------------------------------------------------------- the matching
ZOO_TARGETS = frozenset(v for v in MODELS.values() if v)


def pair_models(teacher_model: str | None, student_model: str | None, ref_teacher,
                ref_student, paper_table: bool) -> tuple[str | None, str | None, list[str]]:
    """(teacher, student) kdbench names to look the pair up by, and sentences on ref names that
    contradict the models (see the module docstring for the rule)."""
    out, notes = [], []
    for side, model, ref in (("teacher", teacher_model, ref_teacher),
                             ("student", student_model, ref_student)):
        ref_name = None
        if not paper_table and isinstance(ref, str) and ref:
            ref_name = MODELS.get(ref)
        if model in ZOO_TARGETS:
            if ref_name and ref_name != model:
                notes.append(f"ref_{side} {ref!r} names {ref_name}, but the {side} is {model}; "
                             f"matched as {model}")
            out.append(model)
        else:
            out.append(ref_name)
    return out[0], out[1], notes


def protocol(key: str) -> tuple[str, str, str, str]:
    """(epoch reported, runs, precision, teachers) of a source, as its README and scripts say."""
    return PROTOCOLS.get(key, UNSTATED)
