"""Training the shapes model on a CPU: autoencoder first, then text encoder + UNet, then the folder.

    python -m sdlite.train --work runs/shapes --out src/sdlite/assets/sdlite-shapes

Stages, each resumable from its checkpoint in the work folder (run the same command again after an
interruption and it goes on from the last checkpoint, with the same result as an uninterrupted run):

1. tokenizer  a CLIP-format BPE vocabulary learned on the caption vocabulary (vocab.json, merges.txt)
2. vae        AutoencoderKL trained on rendered scenes: MSE + L1 + a tiny KL term; then the latent scaling
              factor is set to 1/std of the latents of fresh scenes
3. latents    a fixed pool of training scenes encoded once (latent means) with their token ids
4. unet       text encoder + UNet trained jointly from scratch: epsilon prediction on SD 1.x's own noise
              schedule (scaled_linear 0.00085..0.012, 1000 steps), captions dropped to "" 10% of the time
              for classifier-free guidance, min-SNR loss weighting (gamma 5), EMA of the weights
5. export     a diffusers folder (model_index.json, configs, fp16 safetensors, tokenizer, scheduler)

Every random draw comes from generators seeded by (seed, stage, step), so a run is a function of its
recipe; the data is the procedural `shapes` dataset.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import read_json, write_json
from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.config import config_from_dict
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..samplers import schedule
from ..tokenizer import ClipTokenizer
from ..tokenizer.writer import write_clip_tokenizer
from ..weights.model_folder import SD_MODEL_INDEX, ModelFolderWriter
from . import configs, shapes


@dataclass
class Recipe:
    seed: int = 0
    threads: int = 2
    image_size: int = configs.IMAGE_SIZE
    # autoencoder
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # latent pool for the UNet stage
    latent_pool: int = 16384
    # text encoder + UNet
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0     # loss weight min(SNR, gamma) / SNR (Hang et al., 2023)
    ema_decay: float = 0.999
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 50
    export_dtype: str = "fp16"
    vocab_size: int = 1000
    vae_config: dict = field(default_factory=lambda: copy.deepcopy(configs.VAE))
    text_config: dict = field(default_factory=lambda: copy.deepcopy(configs.TEXT))
    unet_config: dict = field(default_factory=lambda: copy.deepcopy(configs.UNET))
    scheduler_config: dict = field(default_factory=lambda: copy.deepcopy(configs.SCHEDULER))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _rng_seed(seed: int, stage: str, step: int) -> int:
    return random.Random(f"{seed}:{stage}:{step}").randrange(2**62)


def _images_tensor(scenes, size: int) -> torch.Tensor:
    arr = np.stack([shapes.render(s, size) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


class ThreadTuner:
    """Picks the faster of 1 or `max_threads` torch threads every `period` steps by timing a few steps.

    On a machine whose cores are shared, two OpenMP threads can be many times slower than one (each
    parallel region waits for the thread that is not scheduled); on a quiet machine two are faster.
    A probe of the larger count stops at its first step that is clearly slower, so that probing costs
    little on a busy machine. The thread count changes the speed only, not the recipe."""

    def __init__(self, max_threads: int, period: int = 1000, probe: int = 3):
        self.many = max_threads
        self.period, self.probe = period, probe
        self.one: list[float] = []
        self.more: list[float] = []
        self.best = 1
        self.probing_more = False

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        if self.many < 2:
            return 1
        if phase < self.probe:
            return 1
        if phase < 2 * self.probe and self.probing_more:
            return self.many
        return self.best

    def begin(self, step: int) -> None:
        phase = step % self.period
        if phase == 0:
            self.one, self.more, self.probing_more = [], [], True
        n = self.threads_for(step)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def end(self, step: int, seconds: float) -> None:
        phase = step % self.period
        if self.many < 2 or phase >= 2 * self.probe:
            return
        if phase < self.probe:
            if phase > 0:            # the first step after a switch is a warm-up
                self.one.append(seconds)
            return
        if not self.probing_more:
            return
        base = sorted(self.one)[len(self.one) // 2] if self.one else seconds
        if seconds > 2 * base:       # clearly slower: the cores are busy, stay at one thread
            self.probing_more, self.best = False, 1
            return
        if phase > self.probe:
            self.more.append(seconds)
        if phase == 2 * self.probe - 1:
            more = sorted(self.more)[len(self.more) // 2] if self.more else float("inf")
            self.best = self.many if more < base else 1
            self.probing_more = False


def _progress(stage: str, step: int, total: int, t0: float, start_step: int, **values) -> None:
    done = step - start_step
    rate = (time.perf_counter() - t0) / max(done, 1)
    eta = rate * (total - step)
    vals = " ".join(f"{k}={v:.5f}" for k, v in values.items())
    _log(f"{stage} step {step}/{total} {vals} {rate:.3f}s/step eta {eta / 60:.1f} min "
         f"threads {torch.get_num_threads()}")


class Trainer:
    def __init__(self, recipe: Recipe, work: str | Path):
        self.r = recipe
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(recipe.threads)
        recipe_path = self.work / "recipe.json"
        current = asdict(recipe)
        if recipe_path.exists():
            old = read_json(recipe_path)
            changed = sorted(k for k in current if old.get(k) != current[k] and k not in ("threads",))
            if changed:
                raise SystemExit(f"{recipe_path}: the work folder was made with another recipe "
                                 f"(differs in {', '.join(changed)}); use a new --work folder")
        else:
            write_json(recipe_path, current)
        self.tuner = ThreadTuner(recipe.threads)
        self.finish_early = False   # unet stage: stop at the last checkpoint instead of going on
        self.times: dict[str, float] = {}
        times_path = self.work / "times.json"
        if times_path.exists():
            self.times = read_json(times_path)

    def _record_time(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        write_json(self.work / "times.json", self.times)

    # --- 1. tokenizer -----------------------------------------------------------------------------

    def tokenizer(self) -> ClipTokenizer:
        folder = self.work / "tokenizer"
        if not (folder / "merges.txt").exists():
            t0 = time.perf_counter()
            tmp = self.work / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            n = write_clip_tokenizer(tmp, shapes.caption_corpus(), vocab_size=self.r.vocab_size)
            tmp.rename(folder)
            self._record_time("tokenizer", time.perf_counter() - t0)
            _log(f"tokenizer: {n} tokens")
        return ClipTokenizer.from_folder(folder)

    def text_config(self) -> dict:
        vocab = len(read_json(self.work / "tokenizer" / "vocab.json"))
        cfg = copy.deepcopy(self.r.text_config)
        cfg.update(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        return cfg

    # --- 2. autoencoder ---------------------------------------------------------------------------

    def build_vae(self) -> AutoencoderKL:
        torch.manual_seed(_rng_seed(self.r.seed, "vae-init", 0))
        return AutoencoderKL(config_from_dict(VAEConfig, self.r.vae_config))

    def train_vae(self) -> AutoencoderKL:
        r = self.r
        final = self.work / "vae_final.pt"
        vae = self.build_vae()
        if final.exists():
            state = torch.load(final, weights_only=False)
            vae.load_state_dict(state["model"])
            return vae
        ckpt = self.work / "vae.pt"
        opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
        step = 0
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            vae.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step = state["step"]
            _log(f"vae: resuming at step {step}")
        vae.train()
        t0, start = time.perf_counter(), step
        t_mark = time.perf_counter()
        avg = None
        while step < r.vae_steps:
            self.tuner.begin(step)
            t_step = time.perf_counter()
            rng = random.Random(_rng_seed(r.seed, "vae-data", step))
            scenes = [shapes.random_scene(rng, shapes.all_combos() if rng.random() < 0.5 else
                                          shapes.train_combos(), r.image_size)
                      for _ in range(r.vae_batch)]
            x = _images_tensor(scenes, r.image_size)
            g = torch.Generator().manual_seed(_rng_seed(r.seed, "vae-noise", step))
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, r.vae_steps, r.vae_lr, 100)
            mean, logvar = vae.encode(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
            rec = vae.decode(z)
            mse = F.mse_loss(rec, x)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            loss = mse + F.l1_loss(rec, x) + r.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            self.tuner.end(step, time.perf_counter() - t_step)
            step += 1
            avg = mse.item() if avg is None else 0.98 * avg + 0.02 * mse.item()
            if step % r.log_every == 0 or step == r.vae_steps:
                _progress("vae", step, r.vae_steps, t0, start, mse=avg, kl=kl.item())
            if step % r.checkpoint_every == 0 or step == r.vae_steps:
                _save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
                self._record_time("vae", time.perf_counter() - t_mark)
                t_mark = time.perf_counter()
        vae.eval()
        # latent scale: 1/std of the latent means of fresh scenes (what the UNet will see)
        t_mark = time.perf_counter()
        rng = random.Random(_rng_seed(r.seed, "vae-scale", 0))
        scenes = [shapes.random_scene(rng, shapes.all_combos(), r.image_size) for _ in range(512)]
        with torch.no_grad():
            x = _images_tensor(scenes, r.image_size)
            means = torch.cat([vae.encode(x[i:i + 128])[0] for i in range(0, len(x), 128)])
            rec = torch.cat([vae.decode(means[i:i + 128]) for i in range(0, len(x), 128)])
        std = means.std().item()
        recon_mse = F.mse_loss(rec, x).item()
        # how often the checker reads the reconstruction as the original scene
        ok = 0
        for s, img in zip(scenes[:256], rec[:256]):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            c = shapes.check_image(arr)
            ok += (c.background, c.color, c.shape) == (s.background, s.color, s.shape)
        stats = {"latent_std": std, "latent_mean": means.mean().item(), "scaling_factor": 1.0 / std,
                 "recon_mse": recon_mse, "recon_psnr_db": 10 * math.log10(4.0 / recon_mse),
                 "recon_checker_accuracy": ok / 256}
        _log(f"vae: {stats}")
        _save_atomic({"model": vae.state_dict(), "stats": stats}, final)
        self._record_time("vae", time.perf_counter() - t_mark)
        return vae

    def vae_stats(self) -> dict:
        return torch.load(self.work / "vae_final.pt", weights_only=False)["stats"]

    # --- 3. latent pool ---------------------------------------------------------------------------

    def latents(self, vae: AutoencoderKL, tokenizer: ClipTokenizer) -> dict:
        path = self.work / "latents.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        r = self.r
        t0 = time.perf_counter()
        scale = self.vae_stats()["scaling_factor"]
        stream = shapes.scene_stream(r.seed, "train", r.image_size)
        scenes = [next(stream) for _ in range(r.latent_pool)]
        captions = [s.caption() for s in scenes]
        ids = tokenizer(captions).to(torch.int32)
        out = torch.empty(r.latent_pool, vae.config.latent_channels, r.image_size // 4, r.image_size // 4)
        chunk = 256
        with torch.no_grad():
            for i in range(0, r.latent_pool, chunk):
                x = _images_tensor(scenes[i:i + chunk], r.image_size)
                out[i:i + chunk] = vae.encode(x)[0] * scale
                if (i // chunk) % 16 == 0:
                    _log(f"latents: {i + len(x)}/{r.latent_pool}")
        pool = {"latents": out, "ids": ids, "captions": captions}
        _save_atomic(pool, path)
        self._record_time("latents", time.perf_counter() - t0)
        _log(f"latents: {r.latent_pool} scenes encoded, std {out.std().item():.3f}")
        return pool

    # --- 4. text encoder + UNet -------------------------------------------------------------------

    def build_text_unet(self) -> tuple[CLIPTextModel, UNet2DConditionModel]:
        torch.manual_seed(_rng_seed(self.r.seed, "unet-init", 0))
        text = CLIPTextModel(config_from_dict(CLIPTextConfig, self.text_config()))
        unet = UNet2DConditionModel(config_from_dict(UNetConfig, self.r.unet_config))
        return text, unet

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule: the same abar_t the samplers use for this scheduler config."""
        return schedule.alphas_cumprod(schedule.resolve_config("DDIMScheduler", self.r.scheduler_config))

    def train_unet(self, pool: dict, tokenizer: ClipTokenizer):
        r = self.r
        text, unet = self.build_text_unet()
        params = list(text.parameters()) + list(unet.parameters())
        ema = [p.detach().clone() for p in params]
        final = self.work / "unet_final.pt"
        if final.exists():
            state = torch.load(final, weights_only=False)
            return state["text_ema"], state["unet_ema"], state["stats"]
        opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=r.weight_decay)
        ckpt = self.work / "unet.pt"
        step = 0
        avg = None
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            text.load_state_dict(state["text"])
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            for e, v in zip(ema, state["ema"]):
                e.copy_(v)
            step = state["step"]
            avg = state.get("avg")
            _log(f"unet: resuming at step {step}")
        empty_ids = tokenizer([""]).to(torch.int32)[0]
        acp = self.alphas_cumprod()
        latents, ids = pool["latents"], pool["ids"]
        n = len(latents)
        text.train()
        unet.train()
        t0, start, t_mark = time.perf_counter(), step, time.perf_counter()
        if self.finish_early:
            _log(f"unet: finishing early at step {step} of {r.unet_steps}")
        while step < r.unet_steps and not self.finish_early:
            self.tuner.begin(step)
            t_step = time.perf_counter()
            g = torch.Generator().manual_seed(_rng_seed(r.seed, "unet-step", step))
            idx = torch.randint(0, n, (r.unet_batch,), generator=g)
            x0 = latents[idx]
            batch_ids = ids[idx].clone()
            drop = torch.rand(r.unet_batch, generator=g) < r.caption_dropout
            batch_ids[drop] = empty_ids
            t = torch.randint(0, acp.numel(), (r.unet_batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, r.unet_steps, r.unet_lr, r.warmup_steps)
            context = text(batch_ids.long())
            pred = unet(xt, t.float(), context)
            snr = a.view(-1) / (1 - a.view(-1))
            weight = snr.clamp(max=r.min_snr_gamma) / snr
            loss = (weight * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.tuner.end(step, time.perf_counter() - t_step)
            step += 1
            decay = min(r.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
            if step % r.log_every == 0 or step == r.unet_steps:
                _progress("unet", step, r.unet_steps, t0, start, loss=avg)
            if step % r.checkpoint_every == 0 or step == r.unet_steps:
                _save_atomic({"text": text.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                              "ema": ema, "step": step, "avg": avg}, ckpt)
                self._record_time("unet", time.perf_counter() - t_mark)
                t_mark = time.perf_counter()
        # EMA weights as state dicts
        names = [k for k, _ in text.named_parameters()] + [k for k, _ in unet.named_parameters()]
        n_text = len(list(text.parameters()))
        text_sd, unet_sd = text.state_dict(), unet.state_dict()
        for i, (name, value) in enumerate(zip(names, ema)):
            (text_sd if i < n_text else unet_sd)[name] = value.clone()
        stats = {"final_loss_ema": avg, "steps_done": step}
        _save_atomic({"text_ema": text_sd, "unet_ema": unet_sd, "stats": stats}, final)
        return text_sd, unet_sd, stats

    # --- 5. export --------------------------------------------------------------------------------

    def export(self, out: str | Path, vae: AutoencoderKL, text_sd: dict, unet_sd: dict) -> Path:
        r = self.r
        out = Path(out)
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[r.export_dtype]

        def tensors(sd: dict) -> dict:
            return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}

        vae_cfg = copy.deepcopy(r.vae_config)
        vae_cfg["scaling_factor"] = round(self.vae_stats()["scaling_factor"], 6)
        text_cfg = self.text_config()
        text_cfg["torch_dtype"] = "float16" if dtype == torch.float16 else "float32"
        training = {"recipe": asdict(r), "times_s": self.times, "vae": self.vae_stats(),
                    "unet": torch.load(self.work / "unet_final.pt", weights_only=False)["stats"]}
        with ModelFolderWriter(out, replace=True) as folder:
            folder.copy(self.work / "tokenizer", "tokenizer")
            folder.write_component("text_encoder", text_cfg, tensors(text_sd))
            folder.write_component("unet", r.unet_config, tensors(unet_sd))
            folder.write_component("vae", vae_cfg, tensors(vae.state_dict()))
            folder.write_json("scheduler/scheduler_config.json", r.scheduler_config)
            folder.write_json("model_index.json", SD_MODEL_INDEX)
            folder.write_json("training.json", training)
            card = out / "README.md"
            if card.exists():  # keep a model card written (and filled with bench numbers) before
                folder.copy(card, "README.md")
        from .card import write_card
        write_card(out)
        _log(f"export: {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.2f} MiB)")
        return out

    def run(self, out: str | Path | None, stages: set[str]) -> None:
        t_all = time.perf_counter()
        tok = self.tokenizer()
        vae = self.train_vae()
        if stages <= {"tokenizer", "vae"}:
            return
        pool = self.latents(vae, tok)
        if "unet" in stages or "export" in stages:
            text_sd, unet_sd, _ = self.train_unet(pool, tok)
            if "export" in stages and out is not None:
                self.export(out, vae, text_sd, unet_sd)
        _log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min this run; "
             f"recorded stage times (s): {json.dumps({k: round(v) for k, v in self.times.items()})}")
