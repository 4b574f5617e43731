"""A real multi-process Ray cluster on this machine, started by cluster/local.sh: a head node and
two worker nodes, each its own `ray start`, with fake GPUs. distmeta is driven the two ways users
drive a cluster: `ray job submit` and `launch.py --address`."""

import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from test_runtime import small

from distmeta.config import ConfigError, load_config
from distmeta.runtime.cluster import SPLIT_ABOVE_S, describe_layout, plan_layout
from distmeta.runtime.supervisor import ActorLost
from distmeta.runtime.worker import gpu_numerics, gpu_numerics_within, step_seconds
from distmeta.train import train

ROOT = Path(__file__).resolve().parent.parent
PORT, DASHBOARD = 6395, 8285  # not the script's defaults, so a cluster of the user's is left alone
RUN = [
    "--num-workers",
    "2",
    "--gpus-per-worker",
    "1",
    "cluster.cpu_fallback=true",  # the GPUs are fake: the workers say so and run on the CPU
    "cluster.placement=strict_spread",
    "cluster.server_resource=head",
    "train.steps=60",
    "train.checkpoint_every=20",
    "train.eval_every=0",
    "eval.num_tasks=20",
]


@pytest.fixture(scope="module")
def local_cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    script = [str(ROOT / "cluster" / "local.sh")]
    ports = ["--port", str(PORT), "--dashboard-port", str(DASHBOARD)]
    subprocess.run([*script, "start", "--workers", "2", "--gpus", "1", *ports], check=True, env=env, timeout=180)
    yield env
    subprocess.run([*script, "stop", *ports], check=True, env=env, timeout=60)


def check_run(run_dir: Path, output: str) -> None:
    """The run ended, its workers ran on two different worker nodes, TensorBoard and checkpoints exist."""
    placement = json.loads((run_dir / "placement.json").read_text())
    nodes = {worker["node_id"] for worker in placement["workers"]}
    assert len(nodes) == 2 and placement["server"]["node_id"] not in nodes, placement  # the server on the head
    assert all(worker["device"] == "cpu" for worker in placement["workers"])
    assert "sees no CUDA device: running on the CPU (cluster.cpu_fallback=true)" in output
    assert list(run_dir.glob("events.out.tfevents.*"))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["final.pt", "step_00000020.pt", "step_00000040.pt", "step_00000060.pt"], names


def test_a_job_submitted_with_ray_job_submit_runs_on_the_worker_nodes(local_cluster, tmp_path):
    submit = [
        "ray",
        "job",
        "submit",
        "--address",
        f"http://127.0.0.1:{DASHBOARD}",
        "--working-dir",
        str(ROOT),  # uploaded to the cluster, as from a laptop (files in .gitignore stay behind)
        "--",
        "python",
        "launch.py",
        "--address",
        "auto",
        "--logdir",
        str(tmp_path),
        "run_name=job",
        *RUN,
    ]
    deadline = time.time() + 120
    while True:  # a head node that has just started may not yet have a job agent
        job = subprocess.run(submit, env=local_cluster, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in job.stderr + job.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    check_run(tmp_path / "job", job.stdout)


def test_launch_attaches_to_the_cluster_by_address(local_cluster, tmp_path, cli_env):
    """With the default layout (auto): one worker per GPU of the cluster."""
    env = cli_env | {"RAY_AUTH_MODE": "disabled"}
    command = ["python", "launch.py", "--address", f"127.0.0.1:{PORT}", "--logdir", str(tmp_path), "run_name=attached"]
    auto = RUN[4:]  # no --num-workers, no --gpus-per-worker
    run = subprocess.run([*command, *auto], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| 2 workers x 1 CPU + 1 GPU (auto: num_workers, cpus_per_worker, gpus_per_worker) |" in run.stdout
    check_run(tmp_path / "attached", run.stdout + run.stderr)
    # the cluster outlives the job: launch.py disconnects, it does not shut the cluster down
    status = ["ray", "status", "--address", f"127.0.0.1:{PORT}"]
    status = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr


def test_a_gpu_torch_cannot_see_stops_the_run_with_the_reason(local_cluster, tmp_path, cli_env):
    env = cli_env | {"RAY_AUTH_MODE": "disabled"}
    command = ["python", "launch.py", "--address", f"127.0.0.1:{PORT}", "--logdir", str(tmp_path)]
    run = subprocess.run(
        [*command, "--num-workers", "2", "--gpus-per-worker", "1", "train.steps=5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "sees no CUDA device; install a CUDA build of torch" in run.stdout + run.stderr


def test_shards_the_clusters_processes_cannot_find_stop_the_run_before_it_starts(
    local_cluster, omniglot_shards, tmp_path, cli_env
):
    """A relative task.shards is read in each process's working folder: the driver's folder here,
    and in the cluster's actors the folder its `ray start` ran in, which holds no such shards. The
    run stops before any step, naming the nodes and folders, and leaves no run folder behind."""
    (tmp_path / "shards_here").symlink_to(omniglot_shards)  # found by the driver alone
    command = [sys.executable, str(ROOT / "launch.py"), "--address", f"127.0.0.1:{PORT}", *RUN[:7]]
    command += ["--config", str(ROOT / "configs" / "omniglot_maml_5w1s.yaml"), "--logdir", str(tmp_path / "runs")]
    command += ["task.shards=shards_here", "train.steps=5"]
    env = cli_env | {"RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    (error,) = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert "the run's shards are not on its workers' nodes, where its final evaluation reads them." in error
    workers = [part.split(": on node")[0] for part in error.split("reads them. ")[1].split("; ")]
    assert sorted(", ".join(workers).split(", ")) == ["worker 0", "worker 1"], error  # both, whatever their nodes
    assert "working folder " in error and "/shards_here" in error and ": no shards at /" in error
    assert f"task.shards=shards_here is relative: the driver read it in {tmp_path}" in error
    assert "Give task.shards an absolute path that holds the same shards on every node" in error
    assert "Traceback" not in run.stderr and "TaskGenerator" not in run.stderr  # no generator started
    assert not any((tmp_path / "runs").glob("*")), list((tmp_path / "runs").glob("*"))


def numerics() -> tuple[bool, ...]:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (
        matmul.allow_tf32,
        cudnn.allow_tf32,
        cudnn.deterministic,
        cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )


def set_numerics(values: tuple[bool, ...]) -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = values[:4]
    torch.use_deterministic_algorithms(values[4], warn_only=values[5])
    torch.utils.deterministic.fill_uninitialized_memory = values[6]


def test_gpu_workers_compute_float32_in_float32_and_deterministically_unless_told_otherwise(monkeypatch):
    """PyTorch's defaults would run a GPU worker's float32 convolutions in TF32 and pick cuDNN's
    autotuned, atomic kernels: another math than the float64 checks, and a resume that drifts."""
    before = numerics()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        gpu_numerics(load_config(None, []).train)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own workspace is kept
        gpu_numerics(load_config(None, []).train)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        gpu_numerics(load_config(None, ["train.tf32=true", "train.deterministic=false"]).train)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        set_numerics(before)


def test_a_library_call_on_a_gpu_gives_the_caller_its_own_numerics_back():
    """distmeta.adapt runs on a GPU as training did (gpu_numerics) but inside gpu_numerics_within:
    the calling program's settings (here TF32 on and cuDNN autotuning, its choice) come back after
    the call, also when the call fails."""
    before = numerics()
    callers = (True, True, False, True, False, False, True)
    try:
        set_numerics(callers)
        with gpu_numerics_within(load_config(None, []).train):
            assert numerics() == (False, False, True, False, True, True, False)  # float32, deterministic
        assert numerics() == callers
        with pytest.raises(RuntimeError, match="failed"), gpu_numerics_within(load_config(None, []).train):
            raise RuntimeError("the adaptation failed")
        assert numerics() == callers
    finally:
        set_numerics(before)


def test_workers_the_cluster_cannot_place_fail_with_what_the_nodes_have(ray_local, tmp_path):
    """One node cannot hold two strictly spread workers: the run stops after placement_timeout_s."""
    cfg = small("cluster.num_workers=2", "cluster.placement=strict_spread", "cluster.placement_timeout_s=2")
    with pytest.raises(
        ActorLost, match=r"could not place 2 workers .*=strict_spread in 2 s; the cluster's nodes have CPU=4"
    ):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, layout",
    [
        ([], (4, 1.0, 0.0)),  # one single-threaded worker per core of the 4-CPU local Ray
        (["cluster.num_workers=1"], (1, 4.0, 0.0)),  # the cores shared among the workers asked for
        (["cluster.num_workers=3"], (3, 1.0, 0.0)),
        (["cluster.cpus_per_worker=2"], (2, 2.0, 0.0)),
        (["train.meta_batch_size=3"], (3, 1.0, 0.0)),  # every worker needs a task per step
        (["train.mode=async", "train.max_staleness=1"], (2, 2.0, 0.0)),  # more would drop most updates
        (["train.mode=async", "train.max_staleness=1", "train.stale_updates=scale"], (4, 1.0, 0.0)),
    ],
)
def test_the_default_layout_fills_the_cluster(ray_local, overrides, layout):
    cfg = load_config(None, overrides)
    placed = plan_layout(cfg, step_seconds=lambda: 1.0).cluster  # a step worth splitting
    assert (placed.num_workers, placed.cpus_per_worker, placed.gpus_per_worker) == layout
    assert cfg == load_config(None, overrides)  # the request is what the run records (and a resume re-plans)
    assert describe_layout(cfg.cluster, placed).startswith(f"{layout[0]} worker")


def test_a_step_too_short_to_split_runs_on_one_single_threaded_worker(ray_local):
    """Coordination would cost more than a second worker saves (the sinusoid MLP: a few ms). The
    probe itself is timed on real tasks; its speed is the benchmarks' business, not a test's."""
    cfg = load_config(None, [])
    placed = plan_layout(cfg, lambda: SPLIT_ABOVE_S / 10).cluster
    assert (placed.num_workers, placed.cpus_per_worker) == (1, 1.0)
    assert 0 < step_seconds(cfg, SPLIT_ABOVE_S) < 60  # it runs, on the run's own tasks and model


def test_a_layout_larger_than_the_cluster_is_refused_with_what_it_has(ray_local):
    with pytest.raises(ConfigError, match=r"8 workers x 1 CPU = 8 CPUs, but the Ray cluster has 4"):
        plan_layout(load_config(None, ["cluster.num_workers=8", "cluster.cpus_per_worker=1"]), lambda: 1.0)
    with pytest.raises(ConfigError, match=r"1 workers x 1 GPU = 1 GPUs, but the Ray cluster has 0"):
        plan_layout(load_config(None, ["cluster.num_workers=1", "cluster.gpus_per_worker=1"]), lambda: 1.0)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_the_cluster_launcher_configs_follow_rays_schema(name):
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"]["head"] > 0  # cluster.server_resource=head
    # every node holds the shards (generators on the head, evaluations on the workers' nodes), and the
    # submitted job, whose working directory has no data/, names them by an absolute path
    assert any("data fetch omniglot --out ~/data/omniglot" in command for command in config["setup_commands"])
    assert "task.shards=/home/ubuntu/data/omniglot" in (ROOT / "cluster" / name).read_text()


def test_the_kuberay_manifests_run_launch_on_gpu_workers_with_the_head_resource():
    import yaml

    (cluster,) = yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    (job,) = yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    # the volume in a file of its own: deleting a cluster's objects keeps it
    (claim,) = yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "volume.yaml").read_text())
    assert (cluster["kind"], claim["kind"], job["kind"]) == ("RayCluster", "PersistentVolumeClaim", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python launch.py --address auto")
    assert "task.shards=/shared/data/omniglot" in job["spec"]["entrypoint"]  # on the volume every pod mounts
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert '\\"head\\"' in spec["headGroupSpec"]["rayStartParams"]["resources"]
        (workers,) = spec["workerGroupSpecs"]
        (container,) = workers["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # the operator's token reaches every container and a RayJob's submitter pod; one set by hand
        # in the containers' env would not reach the submitter, and the job server refuses it
        assert spec["authOptions"] == {"mode": "token"}
        head = spec["headGroupSpec"]["template"]["spec"]
        assert not any("RAY_AUTH" in str(c.get("env")) for c in head["containers"] + [container])
        (owner, shards) = head["initContainers"]  # the new volume's root to the image's ray user, then the data
        assert "chown 1000:100 /shared" in owner["command"][-1]
        assert shards["command"][-4:] == ["fetch", "omniglot", "--out", "/shared/data/omniglot"]
        for init in (owner, shards):
            assert init["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]


@pytest.fixture(scope="module")
def older_ray_head(tmp_path_factory):
    """A Ray instance of the previous minor release: a venv over this Python's packages with ray alone
    replaced (one wheel from the package registry), which is what a cluster started before an upgrade
    looks like to a client that has upgraded."""
    major, minor = map(int, ray.__version__.split(".")[:2])
    version = f"{major}.{minor - 1}.0"
    venv = tmp_path_factory.mktemp("older-ray")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", f"ray=={version}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        reason = f"cannot install ray=={version} from the package registry: {install.stderr[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)  # a user's machine without the registry; CI always has it
    _see_our_packages(venv)
    head = "import sys, ray; ray.init(num_cpus=1, include_dashboard=False); "
    head += "print(ray.__version__, ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    process = subprocess.Popen(
        [venv / "bin" / "python", "-c", head], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        started, address = process.stdout.readline().split()  # Ray's own logging goes to stderr
        assert started == version, started
        yield version, address
    finally:
        process.stdin.close()  # the head shuts its Ray down as it exits
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _see_our_packages(venv: Path) -> None:
    """Ray's dependencies for the venv: this interpreter's site-packages, listed in a .pth file so that
    they come after the venv's own (its older ray wins). Not `--system-site-packages`: that gives the
    base interpreter's, which under a venv (the README's install) has none of them. Written after the
    pip install, so pip never sees (or touches) this interpreter's ray."""
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (own,) = (venv / "lib").glob("python*/site-packages")
    (own / "distmeta-test-packages.pth").write_text("".join(f"{path}\n" for path in ours))


def test_a_cluster_on_another_ray_version_is_refused_with_both_versions(older_ray_head, tmp_path, cli_env):
    version, address = older_ray_head
    started = time.time()
    command = ["python", "launch.py", "--address", address, "--logdir", str(tmp_path), "train.steps=5"]
    env = cli_env | {"RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"the Ray cluster at {address!r} runs another Ray or Python version" in run.stderr
    assert f"Ray: {version}" in run.stderr and f"Ray: {ray.__version__}" in run.stderr
    assert "Install the cluster's versions here" in run.stderr
    assert time.time() - started < 60
