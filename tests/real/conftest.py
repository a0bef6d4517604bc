"""Real tier: a real node (kubelet, containerd, runc) beside kwok's fake ones, real containers.

The ``cluster`` fixture here overrides the session one for this folder: a local control plane
*with* its real node (``hack/realnode.py``), started once for the tier. The operator and Triton
images are built without Docker (``hack/images.py``, cached by content) and imported into the
node's containerd. Where the node cannot run (not root, a missing package), the tier is skipped
with the reason, except in CI (``MODELDEPLOY_REQUIRE_CLUSTER=1`` or
``MODELDEPLOY_REQUIRE_REAL_NODE=1``), where it fails with it.

One real node per host at a time: ``test_lifecycle.py`` (first in this folder) brings up and
tears down clusters of its own before the session cluster here starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from realtier import figure, realnode, unavailable

import kube
from kube import Cluster, ClusterUnavailable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.real)
    # test_lifecycle.py first whatever the file names sort as (test_chaos_real.py sorts before it):
    # its own clusters must be up and down before the session cluster takes the host's real node.
    items.sort(key=lambda item: Path(item.path).name != "test_lifecycle.py")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The local control plane with its real node ``real-0``, for the whole tier."""
    handle: Cluster | None = None
    try:
        handle = kube.start_local(tmp_path_factory.mktemp("realcluster"), real_node=True)
    except ClusterUnavailable as e:
        unavailable(str(e))
    assert handle is not None and handle.control_plane is not None
    restore_env = handle.export_env()
    cp = handle.control_plane
    figure("cluster up with the real node", cp.format_timings())
    rss = cp.rss_bytes()
    figure(
        "RSS of the node's processes (MiB)",
        ", ".join(f"{n} {rss[n] / 2**20:.0f}" for n in realnode.RealNode.PROCESSES if n in rss),
    )
    try:
        yield handle
    finally:
        restore_env()
        handle.close()
        handle.control_plane.stop()


@pytest.fixture(scope="session")
def images(cluster: Cluster) -> dict[str, str]:
    """name -> reference of the locally built images, imported into the real node's containerd."""
    from hack import images as builder

    assert cluster.control_plane is not None
    refs: dict[str, str] = {}
    for name in ("operator", "triton"):
        try:
            built = builder.build(name)
        except Exception as e:  # a build that cannot run here is the tier's reason, not a crash
            unavailable(f"image {name} cannot be built: {e}")
            raise
        t0 = time.monotonic()
        cluster.control_plane.node.import_image(built.archive)
        how = "cached" if built.cached else f"built in {built.seconds:.0f}s"
        figure(
            f"image {name}",
            f"{built.ref}, {built.size / 1e6:.0f} MB, {how}, imported in {time.monotonic() - t0:.1f}s",
        )
        refs[name] = built.ref
    return refs
