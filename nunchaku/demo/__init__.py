"""The embedded demo model's world: procedural captioned scenes and a faithfulness checker.

`nunchaku.demo.scenes` generates and renders the scenes and parses prompts of their grammar;
`nunchaku.demo.checker` says whether an image shows a prompt. `scripts/train_demo_model.py`
trains the tiny FLUX pipeline on them.
"""

from nunchaku.demo.checker import (
    CheckerConfig, CheckResult, analyze, check_image, degrade, mismatched_prompt, pass_rates,
)
from nunchaku.demo.scenes import (
    COLORS, KINDS, POSITIONS, RELATIONS, SHAPES, VOCABULARY, ObjectQuery, Prompt, SceneDataset, SceneObject,
    SceneSpec, caption, held_out_prompts, held_out_scenes, is_held_out, parse_prompt, render, sample_scene, scene_at,
    to_tensor,
)

__all__ = [
    "COLORS", "KINDS", "POSITIONS", "RELATIONS", "SHAPES", "VOCABULARY", "CheckResult", "CheckerConfig",
    "ObjectQuery", "Prompt", "SceneDataset", "SceneObject", "SceneSpec", "analyze", "caption", "check_image", "degrade",
    "held_out_prompts", "held_out_scenes", "is_held_out", "mismatched_prompt", "parse_prompt", "pass_rates", "render",
    "sample_scene", "scene_at", "to_tensor",
]
