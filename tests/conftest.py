import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the in-process runtime tests (train() reuses it instead of starting its own)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def cli_env():
    """Environment for launch.py subprocesses: the repo importable, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def omniglot_src():
    """The official Omniglot zips: ../shared/data/omniglot beside the repo (always there in CI), or
    $DISTMETA_SHARED/data/omniglot."""
    shared = Path(os.environ.get("DISTMETA_SHARED", ROOT.parent / "shared"))
    src = shared / "data" / "omniglot"
    if not (src / "images_background.zip").is_file():
        pytest.skip(f"no Omniglot zips at {src}: set DISTMETA_SHARED to the folder that holds data/omniglot")
    return src


@pytest.fixture(scope="session")
def omniglot_shards(omniglot_src, tmp_path_factory):
    from distmeta.data.omniglot import build_omniglot

    out = tmp_path_factory.mktemp("omniglot")
    build_omniglot(omniglot_src, out, progress=lambda message: None)
    return out
