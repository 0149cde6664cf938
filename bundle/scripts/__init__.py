"""QSMGAN bundle code: physics, phantoms, data, networks, engines, inference, baselines and metrics."""
