"""The init-container stager's pure parts: archive safety, S3 URIs, where credentials come from (Secret
files, environment, web identity, AWS profiles, GCS keys, Azure keys/SAS/connection strings), scrubbing.

Fetching from real servers (moto S3 + STS, fake-gcs-server, Azurite, HTTPS, a PVC directory) is
tests/triton/test_storage_schemes.py and tests/triton/test_staging_real.py.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest

from modeldeploy.triton import staging
from modeldeploy.triton.staging import (
    S3Location,
    Settings,
    StageError,
    azure_config,
    check_archive,
    gcs_config,
    parse_connection_string,
    parse_s3_uri,
    s3_config,
    safe_extract,
    safe_relative,
)


def test_every_api_scheme_is_supported() -> None:
    assert {"pvc", "http", "https", "s3", "gs", "as"} == staging.SUPPORTED_SCHEMES


def settings(tmp_path: Path | None = None, env: dict[str, str] | None = None, **files: str) -> Settings:
    if tmp_path is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            (tmp_path / name).write_text(value + "\n")
    return Settings(tmp_path, {"HOME": "/nonexistent", **(env or {})})


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


LOC = S3Location("models", "repo/", "http://127.0.0.1:9000")


def test_static_keys_from_secret_files_win_over_env_and_never_show(tmp_path: Path) -> None:
    st = settings(
        tmp_path,
        {"AWS_ACCESS_KEY_ID": "ENVKEYID", "AWS_SECRET_ACCESS_KEY": "envsecret"},
        AWS_ACCESS_KEY_ID="DIRKEYID",
        AWS_SECRET_ACCESS_KEY="dirsecret",
    )
    config, how = s3_config(LOC, st)
    assert (config["access_key_id"], config["secret_access_key"]) == ("DIRKEYID", "dirsecret")
    assert config["endpoint"] == "http://127.0.0.1:9000" and config["region"] == "us-east-1"
    assert how == "static keys from file AWS_SECRET_ACCESS_KEY of the credentials Secret"
    assert "dirsecret" not in repr(st) and "DIRKEYID" not in repr(st)
    assert st.scrub("key DIRKEYID secret dirsecret") == "key *** secret ***"
    env_only = settings(None, {"AWS_ACCESS_KEY_ID": "ENVKEYID", "AWS_SECRET_ACCESS_KEY": "envsecret"})
    assert s3_config(LOC, env_only)[1] == "static keys from environment AWS_SECRET_ACCESS_KEY"


def test_half_a_key_pair_names_the_missing_half(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"AWS_SECRET_ACCESS_KEY is missing .*credentialsSecret"):
        s3_config(LOC, settings(tmp_path, AWS_ACCESS_KEY_ID="AKIDONLY"))


def test_web_identity_as_on_eks(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("eyJ.token.sig")
    env = {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": "arn:aws:iam::1:role/r"}
    st = settings(None, env)
    config, how = s3_config(S3Location("b", "", None), st)
    # AWS's STS: obstore's own provider
    assert config["web_identity_token_file"] == str(token) and config["role_arn"] == "arn:aws:iam::1:role/r"
    assert "web identity" in how and "STS of AWS" in how
    assert st.scrub("token eyJ.token.sig") == "token ***"
    # a custom STS endpoint: the stager's provider (obstore cannot be pointed elsewhere)
    config, how = s3_config(LOC, settings(None, {**env, "AWS_ENDPOINT_URL_STS": "https://sts.local"}))
    assert isinstance(config["_credential_provider"], staging.WebIdentityProvider)
    assert "web_identity_token_file" not in config and "STS https://sts.local" in how
    with pytest.raises(StageError, match="does not exist"):
        s3_config(LOC, settings(None, {**env, "AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "nope")}))
    with pytest.raises(StageError, match="needs both"):
        s3_config(LOC, settings(None, {"AWS_ROLE_ARN": "arn:aws:iam::1:role/r"}))


def test_profiles_from_the_secret_or_shared_files(tmp_path: Path) -> None:
    creds = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = defsecret\n"
    creds += "[team]\naws_access_key_id = AKIDTEAM\naws_secret_access_key = teamsecret\n"
    config_file = "[profile team]\nregion = eu-west-3\n"
    st = settings(tmp_path / "s", {"AWS_PROFILE": "team"}, credentials=creds, config=config_file)
    config, how = s3_config(LOC, st)
    assert (config["access_key_id"], config["region"]) == ("AKIDTEAM", "eu-west-3")
    assert how.startswith("static keys from profile team")
    assert st.scrub("teamsecret") == "***"
    shared = tmp_path / "shared"
    shared.write_text(creds)
    config, _ = s3_config(LOC, settings(None, {"AWS_SHARED_CREDENTIALS_FILE": str(shared)}))
    assert config["access_key_id"] == "AKIDDEFAULT"
    with pytest.raises(StageError, match="AWS_PROFILE=ghost: no such profile"):
        s3_config(LOC, settings(None, {"AWS_PROFILE": "ghost", "AWS_SHARED_CREDENTIALS_FILE": str(shared)}))


def test_no_credentials_public_bucket_or_default_chain() -> None:
    config, how = s3_config(LOC, settings(None, {"AWS_SKIP_SIGNATURE": "true"}))
    assert config["skip_signature"] is True and "unsigned" in how
    config, how = s3_config(LOC, settings(None, {}))
    assert "access_key_id" not in config and "default AWS chain" in how


def test_gcs_service_account_from_the_secret(tmp_path: Path) -> None:
    key = {"type": "service_account", "private_key_id": "kid0123456789", "private_key": "-----BEGIN-----x"}
    files = {"service-account.json": json.dumps(key)}
    st = settings(tmp_path, {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}, **files)
    config, endpoint, how = gcs_config("b", st)
    assert endpoint == "http://127.0.0.1:4443" and config["base_url"] == endpoint
    assert json.loads(config["service_account_key"]) == key and "service-account.json" in how
    assert st.scrub("kid0123456789") == "***"
    config, _, how = gcs_config("b", settings(None, {"STORAGE_EMULATOR_HOST": "http://h:1"}))
    assert config["skip_signature"] is True and "unsigned" in how
    with pytest.raises(StageError, match="not JSON"):
        gcs_config("b", settings(tmp_path / "bad", **{"service-account.json": "{nope"}))


def test_azure_connection_string_key_and_sas(tmp_path: Path) -> None:
    conn = "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5a2V5a2V5==;BlobEndpoint=http://h:1/acct;"
    assert parse_connection_string(conn)["AccountKey"] == "a2V5a2V5a2V5=="
    st = settings(tmp_path, AZURE_STORAGE_CONNECTION_STRING=conn)
    config, endpoint, how = azure_config("acct", st)
    assert config == {"account_name": "acct", "account_key": "a2V5a2V5a2V5==", "endpoint": "http://h:1/acct"}
    assert how == "account key from the connection string"
    assert st.scrub(f"{conn} a2V5a2V5a2V5==") == "*** ***"
    with pytest.raises(StageError, match=r"names account 'acct'.*as://acct/"):
        azure_config("other", settings(tmp_path))
    config, endpoint, how = azure_config(
        "acct", settings(None, {"AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=abcd"})
    )
    assert config["sas_key"] == "sv=1&sig=abcd" and endpoint is None and "SAS" in how
    config, _, how = azure_config("acct", settings(None, {"AZURE_STORAGE_KEY": "dHJpdG9ua2V5"}))
    assert config["account_key"] == "dHJpdG9ua2V5" and "AZURE_STORAGE_KEY" in how  # Triton's variable name


def test_signatures_in_urls_are_scrubbed() -> None:
    st = settings(None, {})
    text = "GET http://h/c?sv=1&sig=SECRETSIG&se=2030 and ?X-Amz-Signature=abc&X-Amz-Credential=AKID%2F"
    out = st.scrub(text)
    assert "SECRETSIG" not in out and "abc" not in out and "AKID" not in out and "sv=1" in out


@pytest.mark.parametrize(
    ("uri", "message"),
    [("gs:///repo", "no bucket"), ("as://acct", "as://account/container/path"), ("s3://h:1/", "no bucket")],
)
def test_uris_without_a_bucket(uri: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=message):
        staging.fetch(uri, tmp_path / "d", pvc_root=tmp_path, environ={})


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
    (root / "repo" / "m" / "1" / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(StageError, match="leaves the claim"):
        staging.fetch("pvc://claim/repo", tmp_path / "d4", pvc_root=root)
    (root / "repo" / "m" / "1" / "escape").unlink()
    (root / "repo" / "m" / "1" / "inside.py").symlink_to(root / "repo" / "m" / "1" / "model.py")
    assert "copied 2 files" in staging.fetch("pvc://claim/repo", tmp_path / "d5", pvc_root=root)
    assert (tmp_path / "d5" / "m" / "1" / "inside.py").read_text() == "x"


def args(tmp_path: Path, uri: str, **kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    staging.add_arguments(p)
    ns = p.parse_args(["--uri", uri, "--dest", str(tmp_path / "dest"), "--model", "m", "--version", "1"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_main_reports_unsupported_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert staging.main(args(tmp_path, "ftp://host/repo")) == 1
    err = capsys.readouterr().err
    assert "ftp:// is not supported by the stager" in err and "gs" in err and "as" in err


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


def test_main_keeps_only_the_version_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A repository holding versions 1, 2 and 10 with its own config.pbtxt (no version_policy: Triton
    would load the latest): only version 2's directory is staged, the config and other files stay."""
    root = tmp_path / "pvc"
    for v in ("1", "2", "10"):
        (root / "repo" / "m" / v).mkdir(parents=True)
        (root / "repo" / "m" / v / "model.py").write_text(v)
    (root / "repo" / "m" / "config.pbtxt").write_text('name: "m"\n')
    (root / "repo" / "m" / "labels").mkdir()
    ns = args(tmp_path, "pvc://c/repo", pvc_root=str(root))
    ns.version = 2
    assert staging.main(ns) == 0
    staged = tmp_path / "dest" / "m"
    assert sorted(p.name for p in staged.iterdir()) == ["2", "config.pbtxt", "labels"]
    assert (staged / "2" / "model.py").read_text() == "2"
    assert "left out the other versions in the repository (1, 10)" in capsys.readouterr().out


def test_object_store_xml_errors_are_condensed_to_code_and_message() -> None:
    """The code must survive the tail that status and Events keep (a CI run lost it behind the
    request and host IDs of the XML body)."""
    raw = (
        "Generic S3 error: Error performing list request: Server returned non-2xx status code: 403 "
        'Forbidden: <?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
        "<Message>The request signature we calculated does not match the signature you provided. Check "
        "your key and signing method.</Message><BucketName>models</BucketName><RequestId>3fPN6xl0</RequestId>"
        "<HostId>9Gjjt1m+cjU4OPvX9O9</HostId></Error>"
    )
    short = staging.condense_xml_errors(raw)
    assert short.endswith(
        "403 Forbidden: SignatureDoesNotMatch: The request signature we calculated does not match the "
        "signature you provided. Check your key and signing method."
    )
    assert "RequestId" not in short and "HostId" not in short
    assert staging.condense_xml_errors("no xml here") == "no xml here"
