"""The init-container stager's pure parts: archive safety, SigV4, S3 URIs, credentials, pvc paths.

Fetching from real servers (S3, HTTP, a PVC directory) and loading the result in a real
tritonserver is tests/triton/test_staging_real.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import tarfile
from pathlib import Path

import pytest

from modeldeploy import staging
from modeldeploy.staging import (
    Credentials,
    S3Location,
    StageError,
    check_archive,
    load_credentials,
    parse_s3_uri,
    safe_extract,
    safe_relative,
    sigv4_headers,
)

# AWS's documented example key pair (Signature Version 4 examples for Amazon S3).
AWS_EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
AWS_EXAMPLE_TIME = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)


def test_s3_is_supported() -> None:
    assert {"pvc", "http", "https", "s3"} <= staging.SUPPORTED_SCHEMES


# --------------------------------------------------------------------------- SigV4


def test_sigv4_get_object_matches_the_aws_example() -> None:
    headers = sigv4_headers(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        region="us-east-1",
        credentials=AWS_EXAMPLE,
        now=AWS_EXAMPLE_TIME,
        headers={"Range": "bytes=0-9"},
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-date"] == "20130524T000000Z"


def test_sigv4_list_objects_matches_the_aws_example() -> None:
    headers = sigv4_headers(
        "GET",
        "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J",
        region="us-east-1",
        credentials=AWS_EXAMPLE,
        now=AWS_EXAMPLE_TIME,
    )
    assert headers["Authorization"].endswith(
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_sigv4_session_token_is_signed() -> None:
    creds = Credentials("AKID", "secret", "token123")
    headers = sigv4_headers("GET", "http://h:9/b/k", region="r", credentials=creds, now=AWS_EXAMPLE_TIME)
    assert headers["x-amz-security-token"] == "token123"
    assert "x-amz-security-token" in headers["Authorization"].split("SignedHeaders=")[1]


# --------------------------------------------------------------------------- S3 URIs and credentials


@pytest.mark.parametrize(
    ("uri", "settings", "expected"),
    [
        ("s3://bucket/repo", {}, S3Location("bucket", "repo/", None)),
        ("s3://bucket/a/b/", {}, S3Location("bucket", "a/b/", None)),
        ("s3://bucket", {}, S3Location("bucket", "", None)),
        ("s3://minio:9000/bucket/repo", {}, S3Location("bucket", "repo/", "https://minio:9000")),
        (
            "s3://minio:9000/bucket/repo",
            {"S3_USE_HTTPS": "0"},
            S3Location("bucket", "repo/", "http://minio:9000"),
        ),
        (
            "s3://b/r",
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:5000/"},
            S3Location("b", "r/", "http://127.0.0.1:5000"),
        ),
        ("s3://b/r", {"S3_ENDPOINT": "s3.local:443"}, S3Location("b", "r/", "https://s3.local:443")),
        (
            "s3://b/r",
            {"AWS_ENDPOINT_URL_S3": "http://a:1", "AWS_ENDPOINT_URL": "http://b:2"},
            S3Location("b", "r/", "http://a:1"),
        ),
    ],
)
def test_parse_s3_uri(uri: str, settings: dict[str, str], expected: S3Location) -> None:
    assert parse_s3_uri(uri, settings) == expected


def test_parse_s3_uri_needs_a_bucket() -> None:
    with pytest.raises(StageError, match="no bucket"):
        parse_s3_uri("s3://host:9000/", {})


def test_s3_urls_path_style_for_endpoints_virtual_hosted_for_aws() -> None:
    custom = staging.S3Client(S3Location("b", "p/", "http://h:1"), region="r", credentials=None)
    assert custom._url("p/a b/c+d.txt") == "http://h:1/b/p/a%20b/c%2Bd.txt"
    aws = staging.S3Client(S3Location("b", "p/", None), region="eu-west-1", credentials=None)
    assert aws._url("", {"prefix": "p/", "list-type": "2"}) == (
        "https://b.s3.eu-west-1.amazonaws.com/?list-type=2&prefix=p%2F"
    )


def test_credentials_from_dir_win_over_env_and_never_show(tmp_path: Path) -> None:
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("DIRKEY\n")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("dirsecret\n")
    env = {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    creds = load_credentials(tmp_path, env)
    assert creds is not None and (creds.access_key, creds.secret_key) == ("DIRKEY", "dirsecret")
    assert "dirsecret" not in repr(creds) and "DIRKEY" not in repr(creds) and str(tmp_path) in repr(creds)
    assert creds.scrub("key DIRKEY secret dirsecret") == "key *** secret ***"
    from_env = load_credentials(tmp_path / "missing", env)
    assert from_env is not None and from_env.access_key == "ENVKEY" and from_env.source == "environment"
    assert load_credentials(None, {}) is None


# --------------------------------------------------------------------------- archives


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (member("../evil.py"), "'..' leaves the repository"),
        (member("m/../../evil.py"), "'..' leaves the repository"),
        (member("/etc/cron.d/evil"), "absolute path"),
        (member("m/1/link", tarfile.SYMTYPE, "/etc/passwd"), "symlink to absolute path"),
        (member("m/1/link", tarfile.SYMTYPE, "../../../etc/passwd"), "leaves the repository"),
        (member("m/1/hard", tarfile.LNKTYPE, "../../outside"), "'..' leaves the repository"),
        (member("m/dev", tarfile.CHRTYPE), "device or FIFO"),
        (member("m/fifo", tarfile.FIFOTYPE), "device or FIFO"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "abs-symlink",
        "escaping-symlink",
        "hardlink",
        "chardev",
        "fifo",
    ],
)
def test_unsafe_archives_are_refused_naming_the_member(
    tmp_path: Path, bad: tarfile.TarInfo, why: str
) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [member("m/config.pbtxt"), bad], {"m/config.pbtxt": b"x"})
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StageError, match=why) as err:
        safe_extract(archive, dest)
    assert repr(bad.name) in str(err.value)
    assert list(dest.iterdir()) == []  # refused before anything was written
    assert not (tmp_path / "evil.py").exists()


def test_safe_archive_with_internal_symlink_unpacks(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "ok.tar.gz",
        [
            member("m/shared.py"),
            member("m/1/model.py", tarfile.SYMTYPE, "../shared.py"),
            member("./m/config.pbtxt"),
        ],
        {"m/shared.py": b"print(1)\n", "./m/config.pbtxt": b'name: "m"\n'},
    )
    dest = tmp_path / "dest"
    assert safe_extract(archive, dest) == 3
    assert (dest / "m" / "1" / "model.py").read_text() == "print(1)\n"
    assert (dest / "m" / "config.pbtxt").read_text() == 'name: "m"\n'


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"<html>404</html>")
    with pytest.raises(StageError, match="not a usable tar archive"):
        safe_extract(junk, tmp_path / "d")


def test_check_archive_accepts_dot_paths() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(member("./"))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar, pytest.raises(StageError, match="empty path"):
        check_archive(tar)


@pytest.mark.parametrize("name", ["a/b", "./a/b", "a//b", "a/./b"])
def test_safe_relative_normalises(name: str) -> None:
    assert str(safe_relative(name)) == "a/b"


# --------------------------------------------------------------------------- pvc and main


def test_pvc_copy_and_traversal(tmp_path: Path) -> None:
    root = tmp_path / "pvc"
    (root / "repo" / "m" / "1").mkdir(parents=True)
    (root / "repo" / "m" / "1" / "model.py").write_text("x")
    (tmp_path / "secret").mkdir()
    dest = tmp_path / "dest"
    assert staging.fetch("pvc://claim/repo", dest, pvc_root=root).startswith("copied")
    assert (dest / "m" / "1" / "model.py").read_text() == "x"
    with pytest.raises(StageError, match="leaves the repository"):
        staging.fetch("pvc://claim/../secret", tmp_path / "d2", pvc_root=root)
    with pytest.raises(StageError, match="not a directory on the claim"):
        staging.fetch("pvc://claim/nope", tmp_path / "d3", pvc_root=root)


def args(tmp_path: Path, uri: str, **kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    staging.add_arguments(p)
    ns = p.parse_args(["--uri", uri, "--dest", str(tmp_path / "dest"), "--model", "m", "--version", "1"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_main_reports_unsupported_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert staging.main(args(tmp_path, "gs://bucket/repo")) == 1
    err = capsys.readouterr().err
    assert "gs:// is not supported by the stager" in err and "s3" in err


def test_main_installs_config_and_checks_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pvc"
    (root / "repo" / "m" / "1").mkdir(parents=True)
    cfg = tmp_path / "config.pbtxt"
    cfg.write_text('name: "m"\n')
    assert staging.main(args(tmp_path, "pvc://c/repo", pvc_root=str(root), config=str(cfg))) == 0
    assert (tmp_path / "dest" / "m" / "config.pbtxt").read_text() == 'name: "m"\n'
    ns = args(tmp_path, "pvc://c/repo", pvc_root=str(root))
    ns.version = 2
    assert staging.main(ns) == 1
    assert "has no version directory 2/" in capsys.readouterr().err
