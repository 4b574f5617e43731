import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def two_torch_threads():
    """At least two torch threads, so the ``threads`` implementation splits its tasks over threads
    (with one it is the loop) on any machine; the count before restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the in-process runtime tests (train() reuses it instead of starting its own)."""
    import ray

    from distmeta.runtime.cluster import allow_slow_start, ray_system_config

    allow_slow_start()
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=ray_system_config()
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cli_env():
    """Environment for launch.py subprocesses: the repo importable, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def omniglot_src():
    """The official Omniglot zips: ../shared/data/omniglot beside the repo (always there in CI), or
    $DISTMETA_SHARED/data/omniglot. Skipped on a user's machine without them, a failure in CI."""
    shared = Path(os.environ.get("DISTMETA_SHARED", ROOT.parent / "shared"))
    src = shared / "data" / "omniglot"
    if not (src / "images_background.zip").is_file():
        message = f"no Omniglot zips at {src}: set DISTMETA_SHARED to the folder that holds data/omniglot"
        if os.environ.get("CI"):
            pytest.fail(message + " (a clone outside the workspace has no ../shared)")
        pytest.skip(message)
    return src


def debian_data(path: Path, package: str) -> Path:
    """A dataset Debian installs (``.ci/run`` installs it with apt): skipped on a machine without it,
    a failure in CI, where it must be."""
    if not path.exists():
        message = f"{path} is missing: install it with `apt-get install {package}`"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run does)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def fashion_mnist_src():
    from distmeta.data import FASHION_MNIST_DEBIAN

    return debian_data(FASHION_MNIST_DEBIAN, "dataset-fashion-mnist")


@pytest.fixture(scope="session")
def noto_fonts():
    from distmeta.data import NOTO_DEBIAN

    return debian_data(NOTO_DEBIAN, "fonts-noto-core")


@pytest.fixture(scope="session")
def omniglot_shards(omniglot_src, tmp_path_factory):
    from distmeta.data.omniglot import build_omniglot

    out = tmp_path_factory.mktemp("omniglot")
    build_omniglot(omniglot_src, out, progress=lambda message: None)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API on this machine (moto's server, a separate process) with one bucket; call the
    result with a prefix for a fresh ``s3://`` URI. The endpoint and (fake) keys travel in the URI,
    as pyarrow reads them there, so Ray's actors reach the same store as the driver."""
    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [shutil.which("moto_server") or "moto_server", "-p", str(port)], stdout=out, stderr=out
        )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, f"moto_server did not start: see {log}"
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        bucket, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@tests?{query}&allow_bucket_creation=true")
        bucket.create_dir("tests")
        names = itertools.count()
        yield lambda prefix: f"s3://testing:testing@tests/{prefix}-{next(names)}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)
