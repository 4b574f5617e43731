"""distmeta against the loop its users would otherwise write, side by side in one run, on the
same episodes and the same cores, every figure a ratio to that plain loop.

  plain loop      a per-task loop written here and sharing no code with distmeta: functional
                  Conv4 / MLP, ``torch.autograd.grad(create_graph=True)`` per task, a torch
                  optimizer, torch on all cores. It stands in for learn2learn, higher and the
                  torch.func MAML example, which are within 10% of each other on this math.
  higher          the same loop through ``higher.innerloop_ctx``, where ``higher`` is installed.
  core loop/vmap/batched/threads  distmeta's Worker + ParameterServer in this process, no Ray,
                  torch on all cores, scoring before adaptation on logging steps only, as training
                  does (batched: the MLP only, its linear layers as batched matrix products;
                  threads: the tasks split over the cores, one torch thread each).
  core ... bf16   the same under ``train.autocast=bf16`` (bfloat16 autocast: not the same math).
  system          ``train()``: Ray, the layout ``auto`` picks (or ``--system-overrides``),
                  TensorBoard; its steady-state rate (and with ``--bf16`` once more under
                  ``train.autocast=bf16``).

The in-process rows run interleaved, step by step, so a drift of the machine's speed hits all
alike. Before timing, each case checks that the plain loop and distmeta's core compute the same
first step (parameters after it, float32). Cases: MAML second order on the strided and the
max-pool Conv4 (Omniglot 5-way 1-shot), 20-way 1-shot with 5 inner steps, the mini-ImageNet
Conv4-32 (synthetic images), first-order MAML, Reptile, ProtoNets (60-way) and sinusoid.

    distmeta data build omniglot --src ../shared/data/omniglot --out data/omniglot
    python benchmarks/peers.py [--steps 8] [--case maml-strided ...] [--device cuda] [--no-system]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distmeta.checkpoint import read_checkpoint
from distmeta.config import AUTO, Config, load_config
from distmeta.runtime.local import LocalLoop
from distmeta.runtime.task_generator import TaskGenerator


@dataclass
class Case:
    config: str
    overrides: list[str] = field(default_factory=list)
    steps: int = 0  # timed steps; 0: --steps


CASES = {
    "maml-strided": Case("configs/omniglot_maml_5w1s.yaml", steps=12),
    "maml-maxpool": Case("configs/omniglot_maml_5w1s.yaml", ["model.downsample=max_pool"]),
    "maml-20w1s-5steps": Case("configs/omniglot_maml_20w1s.yaml", steps=4),
    "miniimagenet-conv4-32": Case("configs/miniimagenet_synthetic_maml.yaml", steps=4),
    "fomaml": Case("configs/omniglot_fomaml_5w1s.yaml"),
    "reptile": Case("configs/omniglot_reptile_5w1s.yaml"),
    "protonet-60w": Case("configs/omniglot_protonet_1shot.yaml"),
    "sinusoid": Case("configs/sinusoid_maml_paper.yaml", steps=400),
}


# --- the plain loop: the math written out, no distmeta ----------------------------------------


def conv4(w: list[torch.Tensor], x: torch.Tensor, pool: bool) -> torch.Tensor:
    for block in range(4):
        weight, bias, gamma, beta = w[4 * block : 4 * block + 4]
        x = F.conv2d(x, weight, bias, stride=1 if pool else 2, padding=1)
        x = F.relu(F.batch_norm(x, None, None, gamma, beta, training=True))
        x = F.max_pool2d(x, 2) if pool else x
    x = x.flatten(1)
    return F.linear(x, w[16], w[17]) if len(w) > 16 else x


def mlp(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for layer in range(0, len(w) - 2, 2):
        x = F.relu(F.linear(x, w[layer], w[layer + 1]))
    return F.linear(x, w[-2], w[-1])


class PlainLoop:
    """One meta-training step at a time, task by task, as the peers' examples write it."""

    def __init__(self, cfg: Config, theta: list[torch.Tensor]):
        self.cfg, a = cfg, cfg.algorithm
        self.w = [p.detach().clone().requires_grad_() for p in theta]
        pool = cfg.model.downsample == "max_pool"
        self.net: Callable = mlp if cfg.model.name == "mlp" else (lambda w, x: conv4(w, x, pool))
        self.loss = F.mse_loss if cfg.task.source == "sinusoid" else F.cross_entropy
        if cfg.meta_optimizer.name == "adam":
            self.opt = torch.optim.Adam(self.w, lr=cfg.meta_optimizer.lr)
        else:
            self.opt = torch.optim.SGD(self.w, lr=cfg.meta_optimizer.lr)
        self.step_fn = {"maml": self.maml, "fomaml": self.maml, "reptile": self.reptile, "protonet": self.protonet}[
            a.name
        ]

    def step(self, step: int, tasks) -> None:
        m = self.cfg.meta_optimizer
        if m.final_lr is not None:  # Reptile's linear annealing, as the config says
            for group in self.opt.param_groups:
                group["lr"] = m.lr + (m.final_lr - m.lr) * min(1.0, step / self.cfg.train.steps)
        self.opt.zero_grad()
        self.step_fn(tasks)
        self.opt.step()

    def maml(self, tasks) -> None:
        a, first_order = self.cfg.algorithm, self.cfg.algorithm.name == "fomaml"
        num_tasks = len(tasks[0])
        for sx, sy, qx, qy in zip(*tasks):
            fast = self.w
            for _ in range(a.inner_steps):
                grads = torch.autograd.grad(self.loss(self.net(fast, sx), sy), fast, create_graph=not first_order)
                fast = [p - a.inner_lr * g for p, g in zip(fast, grads)]
            (self.loss(self.net(fast, qx), qy) / num_tasks).backward()

    def reptile(self, tasks) -> None:
        """Inner Adam with beta1 = 0 on mini-batches cycling through the shot-major support set;
        the meta-gradient is the mean of theta - phi."""
        a = self.cfg.algorithm
        num_tasks, total = len(tasks[0]), [torch.zeros_like(p) for p in self.w]
        for sx, sy, _, _ in zip(*tasks):
            fast = [p.detach().clone().requires_grad_() for p in self.w]
            second = [torch.zeros_like(p) for p in fast]
            size = len(sx)
            batch = a.inner_batch_size if 0 < a.inner_batch_size < size else size
            for step in range(1, a.inner_steps + 1):
                index = (torch.arange(batch) + (step - 1) * batch) % size
                grads = torch.autograd.grad(self.loss(self.net(fast, sx[index]), sy[index]), fast)
                with torch.no_grad():
                    second = [0.999 * v + 0.001 * g**2 for v, g in zip(second, grads)]
                    scale = 1 - 0.999**step
                    fast = [
                        (p - a.inner_lr * g / ((v / scale).sqrt() + 1e-8)).requires_grad_()
                        for p, g, v in zip(fast, grads, second)
                    ]
            for t, p, q in zip(total, self.w, fast):
                t += (p - q).detach() / num_tasks
        for p, t in zip(self.w, total):
            p.grad = t

    def protonet(self, tasks) -> None:
        num_tasks = len(tasks[0])
        for sx, sy, qx, qy in zip(*tasks):
            embedded = self.net(self.w, torch.cat([sx, qx]))  # one batch: BatchNorm sees the episode
            support, query = embedded[: len(sx)], embedded[len(sx) :]
            one_hot = F.one_hot(sy).to(support.dtype)
            prototypes = one_hot.T @ support / one_hot.sum(0)[:, None]
            logits = -(query[:, None] - prototypes[None]).pow(2).sum(-1)
            (F.cross_entropy(logits, qy) / num_tasks).backward()

    def parameters(self) -> torch.Tensor:
        return theta_flat(self.w)


def modules(cfg: Config, theta: list[torch.Tensor]) -> torch.nn.Module:
    """The plain loop's model as ordinary modules (what ``higher`` patches), holding ``theta``."""
    layers: list[torch.nn.Module] = []
    if cfg.model.name == "mlp":
        for weight in theta[0::2]:
            layers += [torch.nn.Linear(weight.shape[1], weight.shape[0]), torch.nn.ReLU()]
        layers = layers[:-1]
    else:
        pool = cfg.model.downsample == "max_pool"
        for block in range(4):
            out, channels = theta[4 * block].shape[:2]
            layers += [torch.nn.Conv2d(channels, out, 3, stride=1 if pool else 2, padding=1)]
            layers += [torch.nn.BatchNorm2d(out, track_running_stats=False), torch.nn.ReLU()]
            layers += [torch.nn.MaxPool2d(2)] if pool else []
        layers += [torch.nn.Flatten(), torch.nn.Linear(theta[16].shape[1], theta[16].shape[0])]
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p, value in zip(net.parameters(), theta, strict=True):
            p.copy_(value)
    return net


def higher_loop(cfg: Config, theta: list[torch.Tensor]):
    """The MAML cases through ``higher`` (a module and its functional copy per task), if installed."""
    try:
        import higher
    except ImportError:
        return None
    if cfg.algorithm.name not in ("maml", "fomaml"):
        return None
    plain = PlainLoop(cfg, theta)
    net = modules(cfg, theta)
    plain.w = list(net.parameters())
    plain.opt = type(plain.opt)(plain.w, lr=cfg.meta_optimizer.lr)
    inner = torch.optim.SGD(plain.w, lr=cfg.algorithm.inner_lr)

    second_order = cfg.algorithm.name == "maml"

    def maml(tasks) -> None:
        for sx, sy, qx, qy in zip(*tasks):
            # copy_initial_weights=False: the meta-gradient reaches net's own parameters (MAML with higher)
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False, track_higher_grads=second_order) as (
                fnet,
                diffopt,
            ):
                for _ in range(cfg.algorithm.inner_steps):
                    diffopt.step(plain.loss(fnet(sx), sy))
                query = plain.loss(fnet(qx), qy) / len(tasks[0])
                if second_order:
                    query.backward()
                else:  # higher detaches the adapted weights: their gradient is passed to θ by hand
                    for p, g in zip(plain.w, torch.autograd.grad(query, list(fnet.parameters())), strict=True):
                        p.grad = g if p.grad is None else p.grad + g

    plain.step_fn = maml
    return plain


# --- distmeta ---------------------------------------------------------------------------------


class Core(LocalLoop):
    """distmeta's compute core in one process: what a step of ``train()`` runs, without Ray."""

    def __init__(self, cfg: Config, implementation: str, device: torch.device):
        super().__init__(cfg, device)
        self.worker.implementation = implementation

    def parameters(self) -> torch.Tensor:
        return torch.from_numpy(super().parameters())


def system(cfg: Config, steps: int, logdir: str) -> tuple[float, str]:
    """The full system's steady-state rate (every step after the first) and the layout it chose."""
    from distmeta.train import train

    cfg = copy.deepcopy(cfg)
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = steps + 1, 0, 0
    cfg.train.print_every_s, cfg.eval.num_tasks, cfg.eval.inner_steps = 1e9, 2, [cfg.algorithm.inner_steps]
    if not cfg.algorithm.name.startswith(("maml", "fomaml", "reptile")):
        cfg.eval.inner_steps = [0]
    cfg.logdir = logdir
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        result = train(cfg)
    workers = json.loads((result.run_dir / "placement.json").read_text())["workers"]
    devices = sorted({str(w.get("device", "?")) for w in workers})
    if cfg.cluster.gpus_per_worker not in (AUTO, 0) and not all(d.startswith("cuda") for d in devices):
        raise RuntimeError(f"the system row asked for a GPU worker and ran on {devices}: not a GPU figure")
    chosen = read_checkpoint(result.checkpoint)["config"]["algorithm"]["implementation"]
    return result.tasks_per_s, f"{len(workers)} worker(s) on {', '.join(devices)}, {chosen}"


# --- one case ---------------------------------------------------------------------------------


# Omniglot's shape on synthetic classes, for machines without the shards (benchmarks/gpu.sh)
SYNTHETIC = ["task.source=synthetic", "task.num_classes=1200", "task.image_size=28", "task.channels=1"]


# On a GPU machine the system row is one GPU worker, checked to have run on it; a fault (a hang of a
# path never run on a GPU) ends it within the benchmark's budget rather than after Ray's 600 s. Four
# task generators: a synthetic meta-batch of 32 Omniglot-shaped tasks takes one 50 ms to draw (2
# million normal samples; real shards take 3 ms), about a GPU step's time
GPU_SYSTEM = [
    "cluster.num_workers=1",
    "cluster.gpus_per_worker=1",
    "cluster.num_task_generators=4",
    "cluster.step_timeout_s=60",
    "cluster.placement_timeout_s=60",
    "cluster.rejoin_timeout_s=20",
    "cluster.actor_restarts=0",
]


def case_config(case: Case, args, *overrides: str) -> Config:
    synthetic = SYNTHETIC if args.synthetic and "omniglot" in case.config else []
    return load_config(case.config, [*case.overrides, *synthetic, *overrides])


def run_case(name: str, case: Case, args) -> dict:
    device = torch.device(args.device)
    cfg = case_config(case, args, "cluster.num_workers=1", "cluster.cpus_per_worker=1")
    steps = args.steps or case.steps or 8
    size = cfg.train.meta_batch_size
    generator = TaskGenerator(cfg, [size], [0], prefetch=False)
    batches = [generator.build(step)[0] for step in range(steps + 2)]
    tensors = [b.to_torch(device, torch.float32) for b in batches]
    if device.type == "cuda":  # the plain loop gets its images on the device once, as a peer's loader would
        torch.cuda.synchronize()
    torch.set_num_threads(os.cpu_count() or 1)

    cores = {impl: Core(cfg, impl, device) for impl in args.implementations}
    cores = {impl: core for impl, core in cores.items() if impl in core.worker.algorithm.implementations()}
    any_core = next(iter(cores.values()))
    theta = [p.clone() for p in any_core.worker._params(any_core.server.parameters()).values()]
    rows: dict[str, object] = {"plain loop": PlainLoop(cfg, theta)}
    peer = higher_loop(cfg, theta)
    if peer is not None:
        rows["higher"] = peer
    rows |= {f"core {impl}": core for impl, core in cores.items()}
    if args.bf16:
        bf16 = case_config(case, args, "train.autocast=bf16")
        rows |= {f"core {impl} bf16": Core(bf16, impl, device) for impl in cores}

    # the same first step: the plain loop is the same math as distmeta's (float32 round-off apart)
    first = {}
    for label, row in rows.items():
        row.step(0, tensors[0] if isinstance(row, PlainLoop) else batches[0])
        first[label] = row.parameters()
    moved = (first["plain loop"] - theta_flat(theta)).abs().mean().item()
    gaps = {label: (params - first["plain loop"]).abs().mean().item() / moved for label, params in first.items()}
    for label, gap in gaps.items():  # Adam's first step moves every parameter by about lr
        assert gap < 1e-2 or "bf16" in label, f"{name}: {label}'s first step is {gap:.1%} off the plain loop's"

    seconds = dict.fromkeys(rows, 0.0)
    for step in range(1, steps + 2):  # step 1 is a warm-up
        order = list(rows.items())
        for label, row in order if step % 2 else reversed(order):  # ABBA: no row always runs after the same one
            started = time.perf_counter()
            row.step(step, tensors[step] if isinstance(row, PlainLoop) else batches[step])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 1:
                seconds[label] += time.perf_counter() - started
    rates = {label: steps * size / s for label, s in seconds.items()}
    layout, plain_around = "", None
    if args.system:  # the config's own layout fields: auto
        # The system runs apart from the interleaved rows, so it is compared with the plain loop
        # timed just before and just after it: this VM's speed drifts by 10-20% within minutes.
        before = time_plain(rows["plain loop"], tensors, size)
        chosen = [*(GPU_SYSTEM if device.type == "cuda" else []), *args.system_overrides]
        rates["system"], layout = system(case_config(case, args, *chosen), steps, args.logdir)
        if args.bf16:
            bf16_system = case_config(case, args, *chosen, "train.autocast=bf16")
            rates["system bf16"], _ = system(bf16_system, steps, args.logdir)
        plain_around = (before + time_plain(rows["plain loop"], tensors, size)) / 2
    plain = rates["plain loop"]
    print(f"\n{name} ({case.config} {' '.join(case.overrides)}; meta-batch {size}, {steps} steps)", flush=True)
    ratios = {k: v / plain for k, v in rates.items()}
    for label in ("system", "system bf16") if plain_around else ():
        if label in rates:
            ratios[label] = rates[label] / plain_around
    for label, rate in rates.items():
        extra = f"  [{layout}; plain loop around it {plain_around:.1f} tasks/s]" if label == "system" else ""
        print(f"  {label:>16}: {rate:9.1f} tasks/s  {ratios[label]:5.2f}x{extra}", flush=True)
    print(f"  first step, mean gap to the plain loop's: {', '.join(f'{k} {v:.1e}' for k, v in gaps.items())}")
    return {
        "tasks_per_s": rates,
        "ratio": ratios,
        "system_layout": layout,
        "plain_loop_around_system": plain_around,
        "first_step_gap": gaps,
    }


def time_plain(plain: PlainLoop, tensors: list, size: int, seconds: float = 3.0) -> float:
    """The plain loop's rate over a few more steps, at least 3 and ``seconds`` (on the case's batches again)."""
    started, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - started < seconds:
        plain.step(steps, tensors[1 + steps % (len(tensors) - 1)])
        steps += 1
        if tensors[0][0].is_cuda:
            torch.cuda.synchronize()
    return steps * size / (time.perf_counter() - started)


def theta_flat(theta: list[torch.Tensor]) -> torch.Tensor:
    """Parameters as one flat float32 vector on the host, where the core's come from."""
    return torch.cat([p.detach().reshape(-1) for p in theta]).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed steps per case (default: each case's own, else 8)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=["loop", "vmap", "batched", "threads"],
        help="each where the case's model and device have it",
    )
    parser.add_argument("--bf16", action="store_true", help="also distmeta's core under train.autocast=bf16")
    parser.add_argument("--synthetic", action="store_true", help="Omniglot-shaped synthetic images, no shards")
    parser.add_argument("--no-system", dest="system", action="store_false", help="in-process rows only (no Ray)")
    parser.add_argument(
        "--system-overrides", nargs="*", default=[], help="config overrides for the system rows (a layout to compare)"
    )
    parser.add_argument("--logdir", default="runs/benchmarks")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    if args.device == "cuda":  # float32 rows in float32: cuDNN and cuBLAS would use TF32 by default
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    summary = {"device": device, "torch": torch.__version__, "tf32": False, "cases": {}}
    for name in args.case or CASES:  # each case on its own: one that fails (a GPU path never run) costs only itself
        try:
            summary["cases"][name] = run_case(name, CASES[name], args)
        except Exception as err:
            traceback.print_exc()
            summary["cases"][name] = {"error": f"{type(err).__name__}: {err}"}
        if args.json:  # after every case: a run cut short keeps what it measured
            with open(args.json, "w") as out:
                json.dump(summary, out, indent=1)
    print(json.dumps(summary))
    if any("error" in result for result in summary["cases"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
