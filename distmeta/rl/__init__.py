"""Meta-reinforcement learning: environments whose tasks are points of a distribution (a goal, a
mass, a direction), policies run with one copy of the parameters per task, rollouts, the
policy-gradient inner loop, and the meta-steps of MAML-TRPO and ProMP. Like the supervised core it
imports no Ray: ``local.py`` runs the whole method in one process, and the runtime moves the same
objects."""
