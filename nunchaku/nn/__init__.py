from .linear import AWQW4A16Linear, SVDQW4A4Linear

__all__ = ["AWQW4A16Linear", "SVDQW4A4Linear"]
