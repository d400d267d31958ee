"""`DATA_STORE=s3://bucket/prefix`: job inputs and results in an S3 bucket, reached by workers
through presigned URLs, so the server leaves the data path.

The server writes a job's input once (`put_input`) and hands the worker two presigned URLs
(`input_ref`: GET of the input, `result_ref`: PUT of this attempt's result). The worker talks
to the object store directly with them; the server reads a result back only once the result
message for an outstanding attempt arrives (`get_result`), and checks it as it checks every
result. Objects live under `{prefix}/jobs/{job_id}/`: `input`, and `result-{attempt_token}` per
attempt, so an upload by an attempt that is no longer outstanding lands beside the one the
server reads and is never read. A presigned URL is the capability here: signed by the store's
credentials, for one object and one method, and expiring after the capability lifetime.
A PUT is idempotent (the same attempt uploading twice writes the same object); it is not
resumable: an upload cut off is sent again whole, as S3 keeps no partial object.

The endpoint, credentials and region come from boto3's usual configuration (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws); with an endpoint of
its own (MinIO, moto) path-style addresses are used, which those serve without DNS names per
bucket. The bucket must exist: the store does not create it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from src.config import Settings
from src.data.capability import REF_SECONDS

# A presigned URL lives as long as the server's own references (a job may wait that long in its
# queue), within SigV4's limit of seven days.
EXPIRY_SECONDS = min(REF_SECONDS, 7 * 24 * 3600)
_KEY = re.compile(r"jobs/(\d+)/")


def parse(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at its ends) of `s3://bucket/prefix`; ValueError otherwise."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"DATA_STORE {url!r}: expected s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


class S3Store:
    """The `DataStore` of an S3 bucket (see src/data/store.py for what each method promises)."""

    def __init__(self, settings: Settings, client=None):
        self.bucket, prefix = parse(settings.data_store)
        self.root = f"{prefix}/jobs/" if prefix else "jobs/"
        self.expiry = EXPIRY_SECONDS
        self.client = client or self._client()

    @staticmethod
    def _client():
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(signature_version="s3v4", s3={"addressing_style": "path" if endpoint else "auto"},
                        retries={"max_attempts": 5, "mode": "standard"})
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return boto3.client("s3", region_name=region, config=config)

    # -- keys ---------------------------------------------------------------------------------

    def _folder(self, job_id: int) -> str:
        return f"{self.root}{int(job_id)}/"

    def _input_key(self, job_id: int) -> str:
        return self._folder(job_id) + "input"

    def _result_key(self, job_id: int, attempt_token: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", attempt_token):
            raise ValueError(f"attempt token {attempt_token!r} cannot name an object")
        return self._folder(job_id) + f"result-{attempt_token}"

    # -- the protocol ------------------------------------------------------------------------

    def check(self) -> None:
        """Fail at start, with the reason, where the bucket cannot be reached."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise RuntimeError(f"DATA_STORE s3://{self.bucket}: {exc}") from exc

    def put_input(self, job_id: int, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._input_key(job_id), Body=body,
                               ContentType="application/octet-stream")

    def input_ref(self, job_id: int, attempt_token: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._input_key(job_id)}, ExpiresIn=self.expiry)

    def result_ref(self, job_id: int, attempt_token: str) -> str:
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._result_key(job_id, attempt_token)},
            ExpiresIn=self.expiry)

    def get_result(self, job_id: int, attempt_token: str) -> bytes | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._result_key(job_id, attempt_token))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read()

    def _keys(self, prefix: str) -> Iterable[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _delete(self, keys: list[str]) -> int:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
        return len(keys)

    def delete_jobs(self, job_ids: Iterable[int]) -> None:
        self._delete([key for job_id in job_ids for key in self._keys(self._folder(job_id))])

    def sweep(self, live_job_ids: set[int]) -> int:
        """Delete every object of a job that is not live (a restart's leftovers); how many."""
        stale = []
        for key in self._keys(self.root):
            found = _KEY.match(key, len(self.root) - len("jobs/"))
            if not found or int(found[1]) not in live_job_ids:
                stale.append(key)
        return self._delete(stale)
