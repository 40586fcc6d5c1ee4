"""Model assemblies: the quantized FLUX transformer, the W4A16 T5 encoder, safety checkers.

Submodules import diffusers/transformers; import them directly (nunchaku.models.flux, ...)."""
