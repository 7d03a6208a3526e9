"""Dataset formats and validation; pure Python, usable with no server and no torch.

The public surface other packages rely on:

* :func:`detect_format`, :func:`iter_examples`, :class:`Example`, :class:`Message`,
  :class:`DatasetFormat`, :class:`DatasetFormatError` — the normalised form the
  trainer consumes;
* :func:`validate_file` returning a :class:`ValidationReport` with ``issues``,
  ``critical_count``, ``warning_count``, ``quality_score``, ``stats`` and the
  readiness checklist;
* issue helpers shared by the server and the CLI: :func:`sort_issues`,
  :func:`filter_issues`, :func:`page_issues`, :func:`issues_to_csv`,
  :func:`context_excerpt`;
* chat-template tokenization for the trainer: :func:`encode_chat`,
  :class:`ChatEncoder` (transformers is only imported by :func:`load_tokenizer`).
"""

from brightrun.validation.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    ChatTemplateError,
    EncodedChat,
    TokenizerLoadError,
    TokenizerUnavailableError,
    encode_chat,
    load_tokenizer,
)
from brightrun.validation.context import ContextExcerpt, context_excerpt
from brightrun.validation.formats import (
    DatasetFormat,
    DatasetFormatError,
    Example,
    Message,
    detect_format,
    iter_examples,
)
from brightrun.validation.issues import (
    ISSUE_CATALOG,
    IssuePage,
    IssueType,
    Severity,
    ValidationIssue,
    filter_issues,
    issues_to_csv,
    page_issues,
    sort_issues,
)
from brightrun.validation.report import (
    DatasetStats,
    ReadinessCheck,
    TokenStats,
    ValidationReport,
    quality_band,
    validate_file,
)

__all__ = [
    "IGNORE_INDEX",
    "ISSUE_CATALOG",
    "ChatEncoder",
    "ChatTemplateError",
    "ContextExcerpt",
    "DatasetFormat",
    "DatasetFormatError",
    "DatasetStats",
    "EncodedChat",
    "Example",
    "IssuePage",
    "IssueType",
    "Message",
    "ReadinessCheck",
    "Severity",
    "TokenStats",
    "TokenizerLoadError",
    "TokenizerUnavailableError",
    "ValidationIssue",
    "ValidationReport",
    "context_excerpt",
    "detect_format",
    "encode_chat",
    "filter_issues",
    "issues_to_csv",
    "iter_examples",
    "load_tokenizer",
    "page_issues",
    "quality_band",
    "sort_issues",
    "validate_file",
]
