"""Nunchaku: SVDQuant 4-bit (W4A4) inference for diffusion transformers."""

__version__ = "0.1.0"
