"""Every gradient path in float64 against references that share no code with distmeta's
algorithms: plain per-task ``torch.autograd.grad`` loops, central finite differences,
``torch.optim.Adam``. Every implementation is checked (vmap and loop on an MLP and on a Conv4 with
BatchNorm on batch statistics, where vmapped second-order gradients are easy to get wrong; batched,
for linear layers only, on the MLP)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from distmeta.algorithms import build_algorithm
from distmeta.algorithms.maml import MAML
from distmeta.config import AlgorithmConfig, ModelConfig
from distmeta.models import DataSpec, build_model

TOL = 1e-10  # relative; float64 agreement is ~1e-13
# batched runs linear layers as batched matrix products: the MLP only (conv4 rejects it); threads
# splits a chunk's tasks over torch threads (with one it is the loop): two at least, in every test here
KIND_IMPLEMENTATIONS = [
    *[("mlp", i) for i in ("vmap", "loop", "batched", "threads")],
    *[("conv4", i) for i in ("vmap", "loop", "threads")],
]
pytestmark = pytest.mark.usefixtures("two_torch_threads")


def setup(kind: str, num_tasks: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = build_model(ModelConfig(name="mlp", hidden=[8, 8]), DataSpec((1,), 1))
        sx, qx = torch.rand(num_tasks, 5, 1) * 10 - 5, torch.rand(num_tasks, 7, 1) * 10 - 5
        sy, qy = torch.sin(sx) * 2, torch.sin(qx) * 2
        loss_fn = F.mse_loss
    else:
        model = build_model(ModelConfig(name="conv4", filters=4), DataSpec((1, 16, 16), 3))
        sx, qx = torch.rand(num_tasks, 6, 1, 16, 16), torch.rand(num_tasks, 9, 1, 16, 16)
        sy, qy = torch.randint(0, 3, (num_tasks, 6)), torch.randint(0, 3, (num_tasks, 9))
        loss_fn = F.cross_entropy
    model = model.double()
    tasks = tuple(t.double() if t.is_floating_point() else t for t in (sx, sy, qx, qy))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, theta, tasks, loss_fn, "regression" if kind == "mlp" else "classification"


def minibatch(x, y, step, batch):
    """Inner step ``step``'s examples: the next ``batch`` of the support set, wrapping around."""
    if not batch:
        return x, y
    index = [(step * batch + j) % len(x) for j in range(batch)]
    return x[index], y[index]


def reference_adapt(model, params, x, y, loss_fn, steps, lr, create_graph, batch=0):
    for step in range(steps):
        bx, by = minibatch(x, y, step, batch)
        grads = torch.autograd.grad(
            loss_fn(functional_call(model, params, (bx,)), by), list(params.values()), create_graph=create_graph
        )
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return params


def reference_meta_gradient(model, theta, tasks, loss_fn, steps, lr, first_order, batch=0):
    """Sum over tasks, one task at a time. First order: the query gradient at the adapted point."""
    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    for sx, sy, qx, qy in zip(*tasks):
        adapted = reference_adapt(model, leaf, sx, sy, loss_fn, steps, lr, create_graph=not first_order, batch=batch)
        if first_order:
            adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
            wrt = list(adapted.values())
        else:
            wrt = list(leaf.values())
        grads = torch.autograd.grad(loss_fn(functional_call(model, adapted, (qx,)), qy), wrt)
        total = {n: total[n] + g for n, g in zip(total, grads)}
    return total


def query_loss_sum(model, theta, tasks, loss_fn, steps, lr):
    """The MAML objective's value (no graph kept), for finite differences."""
    total = 0.0
    for sx, sy, qx, qy in zip(*tasks):
        params = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
        adapted = reference_adapt(model, params, sx, sy, loss_fn, steps, lr, create_graph=False)
        total += loss_fn(functional_call(model, adapted, (qx,)), qy).item()
    return total


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def rel(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


@pytest.mark.parametrize("kind, implementation", KIND_IMPLEMENTATIONS)
def test_maml_meta_gradient_matches_finite_differences(kind, implementation):
    model, theta, tasks, loss_fn, task_kind = setup(kind)
    lr, steps = (0.05, 2) if kind == "mlp" else (0.4, 2)
    algorithm = build_algorithm(AlgorithmConfig(name="maml", inner_lr=lr, inner_steps=steps), model, task_kind)
    meta_grad, _ = algorithm.batch_update(theta, tasks, implementation)
    g = flat(meta_grad)
    generator = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        direction = torch.randn(g.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        offsets = torch.split(direction, [p.numel() for p in theta.values()])
        plus = {n: p + eps * d.view(p.shape) for (n, p), d in zip(theta.items(), offsets)}
        minus = {n: p - eps * d.view(p.shape) for (n, p), d in zip(theta.items(), offsets)}
        numeric = (
            query_loss_sum(model, plus, tasks, loss_fn, steps, lr)
            - query_loss_sum(model, minus, tasks, loss_fn, steps, lr)
        ) / (2 * eps)
        analytic = (g @ direction).item()
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(numeric)), (numeric, analytic)


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
@pytest.mark.parametrize("name", ["maml", "fomaml"])
@pytest.mark.parametrize("batch", [0, 4])  # 4 of 5 or 6 support examples: the mini-batches wrap around
def test_every_implementation_and_plain_autograd_agree(kind, name, batch):
    model, theta, tasks, loss_fn, task_kind = setup(kind, num_tasks=4)
    cfg = AlgorithmConfig(name=name, inner_lr=0.1, inner_steps=3, inner_batch_size=batch)
    algorithm = build_algorithm(cfg, model, task_kind)
    reference = reference_meta_gradient(model, theta, tasks, loss_fn, 3, 0.1, name == "fomaml", batch)
    looped, loop_metrics = algorithm.batch_update(theta, tasks, "loop")
    assert rel(looped, reference) < TOL
    for implementation in algorithm.implementations():
        update, metrics = algorithm.batch_update(theta, tasks, implementation)
        assert rel(update, reference) < TOL, implementation
        assert metrics == pytest.approx(loop_metrics, rel=TOL), implementation
    assert ("batched" in algorithm.implementations()) == (kind == "mlp")


class ThreadRecordingMAML(MAML):
    """MAML that notes which thread computed how many tasks (a real learner, its math untouched)."""

    def chunk_update(self, theta, tasks, score_before=True):
        self.seen.append((threading.current_thread().name, len(tasks.support_x)))
        return super().chunk_update(theta, tasks, score_before)


def test_threads_computes_uneven_shares_of_the_tasks_on_threads_of_their_own():
    """Five tasks on three torch threads: shares of 1, 2 and 2 tasks, each on a thread of its own with
    a copy of the algorithm, summed to the plain per-task reference; the caller's thread count
    back after it."""
    model, theta, tasks, loss_fn, task_kind = setup("conv4", num_tasks=5)
    algorithm = ThreadRecordingMAML(AlgorithmConfig(name="maml", inner_lr=0.1, inner_steps=2), model, task_kind)
    algorithm.seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        update, metrics = algorithm.batch_update(theta, tasks, "threads")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    reference = reference_meta_gradient(model, theta, tasks, loss_fn, 2, 0.1, first_order=False)
    assert rel(update, reference) < TOL
    assert metrics == pytest.approx(algorithm.batch_update(theta, tasks, "loop")[1], rel=TOL)
    assert algorithm.seen[-5:] == [(threading.current_thread().name, 1)] * 5  # the loop, just now, here
    replicas = algorithm.task_threads.replicas
    assert len(replicas) == 3 and all(r.model is not model for r in replicas)
    shares = [replica.seen for replica in replicas]  # each copy's list: deepcopy gave each its own
    assert [len(share) for share in shares] == [1, 2, 2]
    names = {name for share in shares for name, tasks_in_call in share}
    assert len(names) == 3 and all(name.startswith("distmeta-tasks") for name in names)


def test_threads_runs_each_share_under_the_callers_autocast():
    """Autocast is per thread: the shares must run under the caller's, else a bf16 run computes its
    tasks in float32 on the threads (the update would equal float32's)."""
    model, theta, tasks, _, task_kind = setup("conv4", num_tasks=4)
    model, theta = model.float(), {n: p.float() for n, p in theta.items()}
    tasks = tuple(t.float() if t.is_floating_point() else t for t in tasks)
    algorithm = build_algorithm(AlgorithmConfig(name="maml", inner_lr=0.1, inner_steps=1), model, task_kind)
    full = algorithm.batch_update(theta, tasks, "threads")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = algorithm.batch_update(theta, tasks, "threads")[0]
        low_loop = algorithm.batch_update(theta, tasks, "loop")[0]
    assert rel(low, full) > 1e-4  # bf16 was used on the threads
    assert rel(low, low_loop) < 2e-2  # and is the loop's bf16 math


def test_batched_is_refused_where_it_would_be_vmap_under_another_name():
    model, theta, tasks, _, task_kind = setup("conv4")
    algorithm = build_algorithm(AlgorithmConfig(name="maml"), model, task_kind)
    assert algorithm.implementations() == ("vmap", "loop", "threads")
    with pytest.raises(ValueError, match="got 'batched'"):
        algorithm.batch_update(theta, tasks, "batched")


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_first_order_maml_is_maml_without_the_inner_jacobian(kind):
    model, theta, tasks, loss_fn, task_kind = setup(kind)
    first, _ = build_algorithm(
        AlgorithmConfig(name="fomaml", inner_lr=0.1, inner_steps=2), model, task_kind
    ).batch_update(theta, tasks, "vmap")
    second, _ = build_algorithm(
        AlgorithmConfig(name="maml", inner_lr=0.1, inner_steps=2), model, task_kind
    ).batch_update(theta, tasks, "vmap")
    assert rel(first, reference_meta_gradient(model, theta, tasks, loss_fn, 2, 0.1, first_order=True)) < TOL
    assert rel(first, second) > 1e-4  # the inner Jacobian matters here, so the check above has teeth


@pytest.mark.parametrize("kind, implementation", KIND_IMPLEMENTATIONS)
def test_reptile_sgd_delta_by_hand(kind, implementation):
    model, theta, tasks, loss_fn, task_kind = setup(kind)
    algorithm = build_algorithm(AlgorithmConfig(name="reptile", inner_lr=0.05, inner_steps=4), model, task_kind)
    update, _ = algorithm.batch_update(theta, tasks, implementation)
    expected = {n: torch.zeros_like(p) for n, p in theta.items()}
    for sx, sy, _qx, _qy in zip(*tasks):
        params = {n: p.clone() for n, p in theta.items()}
        for _ in range(4):  # plain SGD, by hand
            leaf = {n: p.requires_grad_() for n, p in params.items()}
            grads = torch.autograd.grad(loss_fn(functional_call(model, leaf, (sx,)), sy), list(leaf.values()))
            params = {n: (p - 0.05 * g).detach() for (n, p), g in zip(leaf.items(), grads)}
        expected = {n: expected[n] + theta[n] - params[n] for n in theta}
    assert rel(update, expected) < TOL


@pytest.mark.parametrize("implementation", ["vmap", "loop", "threads"])
@pytest.mark.parametrize("batch", [0, 4])  # Reptile's own setting: Adam on mini-batches of the support set
def test_reptile_adam_matches_torch_adam_with_beta1_zero(implementation, batch):
    model, theta, tasks, loss_fn, task_kind = setup("conv4")
    cfg = AlgorithmConfig(name="reptile", inner_lr=0.01, inner_steps=5, inner_optimizer="adam", inner_batch_size=batch)
    update, _ = build_algorithm(cfg, model, task_kind).batch_update(theta, tasks, implementation)
    expected = {n: torch.zeros_like(p) for n, p in theta.items()}
    for sx, sy, _qx, _qy in zip(*tasks):
        params = {n: p.clone().requires_grad_() for n, p in theta.items()}
        optimizer = torch.optim.Adam(params.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        for step in range(5):
            bx, by = minibatch(sx, sy, step, batch)
            optimizer.zero_grad()
            loss_fn(functional_call(model, params, (bx,)), by).backward()
            optimizer.step()
        expected = {n: expected[n] + theta[n] - params[n].detach() for n in theta}
    # a convolution's bias before BatchNorm has a gradient of rounding noise alone (BatchNorm cancels
    # it), which Adam scales up to steps of its own: those entries agree to ~1e-9, the rest to ~1e-13
    assert rel(update, expected) < 1e-7


@pytest.mark.parametrize("name, batch", [("maml", 0), ("reptile", 0), ("reptile", 4)])
def test_evaluation_trajectory_matches_a_plain_loop(name, batch):
    model, theta, tasks, loss_fn, task_kind = setup("conv4")
    algorithm = build_algorithm(AlgorithmConfig(name=name, inner_lr=0.3, inner_steps=1), model, task_kind)
    trajectory = algorithm.batch_trajectory(theta, tasks, steps=3, batch_size=batch)
    assert trajectory["loss"].shape == (3, 4) and trajectory["accuracy"].shape == (3, 4)
    sparse = algorithm.batch_trajectory(theta, tasks, steps=3, batch_size=batch, score_at={0, 2})
    assert torch.equal(sparse["loss"][:, [0, 2]], trajectory["loss"][:, [0, 2]])
    assert sparse["loss"][:, [1, 3]].isnan().all()  # only the asked-for steps are scored
    for t, (sx, sy, qx, qy) in enumerate(zip(*tasks)):
        params = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for step in range(4):
            with torch.no_grad():
                output = functional_call(model, params, (qx,))
            assert trajectory["loss"][t, step].item() == pytest.approx(loss_fn(output, qy).item(), rel=1e-10)
            accuracy = (output.argmax(-1) == qy).double().mean().item()
            assert trajectory["accuracy"][t, step].item() == pytest.approx(accuracy)
            bx, by = minibatch(sx, sy, step, batch)
            params = reference_adapt(model, params, bx, by, loss_fn, 1, 0.3, create_graph=False)
            params = {n: p.detach().requires_grad_() for n, p in params.items()}


def test_maml_metrics_are_query_losses_before_and_after_adaptation():
    model, theta, tasks, loss_fn, task_kind = setup("mlp")
    algorithm = build_algorithm(AlgorithmConfig(name="maml", inner_lr=0.05, inner_steps=2), model, task_kind)
    _, metrics = algorithm.batch_update(theta, tasks, "vmap")
    before = sum(loss_fn(functional_call(model, theta, (qx,)), qy).item() for _, _, qx, qy in zip(*tasks))
    after = query_loss_sum(model, theta, tasks, loss_fn, 2, 0.05)
    assert metrics["loss_before"] == pytest.approx(before, rel=1e-10)
    assert metrics["loss_after"] == pytest.approx(after, rel=1e-10)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "anil", "metasgd"])
@pytest.mark.parametrize("implementation", ["vmap", "loop", "threads"])
def test_without_the_score_before_adaptation_the_update_is_the_same(name, implementation):
    """Training scores the query set before adaptation on logging steps only: leaving that forward
    pass out must not change the update, only drop the ``*_before`` metrics."""
    model, _, tasks, _, task_kind = setup("conv4")
    algorithm = build_algorithm(AlgorithmConfig(name=name, inner_lr=0.05, inner_steps=2), model, task_kind)
    theta = algorithm.initial_parameters()  # Meta-SGD's learned rates too
    scored, with_before = algorithm.batch_update(theta, tasks, implementation)
    unscored, without = algorithm.batch_update(theta, tasks, implementation, score_before=False)
    assert {n for n in with_before if n.endswith("_before")} == {"loss_before", "accuracy_before"}
    assert without == {n: v for n, v in with_before.items() if not n.endswith("_before")}
    for n in scored:
        assert torch.equal(scored[n], unscored[n]), n
