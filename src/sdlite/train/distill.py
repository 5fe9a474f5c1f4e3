"""`sdlite distill DST --teacher SRC --prompts FILE --minutes N`: teach a pruned UNet (`sdlite prune`) to
do what the original does, without a dataset.

Data-free knowledge distillation in the manner of BK-SDM (Kim et al. 2023, arXiv:2305.15798, section 3.2):

1. latents   the teacher draws one image latent per prompt (DPM++ 2M, `teacher_steps`, cfg scale
             `cfg_scale`, seeds from `seed`): the stand-in for the dataset's images
2. train     each step: a batch of those latents x0, noised at uniform random timesteps t with fresh
             noise eps (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the scheduler's own abar); the
             prompt's text embeddings, replaced by the empty prompt's with probability
             `caption_dropout` (the unconditional branch of classifier-free guidance needs it too). Loss:
                 task     |target - student(x_t)|^2       target = eps, or v for a v-prediction model
                 out_kd   |teacher(x_t) - student(x_t)|^2
                 feat_kd  sum over the down and up blocks both have of |teacher block out - student|^2
             weighted 1 : `out_weight` : `feat_weight` (BK-SDM: 1 : 1 : 1), AdamW.
3. export    the student's UNet written into DST (its stored dtype kept), atomically.

Resumable: the state (student weights in fp32, optimizer, step, time spent, the latent pool) is kept in
`DST/distill/state.pt`, written every `checkpoint_seconds` and at the end; the same command again goes on
from there, until the total time reaches `--minutes` (or the total steps `--steps`). Reproducible: every
random draw comes from a generator seeded by (seed, step); with `--threads 1` the weights after N steps are
the same bit for bit, interrupted or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SdliteError

STATE = "distill/state.pt"


@dataclass
class DistillRecipe:
    seed: int = 0
    batch: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    out_weight: float = 1.0
    feat_weight: float = 1.0
    caption_dropout: float = 0.1
    teacher_steps: int = 20
    cfg_scale: float = 7.5
    teacher_batch: int = 32
    checkpoint_seconds: float = 60.0

    def key(self) -> dict:
        """What must match for a run to resume another (everything but the checkpoint interval)."""
        d = asdict(self)
        d.pop("checkpoint_seconds")
        return d


def load_plain_unet(folder, dtype=torch.float32):
    """The folder's UNet as a plain trainable module in `dtype` (its weights copied out of the file)."""
    from ..models.unet import UNet2DConditionModel
    from ..runtime.components import unet_config
    model = UNet2DConditionModel(unet_config(folder))
    with folder.part("unet").open_weights() as w:
        state = {k: w[k] for k in w.keys()}
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise SdliteError(f"{folder.root}: the UNet weights lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        model.load_state_dict(state, strict=False)
    return model.to(dtype)


class BlockFeatures:
    """Forward hooks keeping the output of every down block (its downsampled x) and up block."""

    def __init__(self, unet):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for kind in ("down_blocks", "up_blocks"):
            for i, block in enumerate(getattr(unet, kind)):
                self.handles.append(block.register_forward_hook(self._keep(f"{kind}.{i}")))

    def _keep(self, name: str):
        def hook(module, args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file; SdliteError when there are none or it cannot be read."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SdliteError(f"{path}: cannot read the prompts ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdliteError(f"{path}: no prompts (one per line)")
    return prompts


class Distiller:
    """One distillation of `dst`'s UNet from `teacher`'s; `run` until a time or step total."""

    def __init__(self, dst: str | Path, teacher: str | Path, prompts: list[str], recipe: DistillRecipe,
                 threads: int | None = None, log=print):
        from ..pipeline import Pipeline
        from ..samplers import schedule
        from ..weights.sources import open_model
        self.dst, self.recipe, self.log = Path(dst), recipe, log
        self.prompts = prompts
        self.pipe = Pipeline.load(teacher, precision="fp32", threads=threads)
        self.teacher = load_plain_unet(self.pipe.folder).eval().requires_grad_(False)
        if Path(dst).resolve() == Path(self.pipe.folder.root).resolve():
            raise SdliteError(f"{dst}: is the teacher itself; distill a pruned copy (sdlite prune TEACHER DST)")
        self.student_folder = open_model(self.dst)
        if self.student_folder.source != "folder":
            raise SdliteError(f"{dst}: distill writes into a diffusers folder (the output of sdlite prune)")
        self.student = load_plain_unet(self.student_folder).train()
        self._check_compatible()
        self.stored_dtype = self._stored_dtype()
        self.abar = schedule.alphas_cumprod(self.pipe.scheduler_config)
        self.prediction = self.pipe.scheduler_config.get("prediction_type", "epsilon")
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.step, self.seconds, self.history = 0, 0.0, []
        self.latents = None
        self.identity = {"teacher": str(Path(teacher).resolve()), "recipe": recipe.key(),
                         "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
        with torch.inference_mode():
            self.uncond = self.pipe.encode_prompt("").clone()
            encoded = [self.pipe.encode_prompt(p) for p in prompts]
            for line, e in enumerate(encoded, 1):
                if e.shape[1] != self.uncond.shape[1]:
                    raise SdliteError(f"prompt {line} is longer than {self.pipe.tokenizer.max_length - 2} tokens; "
                                      "distill takes one-chunk prompts")
            self.cond = torch.cat(encoded).clone()
        self.t_features, self.s_features = BlockFeatures(self.teacher), BlockFeatures(self.student)
        self._resume()

    def _check_compatible(self) -> None:
        t, s = self.teacher.config, self.student.config
        for name in ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels"):
            if getattr(t, name) != getattr(s, name):
                raise SdliteError(f"{self.dst}: the student's {name} {getattr(s, name)} is not the teacher's "
                                  f"{getattr(t, name)}; distill a pruned copy of the teacher (sdlite prune)")

    def _stored_dtype(self) -> torch.dtype:
        with self.student_folder.part("unet").open_weights() as w:
            dtypes = {w.dtype_of(k) for k in w.keys() if len(w.shape_of(k)) >= 2}
        return torch.float16 if dtypes == {torch.float16} else torch.float32

    # --- state ------------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = self.dst / STATE
        if not path.exists():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state file: one line, the way out
            raise SdliteError(f"{path}: cannot be read ({exc}); remove it to start over") from None
        if state.get("identity") != self.identity:
            raise SdliteError(f"{path}: left by a run with another teacher, prompts or recipe; remove "
                              f"{self.dst / 'distill'} to start over, or give the same options")
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.latents = state["latents"]
        self.log(f"distill: resuming at step {self.step} ({self.seconds / 60:.1f} min done)")

    def save(self) -> None:
        path = self.dst / STATE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"identity": self.identity, "student": self.student.state_dict(),
                    "optimizer": self.opt.state_dict(), "step": self.step, "seconds": self.seconds,
                    "history": self.history, "latents": self.latents}, tmp)
        os.replace(tmp, path)
        self.export()

    def export(self) -> None:
        """The student's weights into DST/unet, in the dtype the folder stored them in (atomic rename)."""
        from ..weights.model_folder import WEIGHT_FILES
        from ..weights.safetensors_mmap import save_safetensors
        target = self.dst / "unet" / WEIGHT_FILES["unet"]
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().to(self.stored_dtype).contiguous() for k, v in self.student.state_dict().items()}
        save_safetensors(tensors, tmp, metadata={"format": "pt", "sdlite_distilled_steps": str(self.step)})
        os.replace(tmp, target)
        report = {"teacher": self.identity["teacher"], "prompts": len(self.prompts), "steps": self.step,
                  "minutes": round(self.seconds / 60, 2), "threads": torch.get_num_threads(),
                  "recipe": asdict(self.recipe), "loss_last": self.history[-1] if self.history else None}
        record = self.dst / "sdlite_distill.json"
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, record)

    # --- the work ---------------------------------------------------------------------------------

    def make_latents(self) -> None:
        """Stage 1: one teacher latent per prompt (counted in the run's time)."""
        from .. import samplers
        r = self.recipe
        pipe = self.pipe
        f = pipe.vae_scale_factor
        h = w = pipe.native_size // f
        out = []
        for start in range(0, len(self.prompts), r.teacher_batch):
            cond = self.cond[start:start + r.teacher_batch]
            n = cond.shape[0]
            gen = torch.Generator().manual_seed(hash_seed(r.seed, "latents", start))
            noise = torch.randn((n, pipe.latent_channels, h, w), generator=gen)
            context = torch.cat([self.uncond.expand(n, -1, -1), cond])

            def guided(x, t, context=context):
                u, c = self.teacher(torch.cat([x, x]), t, context).chunk(2)
                return u + r.cfg_scale * (c - u)
            with torch.inference_mode():
                out.append(samplers.sample("dpm++2m", guided, noise, r.teacher_steps, pipe.scheduler_config,
                                           generator=gen))
            self.log(f"distill: teacher latents {start + n}/{len(self.prompts)}")
        self.latents = torch.cat(out)

    def train_step(self) -> dict:
        r = self.recipe
        gen = torch.Generator().manual_seed(hash_seed(r.seed, "step", self.step))
        idx = torch.randint(0, self.latents.shape[0], (r.batch,), generator=gen)
        x0 = self.latents[idx]
        t = torch.randint(0, self.abar.shape[0], (r.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand((r.batch,), generator=gen) < r.caption_dropout
        context = torch.where(drop[:, None, None], self.uncond.expand(r.batch, -1, -1), self.cond[idx])
        a = self.abar[t].float().reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        with torch.no_grad():
            teacher_out = self.teacher(x_t, t.float(), context)
            t_feats = self.t_features.take()
        student_out = self.student(x_t, t.float(), context)
        s_feats = self.s_features.take()
        task = F.mse_loss(student_out, target)
        out_kd = F.mse_loss(student_out, teacher_out)
        shared = [k for k in s_feats if k in t_feats and s_feats[k].shape == t_feats[k].shape]
        feat_kd = sum(F.mse_loss(s_feats[k], t_feats[k]) for k in shared) if shared else torch.zeros(())
        loss = task + r.out_weight * out_kd + r.feat_weight * feat_kd
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": round(loss.item(), 5), "task": round(task.item(), 5),
                "out_kd": round(out_kd.item(), 5), "feat_kd": round(float(feat_kd.detach()), 5)}

    def run(self, minutes: float | None = None, steps: int | None = None, progress=None) -> dict:
        """Train until the total time reaches `minutes` or the total steps `steps` (whichever is given
        first); saves at every `checkpoint_seconds` and at the end, also when interrupted (Ctrl-C)."""
        if minutes is None and steps is None:
            raise SdliteError("give --minutes or --steps")
        budget = None if minutes is None else minutes * 60
        t0, base = time.perf_counter(), self.seconds
        last_save = t0

        def spent() -> float:
            return base + time.perf_counter() - t0

        def done() -> bool:
            return (budget is not None and spent() >= budget) or (steps is not None and self.step >= steps)
        try:
            if self.latents is None:
                self.make_latents()
            while not done():
                rec = self.train_step()
                if self.step % 25 == 0 or self.step == 1:
                    self.history.append(rec)
                if progress is not None:
                    progress(self.step, spent(), budget, steps, rec)
                if time.perf_counter() - last_save >= self.recipe.checkpoint_seconds:
                    self.seconds = spent()
                    self.save()
                    last_save = time.perf_counter()
        finally:
            self.seconds = spent()
            if self.latents is not None:
                self.save()
        return {"steps": self.step, "minutes": round(self.seconds / 60, 2),
                "loss_last": self.history[-1] if self.history else None}

    def close(self) -> None:
        self.pipe.close()


def hash_seed(seed: int, stage: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
