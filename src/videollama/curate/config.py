"""The curation config: a typed :class:`CurateConfig` read from YAML, with ``key=value`` overrides.

Imports no torch. The dataclass defaults below ARE the defaults of ``videollama curate``
without ``--config``; ``configs/curate-default.yaml`` spells out exactly these values, key by key
(tests/test_curate_units.py checks that the two never drift apart). ``configs/curate-web.yaml``
holds the settings for the raw web Shapes corpus of the demo. Every section maps to one stage of
``videollama curate`` (see ``videollama.curate.pipeline``). Config files are read through the
bounded reader (``data/safe_io.py``: a regular file of at most ``MAX_CONFIG_BYTES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videollama.dataclass_io import build, parse_override, set_dotted

MAX_CONFIG_BYTES = 1 << 20  # a curate config is a few KB; anything near this is not one


@dataclass
class ScenesSection:
    """Scene cuts, then clips: a scene shorter than ``min_clip_s`` is dropped, a longer one than
    ``max_clip_s`` is split into equal pieces (``videollama.curate.scenes.scene_clips``)."""

    min_clip_s: float = 2.0
    max_clip_s: float = 10.0
    threshold: float | None = None  # None: scenes.py's default


@dataclass
class ClipEncodeSection:
    """How a clip becomes its ``KEY.mp4``: re-encoded (H.264, yuv420p) from the decoded source,
    so that a cut between keyframes is exact."""

    crf: int = 18
    max_frames_per_video: int = 200_000  # work bound of the one decoding pass over a source


@dataclass
class FramesSpec:
    """Frames sampled from a clip for a stage without a model spec (motion, pixel dedup)."""

    num_frames: int = 8
    fps: float = 2.0
    size: int = 64


@dataclass
class ClipSection:
    """CLIP similarity with a Hugging Face ``CLIPModel`` folder (``--clip``): frames per clip; the
    size and mean/std come from the folder's ``preprocessor_config.json`` (or its config)."""

    model: str | None = None
    num_frames: int = 4
    fps: float = 1.0
    batch_size: int = 32


@dataclass
class ScorerSection:
    """PMI alignment with a VideoLlama model directory (``--scorer``); its own preprocessing spec.

    ``reference_clips``: how many clips (evenly spaced over the clip ids that pass the cheap
    filters) make the reference set of the ``marginal`` prior, p(text) = mean over those clips of
    p(text | clip); 0 computes only the ``text_only`` prior (see ``curate.pmi``). Each text then
    costs 1 + reference_clips decoder passes instead of 2."""

    model: str | None = None
    batch_size: int = 16
    reference_clips: int = 32


@dataclass
class CaptionerSection:
    """Automated captions with a VideoLlama model directory (``--captioner``), greedy, batched."""

    model: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 48


# (filter.pmi_prior, filter.pmi_reduce) -> the score column it thresholds
PMI_COLUMNS = {("text_only", "mean"): "pmi", ("text_only", "sum"): "pmi_sum", ("text_only", "max_span"): "pmi_span",
               ("marginal", "mean"): "pmi_marginal", ("marginal", "sum"): "pmi_marginal_sum",
               ("marginal", "max_span"): "pmi_marginal_span"}
PMI_EXTRA_COLUMNS = tuple(c for c in PMI_COLUMNS.values() if c != "pmi")  # beside the definition's ``pmi``
PMI_PRIORS = ("text_only", "marginal")
PMI_REDUCES = ("mean", "sum", "max_span")


@dataclass
class FilterSection:
    """What a clip must have to be kept.

    ``metric``: which alignment score decides (``pmi``, ``clip``; ``auto``: pmi with a scorer,
    else clip). A text passes when its score is ``>= threshold``, or, with ``keep_fraction``
    set, when it is among that top fraction of all scored texts (the threshold is then that
    quantile, recorded in stats.json).

    ``pmi_prior`` (metric pmi): what p(text) the PMI divides by: ``text_only`` (the decoder with
    no video, the definition) or ``marginal`` (the mean of p(text | clip) over the scorer's
    reference clips; needs ``scorer.reference_clips`` > 0). ``pmi_reduce``: which reduction of
    the per-token PMI is thresholded: ``mean`` (the definition), ``sum`` or ``max_span`` (the
    best contiguous run of tokens). Every combination is a column of clips.parquet (``pmi``,
    ``pmi_sum``, ``pmi_span``, ``pmi_marginal``, ``pmi_marginal_sum``, ``pmi_marginal_span``), so
    a table can be re-filtered by any of them without recomputing (see ``curate.pmi``).
    """

    metric: str = "auto"
    threshold: float = 3.5
    keep_fraction: float | None = None
    # any: a text may caption any clip of its video; best_clip: only the clip it scores best on.
    assign: str = "best_clip"
    pmi_prior: str = "marginal"  # text_only | marginal
    pmi_reduce: str = "max_span"  # mean | sum | max_span
    min_duration_s: float = 2.0
    min_width: int = 224
    min_height: int = 224
    min_motion: float = 0.05  # motion.motion_score below this: a static slideshow


@dataclass
class DedupSection:
    """Near-duplicates: clips whose video embeddings have cosine similarity above ``threshold``.

    ``embedding``: ``pixels`` (the motion frames, mean-removed: re-encodes, rescales and small
    brightness changes of one clip), ``clip`` (mean CLIP image embedding) or ``scorer`` (the
    scorer's mean visual latent).

    Each group keeps the clip whose caption scores best under the run's metric, then the largest
    frame, then the longest (``dedup.keep_preference``); scores are compared rounded to
    ``score_step``, since re-encodes of one clip score the same text a few hundredths apart and such
    noise must not outrank a larger frame."""

    enabled: bool = True
    embedding: str = "pixels"
    threshold: float = 0.95
    score_step: float = 0.1


@dataclass
class OutputSection:
    shard_size: str = "1GB"
    max_count: int | None = None
    prefix: str = "shard"
    plot: bool = True


@dataclass
class CurateConfig:
    engine: str = "local"  # local | ray
    workers: int = 0  # local engine: processes for per-video work (0: one per core)
    torch_threads: int = 1  # threads of each model stage (the same in both engines: same floats)
    device: str = "cpu"  # model stages: cpu or cuda (with Ray: an actor per GPU)
    allow_outside_root: bool = False
    scenes: ScenesSection = field(default_factory=ScenesSection)
    encode: ClipEncodeSection = field(default_factory=ClipEncodeSection)
    motion: FramesSpec = field(default_factory=FramesSpec)
    clip: ClipSection = field(default_factory=ClipSection)
    scorer: ScorerSection = field(default_factory=ScorerSection)
    captioner: CaptionerSection = field(default_factory=CaptionerSection)
    filter: FilterSection = field(default_factory=FilterSection)
    dedup: DedupSection = field(default_factory=DedupSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, got {self.engine!r}")
        if self.filter.metric not in ("auto", "pmi", "clip"):
            raise ValueError(f"filter.metric must be auto, pmi or clip, got {self.filter.metric!r}")
        if self.filter.keep_fraction is not None and not 0 < self.filter.keep_fraction <= 1:
            raise ValueError(f"filter.keep_fraction must be in (0, 1], got {self.filter.keep_fraction}")
        if self.filter.assign not in ("any", "best_clip"):
            raise ValueError(f"filter.assign must be any or best_clip, got {self.filter.assign!r}")
        if self.filter.pmi_reduce not in PMI_REDUCES:
            raise ValueError(f"filter.pmi_reduce must be mean, sum or max_span, got {self.filter.pmi_reduce!r}")
        if self.filter.pmi_prior not in PMI_PRIORS:
            raise ValueError(f"filter.pmi_prior must be text_only or marginal, got {self.filter.pmi_prior!r}")
        if self.scorer.reference_clips < 0:
            raise ValueError(f"scorer.reference_clips must be >= 0, got {self.scorer.reference_clips}")
        if self.metric == "pmi" and self.filter.pmi_prior == "marginal" and self.scorer.reference_clips == 0:
            raise ValueError("filter.pmi_prior marginal needs scorer.reference_clips > 0 (the clips p(text) is "
                             "averaged over)")
        if self.dedup.embedding not in ("pixels", "clip", "scorer"):
            raise ValueError(f"dedup.embedding must be pixels, clip or scorer, got {self.dedup.embedding!r}")
        if not self.dedup.score_step > 0:
            raise ValueError(f"dedup.score_step must be > 0, got {self.dedup.score_step}")
        if not 0 < self.scenes.min_clip_s <= self.scenes.max_clip_s:
            raise ValueError("need 0 < scenes.min_clip_s <= scenes.max_clip_s")
        for name in ("clip", "scorer", "captioner"):
            if getattr(self, name).batch_size < 1:
                raise ValueError(f"{name}.batch_size must be >= 1")
        if self.workers < 0 or self.torch_threads < 1:
            raise ValueError("need workers >= 0 and torch_threads >= 1")

    @property
    def metric(self) -> str | None:
        """The alignment score that decides: pmi, clip, or None when no model scores."""
        if self.filter.metric != "auto":
            return self.filter.metric
        return "pmi" if self.scorer.model else "clip" if self.clip.model else None

    @property
    def score_column(self) -> str | None:
        """The per-text score column the filter thresholds: ``clip`` or a PMI column (``PMI_COLUMNS``)."""
        metric = self.metric
        return PMI_COLUMNS[self.filter.pmi_prior, self.filter.pmi_reduce] if metric == "pmi" else metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurateConfig:
        return build(cls, d)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> CurateConfig:
    """A config from a YAML file (None: the defaults) with ``key.sub=value`` overrides applied.

    The file is read through the bounded reader: a FIFO, a device (``/dev/zero``) or a directory
    is refused before it is opened, and a file over ``MAX_CONFIG_BYTES`` before it is read."""
    import yaml

    from videollama.data.safe_io import read_bounded

    d: dict[str, Any] = {}
    if path is not None:
        data = read_bounded(path, MAX_CONFIG_BYTES, "curate config")
        try:
            d = yaml.safe_load(data.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: not a valid YAML curate config ({' '.join(str(e).split())})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a curate config must be a YAML mapping")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(d, key, value)
    try:
        return CurateConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path or 'curate config'}: {e}") from e
