"""Bento entry point: the service lives in the h33-bento package (shipped as a wheel in the Bento)."""
from h33_bento.runners.service import H33Inference

__all__ = ["H33Inference"]
