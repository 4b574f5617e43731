"""Environments, by name. Add one in its own file (an ``Environment``, base.py) and register it here."""

from distmeta.rl.envs.base import Environment
from distmeta.rl.envs.classic import CartPoleMass, PendulumMass
from distmeta.rl.envs.navigation import Navigation2D
from distmeta.rl.envs.tabular import TabularMDP

ENVIRONMENTS: dict[str, type[Environment]] = {
    "navigation2d": Navigation2D,
    "tabular_mdp": TabularMDP,
    "cartpole_mass": CartPoleMass,
    "pendulum_mass": PendulumMass,
}

__all__ = ["ENVIRONMENTS", "CartPoleMass", "Environment", "Navigation2D", "PendulumMass", "TabularMDP"]
