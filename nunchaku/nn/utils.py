"""Small module-tree helpers shared by the model assemblies."""

from __future__ import annotations

from torch import nn


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule at a dotted path ("blocks.0.attn.to_out.0"); numeric leaves index
    into ModuleLists."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)
