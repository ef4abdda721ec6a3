"""vitdistill: frozen-teacher features, probes, LiT and distillation as one reproducible pipeline.

The library never imports Prefect: ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.1.0"
