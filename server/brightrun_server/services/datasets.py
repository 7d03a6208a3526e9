"""Datasets: streamed upload with integrity checks, validation, listing, deletion."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from brightrun.validation import (
    ContextExcerpt,
    DatasetFormat,
    ValidationIssue,
    ValidationReport,
    context_excerpt,
    filter_issues,
    issues_to_csv,
    page_issues,
    sort_issues,
    validate_file,
)
from brightrun.validation.issues import SortKey
from brightrun_server.domain import caller
from brightrun_server.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from brightrun_server.domain.ids import new_id
from brightrun_server.domain.listing import (
    decode_page_token,
    encode_page_token,
    page_size,
    parse_filter,
)
from brightrun_server.domain.requests import check_request_id
from brightrun_server.domain.states import TERMINAL
from brightrun_server.store.db import Database
from brightrun_server.store.models import DatasetRow, JobRow
from brightrun_server.store.query import after_key, compare

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 256


class DatasetState:
    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class UploadMetadata:
    name: str
    filename: str
    format: DatasetFormat | None
    size_bytes: int
    sha256: str
    request_id: str = ""


def _state_value(text: str) -> str:
    value = text.lower()
    if value not in (DatasetState.VALIDATING, DatasetState.READY, DatasetState.INVALID):
        raise ValueError("one of VALIDATING, READY, INVALID")
    return value


def _format_value(text: str) -> str:
    value = text.lower()
    try:
        return DatasetFormat(value).value
    except ValueError:
        raise ValueError("one of " + ", ".join(f.name for f in DatasetFormat)) from None


_FILTER_FIELDS: dict[str, Callable[[str], Any]] = {"state": _state_value, "format": _format_value, "name": str}
_COLUMNS = {"state": DatasetRow.state, "format": DatasetRow.format, "name": DatasetRow.name}


class DatasetService:
    def __init__(
        self,
        db: Database,
        data_dir: Path,
        *,
        max_upload_bytes: int,
        project_storage_bytes: int | None = None,
        debug_log_data: bool = False,
    ) -> None:
        self._db = db
        self._root = data_dir / "datasets"
        self._max_upload_bytes = max_upload_bytes
        self._storage_limit = project_storage_bytes
        self._debug_log_data = debug_log_data
        #: Serialises each project's final quota check with the insert it admits.
        self._quota_locks: dict[str, asyncio.Lock] = {}

    async def upload(self, meta: UploadMetadata, chunks: AsyncIterator[bytes]) -> DatasetRow:
        violations: list[FieldViolation] = []
        if not meta.filename and not meta.name:
            violations.append(FieldViolation("metadata.filename", "required (or give metadata.name)"))
        if len(meta.name) > MAX_NAME or len(meta.filename) > MAX_NAME:
            violations.append(FieldViolation("metadata.name", f"must be at most {MAX_NAME} characters"))
        if meta.size_bytes < 0:
            violations.append(FieldViolation("metadata.size_bytes", "must not be negative"))
        if meta.sha256 and not re.fullmatch(r"[0-9a-f]{64}", meta.sha256):
            violations.append(FieldViolation("metadata.sha256", "must be 64 lowercase hex digits"))
        if problem := check_request_id(meta.request_id, "metadata.request_id"):
            violations.append(problem)
        if violations:
            raise InvalidArgument(violations)
        if meta.request_id and (existing := await self._by_request_id(meta.request_id)) is not None:
            return existing
        project = caller.current().project
        # Refuse early on the declared size; the stream is checked as it arrives.
        self._check_size(meta.size_bytes)
        used = await self._used_bytes(project) if self._storage_limit is not None else 0
        self._check_quota(used, meta.size_bytes)

        dataset_id = new_id("ds")
        final_dir = self._root / dataset_id
        tmp_dir = self._root / f".upload-{dataset_id}"
        tmp_dir.mkdir(parents=True, exist_ok=False)
        safe = _SAFE_NAME.sub("_", Path(meta.filename or meta.name).name).strip("._") or "data"
        tmp_path = tmp_dir / safe
        try:
            digest, size = await self._receive(tmp_path, chunks, used)
            if meta.size_bytes and size != meta.size_bytes:
                raise FailedPrecondition(
                    f"upload ended after {size} bytes; metadata.size_bytes said {meta.size_bytes}",
                    reason="UPLOAD_CORRUPTED",
                    metadata={"expected": str(meta.size_bytes), "actual": str(size)},
                )
            if meta.sha256 and digest != meta.sha256:
                raise FailedPrecondition(
                    "uploaded bytes do not match metadata.sha256",
                    reason="UPLOAD_CORRUPTED",
                    metadata={"expected": meta.sha256, "actual": digest},
                )
            if size == 0:
                raise InvalidArgument([FieldViolation("chunk", "the upload contained no data")])
            report = await asyncio.to_thread(validate_file, tmp_path, format=meta.format)
            await asyncio.to_thread(_store_report, tmp_dir, report)
            self._log_report(dataset_id, report)
            os.replace(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        row = DatasetRow(
            id=dataset_id,
            name=meta.name or meta.filename,
            filename=meta.filename or meta.name,
            format=report.format.value,
            state=DatasetState.INVALID if report.critical_count else DatasetState.READY,
            size_bytes=size,
            sha256=digest,
            path=str(final_dir / safe),
            stats=_stats(report),
            validation=_summary(report),
            create_time=datetime.now(UTC),
            delete_time=None,
            request_id=meta.request_id or None,
            project=project,
        )
        try:
            async with self._quota_lock(project), self._db.write() as session:
                if self._storage_limit is not None:
                    self._check_quota(await self._used_bytes(project, session), size)
                session.add(row)
        except IntegrityError:
            shutil.rmtree(final_dir, ignore_errors=True)
            # A concurrent upload with the same request_id stored its dataset first.
            winner = await self._by_request_id(meta.request_id) if meta.request_id else None
            if winner is None:
                raise
            return winner
        except BaseException:
            shutil.rmtree(final_dir, ignore_errors=True)
            raise
        return row

    async def _by_request_id(self, request_id: str) -> DatasetRow | None:
        async with self._db.read() as session:
            row = await session.scalar(
                sa.select(DatasetRow).where(
                    DatasetRow.project == caller.current().project, DatasetRow.request_id == request_id
                )
            )
        return row if row is not None and _visible(row) else None

    def _check_size(self, size: int) -> None:
        if size > self._max_upload_bytes:
            raise ResourceExhausted(
                f"the upload exceeds the largest dataset allowed, {self._max_upload_bytes} bytes",
                reason="UPLOAD_TOO_LARGE",
                metadata={"limit_bytes": str(self._max_upload_bytes)},
            )

    def _check_quota(self, used: int, size: int) -> None:
        """Refuse `size` more bytes on top of `used` beyond the project's storage."""
        limit = self._storage_limit
        if limit is not None and size > 0 and used + size > limit:
            raise ResourceExhausted(
                f"the project's datasets use {used} of {limit} bytes; {size} more do not fit "
                "(delete datasets to free space)",
                reason="STORAGE_QUOTA_EXCEEDED",
                metadata={"used_bytes": str(used), "limit_bytes": str(limit)},
            )

    def _quota_lock(self, project: str) -> asyncio.Lock | contextlib.nullcontext[None]:
        if self._storage_limit is None:
            return contextlib.nullcontext()
        return self._quota_locks.setdefault(project, asyncio.Lock())

    async def _used_bytes(self, project: str, session: AsyncSession | None = None) -> int:
        """Bytes of the project's datasets that are not deleted."""
        query = sa.select(sa.func.coalesce(sa.func.sum(DatasetRow.size_bytes), 0)).where(
            DatasetRow.project == project, DatasetRow.delete_time.is_(None)
        )
        if session is not None:
            return int(await session.scalar(query) or 0)
        async with self._db.read() as reader:
            return int(await reader.scalar(query) or 0)

    def _log_report(self, dataset_id: str, report: ValidationReport) -> None:
        """Only with debug_log_data: issues quote the data (values, excerpts)."""
        if self._debug_log_data and report.issues:
            log.info(
                "debug_log_data: dataset %s validation issues",
                dataset_id,
                extra={"issues": [dataclasses.asdict(issue) for issue in report.issues[:5]]},
            )

    async def _receive(self, path: Path, chunks: AsyncIterator[bytes], used: int) -> tuple[str, int]:
        """Write the chunks to `path`, stopping as soon as the upload is over the
        size limit or, with the project's `used` bytes, over its storage quota."""
        digest = hashlib.sha256()
        size = 0
        # Chunk writes land in the page cache (microseconds); the slow fsync runs in a thread.
        with open(path, "wb") as f:  # noqa: ASYNC230
            async for chunk in chunks:
                size += len(chunk)
                self._check_size(size)
                self._check_quota(used, size)
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        return digest.hexdigest(), size

    async def validate(self, dataset_id: str, *, base_model: str, max_seq_length: int) -> DatasetRow:
        """Validate a stored dataset again, with a tokenizer when a base model is given."""
        if max_seq_length < 0 or max_seq_length > 131072:
            raise InvalidArgument([FieldViolation("max_seq_length", "must be between 0 and 131072")])
        row = await self.get(dataset_id)
        path = Path(row.path)
        kwargs: dict[str, Any] = {"format": row.format}
        if base_model:
            kwargs.update(base_model=base_model, max_seq_len=max_seq_length or 2048)
        try:
            report = await asyncio.to_thread(validate_file, path, **kwargs)
        except ImportError as e:
            raise FailedPrecondition(
                "tokenizer checks need transformers on the server: pip install 'brightrun[trainer]'",
                reason="TOKENIZER_UNAVAILABLE",
                metadata={"base_model": base_model},
            ) from e
        except (OSError, ValueError) as e:
            raise InvalidArgument(
                [FieldViolation("base_model", f"could not load a tokenizer from {base_model!r}: {e}")],
                reason="MODEL_UNKNOWN",
                metadata={"base_model": base_model},
            ) from e
        await asyncio.to_thread(_store_report, path.parent, report)
        self._log_report(dataset_id, report)
        async with self._db.write() as session:
            fresh = await session.get(DatasetRow, dataset_id, with_for_update=True)
            if fresh is None or fresh.delete_time is not None:
                raise NotFound("dataset", dataset_id)
            fresh.state = DatasetState.INVALID if report.critical_count else DatasetState.READY
            fresh.stats = _stats(report)
            fresh.validation = _summary(report)
        return fresh

    def _issues(self, row: DatasetRow) -> list[ValidationIssue]:
        document = _load_report(Path(row.path).parent)
        fields = ValidationIssue.__dataclass_fields__
        return [ValidationIssue(**{k: v for k, v in d.items() if k in fields}) for d in document.get("issues", [])]

    async def list_issues(
        self,
        dataset_id: str,
        *,
        size: int,
        token: str,
        order: SortKey,
        critical_only: bool,
        types: Sequence[str],
        include_context: bool,
    ) -> tuple[list[tuple[ValidationIssue, ContextExcerpt | None]], str, int]:
        row = await self.get(dataset_id)
        limit = page_size(size, default=50, maximum=1000)
        issues = await asyncio.to_thread(self._issues, row)
        chosen = sort_issues(filter_issues(issues, critical_only=critical_only, types=list(types) or None), order)
        try:
            page = page_issues(chosen, page_size=limit, page_token=token)
        except ValueError as e:
            raise InvalidArgument([FieldViolation("page_token", str(e))], reason="PAGE_TOKEN_INVALID") from e
        path = Path(row.path)

        def excerpts() -> list[tuple[ValidationIssue, ContextExcerpt | None]]:
            out: list[tuple[ValidationIssue, ContextExcerpt | None]] = []
            for issue in page.issues:
                excerpt = None
                if include_context and issue.byte_offset is not None and issue.line is not None:
                    excerpt = context_excerpt(path, byte_offset=issue.byte_offset, line=issue.line, column=issue.column)
                out.append((issue, excerpt))
            return out

        return await asyncio.to_thread(excerpts), page.next_page_token, page.total

    async def export_issues(self, dataset_id: str, *, critical_only: bool, order: SortKey) -> AsyncIterator[bytes]:
        row = await self.get(dataset_id)
        issues = await asyncio.to_thread(self._issues, row)
        chosen = sort_issues(filter_issues(issues, critical_only=critical_only), order)
        buffer: list[str] = []
        size = 0
        for line in issues_to_csv(chosen):
            buffer.append(line)
            size += len(line)
            if size >= 64 * 1024:
                yield "".join(buffer).encode()
                buffer, size = [], 0
        if buffer:
            yield "".join(buffer).encode()

    async def get(self, dataset_id: str) -> DatasetRow:
        async with self._db.read() as session:
            row = await session.get(DatasetRow, dataset_id)
        if row is None or row.delete_time is not None or not _visible(row):
            raise NotFound("dataset", dataset_id)
        return row

    async def list_datasets(self, *, size: int, token: str, filter_text: str) -> tuple[list[DatasetRow], str]:
        limit = page_size(size, default=50, maximum=1000)
        comparisons = parse_filter(filter_text, _FILTER_FIELDS)
        key = decode_page_token(token, f"datasets|{caller.current().project}|{filter_text}", ("time", "str"))
        query = sa.select(DatasetRow).where(
            DatasetRow.delete_time.is_(None), DatasetRow.project == caller.current().project
        )
        for c in comparisons:
            query = query.where(compare(_COLUMNS[c.field], c))
        if key is not None:
            created = datetime.fromisoformat(key[0])
            query = query.where(after_key([DatasetRow.create_time, DatasetRow.id], [created, key[1]], descending=True))
        query = query.order_by(DatasetRow.create_time.desc(), DatasetRow.id.desc()).limit(limit + 1)
        async with self._db.read() as session:
            rows = list((await session.scalars(query)).all())
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_token = encode_page_token(
                [last.create_time.isoformat(), last.id], f"datasets|{caller.current().project}|{filter_text}"
            )
        return rows, next_token

    async def delete(self, dataset_id: str) -> None:
        async with self._db.write() as session:
            row = await session.get(DatasetRow, dataset_id, with_for_update=True)
            if row is None or row.delete_time is not None or not _visible(row):
                raise NotFound("dataset", dataset_id)
            users = (
                await session.scalars(
                    sa.select(JobRow.id).where(
                        JobRow.dataset_id == dataset_id,
                        JobRow.state.not_in([s.value for s in TERMINAL]),
                    )
                )
            ).all()
            if users:
                raise FailedPrecondition(
                    f"dataset {dataset_id} is used by {len(users)} unfinished job(s): {', '.join(users[:5])}",
                    reason="DATASET_IN_USE",
                    metadata={"dataset_id": dataset_id, "job_ids": ",".join(users[:20])},
                )
            # Keep the row for lineage (jobs reference it); drop the bytes.
            row.delete_time = datetime.now(UTC)
            path = Path(row.path).parent
        shutil.rmtree(path, ignore_errors=True)


REPORT_FILE = "validation.json"


def _visible(row: DatasetRow) -> bool:
    who = caller.current()
    return who.system or row.project == who.project


def _store_report(directory: Path, report: ValidationReport) -> None:
    """The full report (without excerpts, which are read from the file on demand)."""
    tmp = directory / f".{REPORT_FILE}.tmp"
    tmp.write_text(report.to_json() if hasattr(report, "to_json") else json.dumps(report.to_dict()))
    os.replace(tmp, directory / REPORT_FILE)


def _load_report(directory: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((directory / REPORT_FILE).read_text())
    except FileNotFoundError:
        return {}
    return data


def _stats(report: ValidationReport) -> dict[str, Any]:
    s = report.to_dict(context_limit=0)["stats"]
    stats: dict[str, Any] = {
        "conversations": s["conversations"],
        "training_pairs": s["training_pairs"],
        "messages": s["messages"],
        "content_chars": s["content_chars"],
        "conversations_with_errors": s.get("conversations_with_errors", 0),
        "length_unit": s.get("length_unit", "chars"),
        "length_histogram": s.get("length_histogram", []),
        "personas": s.get("persona", {}),
        "emotional_arcs": s.get("emotional_arc", {}),
        "topics": s.get("topic", {}),
        "quality_rating": s.get("quality_rating"),
    }
    tokens = s.get("tokens")
    if tokens:
        stats["total_tokens"] = tokens.get("total_tokens", 0)
        stats["max_tokens"] = (tokens.get("lengths") or {}).get("max", 0)
        stats["token_histogram"] = tokens.get("histogram", [])
        stats["tokenizer"] = report.to_dict(context_limit=0).get("base_model")
    return stats


def _summary(report: ValidationReport) -> dict[str, Any]:
    d = report.to_dict(context_limit=0)
    return {
        "critical_count": report.critical_count,
        "warning_count": report.warning_count,
        "quality_score": report.quality_score,
        "quality_band": d.get("quality_band", ""),
        "ready": bool(d.get("ready")),
        "readiness": d.get("readiness", []),
        "counts_by_type": d.get("counts_by_type", {}),
        "score_bonuses": (d.get("score_breakdown") or {}).get("bonuses", {}),
        "base_model": d.get("base_model") or "",
        "max_seq_length": d.get("max_seq_len") or 0,
        "first_errors": report.first_errors(3),
        "validate_time": datetime.now(UTC).isoformat(),
    }
