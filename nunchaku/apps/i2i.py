"""The sketch-to-image Gradio app: draw, describe, and the image follows as you draw.

With a sketch LoRA (FLUX.1-schnell) each result is one transformer call on the binarized strokes;
without one (the embedded demo model) the colored sketch is the starting image of a few denoising
steps (SDEdit; see nunchaku.pipelines.sketch). app/i2i/run_gradio.py parses the flags."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..demo.scenes import COLORS
from ..models.safety import screen_prompt
from ..pipelines.sketch import SketchMode, SketchToImagePipeline, sketch_on_white
from .common import MAX_SEED, ModelSpec, Precision, apply_style, device_summary, random_seed, styles_for, \
    timed_call

CANVAS = 512  # drawing surface in the browser; the sketch is resized to the model's size


def sketch_image(value) -> Image.Image | None:
    """The sketchpad's composite as an RGB image on white, or None when nothing is drawn."""
    if value is None:
        return None
    composite = value.get("composite") if isinstance(value, dict) else value
    if composite is None:
        return None
    image = composite if isinstance(composite, Image.Image) else Image.fromarray(np.asarray(composite))
    image = sketch_on_white(image)
    if np.asarray(image.convert("L")).min() >= 250:
        return None
    return image


def _brush(spec: ModelSpec, mode: SketchMode) -> gr.Brush:
    if mode is SketchMode.SDEDIT:
        # SDEdit keeps the sketch's colors: offer the colors the model knows.
        colors = ["#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in COLORS.items() if name != "white"]
        return gr.Brush(default_size=24, colors=colors, default_color=colors[0], color_mode="fixed")
    return gr.Brush(default_size=8, colors=["#000000"], default_color="#000000", color_mode="fixed")


def build_app(spec: ModelSpec, pipeline: SketchToImagePipeline, precision: Precision, checker, device: str,
              checker_note: str = "") -> gr.Blocks:
    styles = styles_for(spec)
    sdedit = pipeline.mode is SketchMode.SDEDIT
    downloads = Path(tempfile.mkdtemp(prefix="nunchaku-i2i-"))
    if spec.name == "demo":
        mode_note = ("**Offline demo model.** No FLUX.1 weights were found on this machine, so this runs the "
                     "embedded tiny model, which has no sketch LoRA: your colored sketch is the starting image and "
                     "the model redraws it as the shapes your prompt names (SDEdit, a few denoising steps). "
                     "Paint blobs in the colors you name, where you want the shapes.")
    elif sdedit:
        mode_note = "No sketch LoRA given: the sketch is the starting image of a few denoising steps (SDEdit)."
    else:
        mode_note = "One step per image: the sketch LoRA turns your strokes into a picture."

    def generate(sketch, prompt, style, guidance, seed, steps):
        image = sketch_image(sketch)
        if image is None:
            return None, "Draw something on the sketchpad first.", gr.update(), gr.update()
        try:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("The prompt is empty: say what the sketch shows.")
            if not 0.0 <= float(guidance) <= 1.0:
                raise ValueError(f"Sketch guidance must be between 0 and 1, got {guidance}.")
            if not 0 <= int(seed) <= MAX_SEED:
                raise ValueError(f"Seed must be between 0 and {MAX_SEED}, got {seed}.")
            if not 1 <= int(steps) <= 50:
                raise ValueError(f"Steps must be between 1 and 50, got {steps}.")
            styled = apply_style(styles, style, prompt)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        used, verdict = screen_prompt(styled, checker)
        notes = []
        if verdict.unsafe:
            notes.append(f"⚠️ The prompt was flagged as unsafe ({verdict.reason}) and replaced by: “{used}”.")
        image = image.resize((spec.size, spec.size), Image.Resampling.LANCZOS)
        timed = timed_call(lambda: pipeline(
            image, used, sketch_guidance=float(guidance), generator=torch.Generator("cpu").manual_seed(int(seed)),
            num_inference_steps=int(steps), true_cfg_scale=spec.guidance if sdedit and spec.guidance > 1 else 1.0,
        ), device)
        memory = "" if timed.peak_memory_gib is None else f", peak GPU memory {timed.peak_memory_gib:.2f} GiB"
        notes.append(f"{precision.value.upper()}: {timed.latency_s:.2f} s{memory}")
        sketch_file, result_file = downloads / f"sketch-{seed}.png", downloads / f"result-{seed}.png"
        image.save(sketch_file)
        timed.image.save(result_file)
        return timed.image, "\n\n".join(notes), gr.update(value=str(sketch_file)), gr.update(value=str(result_file))

    with gr.Blocks(title=f"Nunchaku sketch-to-image ({spec.name})") as app:
        gr.Markdown(
            f"# Nunchaku: 4-bit FLUX sketch-to-image\n{spec.description}\n\n{mode_note}\n\n"
            f"Running on: **{device_summary(device)}** · precision: {precision.value.upper()}\n\n{checker_note}",
            elem_id="header",
        )
        with gr.Row():
            with gr.Column():
                sketch = gr.Sketchpad(label="Sketch", type="pil", image_mode="RGBA", canvas_size=(CANVAS, CANVAS),
                                      brush=_brush(spec, pipeline.mode), elem_id="sketch")
                download_sketch = gr.DownloadButton("Download sketch", elem_id="download-sketch")
            with gr.Column():
                result = gr.Image(label="Result", type="pil", format="png", interactive=False, height=420,
                                  elem_id="result")
                download_result = gr.DownloadButton("Download result", elem_id="download-result")
                status = gr.Markdown(elem_id="status")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="What does the sketch show?", scale=3, elem_id="prompt",
                                value=spec.examples[0] if spec.name == "demo" else "")
            style = gr.Dropdown(list(styles), value="None", label="Style", elem_id="style")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            guidance = gr.Slider(0.0, 1.0, value=0.5 if sdedit else 0.4, step=0.01, label="Sketch guidance",
                                 info="how closely the result follows the sketch", elem_id="sketch-guidance")
            # no minimum/maximum: generate checks the range and says what is wrong
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
            reroll = gr.Button("Random seed", elem_id="random-seed")
            steps = gr.Slider(1, 50, value=spec.steps if sdedit else 1, step=1, label="Steps", visible=sdedit,
                              elem_id="steps")
        inputs = [sketch, prompt, style, guidance, seed, steps]
        outputs = [result, status, download_sketch, download_result]
        # Generation as you draw: every stroke asks for an image; trigger_mode "always_last" drops
        # requests that a newer stroke has made stale instead of queueing them all.
        sketch.change(generate, inputs=inputs, outputs=outputs, trigger_mode="always_last", show_progress="minimal")
        for event in (run.click, prompt.submit, style.change, guidance.release):
            event(generate, inputs=inputs, outputs=outputs, trigger_mode="always_last")
        reroll.click(random_seed, outputs=seed).then(generate, inputs=inputs, outputs=outputs)
    app.queue(default_concurrency_limit=1)
    return app
