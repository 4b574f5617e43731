"""Meta-RL on a real local Ray: 1, 2 and 3 worker actors take the same steps as one process."""

from __future__ import annotations

import pytest
import torch

from distmeta.rl.distributed import RayMetaRL
from distmeta.rl.envs import Navigation2D
from distmeta.rl.local import LocalMetaRL
from distmeta.rl.maml_trpo import MamlTrpoConfig
from distmeta.rl.promp import ProMPConfig
from distmeta.rl.setup import MetaRLSetup

F64 = torch.float64
SHORT = type("ShortNavigation", (Navigation2D,), {"horizon": 20})


@pytest.mark.parametrize(
    "cfg",
    # the damping: at the paper's 1e-5 conjugate gradient amplifies the sums' last bits (test_rl.py)
    [MamlTrpoConfig(episodes_per_task=3, cg_damping=0.1), ProMPConfig(episodes_per_task=3)],
    ids=["maml_trpo", "promp"],
)
def test_workers_take_the_steps_of_one_process(ray_local, cfg):
    setup = MetaRLSetup(SHORT, cfg, 6, hidden=(8,), dtype=F64)
    local = LocalMetaRL(setup)
    expected = local.run(2)
    for workers in (1, 2, 3):
        system = RayMetaRL(setup, workers, cpus_per_worker=0.5)
        try:
            metrics = system.run(2)
            theta = torch.tensor(system.get(system.call(system.server, "parameters")))
        finally:
            system.close()
        torch.testing.assert_close(theta, local.theta, rtol=1e-10, atol=1e-12)
        assert len(metrics) == len(expected) == 2
        for got, want in zip(metrics, expected):
            assert got.return_after == pytest.approx(want.return_after, rel=1e-12)
            assert got.environment_steps == want.environment_steps
