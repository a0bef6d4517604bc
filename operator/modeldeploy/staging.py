"""Init-container stager: fetch the model repository into the pod's /models.

Used where Triton cannot read the storage URI itself (pvc://, http(s)://) or where a
rendered config.pbtxt must be added to the repository (then also for s3://). Schemes:

* ``pvc://claim/sub/path``: copies ``<--pvc-root>/sub/path`` (the claim is mounted there).
* ``http(s)://host/archive.tar.gz``: downloads and unpacks a tar archive (gzip, bzip2, xz
  or plain). Every member is checked first: absolute paths, ``..``, links pointing out of
  the repository and device files are refused, naming the member.
* ``s3://bucket/prefix`` (or Triton's ``s3://host:port/bucket/prefix``): lists the prefix
  with ListObjectsV2 and downloads every object, signed with AWS Signature Version 4.
  Endpoint: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT`` (a host:port
  without scheme is https unless ``S3_USE_HTTPS=0``), else the host:port in the URI, else
  AWS (``https://<bucket>.s3.<region>.amazonaws.com``, virtual-hosted style; custom
  endpoints use path style). Region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default
  us-east-1). Credentials: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optional
  ``AWS_SESSION_TOKEN``, from files of those names in ``--credentials-dir`` (the mounted
  Secret) or else from the environment; none: anonymous requests. The settings above may
  also be files in ``--credentials-dir``.

Credentials are never printed: messages name where credentials came from, never their
values, and every message is scrubbed of them. The S3 client is the standard library
only (no boto3: the stager image stays small, and botocore's ``python-dateutil<3`` pin
conflicts with the operator's kubernetes client).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SUPPORTED_SCHEMES = {"pvc", "http", "https", "s3"}

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SETTING_KEYS = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "S3_ENDPOINT",
    "S3_USE_HTTPS",
)
RETRIES = 3
TIMEOUT = 60.0
CHUNK = 1 << 20
MAX_LIST_PAGES = 10_000


class StageError(Exception):
    """Staging failed; the message says why (and never holds a credential)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", required=True, help="storage URI of the model repository")
    p.add_argument("--dest", required=True, help="directory to fill (Triton's --model-repository)")
    p.add_argument("--model", required=True, help="Triton model name")
    p.add_argument("--version", required=True, type=int, help="model version directory expected")
    p.add_argument("--config", default=None, help="rendered config.pbtxt to install when the repo has none")
    p.add_argument("--pvc-root", default="/mnt/model-pvc", help="where the PVC is mounted (pvc://)")
    p.add_argument("--credentials-dir", default=None, help="mounted credentials Secret")


# --------------------------------------------------------------------------- paths and archives


def safe_relative(name: str) -> PurePosixPath:
    """A repository-relative path, or StageError for absolute paths and ``..``."""
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")):
        raise StageError(f"refusing {name!r}: absolute path")
    if ".." in path.parts:
        raise StageError(f"refusing {name!r}: '..' leaves the repository")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise StageError(f"refusing {name!r}: empty path")
    return PurePosixPath(*parts)


def check_archive(tar: tarfile.TarFile) -> None:
    """Refuse an archive with any member that would land outside the destination, or that
    is a device, FIFO, or a link pointing out of it."""
    for member in tar.getmembers():
        rel = safe_relative(member.name)
        if member.isdev() or member.isfifo():
            raise StageError(f"refusing {member.name!r}: device or FIFO in the archive")
        if member.issym():
            target = PurePosixPath(member.linkname)
            if target.is_absolute():
                raise StageError(f"refusing {member.name!r}: symlink to absolute path {member.linkname!r}")
            depth = len(rel.parent.parts)
            for part in target.parts:
                depth = depth - 1 if part == ".." else depth + (part not in ("", "."))
                if depth < 0:
                    raise StageError(
                        f"refusing {member.name!r}: symlink {member.linkname!r} leaves the repository"
                    )
        elif member.islnk():
            try:
                safe_relative(member.linkname)
            except StageError as exc:
                raise StageError(
                    f"refusing {member.name!r}: hard link to {member.linkname!r}: {exc}"
                ) from None


def safe_extract(archive: Path, dest: Path) -> int:
    """Unpack a tar archive into ``dest`` after :func:`check_archive`; returns the member count."""
    try:
        with tarfile.open(archive) as tar:
            check_archive(tar)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                tar.extractall(dest)
            return len(tar.getmembers())
    except tarfile.TarError as exc:
        raise StageError(f"not a usable tar archive: {exc}") from exc


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None
    source: str = "environment"

    def __repr__(self) -> str:  # never shows the values
        return f"Credentials(source={self.source!r})"

    def scrub(self, text: str) -> str:
        for secret in (self.access_key, self.secret_key, self.session_token):
            if secret:
                text = text.replace(secret, "***")
        return text


def read_settings(credentials_dir: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """Credentials and S3 settings: files in ``credentials_dir`` first, then the environment."""
    out: dict[str, str] = {}
    for key in (*CREDENTIAL_KEYS, *SETTING_KEYS):
        value: str | None = None
        if credentials_dir is not None and (credentials_dir / key).is_file():
            value = (credentials_dir / key).read_text().strip()
        if not value:
            value = environ.get(key, "").strip()
        if value:
            out[key] = value
    return out


def load_credentials(credentials_dir: Path | None, environ: Mapping[str, str]) -> Credentials | None:
    from_dir = credentials_dir is not None and all(
        (credentials_dir / k).is_file() for k in CREDENTIAL_KEYS[:2]
    )
    settings = read_settings(credentials_dir if from_dir else None, environ)
    key, secret = settings.get("AWS_ACCESS_KEY_ID"), settings.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        return None
    return Credentials(
        key,
        secret,
        settings.get("AWS_SESSION_TOKEN"),
        source=f"files in {credentials_dir}" if from_dir else "environment",
    )


# --------------------------------------------------------------------------- SigV4


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def sigv4_headers(
    method: str,
    url: str,
    *,
    region: str,
    credentials: Credentials,
    now: dt.datetime,
    headers: Mapping[str, str] | None = None,
    payload_sha256: str = EMPTY_SHA256,
    service: str = "s3",
) -> dict[str, str]:
    """Headers (incl. Authorization) signing a request with AWS Signature Version 4.

    ``url`` must already be encoded as it is sent (S3 signs the path as sent, without
    encoding it twice); its query string is canonicalised here.
    """
    parts = urllib.parse.urlsplit(url)
    amz_date = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    datestamp = amz_date[:8]
    out = {k: v for k, v in (headers or {}).items()}
    out["host"] = parts.netloc
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_sha256
    if credentials.session_token:
        out["x-amz-security-token"] = credentials.session_token
    canon = {k.lower().strip(): " ".join(v.strip().split()) for k, v in out.items()}
    signed = ";".join(sorted(canon))
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query))
    canonical_request = "\n".join(
        [
            method,
            parts.path or "/",
            canonical_query,
            "".join(f"{k}:{canon[k]}\n" for k in sorted(canon)),
            signed,
            payload_sha256,
        ]
    )
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + credentials.secret_key).encode()
    for part in (datestamp, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    del out["host"]  # sent as Host by the HTTP client, from the same URL
    return out


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"
    endpoint: str | None  # scheme://host[:port] for a custom endpoint; None: AWS

    def describe(self) -> str:
        where = self.endpoint or "AWS"
        return f"s3://{self.bucket}/{self.prefix} ({where})"


def parse_s3_uri(uri: str, settings: Mapping[str, str]) -> S3Location:
    rest = uri.split("://", 1)[1]
    first, _, path = rest.partition("/")
    endpoint = (
        settings.get("AWS_ENDPOINT_URL_S3") or settings.get("AWS_ENDPOINT_URL") or settings.get("S3_ENDPOINT")
    )
    if ":" in first:  # Triton's s3://host:port/bucket/path
        endpoint = endpoint or first
        bucket, _, path = path.partition("/")
    else:
        bucket = first
    if not bucket:
        raise StageError(f"{uri}: no bucket in the URI (s3://bucket/path or s3://host:port/bucket/path)")
    if endpoint and "://" not in endpoint:
        https = settings.get("S3_USE_HTTPS", "1").lower() not in ("0", "false", "no")
        endpoint = ("https://" if https else "http://") + endpoint
    prefix = path.strip("/")
    return S3Location(bucket, prefix + "/" if prefix else "", endpoint.rstrip("/") if endpoint else None)


class S3Client:
    """Just enough S3 for the stager: ListObjectsV2 and GetObject, with retries."""

    def __init__(self, loc: S3Location, *, region: str, credentials: Credentials | None) -> None:
        self.loc = loc
        self.region = region
        self.credentials = credentials

    def _url(self, key: str = "", query: Mapping[str, str] | None = None) -> str:
        path_key = _quote(key, safe="/-_.~")
        if self.loc.endpoint:
            url = f"{self.loc.endpoint}/{_quote(self.loc.bucket)}/{path_key}"
        else:
            url = f"https://{self.loc.bucket}.s3.{self.region}.amazonaws.com/{path_key}"
        if query:
            url += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        return url

    def scrub(self, text: str) -> str:
        return self.credentials.scrub(text) if self.credentials else text

    @contextlib.contextmanager
    def _get(self, url: str) -> Iterator[http.client.HTTPResponse]:
        last = ""
        for attempt in range(1, RETRIES + 1):
            headers: dict[str, str] = {}
            if self.credentials is not None:
                headers = sigv4_headers(
                    "GET", url, region=self.region, credentials=self.credentials, now=dt.datetime.now(dt.UTC)
                )
            headers["Host"] = urllib.parse.urlsplit(url).netloc
            req = urllib.request.Request(url, headers=headers, method="GET")
            try:
                resp: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=TIMEOUT)
            except urllib.error.HTTPError as err:
                code, message = _s3_error(err)
                last = f"GET {_redact_url(url)} answered {err.code} {code}: {message}"
                if err.code < 500 or attempt == RETRIES:
                    raise StageError(self.scrub(last)) from None
            except (urllib.error.URLError, OSError) as err:
                last = f"GET {_redact_url(url)}: {err}"
                if attempt == RETRIES:
                    raise StageError(self.scrub(last)) from None
            else:
                with resp:
                    yield resp
                return
            time.sleep(0.5 * 2 ** (attempt - 1))  # retry back-off (bounded: RETRIES attempts)
        raise StageError(self.scrub(last))  # pragma: no cover

    def list(self) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        for _ in range(MAX_LIST_PAGES):
            query = {"list-type": "2", "prefix": self.loc.prefix}
            if token:
                query["continuation-token"] = token
            with self._get(self._url("", query)) as resp:
                body = resp.read()
            try:
                root = ET.fromstring(body)
            except ET.ParseError as exc:
                raise StageError(
                    f"ListObjectsV2 of {self.loc.describe()}: unparsable answer: {exc}"
                ) from None
            keys.extend(el.text or "" for el in root.iter(f"{S3_NS}Key"))
            truncated = (root.findtext(f"{S3_NS}IsTruncated") or "false").lower() == "true"
            token = root.findtext(f"{S3_NS}NextContinuationToken")
            if not truncated or not token:
                return keys
        raise StageError(f"{self.loc.describe()}: more than {MAX_LIST_PAGES} pages of objects")

    def download(self, key: str, target: Path) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        size = 0
        with self._get(self._url(key)) as resp, tmp.open("wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                size += len(chunk)
        tmp.replace(target)
        return size


def _redact_url(url: str) -> str:
    """A URL without its query string (continuation tokens are noise)."""
    return url.split("?", 1)[0]


def _s3_error(err: urllib.error.HTTPError) -> tuple[str, str]:
    """(Code, Message) of an S3 error answer; other elements (e.g. AWSAccessKeyId,
    StringToSign) are never looked at."""
    try:
        body = err.read(65536)
        root = ET.fromstring(body)
    except (ET.ParseError, OSError, ValueError):
        return (err.reason if isinstance(err.reason, str) else "Error"), ""
    return (root.findtext("Code") or "Error", root.findtext("Message") or "")


def fetch_s3(uri: str, dest: Path, *, credentials_dir: Path | None, environ: Mapping[str, str]) -> str:
    settings = read_settings(credentials_dir, environ)
    loc = parse_s3_uri(uri, settings)
    region = settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION") or "us-east-1"
    creds = load_credentials(credentials_dir, environ)
    client = S3Client(loc, region=region, credentials=creds)
    keys = [k for k in client.list() if not k.endswith("/")]  # "directory" markers carry nothing
    if not keys:
        raise StageError(f"{loc.describe()}: no objects under the prefix")
    total = 0
    for key in keys:
        rel = safe_relative(key[len(loc.prefix) :])
        total += client.download(key, dest / rel)
    how = f"credentials from {creds.source}" if creds else "anonymous"
    return f"{len(keys)} objects, {total} bytes from {loc.describe()}, {how}"


# --------------------------------------------------------------------------- fetch


def fetch(
    uri: str,
    dest: Path,
    *,
    pvc_root: Path,
    credentials_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Fill ``dest`` from ``uri``; returns a one-line summary. Raises :class:`StageError`."""
    scheme, _, rest = uri.partition("://")
    env = os.environ if environ is None else environ
    dest.mkdir(parents=True, exist_ok=True)
    if scheme == "pvc":
        _claim, _, sub = rest.partition("/")
        root = pvc_root.resolve()
        src = (root / safe_relative(sub)).resolve() if sub.strip("/") else root
        if src != root and root not in src.parents:
            raise StageError(f"{uri}: {sub!r} leaves the claim")
        if not src.is_dir():
            raise StageError(f"{uri}: {src} is not a directory on the claim")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return f"copied {src}"
    if scheme in ("http", "https"):
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "repo.tar"
            try:
                with urllib.request.urlopen(uri, timeout=TIMEOUT) as resp, archive.open("wb") as fh:
                    shutil.copyfileobj(resp, fh, CHUNK)
            except urllib.error.HTTPError as err:
                raise StageError(f"GET {_redact_url(uri)} answered {err.code} {err.reason}") from None
            except (urllib.error.URLError, OSError) as err:
                raise StageError(f"GET {_redact_url(uri)}: {err}") from None
            members = safe_extract(archive, dest)
        return f"unpacked {members} archive members from {_redact_url(uri)}"
    if scheme == "s3":
        return fetch_s3(uri, dest, credentials_dir=credentials_dir, environ=env)
    raise StageError(
        f"storage scheme {scheme}:// is not supported by the stager (supported: "
        f"{', '.join(sorted(SUPPORTED_SCHEMES))})"
    )


def main(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    creds_dir = Path(args.credentials_dir) if args.credentials_dir else None
    try:
        summary = fetch(args.uri, dest, pvc_root=Path(args.pvc_root), credentials_dir=creds_dir)
    except StageError as exc:
        print(f"stage: {_redact_url(args.uri)}: {exc}", file=sys.stderr)
        return 1
    print(f"stage: {summary}")
    model_dir = dest / args.model
    if not model_dir.is_dir():
        print(f"stage: the repository has no directory {args.model}/", file=sys.stderr)
        return 1
    if args.config and not (model_dir / "config.pbtxt").exists():
        shutil.copyfile(args.config, model_dir / "config.pbtxt")
    if not (model_dir / str(args.version)).is_dir():
        print(f"stage: model {args.model} has no version directory {args.version}/", file=sys.stderr)
        return 1
    os.sync()
    print(f"stage: model {args.model} version {args.version} staged into {dest}")
    return 0
