"""API keys and who may call what.

A key's secret is ``brk_<id>_<secret>``: ``id`` (12 lowercase letters and
digits) is public and finds the stored key, the rest is 40 random base62
characters (~238 bits). The store keeps only SHA-256 of the whole secret —
a fast hash is right for high-entropy random secrets (there is nothing to
brute-force), and the comparison is constant-time.

``METHOD_ROLES`` is the permission table: every RPC the server serves has an
entry (`tests/server/test_auth.py` walks the service descriptors to hold it
to that), so a new RPC cannot ship without a decision about who may call it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from typing import Final

from brightrun_server.domain.caller import Role

PREFIX: Final = "brk_"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY = re.compile(r"brk_([a-z0-9]{12})_([A-Za-z0-9]{40})")

#: Role order: each includes the ones before it.
RANK: Final = {Role.VIEWER: 1, Role.MEMBER: 2, Role.ADMIN: 3}


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    secret: str
    secret_hash: str


def generate() -> NewKey:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    body = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
    secret = f"{PREFIX}{key_id}_{body}"
    return NewKey(key_id, secret, hash_secret(secret))


def parse(secret: str) -> str | None:
    """The key id of a well-formed secret, else None."""
    match = _KEY.fullmatch(secret)
    return match.group(1) if match else None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def allows(role: Role, required: Role) -> bool:
    return RANK[role] >= RANK[required]


#: Methods anyone may call without a key.
PUBLIC: Final = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List", "/grpc.health.v1.Health/Watch"}
)

#: Methods authenticated by the attempt token in the request, not an API key:
#: the trainer's reporting channel.
ATTEMPT_TOKEN: Final = frozenset(
    {
        "/brightrun.v1.TrainerService/ReportAttempt",
    }
)

_V, _M, _A = Role.VIEWER, Role.MEMBER, Role.ADMIN

#: The role each API-key-authenticated method needs.
METHOD_ROLES: Final[dict[str, Role]] = {
    # Datasets
    "/brightrun.v1.DatasetService/UploadDataset": _M,
    "/brightrun.v1.DatasetService/GetDataset": _V,
    "/brightrun.v1.DatasetService/ListDatasets": _V,
    "/brightrun.v1.DatasetService/DeleteDataset": _M,
    "/brightrun.v1.DatasetService/ValidateDataset": _M,
    "/brightrun.v1.DatasetService/ListValidationErrors": _V,
    "/brightrun.v1.DatasetService/ExportValidationErrors": _V,
    # Jobs
    "/brightrun.v1.JobService/CreateJob": _M,
    "/brightrun.v1.JobService/GetJob": _V,
    "/brightrun.v1.JobService/ListJobs": _V,
    "/brightrun.v1.JobService/CancelJob": _M,
    "/brightrun.v1.JobService/StreamJobMetrics": _V,
    "/brightrun.v1.JobService/StreamJobEvents": _V,
    "/brightrun.v1.JobService/WatchJob": _V,
    "/brightrun.v1.JobService/ListJobMetrics": _V,
    "/brightrun.v1.JobService/ListJobEvents": _V,
    "/brightrun.v1.JobService/EstimateJob": _V,
    "/brightrun.v1.JobService/PauseJob": _M,
    "/brightrun.v1.JobService/ResumeJob": _M,
    "/brightrun.v1.JobService/RetryJob": _M,
    "/brightrun.v1.JobService/SuggestFixes": _V,
    "/brightrun.v1.JobService/ResumeFromCheckpoint": _M,
    "/brightrun.v1.JobService/GetFailureReport": _V,
    "/brightrun.v1.JobService/DecideRecovery": _M,
    "/brightrun.v1.JobService/ListJobCheckpoints": _V,
    "/brightrun.v1.JobService/SwitchToOnDemand": _M,
    "/brightrun.v1.JobService/ExportJobs": _V,
    "/brightrun.v1.JobService/BulkCancelJobs": _M,
    # Queue
    "/brightrun.v1.QueueService/GetQueue": _V,
    "/brightrun.v1.QueueService/WatchQueue": _V,
    "/brightrun.v1.QueueService/PromoteJob": _A,
    "/brightrun.v1.QueueService/ListQueueAudit": _V,
    # Projects
    "/brightrun.v1.ProjectService/GetUsage": _V,
    # Keys
    "/brightrun.v1.ApiKeyService/CreateApiKey": _A,
    "/brightrun.v1.ApiKeyService/ListApiKeys": _A,
    "/brightrun.v1.ApiKeyService/RevokeApiKey": _A,
    "/brightrun.v1.ApiKeyService/GetCaller": _V,
    # Server reflection: the API's shape, for any authenticated caller (buf curl, grpcurl).
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _V,
}
