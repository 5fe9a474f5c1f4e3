"""The `sdlite` command.

    sdlite generate PROMPT [-m MODEL] [-o OUT.png] [--steps N] [--sampler NAME] ...   one image
    sdlite info [MODEL]                         components, sizes, and the memory plan per budget
    sdlite convert SRC DST --weights fp16|int8  a copy of a model folder with smaller weight storage
    sdlite random-model ARCH DIR                a random-weight model folder (tests, benches)
    sdlite serve [-m MODEL]                     the gRPC + HTTP service (needs the `serve` extra)
    sdlite loadtest TARGET                      concurrent clients against a local `sdlite serve`
    sdlite doctor [MODEL] [--json] [--probe]    this machine and whether the model fits it (bug reports)
    sdlite prune SRC DST [--recipe ...]         a smaller UNet, blocks removed as BK-SDM does
    sdlite distill DST --teacher SRC --prompts FILE --minutes N   teach the pruned UNet from the original

Errors are one line on stderr and exit code 2 (bad arguments, bad model folders, bad weights, a
request the model or the memory budget cannot take); Ctrl-C exits 130. No output file is left behind
on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import SdliteError

EXIT_FAILED = 1        # the command ran, and its work failed (e.g. a load test where nothing succeeded)
EXIT_USAGE = 2         # bad arguments, model, request or environment: one line on stderr
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the signal reports


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise CliError(message)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def seed_arg(text: str) -> int:
    """A seed: an integer >= 0, or -1 for a random one (A1111's convention)."""
    value = _int_at_least(text, -1)
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def lora_arg(text: str) -> tuple[str, float]:
    """FILE[:SCALE] (default scale 1): a LoRA for --lora."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, finite_float(tail)
        except argparse.ArgumentTypeError:
            pass
    return text, 1.0


def byte_size(text: str) -> int:
    from .units import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MODEL_HELP = ("a diffusers model folder, or a single-file SD 1.x / 2.x checkpoint (.safetensors, .ckpt) "
              "(default: the model sdlite ships)")


def add_model_arguments(parser, positional: bool = False) -> None:
    """-m MODEL (or a positional MODEL), --vae, --config and --prediction-type: how every command opens a model."""
    if positional:  # `sdlite info MODEL`, and `-m MODEL` as the other commands take it
        parser.add_argument("model", nargs="?", help=MODEL_HELP)
        parser.add_argument("-m", "--model", dest="model_option", metavar="MODEL", help="the same as MODEL")
    else:
        parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("--vae", metavar="DIR|FILE", default=None,
                        help="a VAE to decode with instead of the model's own: a folder (e.g. TAESD, diffusers "
                             "AutoencoderTiny) or a single-file VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    parser.add_argument("--config", metavar="DIR", default=None,
                        help="for a single-file model: a diffusers folder to take the configs, tokenizer and "
                             "scheduler from (weights not needed), as diffusers' from_single_file(config=...)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "v"), default=None,
                        help="what the UNet predicts, overriding the scheduler config, the sidecar .yaml or the "
                             "SD 2.x detection")


def add_precision_argument(parser) -> None:
    """--precision: what the networks compute in (runtime.precision)."""
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"), default=None,
                        help="compute precision: auto = bf16 where this CPU computes it natively (AVX512-BF16, "
                             "AMX, ARMv8.6 BF16), else fp32; bf16 / fp16 run the UNet (bf16: and the VAE) in "
                             "16 bits, independent of how the weights are stored; int8: the UNet's transformer "
                             "Linear layers in int8, the rest fp32 (for CPUs without bf16) (default: "
                             "$SDLITE_PRECISION, else auto)")


def add_kv_arguments(parser) -> None:
    """--kv-store / --kv-tokens: how the text's cross-attention K/V are kept (runtime.kv_cache)."""
    parser.add_argument("--kv-store", choices=("compute", "bf16", "int8"), default=None,
                        help="the text's cross-attention K/V kept as computed, in bf16 or in int8 with a scale "
                             "per head (default: as computed unless only a smaller one fits --memory-budget)")
    parser.add_argument("--kv-tokens", choices=("all", "eot"), default=None,
                        help="attend to all 77 tokens a chunk (default, as diffusers) or only through each "
                             "chunk's first end-of-text token (faster; changes the image a little)")


def chosen_precision(args):
    """--precision (or $SDLITE_PRECISION) resolved: a runtime.precision.Precision; CliError when unknown."""
    from .runtime.precision import resolve_precision
    try:
        return resolve_precision(args.precision)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def model_kwargs(args) -> dict:
    """The keyword arguments `open_model` / `Pipeline.load` take from the model arguments."""
    return {"vae": args.vae, "config": args.config, "prediction_type": args.prediction_type}


def sampler_name(text: str) -> str:
    """A sampler name, A1111 label or alias -> the sampler's name (argparse type)."""
    from .errors import InvalidRequest
    from .samplers import resolve_sampler
    try:
        return resolve_sampler(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS, sampler_label

    p = Parser(prog="sdlite", description="Stable Diffusion text-to-image on small CPU-only machines.")
    p.add_argument("--version", action="version", version=f"sdlite {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate an image from a prompt", formatter_class=HelpFormatter,
                       epilog=SHIPPED_MODEL_NOTE)
    g.add_argument("prompt", help="what to draw (A1111 habits work: a negative prompt goes in --negative-prompt)")
    add_model_arguments(g)
    g.add_argument("-o", "--output", default="out.png",
                   help="image to write: .png, .jpg or .webp, with the generation parameters inside (PNG text "
                        "chunk, or EXIF UserComment as A1111 writes them)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="sampler steps (default: 20; an LCM model 4, SD-Turbo 1)")
    g.add_argument("--cfg-scale", type=finite_float, default=None,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: 7.5; an LCM model 8, "
                        "SD-Turbo 0)")
    g.add_argument("--seed", type=seed_arg, default=-1, help="-1: random (the seed used is printed)")
    g.add_argument("-W", "--width", type=positive_int, default=None,
                   help="pixels, a multiple of 8 (default: the model's native size)")
    g.add_argument("-H", "--height", type=positive_int, default=None,
                   help="pixels, a multiple of 8 (default: the model's native size)")
    g.add_argument("--sampler", type=sampler_name, default=None, metavar="NAME",
                   help="one of " + ", ".join(f"{n} ({sampler_label(n)})" for n in SAMPLERS)
                   + "; the A1111 label works too (default: dpm++2m; an LCM model lcm, SD-Turbo euler_a)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from")
    g.add_argument("--init-image", metavar="IN.png", default=None,
                   help="img2img: start from this image (stretched to the size, as A1111's 'Just resize')")
    g.add_argument("--strength", type=finite_float, default=0.75,
                   help="img2img: denoising strength in (0, 1], the share of the steps run (default 0.75)")
    g.add_argument("--mask", metavar="MASK.png", default=None,
                   help="inpainting (with --init-image): white = repaint, black = keep")
    g.add_argument("--batch-count", type=positive_int, default=1, metavar="N",
                   help="N images with seeds s, s+1, ...: OUT.png, OUT-1.png, OUT-2.png, ... (A1111's n_iter)")
    g.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (kohya/A1111 or diffusers/PEFT .safetensors; repeatable; scale default 1, "
                        "0 leaves it out); a bare NAME is looked up in --lora-dir")
    g.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="where --lora NAME and the prompt's <lora:NAME:SCALE> tags are looked up")
    g.add_argument("--clip-skip", type=non_negative_int, default=0,
                   help="text encoder layers to skip from the end (A1111's 'Clip skip' minus 1)")
    g.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111",
                   help="a1111: (word:1.3), [word], BREAK, prompts past 75 tokens in chunks; plain: as diffusers "
                        "(one 77-token chunk, brackets literal)")
    g.add_argument("--embeddings-dir", metavar="DIR", default=None,
                   help="textual-inversion embeddings (A1111's embeddings folder: .pt, .safetensors), used by "
                        "file name in the prompts")
    g.add_argument("--deep-cache", type=non_negative_int, default=0, metavar="N",
                   help="reuse the UNet's deep features for N-1 of every N steps (DeepCache); 0: off")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the physical cores, set up once)")
    add_precision_argument(g)
    add_kv_arguments(g)
    g.add_argument("--memory-budget", type=byte_size, default=None,
                   help="stay within this much memory (e.g. 1.5G, 768M): planned before loading "
                        "(default: no limit)")
    g.add_argument("--profile", metavar="TRACE.json", default=None,
                   help="write a Chrome/Perfetto trace of the stages and memory")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="print the plan and a per-stage table of time and peak memory")

    i = sub.add_parser("info", help="components, parameter counts, sizes and the memory plan",
                       formatter_class=HelpFormatter)
    add_model_arguments(i, positional=True)
    i.add_argument("--memory-budget", type=byte_size, action="append", default=None,
                   help="show the plan for this budget (repeatable; default: a few common budgets)")
    i.add_argument("-W", "--width", type=positive_int, default=None, help="plan for this width (default: native)")
    i.add_argument("-H", "--height", type=positive_int, default=None, help="plan for this height (default: native)")
    add_precision_argument(i)

    c = sub.add_parser("convert", help="write a diffusers folder from a model folder or a single-file "
                       "checkpoint, with fp32, fp16 or int8 weights", formatter_class=HelpFormatter)
    c.add_argument("src", help="a diffusers model folder, or a single-file SD 1.x / 2.x checkpoint")
    c.add_argument("dst", help="the folder to write (must not exist)")
    c.add_argument("--config", metavar="DIR", default=None,
                   help="for a single file: a diffusers folder to take configs, tokenizer and scheduler from")
    c.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "v"), default=None,
                   help="what the UNet predicts (a single SD 2.x file is otherwise tested)")
    c.add_argument("--weights", choices=("fp32", "fp16", "int8"), default=None,
                   help="storage of the weights: int8 (per-channel scales) for the UNet and text encoder's "
                        "layers, fp16 elsewhere; fp16 everything; or fp32")

    r = sub.add_parser("random-model", help="write a random-weight diffusers folder or single file (tests, "
                       "benches)", formatter_class=HelpFormatter)
    r.add_argument("arch", help="tiny, tiny-std, tiny-sd2, tiny-bk, tiny-lcm, bk-sdm-tiny or sd15 (a whole "
                                "model); taesd or tiny-taesd (a VAE folder for --vae)")
    r.add_argument("output", help="the folder to write (must not exist); a name ending in .safetensors or .ckpt "
                                  "writes a single file in the original SD layout instead")
    r.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights")
    r.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="storage of the weights")

    add_serve_parsers(sub)
    add_doctor_parser(sub)
    add_lighten_parsers(sub)
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == "" or default is argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


SHIPPED_MODEL_NOTE = ("Without -m, sdlite uses the model it ships, sdlite-shapes: it draws one flat shape on a flat "
                      "background at 64x64 and knows a few dozen words (colors, shapes, positions, e.g. 'a red "
                      "circle on a blue background'); see its README.md. Real checkpoints: -m FILE.safetensors, "
                      "FILE.ckpt or a diffusers FOLDER.")


class ProgressBar:
    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width, self.t0 = stream, width, time.perf_counter()
        self.tty = stream.isatty()

    def __call__(self, step: int, total: int) -> None:
        done = int(self.width * step / total)
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / step
        line = (f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{total} steps "
                f"{elapsed:.1f}s ({rate:.2f} s/step)")
        if self.tty:
            self.stream.write(line)
            if step == total:
                self.stream.write("\n")
        elif step == total or step == 1:
            self.stream.write(line.lstrip("\r") + "\n")
        self.stream.flush()


def resolve_model(arg: str | None) -> Path:
    from .weights.model_folder import shipped_model
    if arg:
        return Path(arg)
    model = shipped_model()
    if model is None:
        raise CliError("no model given (-m) and no shipped model installed; "
                       "make one with `sdlite random-model tiny ./tiny` and pass -m ./tiny")
    return model


def check_output_path(path: Path, suffix: str | None = None) -> None:
    """An output file we may write: the right kind (`suffix`, or an image format), in a writable folder."""
    from .image_io import output_format
    if suffix is not None and path.suffix.lower() != suffix:
        raise CliError(f"{path}: output must be a {suffix} file")
    if suffix is None:
        try:
            output_format(path)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{path}: directory {parent} is not writable")
    if path.is_dir():
        raise CliError(f"{path}: is a directory")
    if path.is_file() and not path.stat().st_mode & 0o222:
        raise CliError(f"{path}: is read-only; remove it or write elsewhere")


def cmd_generate(args) -> int:
    from .pipeline import GenerationRequest, Pipeline, request_caps
    from .runtime.components import check_vae_matches, native_size, recommended_settings
    from .runtime.prediction import settle_prediction_type
    from .runtime.profiler import Profiler
    from .weights.sources import open_model

    model = resolve_model(args.model)
    output = Path(args.output)
    check_output_path(output)
    if args.profile:
        check_output_path(Path(args.profile), suffix=".json")
    # the request is checked once, before any time goes into loading (the configs alone give the size)
    folder = open_model(model, **model_kwargs(args))  # opened once; Pipeline.load takes it as it is
    check_vae_matches(folder)
    settle_prediction_type(folder)  # an SD 2.x file's v-or-epsilon decides its native size
    native = native_size(folder)
    settings = recommended_settings(folder)  # what the model is meant to run with, where no flag says
    for name in ("steps", "cfg_scale", "sampler"):
        if getattr(args, name) is None:
            setattr(args, name, settings[name])
    req = GenerationRequest(args.prompt, args.negative_prompt, args.steps, args.cfg_scale, args.seed,
                            args.width or native, args.height or native, args.sampler,
                            args.clip_skip)
    req.prompt_syntax = args.prompt_syntax
    req.deep_cache = args.deep_cache
    req.init_image, req.mask = read_image(args.init_image, "RGB"), read_image(args.mask, "L")
    req.denoising_strength = args.strength
    req.validate(request_caps(folder))
    if args.model is None:  # the shipped model: say when a request leaves what its model card says it knows
        from .train.shapes import domain_notes
        for note in domain_notes(req.prompt, req.width, req.height):
            print(f"sdlite: note: {note}", file=sys.stderr)
    precision = chosen_precision(args)
    prof = Profiler()
    try:
        pipe = Pipeline.load(folder, threads=args.threads, memory_budget=args.memory_budget,
                             width=req.width, height=req.height, profiler=prof, loras=args.lora,
                             lora_dir=args.lora_dir, embeddings=args.embeddings_dir, precision=precision,
                             kv_store=args.kv_store, kv_tokens=args.kv_tokens)
        if args.verbose:
            print(f"precision: {pipe.precision.describe()}", file=sys.stderr)
            print(f"plan: {pipe.plan.describe()}", file=sys.stderr)
        progress = None if args.quiet else ProgressBar()
        outputs = []
        for i in range(args.batch_count):  # one image at a time: seeds s, s+1, ...
            one = req if i == 0 else copy.copy(req)  # (a copy keeps attributes set on req, e.g. prompt_syntax)
            one.seed = (req.seed + i) % 2**64
            result = pipe.run(one, progress=progress, profiler=prof)
            path = batch_path(output, i)
            with prof.stage("save"):
                result.save(path)
            outputs.append((path, one.seed))
    finally:
        prof.close()
    if args.verbose:
        print(prof.table(), file=sys.stderr)
        print(memory_summary(prof, pipe.plan), file=sys.stderr)
    if args.profile:
        prof.write_trace(args.profile)
    for path, seed in outputs:
        print(f"{path} (seed {seed}, {req.width}x{req.height}, {req.steps} steps, {req.sampler})")
    return 0


def batch_path(output: Path, index: int) -> Path:
    """Image `index` of a batch: OUT.png, then OUT-1.png, OUT-2.png, ..."""
    return output if index == 0 else output.with_name(f"{output.stem}-{index}{output.suffix}")


def read_image(path: str | None, mode: str):
    """--init-image / --mask: the image in `mode` ("RGB" or "L"), or None; CliError when unreadable."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CliError(f"{path}: cannot read the image ({exc})") from None


def memory_summary(prof, plan) -> str:
    """One line that puts the measured peak beside the plan's estimate and the budget."""
    from .units import format_bytes
    if prof.cgroup is not None:
        measured = f"peak charged to this process's cgroup {format_bytes(prof.peak('cgroup'))}"
    else:
        measured = f"peak RSS {format_bytes(prof.peak('rss'))} (no memory cgroup of its own)"
    budget = format_bytes(plan.budget) if plan.budget else "none"
    return f"memory: {measured}; plan estimate {format_bytes(plan.peak())}; budget {budget}"


def cmd_info(args) -> int:
    from .runtime.components import (
        check_vae_matches,
        check_weights_fit,
        is_taesd,
        native_size,
        unet_config,
        vae_config,
    )
    from .runtime.prediction import settle_prediction_type
    from .units import format_bytes
    from .weights.sources import open_model

    if args.model and args.model_option:
        raise CliError("give the model once: as MODEL or as -m MODEL")
    folder = open_model(resolve_model(args.model or args.model_option), **model_kwargs(args))
    check_vae_matches(folder)
    settle_prediction_type(folder)
    print_model_parts(folder)
    check_weights_fit(folder)  # every network's tensors against its config, names and shapes (no data read)
    ucfg, vcfg = unet_config(folder), vae_config(folder)
    native = native_size(folder)
    vae_kind = "TAESD (AutoencoderTiny)" if is_taesd(vcfg) else "AutoencoderKL"
    replaced = folder.replacement("vae")
    vae_from = f" from {replaced}" if replaced else ""
    print(f"  native size: {native}x{native}, "
          f"unet blocks {list(ucfg.block_out_channels)}, mid block: {ucfg.mid_block_type or 'none'}, "
          f"vae: {vae_kind}{vae_from}")
    print_model_origin(folder)

    from .errors import PlanError
    from .request import LIBRARY_CAPS, check_size
    from .runtime.planner import ModelSizes, make_plan
    from .units import GiB, MiB
    width = check_size("width", args.width or native, LIBRARY_CAPS.max_width)
    height = check_size("height", args.height or native, LIBRARY_CAPS.max_height)
    sizes = ModelSizes.of(folder)
    precision = chosen_precision(args)
    print(f"precision: {precision.describe()}")
    budgets = args.memory_budget or [None, 3 * GiB, 2 * GiB, int(1.5 * GiB), 1 * GiB, 768 * MiB, 512 * MiB]
    print(f"memory plans for {width}x{height} (estimated peak per stage: text / unet / vae):")
    for budget in budgets:
        label = "unlimited" if budget is None else format_bytes(budget)
        try:
            plan = make_plan(folder, budget, width, height, sizes=sizes, precision=precision)
        except PlanError as exc:
            print(f"  {label:>10}: does not fit: {exc}")
            continue
        est = " / ".join(format_bytes(plan.estimates[s]) for s in ("text_encoder", "unet", "vae"))
        print(f"  {label:>10}: {est}  [{plan.describe()}]")
    return 0


def print_model_parts(folder) -> None:
    """`sdlite info`: one line per network (parameters, bytes on disk, stored dtypes), then the rest."""
    import math

    from .units import format_bytes
    print(f"model: {folder.root}" + (f" ({folder.architecture} single file)" if folder.source == "single file"
                                     else ""))
    total_params = total_bytes = 0
    for name in ("text_encoder", "unet", "vae"):
        part = folder.part(name)
        with part.open_weights() as w:
            params = sum(math.prod(w.shape_of(k)) for k in w.keys() if not k.endswith("weight_scale"))
            dtypes = sorted({str(w.dtype_of(k)).replace("torch.", "") for k in w.keys()})
        size = part.bytes_on_disk()
        total_params += params
        total_bytes += size
        print(f"  {name:<13} {params / 1e6:9.2f} M params  {format_bytes(size, precise=True):>10} on disk  "
              f"{'/'.join(dtypes)}")
    if folder.source == "folder":
        for name in ("tokenizer", "scheduler"):
            print(f"  {name:<13} {'':>20}{format_bytes(folder.bytes_on_disk(name), precise=True):>10} on disk")
    print(f"  {'total':<13} {total_params / 1e6:9.2f} M params  {format_bytes(total_bytes, precise=True):>10}")


def print_model_origin(folder) -> None:
    """`sdlite info`: the prediction type and how it was settled; for a single file, where its configs and
    tokenizer come from and what in the file was left out."""
    pred = folder.scheduler_config().get("prediction_type", "epsilon")
    how = f" ({folder.prediction_note})" if folder.prediction_note else ""
    print(f"  prediction type: {pred}{how}")
    if folder.source != "single file":
        return
    print(f"  configs: {folder.config_dir or 'inferred from the weights (standard SD conventions)'}; "
          f"tokenizer: {folder.tokenizer_dir or 'the CLIP tokenizer sdlite ships (' + folder.tokenizer_kind + ')'}; "
          f"scheduler: {folder.scheduler_config().get('_class_name', '?')}")
    ignored = ", ".join(f"{reason}: {n}" for reason, n in folder.ignored.items() if n)
    print(f"  ignored: {ignored or 'nothing'}")


def cmd_convert(args) -> int:
    from .runtime.convert import convert_model

    if os.path.lexists(args.dst):
        raise CliError(f"{args.dst}: already exists")
    t0 = time.perf_counter()
    report = convert_model(args.src, args.dst, args.weights, config=args.config,
                           prediction_type=args.prediction_type)
    for part, counts in report.items():
        done = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        print(f"  {part:<13} {done}")
    print(f"{args.dst} ({args.weights or 'weights as stored'}, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_random_model(args) -> int:
    import torch

    from .testing.architectures import ARCHITECTURES, VAE_ARCHITECTURES
    from .testing.random_model import write_random_model, write_random_vae

    if args.arch not in ARCHITECTURES and args.arch not in VAE_ARCHITECTURES:
        raise CliError(f"unknown architecture {args.arch!r}; choose one of "
                       f"{', '.join([*ARCHITECTURES, *VAE_ARCHITECTURES])}")
    if Path(args.output).exists():
        raise CliError(f"{args.output}: already exists")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    write = write_random_vae if args.arch in VAE_ARCHITECTURES else write_random_model
    suffix = Path(args.output).suffix.lower()
    if suffix in (".safetensors", ".ckpt"):
        import tempfile

        from .fileio import current_umask
        from .testing.single_file import write_single_file
        if args.arch in VAE_ARCHITECTURES:
            raise CliError("a single file is written for whole models only")
        with tempfile.TemporaryDirectory(dir=Path(args.output).parent, prefix=".sdlite-random-") as tmp:
            folder = write(args.arch, Path(tmp) / "model", seed=args.seed, dtype=dtype)
            done = write_single_file(folder, Path(tmp) / f"model{suffix}", fmt=suffix[1:], dtype=dtype)
            os.chmod(done, 0o666 & ~current_umask())  # as a plain file write would leave it
            os.replace(done, args.output)  # complete, or not there at all
    else:
        write(args.arch, args.output, seed=args.seed, dtype=dtype)
    print(args.output)
    return 0



# --- serve and loadtest (issue 5); their work lives in sdlite.serve and sdlite.serve.loadtest -------------

def port_or_off(text: str) -> int | None:
    if text.lower() in ("off", "none"):
        return None
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 = ephemeral) or 'off', got {value}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_serve_parsers(sub) -> None:
    s = sub.add_parser("serve", help="gRPC + HTTP (A1111, OpenAI images) text-to-image service",
                       formatter_class=HelpFormatter)
    add_model_arguments(s)
    s.add_argument("--models-dir", metavar="DIR", default=None,
                   help="the models clients may switch between (diffusers folders, SD 1.x / 2.x .safetensors "
                        "and .ckpt files); -m picks the one loaded first (a name or path), else the first")
    s.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="LoRAs (.safetensors) that requests may name in <lora:NAME:SCALE> prompt tags")
    s.add_argument("--embeddings-dir", metavar="DIR", default=None,
                   help="textual-inversion embeddings (.pt, .safetensors) used by name in prompts")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1); 0.0.0.0 only "
                                                      "with --api-auth / --api-token or behind a TLS proxy")
    s.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", default=None,
                   help="HTTP Basic credentials every route but /healthz and /internal/ping requires, as A1111's "
                        "--api-auth (gRPC: `authorization` metadata); default $SDLITE_API_AUTH")
    s.add_argument("--api-token", metavar="TOKEN", default=None,
                   help="a token accepted as `Authorization: Bearer TOKEN` (HTTP and gRPC); default "
                        "$SDLITE_API_TOKEN")
    s.add_argument("--grpc-port", type=port_or_off, default=50051, help="0: ephemeral; off: no gRPC")
    s.add_argument("--http-port", type=port_or_off, default=7860, help="0: ephemeral; off: no HTTP")
    s.add_argument("--port-file", help='write {"grpc": PORT, "http": PORT, "pid": PID} here when ready')
    s.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the physical cores, set up once)")
    add_precision_argument(s)
    add_kv_arguments(s)
    s.add_argument("--memory-budget", type=byte_size, default=None,
                   help="e.g. 1.5G: the memory planner picks the levers; sizes that cannot fit are refused")
    s.add_argument("--max-concurrency", type=positive_int, default=None,
                   help="generations at once (default: from the memory plan, which is 1 while one "
                        "pipeline runs one generation at a time)")
    s.add_argument("--queue-size", type=non_negative_int, default=4,
                   help="admitted requests that may wait for a slot; more get RESOURCE_EXHAUSTED / 429")
    s.add_argument("--max-width", type=positive_int, default=1024, help="largest width a request may ask for")
    s.add_argument("--max-height", type=positive_int, default=1024, help="largest height a request may ask for")
    s.add_argument("--max-steps", type=positive_int, default=150, help="most sampler steps a request may ask for")
    s.add_argument("--max-images", type=positive_int, default=4, help="cap on OpenAI n / A1111 batch")
    s.add_argument("--default-deadline", type=positive_float, default=300.0,
                   help="seconds a request may take when the client sets no deadline")
    s.add_argument("--max-deadline", type=positive_float, default=3600.0,
                   help="seconds: a client's longer deadline is cut to this")
    s.add_argument("--breaker-failures", type=non_negative_int, default=5,
                   help="consecutive failures/timeouts that open the circuit (0: never)")
    s.add_argument("--breaker-cooldown", type=positive_float, default=30.0,
                   help="seconds the circuit stays open before a trial request")
    s.add_argument("--grace", type=finite_float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds for in-flight work to finish before it is cancelled")
    s.add_argument("--oom-score-adj", type=int, default=None, help="-1000..1000, for this process")
    s.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up generation")
    s.add_argument("-v", "--verbose", action="store_true", help="log every HTTP request")
    r = s.add_argument_group("Ray Serve (the `ray` extra): replicas across the nodes of a Ray cluster")
    r.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="deploy onto the Ray cluster at ADDRESS ('auto', HOST:6379, ray://HOST:10001) instead of "
                        "serving here; HTTP only, on --host/--http-port of the head node's proxy")
    r.add_argument("--replicas", type=positive_int, default=1, help="replicas (each one model, one node's slot)")
    r.add_argument("--min-replicas", type=non_negative_int, default=None, help="autoscaling: fewest replicas")
    r.add_argument("--max-replicas", type=positive_int, default=None, help="autoscaling: most replicas")
    r.add_argument("--target-ongoing-requests", type=positive_float, default=1.0,
                   help="autoscaling: requests per replica it aims for")
    r.add_argument("--ray-resource", metavar="NAME", default="sdlite_slot",
                   help="custom resource each replica takes one of; nodes that generate advertise it "
                        "(ray start --resources='{\"sdlite_slot\": 1}'); '' places replicas anywhere")
    r.add_argument("--ray-proxies", choices=("HeadOnly", "EveryNode"), default="HeadOnly",
                   help="where Ray Serve's HTTP proxies run (HeadOnly keeps them off small worker nodes)")

    lt = sub.add_parser("loadtest", help="drive a local sdlite serve with concurrent clients",
                        formatter_class=HelpFormatter)
    lt.add_argument("target", help="grpc://127.0.0.1:PORT or http://127.0.0.1:PORT (loopback only)")
    lt.add_argument("--api", choices=("a1111", "openai"), default=None, help="HTTP API (default: a1111)")
    lt.add_argument("-c", "--clients", type=positive_int, default=1, help="concurrent closed-loop clients")
    lt.add_argument("-n", "--requests", type=positive_int, default=None,
                    help="requests in all (default 20 when -t is not given)")
    lt.add_argument("-t", "--duration", type=positive_float, default=None, help="seconds")
    lt.add_argument("--prompt", default="a lighthouse at dusk", help="the prompt every request sends")
    lt.add_argument("--negative-prompt", default=None, help="(default: the server's)")
    lt.add_argument("--steps", type=positive_int, default=None, help="(default: the server's)")
    lt.add_argument("--cfg-scale", type=finite_float, default=None, help="(default: the server's)")
    lt.add_argument("--seed", type=non_negative_int, default=None, help="(default: random)")
    lt.add_argument("-W", "--width", type=positive_int, default=None, help="(default: the model's size)")
    lt.add_argument("-H", "--height", type=positive_int, default=None, help="(default: the model's size)")
    lt.add_argument("--sampler", default=None, help="a name or A1111 label (default: the server's)")
    lt.add_argument("--timeout", type=positive_float, default=300.0, help="per-request deadline, seconds")
    lt.add_argument("--retry-wait", type=finite_float, default=0.1,
                    help="seconds a client pauses after a shed answer (429/503, RESOURCE_EXHAUSTED)")
    lt.add_argument("--json", action="store_true", help="print one JSON line instead of text")


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a module blanked in sys.modules
        return False


def serve_logging(args) -> None:
    import logging
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="sdlite serve: %(levelname)s %(message)s")


def cmd_serve(args) -> int:
    if args.ray is not None:
        return cmd_serve_ray(args)
    if args.grpc_port is None and args.http_port is None:
        raise CliError("--grpc-port off and --http-port off: nothing to serve")
    needed = ["prometheus_client"]
    if args.grpc_port is not None:
        needed += ["grpc", "grpc_health", "grpc_reflection", "google.protobuf"]
    if args.http_port is not None:
        needed += ["starlette", "uvicorn"]
    missing = [name for name in needed if not _importable(name)]
    if missing:
        raise CliError(f"serve needs the serve extra, which is not installed (missing: {', '.join(missing)}): "
                       "pip install -c constraints.txt -e '.[serve]'")
    from .serve.server import serve
    serve_logging(args)
    model = resolve_model(args.model) if args.model or not args.models_dir else None
    return serve(serve_config(args, model), warmup=not args.no_warmup)


def cmd_serve_ray(args) -> int:
    """`sdlite serve --ray ADDRESS`: the same service as a Ray Serve application (serve.ray_app)."""
    missing = [name for name in ("ray", "starlette", "prometheus_client") if not _importable(name)]
    if missing:
        raise CliError(f"serve --ray needs the ray extra, which is not installed (missing: {', '.join(missing)}): "
                       "pip install -c constraints.txt -e '.[ray]'")
    if args.models_dir:
        raise CliError("--models-dir is not supported with --ray (a switch would change one replica of many): "
                       "deploy one application per model")
    if args.http_port is None or args.http_port == 0:
        raise CliError("--ray needs a fixed --http-port (Ray Serve's proxies listen on it)")
    from .serve.ray_app import RayOptions, RaySetupError, run_ray
    opts = RayOptions(address=args.ray, replicas=args.replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                      resource=args.ray_resource, proxy_location=args.ray_proxies)
    try:
        opts.check()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    serve_logging(args)
    # the path each replica opens on its own node; without -m each node's shipped model
    model = Path(args.model).absolute() if args.model else None
    config = serve_config(args, model)
    config.grpc_port = None
    try:
        return run_ray(config, opts, sys.stdout, warmup=not args.no_warmup)
    except RaySetupError as exc:
        raise CliError(str(exc)) from None


def serve_config(args, model):
    """The ServeConfig of `sdlite serve`'s flags (CliError for a bad one)."""
    from .serve.config import ApiAuth, Limits, ServeConfig
    if args.grace < 0:
        raise CliError(f"--grace must be >= 0, got {args.grace}")
    try:  # (the environment keeps secrets out of the process list)
        auth = ApiAuth.parse(os.environ.get("SDLITE_API_AUTH") or None if args.api_auth is None else args.api_auth,
                             os.environ.get("SDLITE_API_TOKEN") or None if args.api_token is None else args.api_token)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    limits = Limits(max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
                    max_images=args.max_images)
    return ServeConfig(model, vae=Path(args.vae) if args.vae else None,
                         models_dir=Path(args.models_dir) if args.models_dir else None,
                         model_config=Path(args.config) if args.config else None,
                         lora_dir=Path(args.lora_dir) if args.lora_dir else None,
                         embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
                         prediction_type=args.prediction_type,
                         host=args.host, grpc_port=args.grpc_port,
                         http_port=args.http_port,
                         port_file=Path(args.port_file) if args.port_file else None,
                         threads=args.threads, memory_budget=args.memory_budget,
                         precision=chosen_precision(args).requested,
                         kv_store=args.kv_store, kv_tokens=args.kv_tokens,
                         max_concurrency=args.max_concurrency,
                         queue_size=args.queue_size, default_deadline=args.default_deadline,
                         max_deadline=args.max_deadline, breaker_failures=args.breaker_failures,
                         breaker_cooldown=args.breaker_cooldown, grace=args.grace,
                         oom_score_adj=args.oom_score_adj, limits=limits, auth=auth)


def cmd_loadtest(args) -> int:
    import json

    from .serve.loadtest import LoadtestError, parse_target, run_loadtest

    payload = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
               "cfg_scale": args.cfg_scale, "seed": args.seed, "width": args.width, "height": args.height,
               "sampler": args.sampler}
    try:
        target = parse_target(args.target, args.api)
        report = run_loadtest(target, clients=args.clients, requests=args.requests,
                              duration=args.duration, payload=payload, timeout=args.timeout,
                              retry_wait=args.retry_wait)
    except LoadtestError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(report.as_dict()) if args.json else report.text())
    if report.ok == 0:
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(report.statuses.items())) or "none sent"
        print(f"sdlite: error: no request succeeded ({statuses})", file=sys.stderr)
        return EXIT_FAILED
    return 0

# --- doctor (issue 17); the gathering and the findings live in sdlite.doctor ------------------------------

def add_doctor_parser(sub) -> None:
    d = sub.add_parser("doctor", help="OS, CPU, memory, swap/zram, cgroup, disk, torch, and whether the model "
                       "fits: one screen for a bug report", formatter_class=HelpFormatter)
    d.add_argument("model", nargs="?", help="a model folder or single file (default: the model sdlite ships)")
    d.add_argument("--json", action="store_true", help="one JSON object instead of the screen")
    d.add_argument("--probe", action="store_true", help="load the model and time one UNet step at its native "
                   "size: the expected time per image (takes as long as two steps and a load)")
    d.add_argument("--memory-budget", type=byte_size, default=None,
                   help="check this budget (default: the memory available or the cgroup limit, less headroom)")
    add_precision_argument(d)


def cmd_doctor(args) -> int:
    import json

    from .doctor import diagnose, main_exit_code
    report = diagnose(args.model, precision=chosen_precision(args).requested if args.precision else None,
                      memory_budget_bytes=args.memory_budget, probe=args.probe)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.text())
    return main_exit_code(report)


# --- prune and distill (issue 18); their work lives in sdlite.train.prune and sdlite.train.distill --------

def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_lighten_parsers(sub) -> None:
    from .train.prune import DROPS, IMPORTANCE, RECIPES
    p = sub.add_parser("prune", help="a smaller UNet: remove blocks as BK-SDM does (then `sdlite distill` it)",
                       formatter_class=HelpFormatter)
    p.add_argument("src", help="a diffusers model folder")
    p.add_argument("dst", help="the folder to write (must not exist)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="bk-sdm-small",
                   help="what to remove: bk-sdm-small = the mid block and one resnet+attention per stage; "
                        "bk-sdm-base = one resnet+attention per stage; no-mid; inner-attentions = the innermost "
                        "stage's attentions (down and up)")
    p.add_argument("--drop", action="append", default=None, metavar="WHAT",
                   help=f"remove these instead of the recipe's (repeatable): {', '.join(DROPS)}, or one block's "
                        "attentions (down_blocks.I.attentions, up_blocks.J.attentions)")
    p.add_argument("--target", type=fraction, default=None, metavar="F",
                   help="instead: remove the least important blocks (per parameter) until this fraction of the UNet's "
                        "parameters is gone (e.g. 0.3)")
    p.add_argument("--importance", choices=IMPORTANCE, default="l1",
                   help="which blocks go first: l1 = smallest mean |weight|; output = smallest measured change "
                        "of the UNet's output on --prompts")
    p.add_argument("--prompts", metavar="FILE", default=None, help="prompts, one per line (--importance output)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--no-measure", action="store_true",
                   help="skip timing both UNets (s/step and peak memory, each in a fresh process)")

    d = sub.add_parser("distill", help="teach a pruned UNet from the original, without a dataset (resumable)",
                       formatter_class=HelpFormatter)
    d.add_argument("dst", help="the pruned model folder (from sdlite prune); its UNet is trained in place")
    d.add_argument("--teacher", required=True, help="the original model folder")
    d.add_argument("--prompts", required=True, metavar="FILE", help="prompts, one per line (one-chunk prompts)")
    d.add_argument("--minutes", type=positive_float, default=None,
                   help="train until the total time (every resumed run included) reaches this")
    d.add_argument("--steps", type=positive_int, default=None, help="or until this many steps in total")
    d.add_argument("--batch", type=positive_int, default=16)
    d.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW learning rate")
    d.add_argument("--teacher-steps", type=positive_int, default=20,
                   help="DPM++ 2M steps of the teacher's latents (one per prompt)")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads; --threads 1 makes a run reproducible bit for bit")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress line")


def cmd_prune(args) -> int:
    from .runtime.threads import configure_threads
    from .train.distill import read_prompts
    from .train.prune import RECIPES, prune_model
    if os.path.lexists(args.dst):
        raise CliError(f"{args.dst}: already exists")
    if args.target is not None and args.drop:
        raise CliError("--target chooses the blocks itself; give --target or --drop, not both")
    if args.importance == "output" and not args.prompts:
        raise CliError("--importance output needs --prompts FILE")
    configure_threads(args.threads)
    prompts = read_prompts(args.prompts) if args.prompts else None
    drops = tuple(args.drop) if args.drop else RECIPES[args.recipe]
    report = prune_model(args.src, args.dst, drops, target=args.target, importance=args.importance, prompts=prompts)
    for r in report["removed"]:
        score = next(v for k, v in r.items() if k.startswith("importance_"))
        print(f"  removed {r['unit']:<58} {r['params']:>12,} parameters  ({args.importance} importance {score:g})")
    before, after = report["params_before"], report["params_after"]
    print(f"UNet: {before:,} -> {after:,} parameters ({report['params_removed']:.1%} fewer), "
          f"{report['bytes_before'] / 2**20:.1f} -> {report['bytes_after'] / 2**20:.1f} MiB")
    if not args.no_measure:
        from .train.prune import measure_unet
        a, b = measure_unet(args.src, args.threads), measure_unet(args.dst, args.threads)
        print(f"UNet call at batch 2, {a['size']}x{a['size']}, {a['threads']} threads: {a['s_per_step']:.3f} -> "
              f"{b['s_per_step']:.3f} s/step ({b['s_per_step'] / a['s_per_step']:.2f}x); peak RSS of a process "
              f"that loads the model and runs it: {a['peak_rss'] / 2**20:.0f} -> {b['peak_rss'] / 2**20:.0f} MiB")
    print(f"{args.dst} (distill it: sdlite distill {args.dst} --teacher {args.src} --prompts FILE --minutes N)")
    return 0


class DistillProgress:
    def __init__(self, stream=sys.stderr):
        self.stream, self.last = stream, 0.0

    def __call__(self, step: int, spent: float, budget: float | None, steps: int | None, rec: dict) -> None:
        now = time.perf_counter()
        if now - self.last < (0.5 if self.stream.isatty() else 30):
            return
        self.last = now
        goal = (f"{spent / 60:.1f}/{budget / 60:g} min" if budget is not None else f"{step}/{steps} steps")
        line = f"step {step}  {goal}  loss {rec['loss']:.4f} (task {rec['task']:.4f}, out {rec['out_kd']:.4f}, " \
               f"feat {rec['feat_kd']:.4f})"
        self.stream.write(("\r" + line) if self.stream.isatty() else line + "\n")
        self.stream.flush()


def cmd_distill(args) -> int:
    from .train.distill import Distiller, DistillRecipe, read_prompts
    if args.minutes is None and args.steps is None:
        raise CliError("give --minutes N or --steps N (the total, resumed runs included)")
    prompts = read_prompts(args.prompts)
    recipe = DistillRecipe(seed=args.seed, batch=args.batch, lr=args.lr, teacher_steps=args.teacher_steps)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    dist = Distiller(args.dst, args.teacher, prompts, recipe, threads=args.threads, log=log)
    try:
        out = dist.run(args.minutes, args.steps, None if args.quiet else DistillProgress())
    finally:
        dist.close()
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    last = out["loss_last"] or {}
    print(f"{args.dst}: {out['steps']} steps, {out['minutes']:.1f} min in all"
          + (f", loss {last['loss']:.4f}" if last else ""))
    return 0


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "convert": cmd_convert,
            "random-model": cmd_random_model, "prune": cmd_prune, "distill": cmd_distill}
COMMANDS.update({"serve": cmd_serve, "loadtest": cmd_loadtest, "doctor": cmd_doctor})
NEEDS_64BIT = ("generate", "serve")  # (doctor runs everywhere: it says why these refuse)


def main(argv: list[str] | None = None) -> int:
    with _interruptible(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            if args.command in NEEDS_64BIT:
                from .runtime.cpu_features import arm32_refusal
                if refusal := arm32_refusal():
                    raise CliError(refusal)
            return COMMANDS[args.command](args)
        except (CliError, SdliteError) as exc:
            print(f"sdlite: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:  # `sdlite info | head`: the reader left; stop quietly, as other tools do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # (so that flushing stdout at exit raises nothing)
            return EXIT_BROKEN_PIPE
        except OSError as exc:  # a full disk, a read-only folder, a file that vanished: one line naming it
            print(f"sdlite: error: {_os_error_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("sdlite: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _os_error_line(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what}" if where else what


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a prompt longer than the text encoder takes, ...) as one plain line, not Python's format."""
    print(f"sdlite: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C: the first stops the work at its next step (the command then exits 130, leaving no partial
    output); a second leaves at once. `serve` installs its own handlers for SIGINT/SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def on_sigint(signum, frame):
        from .runtime.compute_thread import busy, exit_now
        if pressed:  # already stopping: leave now if torch is still busy, else let the exit finish
            if busy():
                print("\nsdlite: interrupted", file=sys.stderr)
                exit_now(EXIT_INTERRUPTED)
            return
        pressed.append(True)
        if busy():
            print("\nsdlite: stopping at the next step (Ctrl-C again to quit at once)", file=sys.stderr,
                  flush=True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:  # once interrupted, a late Ctrl-C must not turn the exit into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN if pressed else previous)


if __name__ == "__main__":
    sys.exit(main())
