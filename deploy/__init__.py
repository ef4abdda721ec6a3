"""Deployment definitions for the vitdistill flows (see ``deploy/deployments.py``)."""
