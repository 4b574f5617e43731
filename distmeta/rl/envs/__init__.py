"""Environments, by name. Add one in its own file (an ``Environment``, base.py) and register it here."""

from distmeta.rl.envs.base import Environment
from distmeta.rl.envs.classic import CartPoleMass, PendulumMass
from distmeta.rl.envs.locomotion import AntDirection, HalfCheetahDirection, HalfCheetahVelocity
from distmeta.rl.envs.navigation import Navigation2D
from distmeta.rl.envs.tabular import TabularMDP

ENVIRONMENTS: dict[str, type[Environment]] = {
    "navigation2d": Navigation2D,
    "tabular_mdp": TabularMDP,
    "cartpole_mass": CartPoleMass,
    "pendulum_mass": PendulumMass,
    "halfcheetah_direction": HalfCheetahDirection,
    "halfcheetah_velocity": HalfCheetahVelocity,
    "ant_direction": AntDirection,
}

__all__ = [
    "ENVIRONMENTS",
    "AntDirection",
    "CartPoleMass",
    "Environment",
    "HalfCheetahDirection",
    "HalfCheetahVelocity",
    "Navigation2D",
    "PendulumMass",
    "TabularMDP",
]
