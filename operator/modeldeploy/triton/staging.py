"""Init-container stager: fetch the model repository into the pod's /models.

The operator stages every storage scheme with this init container (Triton is always started on
the staged emptyDir; why, measured against Triton's own cloud storage, is in docs/storage.md).
Schemes:

* ``pvc://claim/sub/path``: copies ``<--pvc-root>/sub/path`` (the claim is mounted there).
* ``http(s)://host/archive.tar.gz``: downloads and unpacks a tar archive (gzip, bzip2, xz
  or plain). Every member is checked first: absolute paths, ``..``, links pointing out of
  the repository and device files are refused, naming the member. A ``ca.crt`` in the
  credentials Secret is trusted besides the system CAs.
* ``s3://bucket/prefix`` (or Triton's ``s3://host:port/bucket/prefix``), ``gs://bucket/prefix``,
  ``as://account/container/prefix``: every object under the prefix is listed and downloaded
  by `obstore <https://developmentseed.org/obstore/>`_ (Rust ``object_store``), which speaks
  the protocols and runs the standard credential providers (AWS web identity/STS, container
  and instance credentials; Google service accounts and metadata; Azure workload identity,
  managed identity). What the stager adds: the settings below, read from the files of the
  mounted credentials Secret (``--credentials-dir``) first, then from the environment.

  S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` (default us-east-1); endpoint ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT`` (a host:port without scheme is https unless
  ``S3_USE_HTTPS=0``), else the host:port in the URI, else AWS; web identity
  (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, ``AWS_ROLE_SESSION_NAME``, STS at
  ``AWS_ENDPOINT_URL_STS`` / ``AWS_STS_ENDPOINT`` / ``AWS_ENDPOINT_URL``, as on EKS); profiles
  (``AWS_PROFILE`` in ``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_CONFIG_FILE``, default
  ``~/.aws/…``, or files ``credentials`` / ``config`` in the Secret: static keys, or
  ``role_arn`` + ``web_identity_token_file``; object_store has no profile support, so that
  lookup is here); ``AWS_SKIP_SIGNATURE=true`` for public buckets.

  GCS: a service-account key ``service-account.json`` in the Secret,
  ``GOOGLE_APPLICATION_CREDENTIALS`` (a file) or ``GOOGLE_SERVICE_ACCOUNT_KEY`` (the JSON);
  endpoint ``GOOGLE_BASE_URL`` or ``STORAGE_EMULATOR_HOST`` (fake-gcs-server; without
  credentials then, requests are unsigned).

  Azure: ``AZURE_STORAGE_ACCOUNT_KEY`` (or Triton's ``AZURE_STORAGE_KEY``),
  ``AZURE_STORAGE_SAS_TOKEN``, or ``AZURE_STORAGE_CONNECTION_STRING`` (AccountName, AccountKey,
  SharedAccessSignature, BlobEndpoint); endpoint ``AZURE_STORAGE_ENDPOINT`` or the connection
  string's ``BlobEndpoint`` (Azurite: ``http://host:10000/devstoreaccount1``).

Kept by hand (project rules, not protocol): archive member checks, path checks of every listed
object, and credentials: never printed; messages name where credentials came from, never their
values, and every message is scrubbed of every credential value the stager read.
"""

from __future__ import annotations

import argparse
import configparser
import datetime as dt
import json
import os
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .. import timeutil

SUPPORTED_SCHEMES = {"pvc", "http", "https", "s3", "gs", "as"}
CLOUD_SCHEMES = {"s3", "gs", "as"}

# Settings the stager reads: a file of that name in the credentials dir, else the environment.
S3_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "S3_ENDPOINT",
    "S3_USE_HTTPS",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL_STS",
    "AWS_STS_ENDPOINT",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_SKIP_SIGNATURE",
)
GCS_KEYS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BASE_URL",
    "STORAGE_EMULATOR_HOST",
)
AZURE_KEYS = (
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ENDPOINT",
)
# Values never printed (scrubbed from every message).
SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
}
GCS_KEY_FILE = "service-account.json"
CA_FILE = "ca.crt"
TIMEOUT = 60.0
CHUNK = 1 << 20
# signatures and tokens in URLs an error message may quote (SAS, presigned S3)
_URL_SECRETS = re.compile(
    r"((?:sig|se|skoid|sktid|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)[^&\s\"']+", re.I
)


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


# --------------------------------------------------------------------------- settings and scrubbing


@dataclass
class Settings:
    """What the stager read: Secret files first, then the environment; remembers every secret
    value it handed out so that :meth:`scrub` can remove them from any message."""

    credentials_dir: Path | None
    environ: Mapping[str, str]
    secrets: set[str] = field(default_factory=set)
    sources: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never shows the values
        return f"Settings(credentials_dir={self.credentials_dir!s}, keys={sorted(self.sources)})"

    def file(self, name: str) -> Path | None:
        if self.credentials_dir is not None and (self.credentials_dir / name).is_file():
            return self.credentials_dir / name
        return None

    def get(self, key: str) -> str | None:
        value: str | None = None
        path = self.file(key)
        if path is not None:
            value = path.read_text().strip()
            source = f"file {key} of the credentials Secret"
        if not value:
            value = self.environ.get(key, "").strip()
            source = f"environment {key}"
        if not value:
            return None
        self.sources[key] = source
        if key in SECRET_KEYS:
            self.remember(value)
        return value

    def remember(self, *values: str | None) -> None:
        for v in values:
            if v and len(v) >= 4:  # shorter "secrets" would scrub ordinary words
                self.secrets.add(v)

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return _URL_SECRETS.sub(r"\1***", text)

    def source(self, key: str) -> str:
        return self.sources.get(key, key)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _client_options(endpoint: str | None, settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"connect_timeout": "10s", "timeout": "3600s", "read_timeout": "120s"}
    if endpoint and endpoint.startswith("http://"):
        options["allow_http"] = True
    ca = settings.file(CA_FILE)
    if ca is not None:
        options["root_certificate"] = ca.read_bytes()
    return options


def _retry_config() -> dict[str, Any]:
    """Bounded retries: a refused connection or 5xx is retried for at most a minute (obstore's default
    is three), then the init container fails and the kubelet restarts it with its own back-off."""
    return {
        "max_retries": 5,
        "retry_timeout": dt.timedelta(seconds=60),
        "backoff": {"init_backoff": dt.timedelta(milliseconds=100), "max_backoff": dt.timedelta(seconds=10)},
    }


def _split(rest: str) -> tuple[str, str]:
    first, _, path = rest.partition("/")
    return first, path.strip("/")


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"
    endpoint: str | None  # scheme://host[:port] for a custom endpoint; None: AWS

    def describe(self) -> str:
        where = self.endpoint or "AWS"
        return f"s3://{self.bucket}/{self.prefix} ({where})"


def parse_s3_uri(uri: str, settings: Mapping[str, str | None]) -> S3Location:
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
        https = (settings.get("S3_USE_HTTPS") or "1").lower() not in ("0", "false", "no")
        endpoint = ("https://" if https else "http://") + endpoint
    prefix = path.strip("/")
    return S3Location(bucket, prefix + "/" if prefix else "", endpoint.rstrip("/") if endpoint else None)


def read_aws_profile(settings: Settings) -> tuple[str, dict[str, str]] | None:
    """(where, values) of the AWS profile in the shared credentials/config files, if any.

    ``AWS_PROFILE`` (default ``default``); files: ``credentials``/``config`` in the Secret, else
    ``AWS_SHARED_CREDENTIALS_FILE``/``AWS_CONFIG_FILE``, else ``~/.aws/credentials``/``~/.aws/config``.
    In the config file a profile other than default is the section ``profile NAME``.
    """
    profile = settings.get("AWS_PROFILE") or "default"
    home = Path(settings.environ.get("HOME") or "~").expanduser()
    creds_file = settings.file("credentials") or Path(
        settings.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"
    )
    config_file = settings.file("config") or Path(settings.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    values: dict[str, str] = {}
    found: list[str] = []
    for path, section in (
        (config_file, profile if profile == "default" else f"profile {profile}"),
        (creds_file, profile),
    ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError) as exc:
            raise StageError(f"AWS shared file {path}: unreadable ({type(exc).__name__})") from None
        if parser.has_section(section):
            values.update({k.lower(): v.strip() for k, v in parser.items(section)})
            found.append(str(path))
    if not found:
        if settings.get("AWS_PROFILE"):
            raise StageError(
                f"AWS_PROFILE={profile}: no such profile in {creds_file} or {config_file}; add it, or "
                "put AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into spec.model.credentialsSecret"
            )
        return None
    settings.remember(values.get("aws_access_key_id"), values.get("aws_secret_access_key"))
    settings.remember(values.get("aws_session_token"))
    return f"profile {profile} ({', '.join(found)})", values


def s3_config(loc: S3Location, settings: Settings) -> tuple[dict[str, Any], str]:
    """obstore S3 configuration and a description of where the credentials come from."""
    profile = read_aws_profile(settings)
    pvals = profile[1] if profile else {}
    region = settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION") or pvals.get("region")
    config: dict[str, Any] = {"region": region or "us-east-1"}
    if loc.endpoint:
        config["endpoint"] = loc.endpoint
        config["virtual_hosted_style_request"] = False
    key, secret = settings.get("AWS_ACCESS_KEY_ID"), settings.get("AWS_SECRET_ACCESS_KEY")
    token_file = settings.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    role = settings.get("AWS_ROLE_ARN")
    sts = settings.get("AWS_ENDPOINT_URL_STS") or settings.get("AWS_STS_ENDPOINT")
    sts = sts or settings.get("AWS_ENDPOINT_URL")
    if key or secret:
        if not (key and secret):
            missing, present = (
                ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
                if key
                else ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            )
            raise StageError(
                f"{missing} is missing ({settings.source(present)} is set): put both keys into "
                "spec.model.credentialsSecret"
            )
        config.update(access_key_id=key, secret_access_key=secret)
        session = settings.get("AWS_SESSION_TOKEN")
        if session:
            config["session_token"] = session
        how = f"static keys from {settings.source('AWS_SECRET_ACCESS_KEY')}"
    elif token_file or role:
        if not (token_file and role):
            raise StageError(
                "web identity needs both AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN "
                f"(only {'AWS_WEB_IDENTITY_TOKEN_FILE' if token_file else 'AWS_ROLE_ARN'} is set)"
            )
        how = _web_identity(config, settings, token_file, role, sts, settings.get("AWS_ROLE_SESSION_NAME"))
        how = f"web identity ({settings.source('AWS_WEB_IDENTITY_TOKEN_FILE')}, {how})"
    elif profile and pvals.get("aws_access_key_id") and pvals.get("aws_secret_access_key"):
        config.update(
            access_key_id=pvals["aws_access_key_id"], secret_access_key=pvals["aws_secret_access_key"]
        )
        if pvals.get("aws_session_token"):
            config["session_token"] = pvals["aws_session_token"]
        how = f"static keys from {profile[0]}"
    elif profile and pvals.get("role_arn") and pvals.get("web_identity_token_file"):
        how = _web_identity(
            config, settings, pvals["web_identity_token_file"], pvals["role_arn"], sts,
            pvals.get("role_session_name"),
        )  # fmt: skip
        how = f"web identity from {profile[0]}, {how}"
    elif _truthy(settings.get("AWS_SKIP_SIGNATURE")):
        config["skip_signature"] = True
        how = "unsigned requests (AWS_SKIP_SIGNATURE)"
    else:
        how = "obstore's default AWS chain (container credentials, instance metadata)"
    return config, how


def _web_identity(
    config: dict[str, Any],
    settings: Settings,
    token_file: str,
    role: str,
    sts: str | None,
    session_name: str | None,
) -> str:
    path = Path(token_file)
    if not path.is_file():
        raise StageError(
            f"web identity token file {token_file} does not exist: mount the projected service account "
            "token there (EKS: the pod identity webhook does), or fix AWS_WEB_IDENTITY_TOKEN_FILE"
        )
    settings.remember(path.read_text().strip())
    name = session_name or "modeldeploy-stager"
    if sts:
        # obstore 0.12 always asks https://sts.<region>.amazonaws.com (its documented ``sts_endpoint``
        # key is refused at run time), so a custom STS endpoint gets this provider instead.
        config["_credential_provider"] = WebIdentityProvider(sts, role, path, name, settings)
    else:
        config.update(web_identity_token_file=str(path), role_arn=role, role_session_name=name)
    return f"role {role}, STS {sts or 'of AWS'}"


STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


@dataclass
class WebIdentityProvider:
    """AssumeRoleWithWebIdentity at a custom STS endpoint (an obstore S3 credential provider)."""

    endpoint: str
    role_arn: str
    token_file: Path
    session_name: str
    settings: Settings

    def __repr__(self) -> str:
        return f"WebIdentityProvider({self.endpoint}, {self.role_arn})"

    def __call__(self) -> dict[str, Any]:
        token = self.token_file.read_text().strip()
        self.settings.remember(token)
        body = urllib.parse.urlencode(
            {
                "Action": "AssumeRoleWithWebIdentity",
                "Version": "2011-06-15",
                "RoleArn": self.role_arn,
                "RoleSessionName": self.session_name,
                "WebIdentityToken": token,
            }
        ).encode()
        req = urllib.request.Request(
            self.endpoint, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=_ssl_context(self.settings)) as resp:
                doc = ET.fromstring(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read(4096).decode(errors="replace")
            raise StageError(
                self.settings.scrub(
                    f"AssumeRoleWithWebIdentity at {self.endpoint} for {self.role_arn} answered {err.code}: "
                    f"{' '.join(detail.split())}; check the role's trust policy and the token's audience"
                )
            ) from None
        except (urllib.error.URLError, OSError, ET.ParseError) as err:
            raise StageError(
                self.settings.scrub(f"AssumeRoleWithWebIdentity at {self.endpoint}: {err}")
            ) from None
        creds = doc.find(f".//{STS_NS}Credentials")
        if creds is None:
            raise StageError(f"AssumeRoleWithWebIdentity at {self.endpoint}: no Credentials in the answer")
        out: dict[str, Any] = {
            "access_key_id": creds.findtext(f"{STS_NS}AccessKeyId") or "",
            "secret_access_key": creds.findtext(f"{STS_NS}SecretAccessKey") or "",
            "token": creds.findtext(f"{STS_NS}SessionToken") or None,
            "expires_at": None,
        }
        self.settings.remember(out["access_key_id"], out["secret_access_key"], out["token"])
        expiration = creds.findtext(f"{STS_NS}Expiration")
        out["expires_at"] = timeutil.parse_rfc3339(expiration)
        return out


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca = settings.file(CA_FILE)
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    return context


# --------------------------------------------------------------------------- GCS and Azure


def gcs_config(bucket: str, settings: Settings) -> tuple[dict[str, Any], str | None, str]:
    """obstore GCS configuration, the endpoint (None: Google), where the credentials come from."""
    config: dict[str, Any] = {}
    endpoint = settings.get("GOOGLE_BASE_URL") or settings.get("STORAGE_EMULATOR_HOST")
    if endpoint:
        endpoint = endpoint.rstrip("/")
        if "://" not in endpoint:
            endpoint = "http://" + endpoint  # STORAGE_EMULATOR_HOST is often host:port
        config["base_url"] = endpoint
    key_path = settings.file(GCS_KEY_FILE)
    key_json = settings.get("GOOGLE_SERVICE_ACCOUNT_KEY")
    adc = settings.get("GOOGLE_APPLICATION_CREDENTIALS")
    how: str
    if key_path is not None:
        key_json, how = key_path.read_text(), f"service account key {GCS_KEY_FILE} of the credentials Secret"
    elif key_json:
        how = f"service account key from {settings.source('GOOGLE_SERVICE_ACCOUNT_KEY')}"
    elif adc:
        if not Path(adc).is_file():
            raise StageError(f"GOOGLE_APPLICATION_CREDENTIALS={adc}: no such file")
        key_json, how = Path(adc).read_text(), f"credentials file {adc} (GOOGLE_APPLICATION_CREDENTIALS)"
    elif endpoint:
        config["skip_signature"] = True
        how = "unsigned requests (emulator endpoint, no credentials)"
    else:
        how = "obstore's default Google chain (metadata server)"
    if key_json:
        try:
            doc = json.loads(key_json)
        except ValueError:
            raise StageError(f"{how}: not JSON; it must be a Google service account key file") from None
        if not isinstance(doc, dict):
            raise StageError(f"{how}: not a JSON object; it must be a Google service account key file")
        settings.remember(key_json, *(str(doc.get(k) or "") for k in ("private_key", "private_key_id")))
        for line in str(doc.get("private_key") or "").splitlines():
            settings.remember(line if len(line) > 16 else None)
        if doc.get("type") == "service_account":
            config["service_account_key"] = key_json
        else:
            config["application_credentials"] = _keep_file(key_json)
    return config, endpoint, how


def _keep_file(text: str) -> str:
    fd, name = tempfile.mkstemp(prefix="gcs-credentials-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return name


def parse_connection_string(text: str) -> dict[str, str]:
    """``Key=Value;…`` of an Azure storage connection string (values may contain ``=``)."""
    out: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise StageError("AZURE_STORAGE_CONNECTION_STRING: a part without '=' (expected Key=Value;...)")
        out[key.strip()] = value.strip()
    return out


AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azure_config(account: str, settings: Settings) -> tuple[dict[str, Any], str | None, str]:
    config: dict[str, Any] = {"account_name": account}
    endpoint = settings.get("AZURE_STORAGE_ENDPOINT")
    conn_text = settings.get("AZURE_STORAGE_CONNECTION_STRING")
    conn = parse_connection_string(conn_text) if conn_text else {}
    if conn:
        settings.remember(conn.get("AccountKey"), conn.get("SharedAccessSignature"))
        if _truthy(conn.get("UseDevelopmentStorage")):
            conn.setdefault("AccountName", AZURITE_ACCOUNT)
            conn.setdefault("AccountKey", AZURITE_KEY)
            conn.setdefault("BlobEndpoint", f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}")
        named = conn.get("AccountName")
        if named and named != account:
            raise StageError(
                f"AZURE_STORAGE_CONNECTION_STRING names account {named!r}, spec.model.storageUri account "
                f"{account!r}: make them agree (as://{named}/container/path)"
            )
        endpoint = endpoint or conn.get("BlobEndpoint")
        if not endpoint and conn.get("EndpointSuffix"):
            proto = conn.get("DefaultEndpointsProtocol", "https")
            endpoint = f"{proto}://{account}.blob.{conn['EndpointSuffix']}"
    key = (
        settings.get("AZURE_STORAGE_ACCOUNT_KEY")
        or settings.get("AZURE_STORAGE_KEY")
        or conn.get("AccountKey")
    )
    sas = settings.get("AZURE_STORAGE_SAS_TOKEN") or conn.get("SharedAccessSignature")
    if key:
        config["account_key"] = key
        src = "AZURE_STORAGE_ACCOUNT_KEY" if settings.sources.get("AZURE_STORAGE_ACCOUNT_KEY") else None
        src = src or ("AZURE_STORAGE_KEY" if settings.sources.get("AZURE_STORAGE_KEY") else None)
        how = f"account key from {settings.source(src) if src else 'the connection string'}"
    elif sas:
        config["sas_key"] = sas.lstrip("?")
        src = "AZURE_STORAGE_SAS_TOKEN" if settings.sources.get("AZURE_STORAGE_SAS_TOKEN") else None
        how = f"SAS token from {settings.source(src) if src else 'the connection string'}"
    else:
        how = "obstore's default Azure chain (workload identity, managed identity)"
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
    return config, endpoint, how


# --------------------------------------------------------------------------- object stores


@dataclass
class Bucket:
    """An obstore store rooted at the repository prefix, and how to describe it."""

    store: Any
    where: str
    how: str


def open_store(uri: str, settings: Settings) -> Bucket:
    from obstore.store import AzureStore, GCSStore, S3Store

    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        loc = parse_s3_uri(uri, {k: settings.get(k) for k in S3_KEYS[3:9]})
        config, how = s3_config(loc, settings)
        provider = config.pop("_credential_provider", None)
        store: Any = S3Store(
            loc.bucket,
            prefix=loc.prefix.rstrip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(loc.endpoint, settings),  # type: ignore[arg-type]
            retry_config=_retry_config(),  # type: ignore[arg-type]
            credential_provider=provider,
        )
        return Bucket(store, loc.describe(), how)
    if scheme == "gs":
        bucket, prefix = _split(rest)
        if not bucket:
            raise StageError(f"{uri}: no bucket in the URI (gs://bucket/path)")
        config, endpoint, how = gcs_config(bucket, settings)
        store = GCSStore(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(endpoint, settings),  # type: ignore[arg-type]
            retry_config=_retry_config(),  # type: ignore[arg-type]
        )
        return Bucket(store, f"gs://{bucket}/{prefix} ({endpoint or 'Google'})", how)
    if scheme == "as":
        account, path = _split(rest)
        container, _, prefix = path.partition("/")
        if not account or not container:
            raise StageError(f"{uri}: expected as://account/container/path")
        config, endpoint, how = azure_config(account, settings)
        store = AzureStore(
            container,
            prefix=prefix.strip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(endpoint, settings),  # type: ignore[arg-type]
            retry_config=_retry_config(),  # type: ignore[arg-type]
        )
        where = endpoint or f"https://{account}.blob.core.windows.net"
        return Bucket(store, f"as://{account}/{container}/{prefix.strip('/')} ({where})", how)
    raise StageError(f"{scheme}:// is not an object store")  # pragma: no cover


def _fix_for(text: str) -> str:
    """A hint naming the fix, for the usual failures."""
    low = text.lower()
    if any(s in low for s in ("nosuchbucket", "no bucket", "containernotfound", "404 not found")):
        return "; check the bucket/container and path in spec.model.storageUri"
    if any(s in low for s in ("403", "forbidden", "signaturedoesnotmatch", "invalidaccesskeyid", "401")):
        return (
            "; check the credentials in spec.model.credentialsSecret (or the pod's identity) and that they "
            "may read the prefix"
        )
    if any(s in low for s in ("connect", "dns", "resolve", "timed out", "operation timed out")):
        return "; check the endpoint (and that the pod may reach it)"
    return ""


_XML_ERROR = re.compile(r"(?:<\?xml[^>]*\?>\s*)?<Error>.*?</Error>", re.S)


def condense_xml_errors(text: str) -> str:
    """An object store's XML error body (``<Error><Code>…</Code><Message>…</Message>…``, as S3
    and Azure answer) as ``Code: Message``: the status and Events keep the end of a message, and
    request IDs and host IDs would crowd the code out of it."""

    def short(match: re.Match[str]) -> str:
        body = match.group(0)
        code = re.search(r"<Code>(.*?)</Code>", body, re.S)
        message = re.search(r"<Message>(.*?)</Message>", body, re.S)
        parts = [m.group(1).strip() for m in (code, message) if m]
        return ": ".join(parts) if parts else body

    return _XML_ERROR.sub(short, text)


def fetch_objects(uri: str, dest: Path, settings: Settings) -> str:
    import obstore
    from obstore.exceptions import BaseError

    bucket = open_store(uri, settings)
    total = count = 0
    try:
        paths: list[str] = []
        for batch in obstore.list(bucket.store):
            paths.extend(str(meta["path"]) for meta in batch)
        paths = [p for p in paths if not p.endswith("/")]  # "directory" markers carry nothing
        if not paths:
            raise StageError(f"{bucket.where}: no objects under the prefix; check spec.model.storageUri")
        for path in sorted(paths):
            target = dest / safe_relative(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            with tmp.open("wb") as fh:
                for chunk in obstore.get(bucket.store, path).stream(min_chunk_size=CHUNK):
                    fh.write(chunk)
                    total += len(chunk)
            tmp.replace(target)
            count += 1
    except BaseError as exc:
        text = settings.scrub(condense_xml_errors(" ".join(str(exc).split("Debug source:", 1)[0].split())))
        if len(text) > 1500:
            text = text[:1500] + "…"
        raise StageError(
            f"{bucket.where} ({bucket.how}): {type(exc).__name__}: {text}{_fix_for(text)}"
        ) from None
    return f"{count} objects, {total} bytes from {bucket.where}, {bucket.how}"


# --------------------------------------------------------------------------- fetch


def _redact_url(url: str) -> str:
    """A URL without its query string (tokens, SAS) and userinfo."""
    parts = urllib.parse.urlsplit(url.split("?", 1)[0])
    if parts.username or parts.password:
        parts = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def fetch_archive(uri: str, dest: Path, settings: Settings) -> str:
    context = _ssl_context(settings) if uri.startswith("https://") else None
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "repo.tar"
        try:
            with (
                urllib.request.urlopen(uri, timeout=TIMEOUT, context=context) as resp,
                archive.open("wb") as fh,
            ):
                shutil.copyfileobj(resp, fh, CHUNK)
        except urllib.error.HTTPError as err:
            raise StageError(
                f"GET {_redact_url(uri)} answered {err.code} {err.reason}; check spec.model.storageUri"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                hint = f"; put the server's CA certificate into spec.model.credentialsSecret as {CA_FILE}"
            raise StageError(settings.scrub(f"GET {_redact_url(uri)}: {err}{hint}")) from None
        members = safe_extract(archive, dest)
    return f"unpacked {members} archive members from {_redact_url(uri)}"


def copy_tree(src: Path, dest: Path, root: Path) -> int:
    """Copy the files under ``src`` into ``dest``, contents only: no owner, mode or times (``dest`` is an
    emptyDir the stager's uid does not own, so copying metadata fails with EPERM). A symlink is
    followed only where it points inside the claim (``root``)."""
    count = 0
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise StageError(f"refusing {entry}: symlink to {target} leaves the claim")
        if target.is_dir():
            count += copy_tree(target, dest / entry.name, root)
        elif target.is_file():
            shutil.copyfile(target, dest / entry.name)
            count += 1
    return count


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
    settings = Settings(credentials_dir, os.environ if environ is None else environ)
    dest.mkdir(parents=True, exist_ok=True)
    if scheme == "pvc":
        _claim, _, sub = rest.partition("/")
        root = pvc_root.resolve()
        src = (root / safe_relative(sub)).resolve() if sub.strip("/") else root
        if src != root and root not in src.parents:
            raise StageError(f"{uri}: {sub!r} leaves the claim")
        if not src.is_dir():
            raise StageError(f"{uri}: {src} is not a directory on the claim")
        count = copy_tree(src, dest, root)
        return f"copied {count} files from {src}"
    if scheme in ("http", "https"):
        return fetch_archive(uri, dest, settings)
    if scheme in CLOUD_SCHEMES:
        try:
            return fetch_objects(uri, dest, settings)
        except StageError as exc:
            raise StageError(settings.scrub(str(exc))) from None
    raise StageError(
        f"storage scheme {scheme}:// is not supported by the stager (supported: "
        f"{', '.join(sorted(SUPPORTED_SCHEMES))})"
    )


def main(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    creds_dir = Path(args.credentials_dir) if args.credentials_dir else None
    started = time.monotonic()
    try:
        summary = fetch(args.uri, dest, pvc_root=Path(args.pvc_root), credentials_dir=creds_dir)
    except StageError as exc:
        print(f"stage: {_redact_url(args.uri)}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a full emptyDir, an unreadable file on the claim
        print(f"stage: {_redact_url(args.uri)}: {exc} (writing into {dest})", file=sys.stderr)
        return 1
    print(f"stage: {summary} in {time.monotonic() - started:.2f}s")
    model_dir = dest / args.model
    if not model_dir.is_dir():
        print(f"stage: the repository has no directory {args.model}/", file=sys.stderr)
        return 1
    if args.config and not (model_dir / "config.pbtxt").exists():
        shutil.copyfile(args.config, model_dir / "config.pbtxt")
    if not (model_dir / str(args.version)).is_dir():
        print(f"stage: model {args.model} has no version directory {args.version}/", file=sys.stderr)
        return 1
    # Only the version asked for stays: a repository's own config.pbtxt without a version_policy
    # makes Triton load the latest version it finds, not spec.model.version.
    others = sorted(
        p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) != args.version
    )
    for name in others:
        shutil.rmtree(model_dir / name)
    if others:
        print(f"stage: left out the other versions in the repository ({', '.join(others)})")
    os.sync()
    print(f"stage: model {args.model} version {args.version} staged into {dest}")
    return 0
