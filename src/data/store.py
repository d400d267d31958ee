"""The `DataStore` protocol, which every place job bytes can live implements, and the choice among them.

The server puts each job's input once (`put_input`, at its first publication) and hands
every publication of the job two references: `input_ref` (a URL the worker GETs) and
`result_ref` (a URL the worker PUTs its result to), both bound to that attempt's token.
The collector reads a result back with `get_result` before the kind checks it. Inputs are
keyed by job id, results by job id and attempt token (two attempts never overwrite each
other). `delete_jobs` drops both when their task ends; `sweep` drops whatever belongs to
no live job (a restart's leftovers) and says how many objects it removed.

DATA_STORE chooses: empty (the default) is the server itself (`local.ServerStore`,
served by `endpoint`); `s3://bucket/prefix` is an S3 bucket (`s3.S3Store`, presigned
URLs), imported only then, so a deployment without S3 never needs boto3.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from src.config import Settings

# What a result may weigh on the data plane when its kind names no `max_result_bytes`: the
# largest a kind produces today (a separation job's 96 MiB of float32 stems) with headroom.
DEFAULT_RESULT_LIMIT = 128 * 1024 * 1024


class DataStore(Protocol):
    def put_input(self, job_id: int, body: bytes) -> None: ...
    def input_ref(self, job_id: int, attempt_token: str) -> str: ...
    def result_ref(self, job_id: int, attempt_token: str) -> str: ...
    def get_result(self, job_id: int, attempt_token: str) -> bytes | None: ...
    def delete_jobs(self, job_ids: Iterable[int]) -> None: ...
    def sweep(self, live_job_ids: set[int]) -> int: ...


def is_s3(settings: Settings) -> bool:
    return settings.data_store.startswith("s3://")


def open_store(settings: Settings) -> DataStore:
    """The store DATA_STORE names (ValueError for a value that names none)."""
    if is_s3(settings):
        from src.data.s3 import S3Store  # boto3 only where S3 is used

        return S3Store(settings)
    if settings.data_store not in ("", "server"):
        raise ValueError(f"DATA_STORE={settings.data_store!r}: leave it empty (the server) or give s3://bucket/prefix")
    from src.data.capability import load_secret
    from src.data.local import ServerStore

    root = settings.storage_dir / "data"
    return ServerStore(root, settings.data_address, load_secret(settings.data_secret, root))
