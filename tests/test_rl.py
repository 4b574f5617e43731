"""Meta-RL's core in float64 against independent references: policy gradients and MAML-RL's
meta-gradient against the closed-form expected return of tabular MDPs (dynamic programming, no
sampling); MAML-TRPO's surrogate and ProMP's objective written out by hand (the policy's density,
the inner steps, the clip, the KL in closed form) against their gradients by finite differences;
conjugate gradient against a dense solve, the Fisher-vector product against the Hessian of the
closed-form KL, and TRPO's constraint."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from distmeta.params import ParamLayout, flat_parameters
from distmeta.report import scored_row
from distmeta.rl.envs import ENVIRONMENTS, CartPoleMass, Navigation2D, PendulumMass, TabularMDP
from distmeta.rl.episodes import (
    BASELINE_REGULARISATION,
    Episodes,
    baseline_features,
    discounted_returns,
    linear_baseline,
    rollout,
    with_advantages,
)
from distmeta.rl.evaluate import adaptation_curve
from distmeta.rl.local import LearnerState, LocalMetaRL
from distmeta.rl.maml_trpo import MamlTrpo, MamlTrpoConfig, MamlTrpoShare, MetaRLBatch
from distmeta.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, per_task, policy_output
from distmeta.rl.promp import ProMP, ProMPConfig, ProMPShare
from distmeta.rl.setup import MetaRLSetup
from distmeta.rl.trpo import MeanOverShares, conjugate_gradient, trust_region_step

F64 = torch.float64
TINY = TabularMDP.sized(num_states=3, num_actions=2, horizon=4)
SHORT = type("ShortNavigation", (Navigation2D,), {"horizon": 20})  # 2-D navigation, a fifth of the episode


# --- references ------------------------------------------------------------------------------


def expected_return(table_logits: torch.Tensor, task: np.ndarray, env: type[TabularMDP] = TINY) -> torch.Tensor:
    """A tabular policy's expected undiscounted return in ``task``, by dynamic programming over
    state distributions: differentiable in the policy's logits table [S, A]."""
    transitions, rewards = (torch.as_tensor(t[0], dtype=F64) for t in env.tables(task[None]))
    policy = torch.softmax(table_logits, -1)
    state = torch.zeros(env.num_states, dtype=F64)
    state[0] = 1.0
    total = torch.zeros((), dtype=F64)
    for _ in range(env.horizon):
        total = total + (state[:, None] * policy * rewards).sum()
        state = torch.einsum("s,sa,sap->p", state, policy, transitions)
    return total


def table(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A linear categorical policy on one-hot states as its logits table [S, A]."""
    return params["logits.0.weight"].T + params["logits.0.bias"]


def tabular_policy(seed=0) -> tuple[CategoricalMLPPolicy, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    policy = CategoricalMLPPolicy(TINY.observation_dim, TINY.action_dim, (), "tanh").to(F64)
    theta = {n: torch.randn_like(p) * 0.7 for n, p in policy.named_parameters()}
    return policy, theta


def generators(seed, num_tasks: int) -> list[np.random.Generator]:
    """One random generator per task."""
    return [np.random.default_rng([seed, task]) for task in range(num_tasks)]


def with_rewards_to_go(episodes: Episodes) -> Episodes:
    """Advantages = rewards to go (gamma = 1, no baseline): REINFORCE's unbiased estimator."""
    return dataclasses.replace(episodes, advantages=discounted_returns(episodes, 1.0))


def estimate_and_error(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first axis and its standard error."""
    return samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5


def per_task_gradients(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """d loss.sum() / d each task's own parameters, flattened: [T, P]."""
    grads = torch.autograd.grad(loss.sum(), list(params.values()))
    return torch.cat([g.flatten(1) for g in grads], 1)


# --- environments, returns, the baseline -------------------------------------------------------


def test_navigation_dynamics_follow_the_reference():
    goals = np.array([[0.3, -0.2], [0.05, 0.0]])
    env = Navigation2D(goals, episodes=2, rngs=generators(0, 2))
    assert (env.reset() == 0).all()
    position, reward, done = env.step(np.array([[[3.0, -1.0], [0.2, 0.0]], [[0.5, 0.05], [0.0, 0.0]]]))
    np.testing.assert_allclose(position[0], [[0.1, -0.1], [0.02, 0.0]])  # in units of 0.1, clipped to 1
    np.testing.assert_allclose(position[1], [[0.05, 0.005], [0.0, 0.0]])
    np.testing.assert_allclose(reward[0], -np.linalg.norm(position[0] - goals[0], axis=-1))
    np.testing.assert_array_equal(done, [[False, False], [True, False]])  # both coordinates within 0.01
    tasks = Navigation2D.sample_tasks(np.random.default_rng(1), 1000)
    assert tasks.min() >= -0.5 and tasks.max() <= 0.5 and abs(tasks.mean()) < 0.03


def test_tabular_transitions_follow_the_task():
    task = TINY.sample_tasks(np.random.default_rng(2), 1)
    env = TINY(task, episodes=40_000, rngs=generators(3, 1))
    env.reset()
    _, reward, _ = env.step(np.ones((1, 40_000), dtype=np.int64))
    transitions, rewards = TINY.tables(task)
    frequencies = np.bincount(env.state[0], minlength=3) / 40_000
    np.testing.assert_allclose(frequencies, transitions[0, 0, 1], atol=0.01)
    np.testing.assert_allclose(reward, rewards[0, 0, 1])


def test_rollout_masks_what_follows_an_episodes_end():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (8,), "tanh").to(F64)
    still = {n: torch.zeros_like(p) if n.startswith("mean.2") else p.detach() for n, p in policy.named_parameters()}
    still["log_std"] = torch.full((2,), -30.0, dtype=F64)  # a policy that stands still
    goals = np.array([[0.005, 0.0], [0.4, 0.4]])  # the first task's goal is within 0.01 of the start
    episodes = rollout(policy, per_task(still, 2), Navigation2D, goals, 3, generators(0, 2))
    assert episodes.observations.shape == (2, 100, 3, 2) and episodes.actions.shape == (2, 100, 3, 2)
    assert episodes.lengths.tolist() == [[1, 1, 1], [100, 100, 100]]
    assert (episodes.rewards * (1 - episodes.mask)).abs().sum() == 0 and episodes.rewards[0, 0].sum() != 0
    moving = {n: p.detach() for n, p in policy.named_parameters()}
    runs = [rollout(policy, per_task(moving, 2), Navigation2D, goals, 3, generators(0, 2)) for _ in range(2)]
    assert torch.equal(runs[0].actions, runs[1].actions)  # a pure function of the generators
    alone = rollout(policy, per_task(moving, 1), Navigation2D, goals[1:], 3, generators(0, 2)[1:])
    assert torch.equal(alone.actions[0], runs[0].actions[1])  # and of the task's own alone


def test_a_scaled_policy_records_its_own_actions_and_moves_by_them_over_the_scale():
    """rl.action_scale (ProMP's reference: 10): the episodes keep the policy's actions, for its
    likelihoods; the environment is given them divided by the scale."""
    torch.manual_seed(0)
    moves = {}
    for scale in (1.0, 10.0):
        policy = GaussianMLPPolicy(2, 2, (8,), "tanh", action_scale=scale).to(F64)
        params = {n: p.detach() for n, p in policy.named_parameters()}
        params["mean.2.weight"] = torch.zeros_like(params["mean.2.weight"])
        params["mean.2.bias"] = torch.tensor([0.5, -0.3], dtype=F64)  # the same action from every state
        params["log_std"] = torch.full((2,), -30.0, dtype=F64)
        episodes = rollout(policy, per_task(params, 1), Navigation2D, np.array([[0.4, 0.4]]), 2, generators(0, 1))
        np.testing.assert_allclose(episodes.actions[0, :5].numpy(), np.broadcast_to([0.5, -0.3], (5, 2, 2)))
        moves[scale] = (episodes.observations[0, 1] - episodes.observations[0, 0]).numpy()
    np.testing.assert_allclose(moves[1.0], np.broadcast_to([0.05, -0.03], (2, 2)), atol=1e-12)  # top speed 0.1
    np.testing.assert_allclose(moves[10.0], moves[1.0] / 10, atol=1e-12)


def test_losses_average_over_every_step_a_task_ran():
    """As the papers' code (tf.reduce_mean over a task's samples): an episode that ended after one
    step weighs one step, not as much as one of three (9 / 4 here, not the per-episode 2.5)."""
    mask = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]], dtype=F64)  # [T, H, E]: lengths 1 and 3
    zeros = torch.zeros(1, 3, 2, 2, dtype=F64)
    episodes = Episodes(zeros, zeros, torch.zeros_like(mask), mask, zeros)
    values = torch.tensor([[[3.0, 1.0], [7.0, 2.0], [7.0, 3.0]]], dtype=F64)  # 7: after the end, ignored
    torch.testing.assert_close(episodes.step_mean(values), torch.tensor([9.0 / 4], dtype=F64))


def test_linear_baseline_is_each_tasks_ridge_regression():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (8,), "tanh").to(F64)
    theta = per_task({n: p.detach() for n, p in policy.named_parameters()}, 2)
    episodes = rollout(policy, theta, Navigation2D, np.array([[0.2, 0.1], [-0.3, 0.4]]), 4, generators(1, 2))
    features = baseline_features(episodes)
    weights = torch.randn(2, features.shape[-1], dtype=F64)
    returns = torch.einsum("thef,tf->the", features, weights) + 0.01 * torch.randn(episodes.rewards.shape, dtype=F64)
    values = linear_baseline(episodes, returns)
    for task in range(2):  # numpy's least squares on the ridge's augmented system, [X; sqrt(l) I] w = [y; 0]
        design = features[task].reshape(-1, features.shape[-1]).numpy()
        augmented = np.concatenate([design, np.sqrt(BASELINE_REGULARISATION) * np.eye(design.shape[1])])
        targets = np.concatenate([returns[task].reshape(-1).numpy(), np.zeros(design.shape[1])])
        reference = design @ np.linalg.lstsq(augmented, targets, rcond=None)[0]
        np.testing.assert_allclose(values[task].reshape(-1).numpy(), reference, rtol=1e-6, atol=1e-8)
    assert (values - returns).abs().mean() < 0.02  # and it fits what the features can express


def test_advantages_are_returns_minus_values_at_lambda_one():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (8,), "tanh").to(F64)
    theta = per_task({n: p.detach() for n, p in policy.named_parameters()}, 2)
    episodes = rollout(policy, theta, Navigation2D, np.array([[0.2, 0.1], [-0.3, 0.4]]), 5, generators(1, 2))
    returns = discounted_returns(episodes, 0.9)
    values = linear_baseline(episodes, returns)
    raw = with_advantages(episodes, 0.9, 1.0, normalize=False).advantages
    torch.testing.assert_close(raw, (returns - values) * episodes.mask)
    normalized = with_advantages(episodes, 0.9, 1.0).advantages
    count = episodes.mask.sum((1, 2))
    torch.testing.assert_close(normalized.sum((1, 2)) / count, torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close((normalized**2).sum((1, 2)) / count, torch.ones(2, dtype=F64), atol=1e-6, rtol=0)


# --- policy gradients against the closed form --------------------------------------------------


def test_policy_gradient_estimator_matches_the_exact_gradient():
    """REINFORCE with rewards to go, as the inner loss computes it, is unbiased: its mean over many
    independent batches equals the exact gradient of the expected return, within 4 standard errors."""
    policy, theta = tabular_policy()
    tasks = TINY.sample_tasks(np.random.default_rng(5), 2)
    repeats, episodes_each = 64, 500
    learner = MamlTrpo(MamlTrpoConfig(), policy, TINY)
    params = {n: p.requires_grad_() for n, p in per_task(theta, 2 * repeats).items()}
    episodes = rollout(policy, params, TINY, np.repeat(tasks, repeats, 0), episodes_each, generators(6, 2 * repeats))
    # the loss is a mean over the horizon's steps: times the horizon it estimates -grad of the return
    estimates = -TINY.horizon * per_task_gradients(learner.inner_loss(params, with_rewards_to_go(episodes)), params)
    layout = ParamLayout.of(theta)
    for task, samples in zip(tasks, estimates.view(2, repeats, -1)):
        flat = flat_parameters(theta, F64).requires_grad_()
        exact = torch.autograd.grad(expected_return(table(layout.unflatten(flat)), task), flat)[0]
        mean, error = estimate_and_error(samples)
        assert exact.abs().max() > 10 * error.max()  # the test can tell a wrong gradient from noise
        assert ((mean - exact).abs() <= 4 * error + 1e-12).all(), (mean, exact, error)


def test_maml_meta_gradient_matches_the_derivative_of_the_adapted_return():
    """MAML-RL's meta-gradient for a fixed batch of pre-update episodes D is an unbiased estimate of
    d/dtheta J(U(theta, D)), the exact expected return after the inner step U on D; the reference
    differentiates the closed form by central finite differences (no autograd through U)."""
    policy, theta = tabular_policy(1)
    task = TINY.sample_tasks(np.random.default_rng(7), 1)
    learner = MamlTrpo(MamlTrpoConfig(inner_lr=0.5), policy, TINY)
    layout = ParamLayout.of(theta)
    train = with_rewards_to_go(rollout(policy, per_task(theta, 1), TINY, task, 10, generators(8, 1)))

    def adapted_return(flat: torch.Tensor) -> float:
        with torch.enable_grad():
            named = {n: p.requires_grad_() for n, p in per_task(layout.unflatten(flat.detach()), 1).items()}
            adapted = learner.inner_step(named, train, create_graph=False)
        return float(expected_return(table({n: p[0] for n, p in adapted.items()}).detach(), task[0]))

    flat = flat_parameters(theta, F64)
    eps = 1e-5
    basis = torch.eye(len(flat), dtype=F64)
    reference = torch.tensor(
        [(adapted_return(flat + eps * e) - adapted_return(flat - eps * e)) / (2 * eps) for e in basis], dtype=F64
    )

    samples = []
    adapted = learner.detached_step(per_task(theta, 1), train)
    for repeat in range(32):
        valid = rollout(policy, adapted, TINY, task, 2000, generators([9, repeat], 1))
        valid = with_rewards_to_go(valid)
        batch = MetaRLBatch(task, [train], valid)
        _, gradient = MamlTrpoShare(learner, layout, flat, batch).gradient_sum()  # one task: sum = mean
        samples.append(-TINY.horizon * gradient)  # the surrogate is a mean over the horizon's steps
    mean, error = estimate_and_error(torch.stack(samples))
    assert reference.abs().max() > 10 * error.max()
    assert ((mean - reference).abs() <= 4 * error + 1e-8).all(), (mean, reference, error)


# --- the navigation policy and the meta-objectives written out by hand: the references below ---


def gaussian(named: dict[str, torch.Tensor], observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The navigation tests' policy (2 -> 6 tanh -> 2, a state-independent log-std) for one task:
    the mean and log-std of its actions."""
    mean = torch.tanh(observations @ named["mean.0.weight"].T + named["mean.0.bias"]) @ named["mean.2.weight"].T
    mean = mean + named["mean.2.bias"]
    return mean, named["log_std"].expand_as(mean)


def log_density(mean, log_std, actions) -> torch.Tensor:
    """log N(actions; mean, diag(exp(log_std))^2), summed over the action's coordinates."""
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_gaussians(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the coordinates."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def run_steps_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the steps one task's episodes ran ([H, E])."""
    return (values * mask).sum() / mask.sum()


def behaviour_terms(named, episodes: Episodes, task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task ``task``'s importance ratios pi(a|s) / pi_o(a|s), KL(pi_o || pi) per step, and advantages."""
    mean, log_std = gaussian(named, episodes.observations[task])
    old_mean, old_log_std = episodes.behaviour[task].chunk(2, -1)
    actions = episodes.actions[task]
    ratio = torch.exp(log_density(mean, log_std, actions) - log_density(old_mean, old_log_std, actions))
    return ratio, kl_gaussians(old_mean, old_log_std, mean, log_std), episodes.advantages[task]


def adapted_by_hand(named, train: list[Episodes], task: int, lr: float, lvc: bool, create_graph=False) -> list[dict]:
    """One task's parameters before each inner step and after the last: steps of ``lr`` on
    REINFORCE's loss (-log pi(a|s) A) or ProMP's LVC (-pi(a|s) / pi_o(a|s) A), each a mean over the
    steps run."""
    visited = [named]
    for episodes in train:
        ratio, _, advantages = behaviour_terms(named, episodes, task)
        weight = ratio if lvc else torch.log(ratio)  # log pi - log pi_o: the same gradient as log pi
        loss = -run_steps_mean(weight * advantages, episodes.mask[task])
        grads = torch.autograd.grad(loss, list(named.values()), create_graph=create_graph)
        named = {n: p - lr * g for (n, p), g in zip(named.items(), grads)}
        visited.append(named)
    return visited


def frozen_inner_gradient(adapted_at: dict, at: dict, point: dict) -> dict:
    """First order: the adapted parameters as ``point`` plus the inner steps' displacement held at its
    value at ``at`` (U(theta) = theta + (U(at) - at))."""
    return {n: point[n] + (adapted_at[n] - at[n]).detach() for n in point}


# --- the surrogate and the trust-region step on 2-D navigation ----------------------------------


def navigation_problem(
    first_order=False, seed=0, inner_lr=0.1, inner_steps=1
) -> tuple[MamlTrpo, ParamLayout, torch.Tensor, MetaRLBatch]:
    """A small MAML-TRPO batch on 2-D navigation in float64: 3 tasks, 4 episodes of 20 steps each."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, (6,), "tanh").to(F64)
    cfg = MamlTrpoConfig(episodes_per_task=4, first_order=first_order, inner_lr=inner_lr, inner_steps=inner_steps)
    learner = MamlTrpo(cfg, policy, SHORT)
    theta = {n: p.detach() for n, p in policy.named_parameters()}
    tasks = Navigation2D.sample_tasks(np.random.default_rng(seed), 3)
    batch = learner.collect(theta, tasks, generators(seed + 1, 3))
    return learner, ParamLayout.of(theta), flat_parameters(theta, F64), batch


def central_differences(function, point: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The gradient of a scalar ``function`` at ``point`` by central differences along each axis."""
    basis = torch.eye(len(point), dtype=F64)
    return torch.tensor([(function(point + eps * e) - function(point - eps * e)) / (2 * eps) for e in basis], dtype=F64)


REFERENCE_LR = 0.3  # not the configs' default: an inner step that ignored its setting would show


def surrogate_by_hand(layout, batch: MetaRLBatch, point: torch.Tensor, first_order: bool, at: torch.Tensor) -> float:
    """MAML-TRPO's mean surrogate over the tasks, -mean(pi_U(a|s) / pi_o(a|s) A) on the later episodes,
    U the inner steps from ``point`` (first order: their displacement held at ``at``)."""
    total = 0.0
    for task in range(len(batch.tasks)):
        with torch.enable_grad():
            named = {n: p.clone().requires_grad_() for n, p in layout.unflatten(point).items()}
            adapted = adapted_by_hand(named, batch.train, task, REFERENCE_LR, lvc=False)[-1]
            if first_order:
                start = {n: p.clone().requires_grad_() for n, p in layout.unflatten(at).items()}
                adapted = frozen_inner_gradient(
                    adapted_by_hand(start, batch.train, task, REFERENCE_LR, False)[-1], start, named
                )
        ratio, _, advantages = behaviour_terms(adapted, batch.valid, task)
        total += float(-run_steps_mean(ratio * advantages, batch.valid.mask[task]).detach())
    return total / len(batch.tasks)


@pytest.mark.parametrize("first_order,inner_steps", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_surrogate_gradient_matches_finite_differences(first_order, inner_steps):
    """The meta-gradient through the inner steps (or around them, first order) is the derivative of
    the surrogate written out by hand here (the policy, its log-density, REINFORCE's inner step of
    the configured size), by central differences."""
    learner, layout, flat, batch = navigation_problem(first_order, inner_lr=REFERENCE_LR, inner_steps=inner_steps)
    assert len(batch.train) == inner_steps
    _, gradient = MeanOverShares.local([MamlTrpoShare(learner, layout, flat, batch)]).gradient()

    reference = central_differences(lambda point: surrogate_by_hand(layout, batch, point, first_order, flat), flat)
    assert reference.abs().max() > 1e-3  # a gradient to compare, not zeros
    torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-8)


def dense_fisher(problem: MeanOverShares, size: int) -> torch.Tensor:
    return torch.stack([problem.fisher_product(e) for e in torch.eye(size, dtype=F64)])


def test_fisher_product_is_the_kl_hessian_and_cg_solves_it():
    learner, layout, flat, batch = navigation_problem()
    problem = MeanOverShares.local([MamlTrpoShare(learner, layout, flat, batch)])

    def mean_kl(point):  # KL(pi_o || pi_U) in closed form, U the inner step differentiated through
        named = layout.unflatten(point)
        kls = []
        for task in range(len(batch.tasks)):
            adapted = adapted_by_hand(named, batch.train, task, learner.cfg.inner_lr, lvc=False, create_graph=True)[-1]
            kls.append(run_steps_mean(behaviour_terms(adapted, batch.valid, task)[1], batch.valid.mask[task]))
        return torch.stack(kls).mean()

    fisher = dense_fisher(problem, len(flat))
    torch.testing.assert_close(fisher, torch.autograd.functional.hessian(mean_kl, flat.clone()), rtol=1e-7, atol=1e-10)
    assert torch.linalg.eigvalsh((fisher + fisher.T) / 2).min() > -1e-10  # positive semi-definite at theta
    _, gradient = problem.gradient()
    damped = fisher + 1e-2 * torch.eye(len(flat), dtype=F64)
    solution = conjugate_gradient(lambda v: damped @ v, gradient, iterations=4 * len(flat), tolerance=1e-30)
    torch.testing.assert_close(solution, torch.linalg.solve(damped, gradient), rtol=1e-6, atol=1e-9)


def test_trust_region_step_stays_within_the_kl_bound_and_lowers_the_surrogate():
    learner, layout, flat, batch = navigation_problem()
    problem = MeanOverShares.local([MamlTrpoShare(learner, layout, flat, batch)])
    max_kl = 1e-3
    step = trust_region_step(flat, problem, max_kl, 10, 1e-5, 15, 0.8)
    assert step.accepted and step.kl <= max_kl and step.loss_after < step.loss_before
    assert problem.evaluate(step.theta) == (step.loss_after, step.kl)
    # the full step sits on the quadratic model's boundary: 1/2 s^T F s = max_kl
    full = (flat - step.theta) / 0.8**step.backtracks
    fisher = dense_fisher(problem, len(flat)) + 1e-5 * torch.eye(len(flat), dtype=F64)
    assert float(0.5 * full @ fisher @ full) == pytest.approx(max_kl, rel=1e-6)


def test_a_trust_region_step_with_a_non_finite_gradient_is_marked_for_rejection():
    """An overflowed gradient is a fault the server rejects (and counts toward
    train.max_rejected_steps), not a step the line search merely declined; a zero one is no step."""

    class Constant:
        def __init__(self, gradient):
            self.value = gradient

        def gradient(self):
            return 1.0, self.value

        def fisher_product(self, v):
            return v

        def evaluate(self, theta):
            return 0.0, 0.0

    theta = torch.zeros(3, dtype=F64)
    overflowed = trust_region_step(theta, Constant(torch.tensor([1.0, math.inf, 0.0], dtype=F64)), 1e-2, 10, 0, 5, 0.8)
    assert not overflowed.finite and not overflowed.accepted and torch.equal(overflowed.theta, theta)
    flat = trust_region_step(theta, Constant(torch.zeros(3, dtype=F64)), 1e-2, 10, 0, 5, 0.8)
    assert flat.finite and not flat.accepted


def test_the_linear_baseline_of_diverged_episodes_is_nan_for_their_task_alone():
    """A task whose policy diverged (non-finite observations) cannot be fitted: its estimates are NaN
    (its terms then come out non-finite and the step is rejected), the other tasks' as ever."""
    episodes = navigation_problem()[3].valid  # 3 tasks
    returns = discounted_returns(episodes, 0.99)
    clean = linear_baseline(episodes, returns)
    observations = episodes.observations.clone()
    observations[1, 3] = math.nan
    observations[2] *= 1e80  # finite, but its normal equations overflow (their squares' sums pass 1e308)
    broken = dataclasses.replace(episodes, observations=observations)
    values = linear_baseline(broken, discounted_returns(broken, 0.99))
    assert torch.isnan(values[1:]).all()
    torch.testing.assert_close(values[0], clean[0], rtol=0, atol=0)


def test_a_step_is_a_pure_function_of_the_seed_and_the_parameters():
    """Resuming at step 2 from the parameters after step 1 repeats the run bit for bit."""
    cfg = MamlTrpoConfig(episodes_per_task=3)
    straight = LocalMetaRL(MetaRLSetup(SHORT, cfg, 4, hidden=(8,), dtype=F64))
    start = straight.theta.clone()
    straight.run(2)
    after_two = straight.theta.clone()
    last, _ = straight.step(2)
    assert not torch.equal(start, after_two) and last.accepted
    resumed = LocalMetaRL(MetaRLSetup(SHORT, cfg, 4, hidden=(8,), dtype=F64), state=LearnerState(2, after_two.numpy()))
    again, _ = resumed.step(2)
    assert torch.equal(resumed.theta, straight.theta)
    timing = {"rollout_s": 0.0, "learn_s": 0.0}
    assert dataclasses.replace(again, **timing) == dataclasses.replace(last, **timing)


def test_adaptation_curve_scores_fresh_episodes_after_each_step():
    learner, layout, flat, _ = navigation_problem()
    theta = layout.unflatten(flat)
    tasks = Navigation2D.sample_tasks(np.random.default_rng(11), 3)
    curve = adaptation_curve(learner, theta, tasks, [0.1, 0.05], 5, generators(12, 3))
    assert curve.shape == (3, 3)
    rngs = generators(12, 3)  # the protocol by hand: episodes, a step of 0.1 on them, new episodes
    first = rollout(learner.policy, per_task(theta, 3), SHORT, tasks, 5, rngs)
    adapted = learner.detached_step(per_task(theta, 3), with_advantages(first, 0.99, 1.0), lr=0.1)
    second = rollout(learner.policy, adapted, SHORT, tasks, 5, rngs)
    np.testing.assert_array_equal(curve[:, 0], first.returns().mean(1).numpy())
    np.testing.assert_array_equal(curve[:, 1], second.returns().mean(1).numpy())
    row = scored_row(curve[:, 1], 0, ways=0, shots=5, steps=1, metric="return")  # the evaluation's CI
    np.testing.assert_allclose(row.ci95, 1.96 * curve[:, 1].std(ddof=1) / np.sqrt(3))


def test_shares_of_the_meta_batch_give_the_same_steps():
    """Split into 1, 2 or 3 shares (the runtime's workers), the meta-batch takes the same steps: each
    task's episodes come from its own generator and the shares' sums are added in order. The sums'
    order still changes their last bits, which conjugate gradient amplifies on an ill-conditioned
    Fisher matrix: at the paper's damping of 1e-5 the parameters differ by 6e-8 after one step here,
    so this runs at a damping of 0.1, where the steps agree to 1e-14."""
    cfg = MamlTrpoConfig(episodes_per_task=3, cg_damping=0.1)
    thetas = []
    for shares in (1, 2, 3):
        loop = LocalMetaRL(MetaRLSetup(SHORT, cfg, 6, hidden=(8,), dtype=F64), shares=shares)
        metrics = loop.run(2)
        thetas.append(loop.theta)
        assert all(m.accepted for m in metrics)
    assert not torch.equal(thetas[0], LocalMetaRL(MetaRLSetup(SHORT, cfg, 6, hidden=(8,), dtype=F64)).theta)
    for theta in thetas[1:]:
        torch.testing.assert_close(theta, thetas[0], rtol=1e-10, atol=1e-12)


# --- classic control with random dynamics (gymnasium) -------------------------------------------


def test_cartpole_mass_steps_by_the_equations_of_motion_with_the_tasks_masses():
    """One Euler step of the cart-pole (Florian, 2007, as gymnasium integrates it) with the task's cart
    and pole masses, written out here."""
    cart, pole, half_length, gravity, force, tau = 1.7, 0.15, 0.5, 9.8, 10.0, 0.02
    env = CartPoleMass(np.array([[cart, pole]]), 1, generators(0, 1))
    x, x_dot, angle, angle_dot = env.reset()[0, 0]
    observation, reward, done = env.step(np.array([[1]]))  # push right
    total = cart + pole
    temp = (force + pole * half_length * angle_dot**2 * np.sin(angle)) / total
    angle_acc = (gravity * np.sin(angle) - np.cos(angle) * temp) / (
        half_length * (4 / 3 - pole * np.cos(angle) ** 2 / total)
    )
    x_acc = temp - pole * half_length * angle_acc * np.cos(angle) / total
    expected = [x + tau * x_dot, x_dot + tau * x_acc, angle + tau * angle_dot, angle_dot + tau * angle_acc]
    np.testing.assert_allclose(observation[0, 0], expected, rtol=1e-5, atol=1e-7)  # gymnasium's float32
    assert reward[0, 0] == 1.0 and not done[0, 0]


def test_pendulum_mass_steps_with_the_tasks_mass_and_length():
    mass, length, torque, dt = 1.6, 0.7, 1.5, 0.05
    env = PendulumMass(np.array([[mass, length]]), 1, generators(0, 1))
    cos, sin, speed = env.reset()[0, 0]
    observation, reward, _ = env.step(np.array([[[torque]]]))  # [tasks, episodes, action_dim]
    angle = np.arctan2(sin, cos)
    new_speed = speed + (3 * 10.0 / (2 * length) * np.sin(angle) + 3.0 / (mass * length**2) * torque) * dt
    new_angle = angle + new_speed * dt
    np.testing.assert_allclose(observation[0, 0], [np.cos(new_angle), np.sin(new_angle), new_speed], rtol=1e-5)
    cost = ((angle + np.pi) % (2 * np.pi) - np.pi) ** 2 + 0.1 * speed**2 + 0.001 * torque**2
    np.testing.assert_allclose(reward[0, 0], -cost, rtol=1e-5)


@pytest.mark.parametrize("env", ["cartpole_mass", "pendulum_mass"])
def test_maml_trpo_takes_a_step_on_classic_control(env):
    loop = LocalMetaRL(MetaRLSetup(env, MamlTrpoConfig(episodes_per_task=3), 2, hidden=(16,), dtype=F64))
    metrics, _ = loop.step(0)
    assert metrics.accepted and metrics.kl <= 0.01
    if env == "cartpole_mass":  # poles fall: episodes end at their own times, and are masked after
        episodes = rollout(
            loop.learner.policy,
            per_task(loop.layout.unflatten(loop.theta), 2),
            loop.learner.env,
            loop.learner.env.sample_tasks(np.random.default_rng(0), 2),
            3,
            generators(1, 2),
        )
        lengths = episodes.lengths
        assert lengths.max() < 200 and lengths.min() < lengths.max()
        assert torch.equal(episodes.returns(), lengths)  # a reward of 1 for each step the pole stood


# --- ProMP ---------------------------------------------------------------------------------------


def per_task_leaves(theta: dict[str, torch.Tensor], num_tasks: int) -> dict[str, torch.Tensor]:
    """Each task's own copy of theta as a leaf: gradients per task, and Hessians by rows."""
    return {n: p.detach().expand(num_tasks, *p.shape).clone().requires_grad_() for n, p in theta.items()}


def gradients_and_hessians(objective: torch.Tensor, params: dict[str, torch.Tensor]):
    """Each task's gradient [T, P] and Hessian [T, P, P] of its entry of ``objective`` [T]."""
    leaves = list(params.values())
    grads = torch.cat([g.flatten(1) for g in torch.autograd.grad(objective.sum(), leaves, create_graph=True)], 1)
    rows = [torch.autograd.grad(grads[:, i].sum(), leaves, retain_graph=True) for i in range(grads.shape[1])]
    hessians = torch.stack([torch.cat([g.flatten(1) for g in row], 1) for row in rows], 1)
    return grads.detach(), hessians


def dice_objective(policy, params, episodes: Episodes) -> torch.Tensor:
    """DiCE (Foerster et al., 2018), per task: the mean over episodes of sum_t magic(sum_{t' <= t}
    log pi(a_t' | s_t')) r_t, magic(x) = exp(x - stop_gradient(x)); every derivative of it is an
    unbiased estimate of the return's."""
    log_prob = policy.distribution(policy_output(policy, params, episodes.observations)).log_prob(episodes.actions)
    so_far = log_prob.cumsum(1)
    return (torch.exp(so_far - so_far.detach()) * episodes.rewards).sum(1).mean(1)


@pytest.mark.parametrize("horizon", [1, 4])
def test_lvc_against_dice_and_the_exact_derivatives(horizon, capsys):
    """ProMP's LVC inner objective against DiCE on tabular MDPs, over 400 batches of 50 episodes:
    its gradient is DiCE's, sample by sample (both the policy gradient); its Hessian is DiCE's on a
    one-step task; over 4 steps it drops the trajectory distribution's cross terms, so it is biased
    (the paper's section 5) where DiCE's Hessian matches the exact one, with a smaller variance
    (the ratio is printed)."""
    env = TabularMDP.sized(num_states=3, num_actions=2, horizon=horizon)
    policy, theta = tabular_policy(2)
    batches, task = 400, env.sample_tasks(np.random.default_rng(13), 1)
    learner = ProMP(ProMPConfig(), policy, env)
    leaves = per_task_leaves(theta, batches)
    episodes = rollout(policy, leaves, env, np.repeat(task, batches, 0), 50, generators(14, batches))
    episodes = with_rewards_to_go(episodes)
    lvc_grad, lvc_hessian = gradients_and_hessians(-env.horizon * learner.inner_loss(leaves, episodes), leaves)
    dice_grad, dice_hessian = gradients_and_hessians(dice_objective(policy, leaves, episodes), leaves)
    torch.testing.assert_close(lvc_grad, dice_grad, rtol=1e-10, atol=1e-12)

    def expected(flat):  # the exact return of this task, a function of the flat parameters
        return expected_return(table(ParamLayout.of(theta).unflatten(flat)), task[0], env)

    exact = torch.autograd.functional.hessian(expected, flat_parameters(theta, F64))
    dice_mean, dice_error = estimate_and_error(dice_hessian)
    assert ((dice_mean - exact).abs() <= 4 * dice_error + 1e-10).all()
    lvc_mean, lvc_error = estimate_and_error(lvc_hessian)
    variance_ratio = float(dice_hessian.var(0).sum() / lvc_hessian.var(0).sum())
    print(f"horizon {horizon}: Hessian variance DiCE / LVC = {variance_ratio:.2f}")
    if horizon == 1:
        torch.testing.assert_close(lvc_hessian, dice_hessian, rtol=1e-10, atol=1e-12)
    else:
        assert ((lvc_mean - exact).abs() > 6 * lvc_error).any()  # biased
        assert variance_ratio > 1.5


def promp_problem(
    seed=0, first_order=False, inner_lr=0.1, inner_steps=1
) -> tuple[ProMP, ParamLayout, torch.Tensor, MetaRLBatch]:
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, (6,), "tanh").to(F64)
    cfg = ProMPConfig(episodes_per_task=4, first_order=first_order, inner_lr=inner_lr, inner_steps=inner_steps)
    learner = ProMP(cfg, policy, SHORT)
    theta = {n: p.detach() for n, p in policy.named_parameters()}
    batch = learner.collect(theta, SHORT.sample_tasks(np.random.default_rng(seed), 3), generators(seed + 1, 3))
    return learner, ParamLayout.of(theta), flat_parameters(theta, F64), batch


def test_promp_adapts_as_maml_where_the_episodes_were_collected():
    """At the parameters that collected the episodes LVC's gradient is the policy gradient."""
    learner, layout, flat, batch = promp_problem()
    maml = MamlTrpo(MamlTrpoConfig(), learner.policy, SHORT)
    start = per_task(layout.unflatten(flat), 3)
    lvc, reinforce = (method.detached_step(start, batch.train[0]) for method in (learner, maml))
    for name in lvc:
        torch.testing.assert_close(lvc[name], reinforce[name], rtol=1e-12, atol=1e-14)


def promp_objective_by_hand(
    layout, batch: MetaRLBatch, point: torch.Tensor, first_order: bool, at: torch.Tensor
) -> float:
    """ProMP's objective summed over the tasks, written out: PPO's clipped surrogate
    -mean(min(r A, clip(r, 1 -+ 0.3) A)) of the policy after LVC inner steps on its later episodes,
    plus 5e-4 times the mean over the inner steps of KL(pi_o || pi) before each (first order: the
    inner steps' displacements held at their values at ``at``)."""
    total = 0.0
    for task in range(len(batch.tasks)):
        with torch.enable_grad():
            named = {n: p.clone().requires_grad_() for n, p in layout.unflatten(point).items()}
            visited = adapted_by_hand(named, batch.train, task, REFERENCE_LR, lvc=True)
            if first_order:
                start = {n: p.clone().requires_grad_() for n, p in layout.unflatten(at).items()}
                held = adapted_by_hand(start, batch.train, task, REFERENCE_LR, lvc=True)
                visited = [frozen_inner_gradient(h, start, named) for h in held]
        kls = [run_steps_mean(behaviour_terms(v, e, task)[1], e.mask[task]) for v, e in zip(visited, batch.train)]
        ratio, _, advantages = behaviour_terms(visited[-1], batch.valid, task)
        clipped = torch.minimum(ratio * advantages, ratio.clamp(0.7, 1.3) * advantages)
        total += float((-run_steps_mean(clipped, batch.valid.mask[task]) + 5e-4 * torch.stack(kls).mean()).detach())
    return total


@pytest.mark.parametrize("first_order,inner_steps", [(False, 1), (True, 1), (False, 2)])
def test_promp_meta_gradient_matches_finite_differences_away_from_the_sampling_parameters(first_order, inner_steps):
    """ProMP's gradient (through the LVC inner steps, the clipped ratio and the KL penalty) at a theta
    its Adam steps reach, where the ratios are no longer 1 and some are clipped, against the
    objective written out by hand here, by central differences."""
    learner, layout, flat, batch = promp_problem(
        first_order=first_order, inner_lr=REFERENCE_LR, inner_steps=inner_steps
    )
    assert (learner.cfg.clip_eps, learner.cfg.inner_kl_penalty) == (0.3, 5e-4)  # the reference's constants
    share = ProMPShare(learner, layout, batch)
    moved = flat + 0.2 * torch.randn(flat.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    _, gradient = share.gradient_sum(moved)
    clipped = []  # where the clip decides the minimum, and so the gradient
    for task in range(len(batch.tasks)):
        with torch.enable_grad():
            named = {n: p.clone().requires_grad_() for n, p in layout.unflatten(moved).items()}
            adapted = adapted_by_hand(named, batch.train, task, REFERENCE_LR, lvc=True)[-1]
        ratio, _, advantages = behaviour_terms(adapted, batch.valid, task)
        active = ((ratio > 1.3) & (advantages > 0)) | ((ratio < 0.7) & (advantages < 0))
        clipped.append(active[batch.valid.mask[task] > 0])
    assert 0.02 < torch.cat(clipped).double().mean() < 0.5  # both sides of the clip are checked

    reference = central_differences(
        lambda point: promp_objective_by_hand(layout, batch, point, first_order, moved), moved
    )
    torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-8)


def test_promp_steps_lower_its_objective_and_do_not_depend_on_the_shares():
    cfg = ProMPConfig(episodes_per_task=3)
    thetas = []
    for shares in (1, 3):
        loop = LocalMetaRL(MetaRLSetup(SHORT, cfg, 6, hidden=(8,), dtype=F64), shares=shares)
        metrics = loop.run(2)
        assert all(m.loss_after < m.loss_before for m in metrics)
        thetas.append(loop.theta)
    torch.testing.assert_close(thetas[1], thetas[0], rtol=1e-10, atol=1e-12)


# --- MuJoCo locomotion (gymnasium's v5 environments) ---------------------------------------------


def raw_step(gymnasium_env: str, seed: int, action: np.ndarray, **options):
    """One step of a fresh gymnasium environment from reset(seed): (x before, x after, dt, info).
    x is the root's position: HalfCheetah's root joint, Ant's torso body (v5 measures each so; the
    torso's frame lags the free joint by one substep after mj_step)."""
    import gymnasium

    env = gymnasium.make(gymnasium_env, **options).unwrapped
    env.reset(seed=seed)
    x = (lambda: env.data.body("torso").xpos[0]) if gymnasium_env.startswith("Ant") else (lambda: env.data.qpos[0])
    before = float(x())
    _, _, terminated, _, info = env.step(action)
    return before, float(x()), env.dt, info, terminated


@pytest.mark.parametrize("name", ["halfcheetah_direction", "halfcheetah_velocity", "ant_direction"])
def test_locomotion_rewards_are_the_reference_shaping_of_the_simulated_motion(name):
    """Each task's reward from the MuJoCo state itself: the forward velocity as the change of the
    root's x over the step's time, the control cost from the action, against a plain gymnasium
    environment from the same seed."""
    env_class = ENVIRONMENTS[name]
    tasks = np.array([[1.0], [-1.0]]) if name.endswith("direction") else np.array([[0.3], [1.7]])
    rngs = generators(5, 2)
    seeds = [np.random.default_rng([5, t]).integers(2**31) for t in range(2)]  # what reset() draws, per task
    env = env_class(tasks, 1, rngs)
    env.reset()
    action = np.linspace(-0.9, 0.9, env_class.action_dim)
    _, reward, _ = env.step(np.broadcast_to(action, (2, 1, env_class.action_dim)).copy())
    gymnasium_env = "Ant-v5" if name.startswith("ant") else "HalfCheetah-v5"
    options = {"include_cfrc_ext_in_observation": False} if name.startswith("ant") else {}
    for t, task in enumerate(tasks[:, 0]):
        before, after, dt, info, _ = raw_step(gymnasium_env, int(seeds[t]), action, **options)
        velocity = (after - before) / dt
        if name == "halfcheetah_direction":
            expected = task * velocity - 0.05 * (action**2).sum()
        elif name == "halfcheetah_velocity":
            expected = -abs(velocity - task) - 0.05 * (action**2).sum()
        else:  # ant: v5's contact cost and healthy reward, its control cost 0.5 |a|^2
            expected = task * velocity - 0.5 * (action**2).sum() + info["reward_contact"] + 1.0
        assert reward[t, 0] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert env.reset().shape == (2, 1, env_class.observation_dim)


def test_maml_trpo_takes_a_step_on_halfcheetah():
    loop = LocalMetaRL(MetaRLSetup("halfcheetah_direction", MamlTrpoConfig(episodes_per_task=2), 2, hidden=(16,)))
    metrics, _ = loop.step(0)
    assert metrics.accepted and 0 < metrics.kl <= 0.01 and metrics.environment_steps == 2 * 2 * 2 * 200
