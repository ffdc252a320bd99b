"""The S3-compatible artifact store (spec.artifacts.s3) of the master.

What lives here:

- `S3Settings`: spec.artifacts.s3 (endpoint, bucket, prefix, credentialsSecret, region), validated
  by `from_spec` with errors naming spec.artifacts.s3.<field>.
- `S3Store`: the `ArtifactStore` protocol (morphml.distributed.checkpoints) over one bucket and
  key prefix, through boto3. `check()` is what the master runs before it serves: it reads the
  bucket and writes, reads back and deletes one probe object, so wrong credentials, a missing
  bucket or a read-only key refuse the start with an `S3StoreError` naming the endpoint and
  bucket, instead of failing at the first checkpoint. The constructor runs it (so `make_store`
  never returns an unusable S3 store) unless told not to.
- `S3StoreError`: that refusal, and any later S3 failure, with the endpoint, bucket and key.

Only the master talks to S3: workers upload and download through the master's RPCs (one code
path for both stores, the credentials in one pod, workers need no egress). Credentials come from
boto3's own chain: on the cluster the operator sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in
the master pod from the Secret spec.artifacts.s3.credentialsSecret names; locally the same
environment variables (or an AWS profile) are read. A test may pass them to `S3Store` directly.

Imports: the standard library and morphml.distributed.checkpoints at module level; boto3 and
botocore inside `S3Store` (the master's extra, not the worker image's).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from morphml.distributed.checkpoints import validate_key

S3_FIELD = "spec.artifacts.s3"
DEFAULT_REGION = "us-east-1"
# Environment variables the master reads its credentials from (boto3's names); the operator sets
# them from these keys of the credentials Secret.
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
SECRET_KEYS = (ACCESS_KEY_ENV, SECRET_KEY_ENV)
# Bucket names as S3 allows them (3-63 lowercase letters, digits, dots, hyphens; starting and
# ending with a letter or digit).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SECRET_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_REGION_RE = re.compile(r"^[a-z0-9-]{1,64}$")
# Connect/read timeouts and retries of one S3 call: a dead endpoint is an error within seconds.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3


class S3StoreError(RuntimeError):
    """The S3 store cannot be used (at the master's start) or one call failed; names endpoint/bucket."""


@dataclass(frozen=True)
class S3Settings:
    """spec.artifacts.s3, validated."""

    bucket: str
    endpoint: str = ""  # "" = AWS's own endpoint for the region
    prefix: str = ""  # key prefix inside the bucket, no leading/trailing "/"
    credentials_secret: str = ""  # Secret in the experiment's namespace (the operator's concern)
    region: str = DEFAULT_REGION

    @classmethod
    def from_spec(cls, spec: Any) -> S3Settings:
        """From spec.artifacts.s3; ValueError naming spec.artifacts.s3.<field> and what is allowed."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{S3_FIELD}: must be an object, got {type(spec).__name__}")
        allowed = ("endpoint", "bucket", "prefix", "credentialsSecret", "region")
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ValueError(f"{S3_FIELD}.{unknown[0]}: unknown field; allowed {', '.join(allowed)}")
        bucket = spec.get("bucket")
        if bucket is None:
            raise ValueError(f"{S3_FIELD}.bucket: required (the bucket checkpoints and results are stored in)")
        if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"{S3_FIELD}.bucket={bucket!r}: allowed an S3 bucket name: 3-63 lowercase "
                             f"letters, digits, '.' and '-', starting and ending with a letter or digit")
        endpoint = spec.get("endpoint") or ""
        if not isinstance(endpoint, str):
            raise ValueError(f"{S3_FIELD}.endpoint={endpoint!r}: must be a URL string")
        if endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
                    or parts.path not in ("", "/"):
                raise ValueError(f"{S3_FIELD}.endpoint={endpoint!r}: allowed http(s)://HOST[:PORT] "
                                 f"(no path; the bucket goes in spec.artifacts.s3.bucket)")
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ValueError(f"{S3_FIELD}.endpoint={endpoint!r}: the port must be 1..65535") from None
            endpoint = endpoint.rstrip("/")
        prefix = spec.get("prefix") or ""
        if not isinstance(prefix, str):
            raise ValueError(f"{S3_FIELD}.prefix={prefix!r}: must be a string")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError:
                raise ValueError(f"{S3_FIELD}.prefix={spec.get('prefix')!r}: allowed letters, digits and "
                                 f". _ / - in '/'-separated parts, none empty, '.' or '..'") from None
        secret = spec.get("credentialsSecret") or ""
        if not isinstance(secret, str) or (secret and (len(secret) > 253 or not _SECRET_RE.match(secret))):
            raise ValueError(f"{S3_FIELD}.credentialsSecret={secret!r}: allowed the name of a Secret "
                             f"(lowercase DNS subdomain, at most 253 characters)")
        region = spec.get("region") or DEFAULT_REGION
        if not isinstance(region, str) or not _REGION_RE.match(region):
            raise ValueError(f"{S3_FIELD}.region={region!r}: allowed a region name such as us-east-1 "
                             f"(lowercase letters, digits, '-')")
        return cls(bucket=bucket, endpoint=endpoint, prefix=prefix, credentials_secret=secret, region=region)

    def url(self) -> str:
        """"s3://bucket/prefix" (what status and logs show)."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def where(self) -> str:
        """The bucket and the endpoint, for error messages."""
        return f"{self.url()} at {self.endpoint or 'the AWS endpoint of ' + self.region}"


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", "")) or type(error).__name__


class S3Store:
    """Artifacts as objects `<prefix>/<key>` in one bucket (see the module docstring)."""

    def __init__(self, settings: S3Settings, access_key: str | None = None, secret_key: str | None = None,
                 check: bool = True) -> None:
        """A store over `settings`' bucket; with `check` (the default, what `make_store` gets at
        the master's start) it is verified first and an unusable one raises S3StoreError here."""
        import boto3
        from botocore.config import Config

        self.settings = settings
        config = Config(region_name=settings.region, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                        # Path-style ("endpoint/bucket/key") works with every S3-compatible server;
                        # virtual-host style needs DNS for each bucket.
                        s3={"addressing_style": "path"})
        credentials: dict[str, str] = {}
        if access_key is not None or secret_key is not None:
            credentials = {"aws_access_key_id": access_key or "", "aws_secret_access_key": secret_key or ""}
        # A session of our own: boto3's default session is shared process state.
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=settings.endpoint or None, config=config, **credentials)
        if check:
            self.check()

    def _object(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    def _fail(self, what: str, key: str, error: Exception) -> S3StoreError:
        return S3StoreError(f"S3 store {self.settings.where()}: {what} {key!r} failed: "
                            f"{_error_code(error)}: {error}")

    def check(self) -> None:
        """Refuse a store the master could not use: S3StoreError naming the endpoint and bucket.

        Reads the bucket (wrong credentials: 403; missing bucket: 404; endpoint down: no answer),
        then puts, reads and deletes a probe object under the prefix (a key without write rights)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = self.settings.where()
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except NoCredentialsError:
            raise S3StoreError(f"S3 store {where}: no credentials: set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} "
                               f"(on the cluster: the Secret {S3_FIELD}.credentialsSecret names, with those "
                               f"two keys)") from None
        except ClientError as error:
            code = _error_code(error)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise S3StoreError(f"S3 store {where}: bucket {self.settings.bucket!r} does not exist "
                                   f"({S3_FIELD}.bucket); create it first") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
                raise S3StoreError(f"S3 store {where}: access denied to bucket {self.settings.bucket!r} "
                                   f"({code}): check the credentials ({ACCESS_KEY_ENV}/{SECRET_KEY_ENV}, "
                                   f"from {S3_FIELD}.credentialsSecret on the cluster)") from None
            raise S3StoreError(f"S3 store {where}: bucket check failed: {code}: {error}") from None
        except BotoCoreError as error:
            raise S3StoreError(f"S3 store {where}: endpoint not usable ({S3_FIELD}.endpoint): {error}") from None
        probe = f".morphml-probe-{uuid.uuid4().hex}"
        try:
            name = self._object(probe)
            self._client.put_object(Bucket=self.settings.bucket, Key=name, Body=b"morphml")
            body = self._client.get_object(Bucket=self.settings.bucket, Key=name)["Body"].read()
            self._client.delete_object(Bucket=self.settings.bucket, Key=name)
        except (ClientError, BotoCoreError) as error:
            raise S3StoreError(f"S3 store {where}: cannot write, read and delete a probe object "
                               f"({_error_code(error)}): the credentials need s3:PutObject, s3:GetObject "
                               f"and s3:DeleteObject on the prefix") from None
        if body != b"morphml":
            raise S3StoreError(f"S3 store {where}: the probe object read back differs from what was written")

    def put_file(self, key: str, path: Path) -> None:
        # One PUT (or a multipart upload for large files, completed atomically): S3 answers only
        # once the object is stored durably, and a reader never sees part of it under the key.
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._object(key)
        try:
            self._client.upload_file(str(path), self.settings.bucket, name,
                                     Config=TransferConfig(multipart_threshold=64 << 20, use_threads=False))
        except (ClientError, BotoCoreError) as error:
            raise self._fail("put", key, error) from None

    def open_chunks(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._object(key)
        try:
            # Requested here, not in the generator, so a missing key is a KeyError at the call.
            body = self._client.get_object(Bucket=self.settings.bucket, Key=name)["Body"]
        except ClientError as error:
            if _error_code(error) in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(key) from None
            raise self._fail("get", key, error) from None
        except BotoCoreError as error:
            raise self._fail("get", key, error) from None
        return self._chunks(body, key, chunk)

    def _chunks(self, body: Any, key: str, chunk: int) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError

        try:
            yield from body.iter_chunks(chunk)
        except BotoCoreError as error:
            raise self._fail("read", key, error) from None
        finally:
            body.close()

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # S3 answers a delete of a missing key with success too
            self._client.delete_object(Bucket=self.settings.bucket, Key=self._object(key))
        except (ClientError, BotoCoreError) as error:
            raise self._fail("delete", key, error) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.settings.bucket, Key=self._object(key))
        except ClientError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("head", key, error) from None
        except BotoCoreError as error:
            raise self._fail("head", key, error) from None
        return True

    def describe(self) -> str:
        return self.settings.url()
