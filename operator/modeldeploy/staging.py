"""Init-container stager: fetch the model repository into the pod's /models.

Used where Triton cannot read the storage URI itself (pvc://, http(s)://) or where a
rendered config.pbtxt must be added to the repository. Credentials are read from the
mounted Secret directory or the environment and never printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path


SUPPORTED_SCHEMES = {"pvc", "http", "https"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", required=True, help="storage URI of the model repository")
    p.add_argument("--dest", required=True, help="directory to fill (Triton's --model-repository)")
    p.add_argument("--model", required=True, help="Triton model name")
    p.add_argument("--version", required=True, type=int, help="model version directory expected")
    p.add_argument("--config", default=None, help="rendered config.pbtxt to install when the repo has none")
    p.add_argument("--pvc-root", default="/mnt/model-pvc", help="where the PVC is mounted (pvc://)")
    p.add_argument("--credentials-dir", default=None, help="mounted credentials Secret")


def _safe_extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def fetch(uri: str, dest: Path, *, pvc_root: Path) -> None:
    scheme, _, rest = uri.partition("://")
    dest.mkdir(parents=True, exist_ok=True)
    if scheme == "pvc":
        _claim, _, sub = rest.partition("/")
        src = pvc_root / sub
        if not src.is_dir():
            raise SystemExit(f"stage: {uri}: {src} is not a directory on the claim")
        shutil.copytree(src, dest, dirs_exist_ok=True)
    elif scheme in ("http", "https"):
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "repo.tar.gz"
            with urllib.request.urlopen(uri, timeout=60) as resp, archive.open("wb") as fh:  # noqa: S310
                shutil.copyfileobj(resp, fh)
            _safe_extract(archive, dest)
    else:
        raise SystemExit(f"stage: storage scheme {scheme}:// is not supported by the stager")


def main(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    fetch(args.uri, dest, pvc_root=Path(args.pvc_root))
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
