"""Train the embedded demo model: a tiny FLUX.1-architecture text-to-image pipeline, from scratch,
on the procedural scenes of `nunchaku.demo.scenes`.

    python scripts/train_demo_model.py --work-dir runs/demo            # a run stops by --max-minutes
    python scripts/train_demo_model.py --work-dir runs/demo            # the next resumes; the last exports
    python scripts/train_demo_model.py --work-dir /tmp/smoke --smoke   # CPU, < 60 s, end to end

What is trained, in order (phases; each run continues where the last stopped):

1. data    a pool of `--pool-size` training scenes (held-out captions excluded) rendered at
           `--resolution`, kept on the device as uint8, captions tokenized once. Rendering is
           parallel over CPU processes and redone by every run (deterministic, ~20 s for 150k
           scenes on 16 cores), so no data goes to disk.
2. vae     AutoencoderKL (FLUX's class, 8x downsampling) with L1 + MSE reconstruction and a small
           KL term (1e-6 per latent sum); no GAN or LPIPS loss: flat-colored shapes need neither.
           Afterwards the latents' mean and std become the VAE config's shift_factor and
           1/scaling_factor, as FLUX's VAE has them, so FluxPipeline's decode is unchanged.
3. flow    transformer and both text encoders, jointly, with the rectified-flow objective of
           FLUX / SD3: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0 (MSE),
           t = sigmoid(N(0, 1)) (logit-normal). The text encoders start random and learn through
           the transformer's loss: FLUX gives text tokens no position (txt_ids are zeros), so
           which color goes with which shape in "a red circle above a blue square" must come
           from T5, and a frozen random T5 barely encodes word order. They run in eval mode
           (no dropout) while training, as the pipeline runs them. 10% of captions are dropped to
           the empty prompt, so diffusers' true CFG (`true_cfg_scale`, `negative_prompt=""`)
           works. An EMA of the weights (decay 0.999) is what gets exported.
4. export  a normal diffusers FluxPipeline folder (`save_pretrained`, weights in --export-dtype),
           sample images, and the faithfulness pass rate on held-out prompts (metrics.json).

Every random draw comes from a generator seeded by (seed, phase, step), so a resumed run takes the
same batches and noise as an uninterrupted one. A run stops itself when --max-minutes (counted
from process start) is near, after saving model, optimizer and EMA state to --work-dir/state.pt;
it also saves every --save-every-minutes. The loss curve is appended to --work-dir/loss.csv and
drawn in loss.png.

The demo config (DEMO_CONFIG) and its sizes:

    transformer  inner dim 256 (4 heads x 64), 2 double + 3 single blocks, latent 8 ch (in 32):
                 8.10 M parameters, 16.2 MB in BF16 (sharded at 15 MB by save_pretrained, so no
                 file exceeds 16 MB however the limit is counted)
    CLIP-like    hidden 128, 2 layers: 0.27 M (0.55 MB)     T5-like  d_model 128, 2 layers: 0.27 M (0.54 MB)
    VAE          channels (32, 64, 64, 64), 8 latent ch: 1.26 M (2.5 MB; decoder 0.77 M)
    total        9.9 M parameters, 19.8 MB in BF16; the SVDQuant INT4 transformer (4-bit codes,
                 group scales, rank-32 branches, 16-bit embedders) adds about 7-8 MB: ~28 MB < 32 MB.

Planned run on one H100 (FLOPs counted with torch's FlopCounterMode; times are estimates, the
script measures the flow speed itself with --budget-minutes):

    resolution 128: latent 16x16x8, 64 image tokens + 16 text tokens
    data       150k training scenes, 7.4 GB uint8 on the GPU; rendered in ~20 s on 16 cores
    vae        3000 steps x batch 64, AdamW lr 4e-4: 19.2 GFLOP per image fwd+bwd, 1.2 TFLOP per
               step, ~25-45 ms per step (small-channel convs reach a fraction of peak): 1.5-2.5 min
    flow       batch 512, AdamW lr 4e-4 (text encoders 2e-4), 1000 warm-up steps, cosine to 10%:
               1.96 GFLOP per sample fwd+bwd (text encoders included), 1.0 TFLOP per step. Eager, the
               step ran ~5000 small kernels and was launch-bound (11.9 steps/s measured); compiled
               (--compile, the CUDA default) with fused AdamW it runs 25 steps/s (measured, 80 s of
               compile). --budget-minutes 18.5 fixes the total from the speed measured at the start
               of the flow and the time all runs have spent so far (capped at --flow-steps 30000):
               13.6k steps, 7 M samples in the shipped run
    runs       two runs of at most 9 minutes (--max-minutes 9, the clock starting with Python):
               run 1 renders, trains the VAE and ~4 min of flow; run 2 re-renders and re-encodes,
               trains the rest of the flow (ending --overhead-seconds before the budget's end),
               exports, and draws and checks 200 held-out prompts without and with true CFG 3
               (--final-seconds 90 kept for that; a run short of it leaves the export to a next
               one). The shipped run took 522 s + 336 s. Each run prints the budget left.
               scripts/device_train_demo.sh makes the two device calls:

        python scripts/train_demo_model.py --work-dir runs/demo --budget-minutes 18.5 --max-minutes 9 \\
            --overhead-seconds 300 --vae-steps 2000        # twice

Sampling the result: FluxPipeline(prompt, height=128, width=128, num_inference_steps=28,
guidance_scale=0, max_sequence_length=16); the T5 tokenizer pads to max_sequence_length and
diffusers' default (512) would give the transformer 512 text tokens it was never trained on.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

_START = time.monotonic()  # --max-minutes counts from here, before the slow imports

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nunchaku.demo.scenes import VOCABULARY, caption, held_out_prompts, render, scene_at  # noqa: E402
from nunchaku.models.tiny import TinyFluxConfig, build_tiny_flux_pipeline  # noqa: E402

DEMO_CONFIG = TinyFluxConfig(
    num_layers=2, num_single_layers=3, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=128,
    pooled_projection_dim=128, latent_channels=8, vae_block_out_channels=(32, 64, 64, 64), clip_max_length=16,
    t5_max_length=16,
)
SMOKE_CONFIG = TinyFluxConfig(clip_max_length=16, t5_max_length=16)
PHASES = ("vae", "flow", "done")
MAX_FILE_BYTES = 16_000_000
MAX_TOTAL_BYTES = 32_000_000


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the result; stored in the checkpoint and checked on resume."""

    seed: int
    resolution: int
    pool_size: int
    vae_steps: int
    vae_batch: int
    vae_lr: float
    flow_steps: int
    flow_batch: int
    flow_lr: float
    text_lr: float
    warmup: int
    caption_dropout: float
    ema_decay: float
    budget_minutes: float | None
    config: dict


# ----------------------------------------------------------------------------- data


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, start, stop, resolution = args
    scenes = [scene_at(seed, i, "train") for i in range(start, stop)]
    images = np.stack([np.asarray(render(s, resolution), dtype=np.uint8) for s in scenes])
    return images, [caption(s) for s in scenes]


def render_pool(seed: int, size: int, resolution: int, workers: int) -> tuple[np.ndarray, list[str]]:
    """Training scenes 0..size-1 of `seed`: uint8 [N, H, W, 3] and captions."""
    chunk = 2000
    jobs = [(seed, s, min(s + chunk, size), resolution) for s in range(0, size, chunk)]
    if workers <= 1 or len(jobs) == 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        # fork is fast; main() renders before anything touches CUDA, so no child inherits a context.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def _generator(device: torch.device, seed: int, phase: str, step: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + PHASES.index(phase) * 7_919 + step * 104_729) % 2**63)
    return g


def _images(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As FluxPipeline.encode_prompt does it: CLIP's pooled output and T5's last hidden states."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return pooled, pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]


class Trainer:
    def __init__(self, args: argparse.Namespace, recipe: Recipe, device: torch.device):
        self.args, self.recipe, self.device = args, recipe, device
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.config = TinyFluxConfig(**{**recipe.config, "vae_block_out_channels":
                                        tuple(recipe.config["vae_block_out_channels"])})
        self.pipe = build_tiny_flux_pipeline(self.config, VOCABULARY, seed=recipe.seed)
        self.pipe.to(device)
        self.amp = device.type == "cuda"
        if device.type == "cuda":
            # The cuDNN SDPA backend's backward fails on this model on the H100 (torch 2.11:
            # "mha_graph.execute(...).is_good()" at the first flow step); flash/efficient train it.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.phase, self.step = "vae", 0
        self.flow_total = recipe.flow_steps
        self.flow_total_fixed = recipe.budget_minutes is None
        self.spent_before = 0.0  # wall seconds of the previous runs
        self._probe: tuple[int, float] | None = None
        self.latent_stats: tuple[float, float] | None = None
        self.log: list[dict] = []
        # One fused kernel per optimizer step instead of several per parameter: at these sizes the
        # step is bound by kernel launches, not by arithmetic.
        fused = device.type == "cuda"
        self.vae_opt = torch.optim.AdamW(self.pipe.vae.parameters(), lr=recipe.vae_lr, betas=(0.9, 0.99),
                                         weight_decay=0.0, fused=fused)
        text_params = [*self.pipe.text_encoder.parameters(), *self.pipe.text_encoder_2.parameters()]
        transformer_params = list(self.pipe.transformer.parameters())
        self.flow_params = transformer_params + text_params
        self.flow_opt = torch.optim.AdamW(
            [{"params": transformer_params, "lr": recipe.flow_lr},
             {"params": text_params, "lr": recipe.text_lr}], betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
        self.img_ids: torch.Tensor | None = None
        self.txt_ids: torch.Tensor | None = None
        # Compiling the text encoders + transformer forward (and so its backward) fuses autocast's
        # weight casts and the elementwise work: eager runs ~5000 small kernels per step.
        self.flow_loss = torch.compile(self._flow_loss, dynamic=False) if args.compile else self._flow_loss
        self._compiled_ok = False
        self.ema = {name: copy.deepcopy(getattr(self.pipe, name)).requires_grad_(False)
                    for name in ("transformer", "text_encoder", "text_encoder_2")}
        self.state_path = self.work / "state.pt"
        if self.state_path.exists():
            self._load()

    # -- checkpoint

    def _load(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        if state["recipe"] != asdict(self.recipe):
            raise SystemExit(f"{self.state_path} was written with another recipe:\n{state['recipe']}\n"
                             f"this run asks for\n{asdict(self.recipe)}\nuse a new --work-dir or the same flags")
        for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
            getattr(self.pipe, name).load_state_dict(state["models"][name])
        for name, module in self.ema.items():
            module.load_state_dict(state["ema"][name])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.flow_opt.load_state_dict(state["flow_opt"])
        self.phase, self.step, self.log = state["phase"], state["step"], state["log"]
        self.latent_stats = state["latent_stats"]
        self.flow_total, self.flow_total_fixed = state["flow_total"], state["flow_total_fixed"]
        self.spent_before = state["spent_s"]
        if self.latent_stats is not None:
            self._set_latent_stats(*self.latent_stats)
        print(f"resumed at phase {self.phase}, step {self.step}")

    def save(self) -> None:
        state = {
            "recipe": asdict(self.recipe), "phase": self.phase, "step": self.step, "log": self.log,
            "latent_stats": self.latent_stats, "flow_total": self.flow_total,
            "flow_total_fixed": self.flow_total_fixed, "spent_s": self.spent(),
            "models": {n: getattr(self.pipe, n).state_dict() for n in ("vae", "transformer", "text_encoder",
                                                                      "text_encoder_2")},
            "ema": {n: m.state_dict() for n, m in self.ema.items()},
            "vae_opt": self.vae_opt.state_dict(), "flow_opt": self.flow_opt.state_dict(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)  # a run killed while saving leaves the previous state intact
        write_loss_log(self.log, self.work)

    # -- data

    def load_data(self, images: np.ndarray, captions: list[str]) -> None:
        """The rendered pool onto the device, captions tokenized once."""
        self.pool = torch.from_numpy(images).to(self.device)
        tok = dict(padding="max_length", truncation=True, return_tensors="pt")
        self.clip_ids = self.pipe.tokenizer(captions, max_length=self.config.clip_max_length, **tok).input_ids
        self.t5_ids = self.pipe.tokenizer_2(captions, max_length=self.config.t5_max_length, **tok).input_ids
        self.clip_ids, self.t5_ids = self.clip_ids.to(self.device), self.t5_ids.to(self.device)
        self.empty_clip = self.pipe.tokenizer([""], max_length=self.config.clip_max_length, **tok).input_ids
        self.empty_t5 = self.pipe.tokenizer_2([""], max_length=self.config.t5_max_length, **tok).input_ids
        self.empty_clip, self.empty_t5 = self.empty_clip.to(self.device), self.empty_t5.to(self.device)

    # -- phases

    def spent(self) -> float:
        """Wall seconds of all runs so far, this one included."""
        return self.spent_before + time.monotonic() - _START

    def time_left(self) -> float:
        return self.args.max_minutes * 60 - (time.monotonic() - _START)

    def run(self) -> bool:
        """Train until done or out of time; True when the pipeline has been exported."""
        last_save = time.monotonic()
        reserve = self.args.reserve_seconds
        steps_this_run = 0
        while self.phase != "done":
            out_of_steps = self.args.run_steps is not None and steps_this_run >= self.args.run_steps
            if self.time_left() < reserve or out_of_steps:
                self.save()
                why = "--run-steps" if out_of_steps else "--max-minutes"
                print(f"stopping at phase {self.phase}, step {self.step} ({why}); run again to resume")
                return False
            steps_this_run += 1
            if time.monotonic() - last_save > self.args.save_every_minutes * 60:
                self.save()
                last_save = time.monotonic()
            if self.phase == "vae":
                self._vae_step()
            else:
                self._flow_step()
        self.save()
        return True

    def _vae_step(self) -> None:
        r, vae = self.recipe, self.pipe.vae
        g = _generator(self.device, r.seed, "vae", self.step)
        idx = torch.randint(0, self.pool.shape[0], (r.vae_batch,), device=self.device, generator=g)
        x = _images(self.pool, idx)
        for group in self.vae_opt.param_groups:
            group["lr"] = r.vae_lr * _lr_factor(self.step, r.vae_steps, min(200, r.vae_steps // 10 + 1))
        vae.train()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().float().mean()
        loss = l1 + mse + 1e-6 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        vae.eval()
        self._record("vae", loss=loss, l1=l1, kl=kl)
        self.step += 1
        if self.step >= r.vae_steps:
            self._finish_vae()

    @torch.no_grad()
    def _finish_vae(self) -> None:
        n = min(self.pool.shape[0], 2048)
        means = torch.cat([self.pipe.vae.encode(_images(self.pool, torch.arange(s, min(s + 256, n),
                                                                                   device=self.device))
                                                ).latent_dist.mean.float() for s in range(0, n, 256)])
        self._set_latent_stats(means.mean().item(), means.std().item())
        self.latent_stats = (means.mean().item(), means.std().item())
        print(f"vae done: latent mean {self.latent_stats[0]:.4f}, std {self.latent_stats[1]:.4f}")
        self.phase, self.step = "flow", 0

    def _set_latent_stats(self, mean: float, std: float) -> None:
        self.pipe.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)

    def _encode_latents(self) -> None:
        """Posterior mean and std of every pool image (the VAE is frozen from here on)."""
        vae, chunks_mean, chunks_std = self.pipe.vae, [], []
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            for s in range(0, self.pool.shape[0], 512):
                idx = torch.arange(s, min(s + 512, self.pool.shape[0]), device=self.device)
                dist = vae.encode(_images(self.pool, idx)).latent_dist
                chunks_mean.append(dist.mean.to(torch.bfloat16))
                chunks_std.append(dist.std.to(torch.bfloat16))
        self.lat_mean, self.lat_std = torch.cat(chunks_mean), torch.cat(chunks_std)

    def _flow_step(self) -> None:
        r, pipe = self.recipe, self.pipe
        if not hasattr(self, "lat_mean"):
            self._encode_latents()
        g = _generator(self.device, r.seed, "flow", self.step)
        b = r.flow_batch
        idx = torch.randint(0, self.pool.shape[0], (b,), device=self.device, generator=g)
        z = self.lat_mean[idx].float() + self.lat_std[idx].float() * torch.randn(
            self.lat_mean[idx].shape, device=self.device, generator=g)
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, device=self.device, generator=g)
        t = torch.sigmoid(torch.randn((b,), device=self.device, generator=g))
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        drop = torch.rand((b,), device=self.device, generator=g) < r.caption_dropout
        clip_ids = torch.where(drop[:, None], self.empty_clip, self.clip_ids[idx])
        t5_ids = torch.where(drop[:, None], self.empty_t5, self.t5_ids[idx])
        _, c, h, w = x0.shape
        packed = pipe._pack_latents(xt, b, c, h, w)
        target = pipe._pack_latents(noise - x0, b, c, h, w)
        if self.img_ids is None:
            self.img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, x0.dtype)
            self.txt_ids = torch.zeros(t5_ids.shape[1], 3, device=self.device, dtype=x0.dtype)
        self._probe_speed()
        factor = _lr_factor(self.step, self.flow_total, r.warmup)
        for group, base in zip(self.flow_opt.param_groups, (r.flow_lr, r.text_lr)):
            group["lr"] = base * factor
        self.flow_opt.zero_grad(set_to_none=True)
        try:
            loss = self.flow_loss(packed, t, clip_ids, t5_ids, target)
            loss.backward()
        except Exception as error:  # noqa: BLE001 - any compiler failure: report it and train eagerly
            if self.flow_loss is self._flow_loss or self._compiled_ok:
                raise
            print(f"WARNING: torch.compile failed ({type(error).__name__}: {str(error)[:300]}); "
                  "training this run eagerly (--no-compile)", flush=True)
            self.flow_loss = self._flow_loss
            self.flow_opt.zero_grad(set_to_none=True)
            loss = self.flow_loss(packed, t, clip_ids, t5_ids, target)
            loss.backward()
        self._compiled_ok = True
        torch.nn.utils.clip_grad_norm_(self.flow_params, 1.0)
        self.flow_opt.step()
        self._update_ema()
        self._record("flow", loss=loss)
        self.step += 1
        if self.step >= self.flow_total:
            self.phase, self.step = "done", 0

    def _flow_loss(self, packed: torch.Tensor, t: torch.Tensor, clip_ids: torch.Tensor, t5_ids: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            pooled, tokens = _encode_text(pipe, clip_ids, t5_ids)
            pred = pipe.transformer(hidden_states=packed, timestep=t, pooled_projections=pooled,
                                    encoder_hidden_states=tokens, txt_ids=self.txt_ids, img_ids=self.img_ids,
                                    guidance=None, return_dict=False)[0]
        return (pred.float() - target).pow(2).mean()

    @torch.no_grad()
    def _update_ema(self) -> None:
        # The usual warm-up: early on the average follows the fast-changing weights closely.
        decay = min(self.recipe.ema_decay, (1 + self.step) / (10 + self.step))
        for name, ema in self.ema.items():
            live = getattr(self.pipe, name)
            torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)

    def _probe_speed(self) -> None:
        """With --budget-minutes: time steps 20..220 of this run's flow and fix the total steps to
        what fits the budget left after the time all runs have spent and --overhead-seconds
        (capped by --flow-steps). Decided while the warm-up runs, whose length does not depend on
        the total, and stored, so a resumed run keeps the schedule."""
        if self.flow_total_fixed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.monotonic()
        if self._probe is None:
            self._probe = (self.step + 20, 0.0)
        elif self.step == self._probe[0]:
            self._probe = (self.step, now)
        elif self._probe[1] > 0 and self.step - self._probe[0] >= 200:
            rate = (self.step - self._probe[0]) / (now - self._probe[1])
            left = self.recipe.budget_minutes * 60 - self.spent() - self.args.overhead_seconds
            fitting = self.step + int(rate * max(left, 0.0)) // 100 * 100
            self.flow_total = max(self.step + 100, min(self.recipe.flow_steps, fitting))
            self.flow_total_fixed = True
            print(f"flow: {rate:.1f} steps/s, {left:.0f} s of --budget-minutes left: {self.flow_total} steps "
                  f"(cap --flow-steps {self.recipe.flow_steps})", flush=True)

    def _record(self, phase: str, **values: torch.Tensor) -> None:
        """Log every --log-every steps (only then is the GPU synchronized for the values)."""
        last = (self.recipe.vae_steps if phase == "vae" else self.flow_total) - 1
        if self.step % self.args.log_every and self.step != last:
            return
        row = {"phase": phase, "step": self.step, "elapsed_s": round(time.monotonic() - _START, 1),
               **{k: v.item() for k, v in values.items()}}
        self.log.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    # -- export

    def export(self, out: Path, dtype: torch.dtype) -> Path:
        from diffusers import FluxPipeline

        pipe = self.pipe
        for name, ema in self.ema.items():
            getattr(pipe, name).load_state_dict(ema.state_dict())
        exported = FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                text_encoder_2=pipe.text_encoder_2, transformer=pipe.transformer,
                                tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
        for module in (exported.vae, exported.text_encoder, exported.text_encoder_2, exported.transformer):
            module.eval().to(dtype)
        exported.save_pretrained(out, max_shard_size="15MB")
        for module in (exported.vae, exported.text_encoder, exported.text_encoder_2, exported.transformer):
            module.float()
        return out


# ----------------------------------------------------------------------------- reporting


def write_loss_log(log: Sequence[dict], work: Path) -> None:
    """loss.csv (every logged row) and loss.png (one panel per phase, loss on a log scale)."""
    keys = list(dict.fromkeys(k for row in log for k in row))
    with open(work / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(log)
    plot_loss(log, work / "loss.png")


def plot_loss(log: Sequence[dict], path: Path) -> None:
    """A dependency-free plot (PIL): raw loss in light gray, a running mean in blue, per phase."""
    from PIL import Image, ImageDraw

    phases = [p for p in ("vae", "flow") if any(r["phase"] == p for r in log)]
    width, panel = 640, 240
    image = Image.new("RGB", (width, max(1, len(phases)) * panel), "white")
    draw = ImageDraw.Draw(image)
    for k, phase in enumerate(phases):
        rows = [r for r in log if r["phase"] == phase]
        steps = np.array([r["step"] for r in rows], float)
        loss = np.log10(np.maximum([r["loss"] for r in rows], 1e-8))
        smooth = np.convolve(loss, np.ones(min(20, len(loss))) / min(20, len(loss)), mode="valid")
        x0, y0, x1, y1 = 60, k * panel + 24, width - 16, (k + 1) * panel - 28
        lo, hi = float(loss.min()), float(loss.max()) + 1e-6
        span = max(steps.max() - steps.min(), 1.0)

        def xy(s: float, v: float) -> tuple[float, float]:
            return x0 + (s - steps.min()) / span * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline="black")
        if len(rows) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, loss)], fill=(200, 200, 200))
            draw.line([xy(s, v) for s, v in zip(steps[len(steps) - len(smooth):], smooth)], fill=(30, 80, 200), width=2)
        draw.text((x0, y0 - 16), f"{phase}: log10(loss), step {int(steps.min())}..{int(steps.max())}", fill="black")
        draw.text((4, y0), f"{10 ** hi:.3g}", fill="black")
        draw.text((4, y1 - 10), f"{10 ** lo:.3g}", fill="black")
    image.save(path)


def evaluate(folder: Path, n_prompts: int, steps: int, cfg: float, device: torch.device, seed: int,
             resolution: int, max_sequence_length: int) -> dict:
    """Load the exported folder with diffusers, draw held-out prompts, and check them."""
    from diffusers import FluxPipeline
    from PIL import Image

    from nunchaku.demo.checker import pass_rates

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    prompts = held_out_prompts(n_prompts)
    images = []
    for s in range(0, len(prompts), 64):
        batch = prompts[s:s + 64]
        extra = {"true_cfg_scale": cfg, "negative_prompt": [""] * len(batch)} if cfg > 1 else {}
        out = pipe(batch, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=0.0,
                   max_sequence_length=max_sequence_length,
                   generator=torch.Generator(device).manual_seed(seed + s), **extra).images
        images.extend(out)
    cols = 8
    grid = Image.new("RGB", (cols * resolution, math.ceil(min(len(images), 32) / cols) * resolution))
    for i, image in enumerate(images[:32]):
        grid.paste(image, ((i % cols) * resolution, (i // cols) * resolution))
    grid.save(folder.parent / f"samples_cfg{cfg:g}.png")
    with open(folder.parent / f"samples_cfg{cfg:g}.txt", "w") as f:
        f.write("\n".join(prompts[:32]) + "\n")
    return {"cfg": cfg, "steps": steps, "prompts": len(prompts), "pass_rate": pass_rates(prompts, images)}


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*.safetensors"))}


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", required=True, type=Path, help="checkpoint, loss log, samples")
    p.add_argument("--out", type=Path, help="exported FluxPipeline folder (default WORK_DIR/pipeline)")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, a few steps, on CPU")
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop (and save) before this much wall time")
    p.add_argument("--reserve-seconds", type=float, default=25.0, help="time kept for saving before the limit")
    p.add_argument("--save-every-minutes", type=float, default=3.0)
    p.add_argument("--run-steps", type=int, help="stop (and save) after this many steps in this run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--pool-size", type=int, default=150_000)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=4e-4)
    p.add_argument("--flow-steps", type=int, default=30_000, help="total flow steps (the cap with --budget-minutes)")
    p.add_argument("--budget-minutes", type=float,
                   help="wall time of all runs together: the flow steps are fitted to it (measured speed)")
    p.add_argument("--overhead-seconds", type=float, default=150.0,
                   help="kept out of the budget for later runs' start-up and the final export and evaluation")
    p.add_argument("--final-seconds", type=float, default=90.0,
                   help="export and evaluation start only with this much of --max-minutes left")
    p.add_argument("--flow-batch", type=int, default=512)
    p.add_argument("--flow-lr", type=float, default=4e-4)
    p.add_argument("--text-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--export-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts checked after export (0: none)")
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-cfg", type=float, nargs="+", default=[1.0, 3.0], help="true CFG scales (1: none)")
    p.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()))
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the flow step's forward and backward (default: on for CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if p.parse_known_args(argv)[0].smoke:
        # Defaults only: flags given with --smoke still win.
        p.set_defaults(resolution=64, pool_size=32, vae_steps=3, vae_batch=4, flow_steps=3, flow_batch=4, warmup=1,
                       eval_prompts=2, eval_steps=2, eval_cfg=[1.0], workers=1, log_every=1, device="cpu")
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = torch.device(args.device).type == "cuda"
    if args.budget_minutes is not None and args.warmup < 250:
        raise SystemExit("--budget-minutes fixes the step count at flow step ~220: needs --warmup >= 250")
    if args.resolution % 16:
        raise SystemExit("--resolution must be a multiple of 16 (8x VAE, then 2x2 patches)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = SMOKE_CONFIG if args.smoke else DEMO_CONFIG
    recipe = Recipe(args.seed, args.resolution, args.pool_size, args.vae_steps, args.vae_batch, args.vae_lr,
                    args.flow_steps, args.flow_batch, args.flow_lr, args.text_lr, args.warmup, args.caption_dropout,
                    args.ema_decay, args.budget_minutes,
                    {**asdict(config), "vae_block_out_channels": list(config.vae_block_out_channels)})
    device = torch.device(args.device)
    if (args.work_dir / "metrics.json").exists():
        print("already trained, exported and evaluated")
        return 0
    t0 = time.monotonic()
    images, captions = render_pool(recipe.seed, recipe.pool_size, recipe.resolution, args.workers)
    print(f"data: {len(captions)} scenes at {recipe.resolution}px in {time.monotonic() - t0:.1f} s")
    trainer = Trainer(args, recipe, device)
    params = {n: sum(p.numel() for p in getattr(trainer.pipe, n).parameters())
              for n in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    print("parameters:", params, "total", sum(params.values()))
    if args.budget_minutes is not None:
        print(f"budget: {trainer.spent_before:.0f} s spent by earlier runs of {args.budget_minutes * 60:.0f} s")
    if trainer.phase != "done":
        trainer.load_data(images, captions)
        if not trainer.run():
            return 0
        if trainer.time_left() < args.final_seconds:
            print("training done; export and evaluation left for the next run (--final-seconds)")
            return 0
    out = trainer.export(args.out or args.work_dir / "pipeline", getattr(torch, args.export_dtype))
    sizes = file_sizes(out)
    metrics: dict = {"parameters": params, "file_bytes": sizes, "total_bytes": sum(sizes.values()),
                     "recipe": asdict(recipe)}
    too_big = [f for f, n in sizes.items() if n > MAX_FILE_BYTES]
    if not args.smoke and (too_big or metrics["total_bytes"] > MAX_TOTAL_BYTES):
        print(f"WARNING: over the shipping limits: files {too_big}, total {metrics['total_bytes']}")
    metrics["eval"] = [evaluate(out, args.eval_prompts, args.eval_steps, cfg, device, args.seed, args.resolution,
                                config.t5_max_length) for cfg in args.eval_cfg if args.eval_prompts > 0]
    (args.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: metrics[k] for k in ("parameters", "total_bytes", "eval")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
