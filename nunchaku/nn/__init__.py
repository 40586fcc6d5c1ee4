from .linear import AWQW4A16Linear, SVDQW4A4Linear, set_sm90_activations

__all__ = ["AWQW4A16Linear", "SVDQW4A4Linear", "set_sm90_activations"]
