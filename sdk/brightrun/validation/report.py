"""Validation results: issues, stats, the quality score and training readiness.

:func:`validate_file` streams a file once through the engine (see
``_engine.py``), reports every problem it finds with its place and a fix, and
sums the file up.

Quality score (0 to 100)::

    score = clamp(100 - 10 x critical - 2 x warnings + bonus, 0, 100)

The bonus rewards data that is better than "no errors" and only applies to a
file without critical errors (so a bonus never hides a blocking problem); it is
at most +10, made of:

* +3 ``volume`` — at least 1,000 training pairs (the seeds' "exceeds the 500 to
  1,000 minimum");
* +3 ``scaffolding_coverage`` — every training pair carries persona,
  emotional_arc and topic (conversations format);
* +2 ``quality_rating`` — the data's own quality rating averages at least 4.0/5;
* +2 ``fits_max_seq_len`` — tokenizer checks ran and no example was truncated.

Bands: ``good`` (>= 90), ``minor_issues`` (70 to 89), ``fix_first`` (< 70).

Readiness checklist (the seeds' P02 criteria): format compatible (no critical
structural errors), sufficient volume (more than 500 training pairs), quality
score acceptable (>= 70), quality rating >= 3.0/5 where the data gives one
(``quality_score`` on each conversation, or ``dataset_metadata.quality_score``
in a ``{"conversations": [...]}`` document; a dataset-level rating wins), and,
when a tokenizer was used, no example that loses all its target tokens or that
the chat template refuses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from brightrun.validation import _json
from brightrun.validation._engine import (
    MAX_RECORD_BYTES,
    Engine,
    EngineResult,
    LengthStats,
    TokenCheck,
)
from brightrun.validation.context import ContextExcerpt, context_excerpt
from brightrun.validation.formats import DatasetFormat, detect_format
from brightrun.validation.issues import (
    IssuePage,
    IssueType,
    Severity,
    SortKey,
    ValidationIssue,
    filter_issues,
    page_issues,
    sort_issues,
)

#: Default ``max_seq_len`` for tokenizer checks (the spec's default max length).
DEFAULT_MAX_SEQ_LEN = 2048
#: More training pairs than this count as sufficient volume (seeds: "> 500 pairs").
MIN_TRAINING_PAIRS = 500
#: Lowest acceptable quality rating on the seeds' 0-5 scale.
MIN_QUALITY_RATING = 3.0
#: Lowest quality score that is not "fix first".
MIN_QUALITY_SCORE = 70
#: Largest total bonus.
MAX_BONUS = 10

TOKEN_EDGES = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CHAR_EDGES = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_TOKEN_TYPES = frozenset(
    {
        IssueType.TOKEN_LENGTH_EXCEEDED.value,
        IssueType.ALL_LABELS_MASKED.value,
        IssueType.TEMPLATE_ERROR.value,
        IssueType.TEMPLATE_DROPS_CONTENT.value,
    }
)

QualityBand = Literal["good", "minor_issues", "fix_first"]


@dataclass(frozen=True, slots=True)
class HistogramBin:
    """``count`` lengths in ``[low, high)``; ``high`` is None for the last bin."""

    low: int
    high: int | None
    count: int


@dataclass(frozen=True, slots=True)
class LengthSummary:
    """Lengths of valid examples; percentiles are within 12.5 % (bucketed)."""

    count: int = 0
    min: int = 0
    max: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Token counts with the base model's tokenizer and chat template."""

    max_seq_len: int
    examples: int
    total_tokens: int
    target_tokens: int
    #: Examples longer than ``max_seq_len`` (truncated in training).
    over_max_seq_len: int
    #: Tokens beyond ``max_seq_len``, summed over those examples, and the largest overflow.
    tokens_over_max: int
    max_overflow: int
    #: Truncated examples that lose at least one target token.
    targets_truncated: int
    template_errors: int
    lengths: LengthSummary
    histogram: list[HistogramBin]


@dataclass(slots=True)
class DatasetStats:
    """Counts of what a dataset holds.

    ``training_pairs`` counts the examples the trainer would see (valid ones): one
    per line for chat and instruction files, one per training pair for
    conversation files. ``conversations`` counts records, valid or not.
    """

    conversations: int = 0
    training_pairs: int = 0
    messages: int = 0
    content_chars: int = 0
    conversations_with_errors: int = 0
    #: "tokens" when a tokenizer was used, else "chars" (content characters).
    length_unit: str = "chars"
    length_summary: LengthSummary = field(default_factory=LengthSummary)
    length_histogram: list[HistogramBin] = field(default_factory=list)
    char_length_summary: LengthSummary = field(default_factory=LengthSummary)
    #: Training pairs per persona / emotional_arc / topic, and per persona x arc.
    persona: dict[str, int] = field(default_factory=dict)
    emotional_arc: dict[str, int] = field(default_factory=dict)
    topic: dict[str, int] = field(default_factory=dict)
    persona_arc: dict[str, int] = field(default_factory=dict)
    pairs_with_scaffolding: int = 0
    #: Mean quality rating (0-5) where the data gives one; its source.
    quality_rating: float | None = None
    quality_rating_source: str | None = None
    rated_conversations: int = 0
    format_version: str | None = None
    tokens: TokenStats | None = None


@dataclass(frozen=True, slots=True)
class ReadinessCheck:
    """One line of the readiness checklist; ``passed`` is None when not applicable."""

    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    critical_penalty: int
    warning_penalty: int
    bonuses: dict[str, int]
    score: int
    band: QualityBand


def quality_band(score: int) -> QualityBand:
    if score >= 90:
        return "good"
    if score >= MIN_QUALITY_SCORE:
        return "minor_issues"
    return "fix_first"


_BAND_TEXT = {"good": "Good", "minor_issues": "Minor issues", "fix_first": "Fix errors first"}


@dataclass(slots=True)
class ValidationReport:
    """The outcome of validating one file."""

    format: DatasetFormat
    issues: list[ValidationIssue] = field(default_factory=list)
    stats: DatasetStats = field(default_factory=DatasetStats)
    #: Exact counts per type (stored ``issues`` may be capped per type).
    counts_by_type: dict[str, int] = field(default_factory=dict)
    critical_count: int = 0
    warning_count: int = 0
    #: Exact counts of critical issues per type.
    critical_by_type: dict[str, int] = field(default_factory=dict)
    #: Issues counted but not stored because their type reached the cap.
    omitted_by_type: dict[str, int] = field(default_factory=dict)
    path: str | None = None
    size_bytes: int = 0
    elapsed_seconds: float = 0.0
    base_model: str | None = None
    max_seq_len: int | None = None
    #: Why validation stopped early (the file is not text), if it did.
    aborted: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.issues and not self.counts_by_type:
            for i in self.issues:
                self.counts_by_type[i.type] = self.counts_by_type.get(i.type, 0) + 1
                if i.is_critical:
                    self.critical_by_type[i.type] = self.critical_by_type.get(i.type, 0) + 1
            self.critical_count = sum(self.critical_by_type.values())
            self.warning_count = len(self.issues) - self.critical_count

    # -- verdict ----------------------------------------------------------------

    @property
    def passed(self) -> bool:
        """No critical errors: a job may use this file."""
        return self.critical_count == 0

    def score_breakdown(self) -> ScoreBreakdown:
        bonuses: dict[str, int] = {}
        s = self.stats
        if self.critical_count == 0:
            if s.training_pairs >= 1000:
                bonuses["volume"] = 3
            if s.training_pairs and s.pairs_with_scaffolding == s.training_pairs:
                bonuses["scaffolding_coverage"] = 3
            if s.quality_rating is not None and s.quality_rating >= 4.0:
                bonuses["quality_rating"] = 2
            if s.tokens is not None and s.tokens.examples and s.tokens.over_max_seq_len == 0:
                bonuses["fits_max_seq_len"] = 2
        bonus = min(MAX_BONUS, sum(bonuses.values()))
        crit, warn = 10 * self.critical_count, 2 * self.warning_count
        score = max(0, min(100, 100 - crit - warn + bonus))
        return ScoreBreakdown(crit, warn, bonuses, score, quality_band(score))

    @property
    def quality_score(self) -> int:
        """100 - 10 x critical - 2 x warnings + bonus, clamped to 0..100 (module doc)."""
        return self.score_breakdown().score

    @property
    def quality_band(self) -> QualityBand:
        return quality_band(self.quality_score)

    def readiness(self) -> list[ReadinessCheck]:
        s = self.stats
        structural = sum(n for t, n in self.critical_by_type.items() if t not in _TOKEN_TYPES)
        fmt = self.format.value + (f" ({s.format_version})" if s.format_version else "")
        checks = [
            ReadinessCheck(
                "format_compatible",
                structural == 0,
                fmt if structural == 0 else f"{fmt}: {structural} critical format errors",
            ),
            ReadinessCheck(
                "sufficient_volume",
                s.training_pairs > MIN_TRAINING_PAIRS,
                f"{s.training_pairs:,} training pairs (more than {MIN_TRAINING_PAIRS} needed)",
            ),
            ReadinessCheck(
                "quality_score",
                self.quality_score >= MIN_QUALITY_SCORE,
                f"{self.quality_score}/100 ({_BAND_TEXT[self.quality_band]})",
            ),
        ]
        if s.quality_rating is None:
            checks.append(ReadinessCheck("quality_rating", None, "no quality rating in the data"))
        else:
            checks.append(
                ReadinessCheck(
                    "quality_rating",
                    s.quality_rating >= MIN_QUALITY_RATING,
                    f"{s.quality_rating:.1f}/5.0 (at least {MIN_QUALITY_RATING:.1f} needed)",
                )
            )
        if s.tokens is None:
            checks.append(ReadinessCheck("tokenization", None, "not checked (no base model given)"))
        else:
            t = s.tokens
            blocking = self.critical_by_type.get(IssueType.ALL_LABELS_MASKED.value, 0) + t.template_errors
            detail = f"{t.examples:,} examples tokenized; {t.over_max_seq_len:,} over max_seq_len {t.max_seq_len}"
            if blocking:
                detail += f"; {blocking} cannot be trained on"
            checks.append(ReadinessCheck("tokenization", blocking == 0, detail))
        return checks

    @property
    def ready(self) -> bool:
        """No critical errors and every applicable readiness check passes."""
        return self.passed and all(c.passed is not False for c in self.readiness())

    def summary(self) -> str:
        """The seeds' one-line verdict."""
        s = self.stats
        if self.passed:
            return (
                f"Training file validated: {s.conversations:,} conversations, "
                f"{s.training_pairs:,} training pairs, all checks passed"
                + (f" ({self.warning_count} warnings)" if self.warning_count else "")
            )
        return f"Validation failed: {self.critical_count:,} critical errors, {self.warning_count:,} warnings"

    def first_errors(self, n: int = 3) -> list[str]:
        """Headlines of the first ``n`` issues, critical ones first."""
        return [i.headline() for i in sort_issues(self.issues, "severity")[:n]]

    # -- issues -------------------------------------------------------------

    def context(
        self,
        issue: ValidationIssue,
        *,
        before: int = 10,
        after: int = 10,
        path: str | Path | None = None,
    ) -> ContextExcerpt | None:
        """Lines around ``issue``, read from the file now (None if not possible).

        ``path``: where the validated file is now, if it moved since validation.
        """
        where = path if path is not None else self.path
        if where is None or issue.byte_offset is None or issue.line is None:
            return None
        try:
            return context_excerpt(
                where,
                byte_offset=issue.byte_offset,
                line=issue.line,
                column=issue.column,
                before=before,
                after=after,
            )
        except OSError:
            return None

    def page(
        self,
        *,
        sort: SortKey = "index",
        critical_only: bool = False,
        page_size: int = 25,
        page_token: str = "",
    ) -> IssuePage:
        """Sorted, filtered page of the stored issues (see :mod:`.issues`)."""
        chosen = filter_issues(self.issues, critical_only=critical_only)
        return page_issues(sort_issues(chosen, sort), page_size=page_size, page_token=page_token)

    # -- export -----------------------------------------------------------------

    def to_dict(self, *, context_limit: int = 0) -> dict[str, Any]:
        """A JSON-ready dict; the first ``context_limit`` issues get their excerpt."""
        breakdown = self.score_breakdown()
        issues: list[dict[str, Any]] = []
        for k, issue in enumerate(self.issues):
            d = issue.to_dict()
            if k < context_limit:
                excerpt = self.context(issue)
                d["context"] = excerpt.render() if excerpt is not None else None
            issues.append(d)
        return {
            "path": self.path,
            "format": self.format.value,
            "passed": self.passed,
            "ready": self.ready,
            "summary": self.summary(),
            "quality_score": breakdown.score,
            "quality_band": breakdown.band,
            "score_breakdown": asdict(breakdown),
            "critical_count": self.critical_count,
            "warning_count": self.warning_count,
            "counts_by_type": dict(sorted(self.counts_by_type.items())),
            "critical_by_type": dict(sorted(self.critical_by_type.items())),
            "omitted_by_type": dict(sorted(self.omitted_by_type.items())),
            "readiness": [asdict(c) for c in self.readiness()],
            "stats": asdict(self.stats),
            "size_bytes": self.size_bytes,
            "elapsed_seconds": round(self.elapsed_seconds, 4),
            "base_model": self.base_model,
            "max_seq_len": self.max_seq_len,
            "aborted": self.aborted,
            "notes": list(self.notes),
            "issues": issues,
        }

    def to_json(self, *, context_limit: int = 0, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(context_limit=context_limit), indent=indent, ensure_ascii=False)


def _summary(lengths: LengthStats) -> LengthSummary:
    if not lengths.count:
        return LengthSummary()
    return LengthSummary(
        count=lengths.count,
        min=lengths.min,
        max=lengths.max,
        mean=round(lengths.total / lengths.count, 1),
        p50=lengths.percentile(0.5),
        p95=lengths.percentile(0.95),
    )


def _histogram(lengths: LengthStats, edges: tuple[int, ...]) -> list[HistogramBin]:
    return [HistogramBin(lo, hi, n) for lo, hi, n in lengths.histogram(edges)]


def _stats(res: EngineResult) -> DatasetStats:
    s = DatasetStats(
        conversations=res.records,
        training_pairs=res.examples,
        messages=res.messages,
        content_chars=res.content_chars,
        conversations_with_errors=res.records_with_errors,
        char_length_summary=_summary(res.char_lengths),
        persona=dict(res.scaffolding["persona"].most_common()),
        emotional_arc=dict(res.scaffolding["emotional_arc"].most_common()),
        topic=dict(res.scaffolding["topic"].most_common()),
        persona_arc=dict(res.combinations.most_common()),
        pairs_with_scaffolding=res.pairs_with_metadata,
        rated_conversations=res.rating_count,
        format_version=res.format_version,
    )
    if res.dataset_rating is not None:
        s.quality_rating, s.quality_rating_source = round(res.dataset_rating, 2), "dataset"
    elif res.rating_count:
        s.quality_rating = round(res.rating_sum / res.rating_count, 2)
        s.quality_rating_source = "conversations"
    t = res.tokens
    if t is not None:
        s.tokens = TokenStats(
            max_seq_len=t.max_seq_len,
            examples=t.examples,
            total_tokens=t.tokens,
            target_tokens=t.target_tokens,
            over_max_seq_len=t.over_max,
            tokens_over_max=t.tokens_over_max,
            max_overflow=t.max_overflow,
            targets_truncated=t.targets_truncated,
            template_errors=t.template_errors,
            lengths=_summary(t.lengths),
            histogram=_histogram(t.lengths, TOKEN_EDGES),
        )
        s.length_unit = "tokens"
        s.length_summary = s.tokens.lengths
        s.length_histogram = s.tokens.histogram
    else:
        s.length_summary = s.char_length_summary
        s.length_histogram = _histogram(res.char_lengths, CHAR_EDGES)
    return s


def validate_file(
    path: str | Path,
    *,
    format: DatasetFormat | str | None = None,  # mirrors the proto field
    base_model: str | None = None,
    max_seq_len: int | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    max_issues_per_type: int | None = 1000,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> ValidationReport:
    """Validate a dataset file without a server; report every problem in it.

    ``format`` is detected when not given. With ``base_model`` (a local path or
    a hub name; transformers must be installed: ``pip install
    'brightrun[trainer]'``) or an already loaded ``tokenizer``, every valid
    example is also rendered with the chat template and tokenized:
    ``max_seq_len`` (default 2048) bounds its length. At most
    ``max_issues_per_type`` issues of each type are stored (None: all); counts
    stay exact. Raises ``OSError`` when the file cannot be read and the
    tokenizer errors of :func:`brightrun.validation.chat.load_tokenizer`; any
    content, even arbitrary bytes, yields a report.
    """
    started = time.perf_counter()
    fmt = DatasetFormat(format) if format else detect_format(path)
    notes: list[str] = []
    token_check = None
    limit = None
    if tokenizer is None and base_model:
        from brightrun.validation.chat import load_tokenizer

        tokenizer = load_tokenizer(base_model)
    if tokenizer is not None:
        from brightrun.validation.chat import ChatEncoder

        limit = max_seq_len or DEFAULT_MAX_SEQ_LEN
        token_check = TokenCheck(ChatEncoder(tokenizer, chat_template=chat_template), limit)
    elif max_seq_len is not None:
        notes.append("max_seq_len ignored: token checks need a base model")
    engine = Engine(
        fmt,
        max_issues_per_type=max_issues_per_type,
        token_check=token_check,
        max_record_bytes=max_record_bytes,
    )
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            res = engine.run(f, size)
        except Exception as e:  # a validator bug must still produce a report
            engine.emit(
                IssueType.INTERNAL_ERROR,
                Severity.CRITICAL.value,
                f"internal validator error: {type(e).__name__}: {e}",
                None,
                fix="Report this to the BrightRun maintainers.",
            )
            res = engine.res
            res.critical, res.warning = engine.n_critical, engine.n_warning
            res.aborted = f"internal error: {type(e).__name__}"
    issues = sorted(res.issues, key=_file_order)
    notes.append(f"json backend: {_json.backend()}")
    return ValidationReport(
        format=fmt,
        issues=issues,
        stats=_stats(res),
        counts_by_type=dict(res.counts),
        critical_by_type=dict(res.critical_by_type),
        critical_count=res.critical,
        warning_count=res.warning,
        omitted_by_type=dict(res.dropped),
        path=str(path),
        size_bytes=res.size_bytes,
        elapsed_seconds=time.perf_counter() - started,
        base_model=base_model,
        max_seq_len=limit,
        aborted=res.aborted,
        notes=notes,
    )


def _file_order(issue: ValidationIssue) -> tuple[int, int]:
    """Position in the file; file-level issues without a place come first (stable)."""
    return (issue.line or 0, issue.column or 0)
