"""h33-bento: encrypted inference with CKKS."""
__version__ = "0.1.0"
