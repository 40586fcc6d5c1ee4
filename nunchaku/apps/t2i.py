"""The text-to-image Gradio app: INT4 and/or BF16 side by side, each column with its image,
latency and GPU memory. app/t2i/run_gradio.py parses the flags and calls build_app."""

from __future__ import annotations

import gradio as gr

from ..models.safety import screen_prompt
from .common import ModelSpec, Precision, device_summary, random_seed, select_lora, timed_generate, \
    validate_generation_inputs

NO_LORA = "None"


def _maybe_spaces_gpu(fn):
    """On Hugging Face Spaces (ZeroGPU) the generate call must be wrapped by spaces.GPU."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def build_app(spec: ModelSpec, pipelines: dict, checker, device: str, checker_note: str = "") -> gr.Blocks:
    """pipelines: {Precision: pipeline}; with spec.loras they must carry those LoRAs
    (common.attach_loras)."""
    precisions = list(pipelines)
    demo_note = ""
    if spec.name == "demo":
        demo_note = ("\n\n**Offline demo model.** No FLUX.1 weights were found on this machine, so this is the "
                     "embedded tiny model: it draws simple shapes, colors and positions, not photographs. "
                     "Try the examples, or combine their words.")

    def generate(prompt, seed, steps, guidance, size, lora_choice=NO_LORA, lora_strength=1.0):
        try:
            validate_generation_inputs(spec, prompt, seed, steps, guidance, size, size)
            if not 0.0 <= float(lora_strength) <= 2.0:
                raise ValueError(f"LoRA strength must be between 0 and 2, got {lora_strength}.")
        except ValueError as e:
            raise gr.Error(str(e)) from None
        used, verdict = screen_prompt(prompt, checker)
        status = ""
        if verdict.unsafe:
            status = (f"⚠️ The prompt was flagged as unsafe ({verdict.reason}, score {verdict.score:.2f}) and "
                      f"replaced by: “{used}”.")
        outputs = []
        for p in precisions:
            if spec.loras:
                select_lora(pipelines[p], spec.loras, None if lora_choice == NO_LORA else lora_choice, lora_strength)
            result = timed_generate(pipelines[p], spec, used, seed, steps, guidance, size, size, device)
            memory = "" if result.peak_memory_gib is None else f", peak GPU memory {result.peak_memory_gib:.2f} GiB"
            outputs += [result.image, f"{p.value.upper()}: {result.latency_s:.2f} s{memory}"]
        return [status, *outputs]

    with gr.Blocks(title=f"Nunchaku text-to-image ({spec.name})") as app:
        gr.Markdown(
            f"# Nunchaku: 4-bit FLUX text-to-image\n{spec.description}{demo_note}\n\n"
            f"Running on: **{device_summary(device)}** · precision: {', '.join(p.value.upper() for p in precisions)}"
            f"\n\n{checker_note}",
            elem_id="header",
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Describe the image", scale=4, elem_id="prompt")
            run = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
        with gr.Row():
            # no minimum/maximum: generate checks the range and says what is wrong
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
            reroll = gr.Button("Random seed", elem_id="random-seed")
            steps = gr.Slider(spec.steps_range[0], spec.steps_range[1], value=spec.steps, step=1, label="Steps",
                              elem_id="steps")
            guidance = gr.Slider(spec.guidance_range[0], max(spec.guidance_range[1], spec.guidance_range[0] + 0.1),
                                 value=spec.guidance, step=0.1, label="Guidance",
                                 interactive=spec.guidance_range[1] > spec.guidance_range[0], elem_id="guidance")
            size = gr.Slider(16, 2048, value=spec.size, step=16, label="Size (pixels)", elem_id="size")
        lora_inputs = []
        if spec.loras:
            with gr.Row():
                lora_inputs = [
                    gr.Dropdown([NO_LORA, *spec.loras], value=NO_LORA, label="LoRA", elem_id="lora"),
                    gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength", elem_id="lora-strength"),
                ]
        status = gr.Markdown(elem_id="status")
        images, stats = [], []
        with gr.Row():
            for p in precisions:
                with gr.Column():
                    images.append(gr.Image(label=p.value.upper(), type="pil", format="png", height=420,
                                           elem_id=f"image-{p.value}"))
                    stats.append(gr.Markdown(elem_id=f"stats-{p.value}"))
        gr.Examples(list(spec.examples), inputs=[prompt])
        outputs = [status]
        for image, stat in zip(images, stats):
            outputs += [image, stat]
        inputs = [prompt, seed, steps, guidance, size, *lora_inputs]
        run.click(_maybe_spaces_gpu(generate), inputs=inputs, outputs=outputs)
        prompt.submit(_maybe_spaces_gpu(generate), inputs=inputs, outputs=outputs)
        reroll.click(random_seed, outputs=seed)
    # One generation at a time: concurrent users wait in the queue instead of sharing the GPU.
    app.queue(default_concurrency_limit=1)
    return app


def precisions_from_flags(values: list[str]) -> list[Precision]:
    out = []
    for v in values:
        try:
            p = Precision(v)
        except ValueError:
            raise SystemExit(f"-p takes int4 and/or bf16, got {v!r}") from None
        if p not in out:
            out.append(p)
    return out
