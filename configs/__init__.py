"""Experiment configs: ``get_config(arg=None)`` files for ``python -m decjax.train``."""
