"""int8 compute of Linear layers (runtime.int8_compute) against fp32 and bf16, on SD 1.5's shapes.

    .venv/bin/python bench/int8_compute.py [--model /tmp/sdlite-sd15-fp16] [--threads 2] [--no-unet]

Prints JSON lines:
- "env": torch, quantized engines, the CPU's int8/bf16 features, threads, load average;
- "linear": one per SD 1.5 Linear shape at 512x512 with CFG batch 2 (tokens, in, out, how many such calls
  one UNet step makes): median ms of fp32 F.linear, bf16 F.linear (bf16 tensors in and out; and with the
  fp32 -> bf16 -> fp32 casts a bf16 layer in an fp32 network pays), int8 `quantized::linear_dynamic` per
  engine; speedups over fp32; relative error ||y - y_fp32|| / ||y_fp32||. Methods are timed alternately
  (round robin, one call each per round) so that load from other processes hits them alike;
- "linear_total": the per-step sums (count x median) of those times;
- "unet": one SD 1.5-size UNet call (batch 2, 64x64 latents, 77 tokens), fp32 weights materialized, against
  the same with int8 Linear layers (and with the 1x1 proj convs too), timed alternately after a warm-up;
  relative error of the output, layers converted, packed bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sdlite.runtime.cpu_features import read_cpu_features
from sdlite.runtime.int8_compute import ENGINES, _pack, reduce_range_for
from sdlite.runtime.lazy_weights import quantize_int8

# (name, tokens, in, out, calls per UNet step): SD 1.5 at 512x512, batch 2. Transformers per width:
# 320 at 64x64 (2 down, 3 up), 640 at 32x32 (2 + 3), 1280 at 16x16 (2 + 3), 1280 at 8x8 (mid, 1).
# Per transformer block: attn1 q/k/v/out + attn2 q/out (6 of C x C), attn2 k/v on the text (2 of 768 -> C,
# 154 tokens; computed once per request with the K/V cache), GEGLU C -> 8C, ff out 4C -> C; proj_in/proj_out
# are 1x1 convs of C x C in SD 1.5 (2 more C x C on the same tokens, `convs=True`).
LEVELS = ((320, 2 * 4096, 5), (640, 2 * 1024, 5), (1280, 2 * 256, 5), (1280, 2 * 64, 1))


def shapes():
    for c, tokens, blocks in LEVELS:
        yield "attn q/k/v/out", tokens, c, c, 6 * blocks
        yield "proj_in/out (1x1 conv)", tokens, c, c, 2 * blocks
        yield "ff GEGLU in", tokens, c, 8 * c, blocks
        yield "ff out", tokens, 4 * c, c, blocks
        yield "attn2 k/v (text)", 2 * 77, 768, c, 2 * blocks


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 3)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((y.float() - ref).norm() / ref.norm()), 5)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called round robin after one warm-up call each."""
    times = {k: [] for k in fns}
    for k, f in fns.items():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: median_ms(v) for k, v in times.items()}


def bench_shape(name, tokens, n_in, n_out, count, engines, repeats):
    g = torch.Generator().manual_seed(tokens + n_in + n_out)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    b = 0.02 * torch.randn(n_out, generator=g)
    if name == "ff out":  # GEGLU's output: a * gelu(gate), heavier-tailed than a normed input
        x = torch.randn(tokens, n_in, generator=g) * F.gelu(torch.randn(tokens, n_in, generator=g))
    else:
        x = torch.randn(tokens, n_in, generator=g)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    q, scale = quantize_int8(w)
    fns = {"fp32": lambda: F.linear(x, w, b), "bf16": lambda: F.linear(xb, wb, bb),
           "bf16_cast": lambda: F.linear(x.bfloat16(), wb, bb).float()}
    for engine in engines:
        packed, rr = _pack(q, scale, b, engine), reduce_range_for(engine)
        fns[f"int8_{engine}"] = (lambda p, r: lambda: torch.ops.quantized.linear_dynamic(x, p, r))(packed, rr)
    ref = fns["fp32"]()
    errors = {f"rel_err_{k}": rel(f(), ref) for k, f in fns.items() if k not in ("fp32", "bf16_cast")}
    ms = alternate(fns, repeats)
    out = {"kind": "linear", "what": name, "tokens": tokens, "in": n_in, "out": n_out, "calls_per_step": count,
           **{f"{k}_ms": v for k, v in ms.items()},
           **{f"speedup_{k}": round(ms["fp32"] / v, 2) for k, v in ms.items() if k != "fp32"},
           **errors, "loadavg": load()}
    print(json.dumps(out), flush=True)
    return out


def bench_unet(model: str, repeats: int, convs: bool) -> None:
    from sdlite.runtime.components import load_unet
    from sdlite.runtime.int8_compute import apply_int8_compute, packed_bytes
    from sdlite.weights.sources import open_model

    folder = open_model(model)
    variants = {"fp32": load_unet(folder, torch.float32, weights_mode="materialize")}
    info = {}
    for name, with_convs in (("int8_linear", False), ("int8_linear_conv1x1", True))[: 2 if convs else 1]:
        part = load_unet(folder, torch.float32, weights_mode="materialize")
        t = time.perf_counter()
        n = apply_int8_compute(part.module, "unet", convs=with_convs)
        info[name] = {"layers": n, "packed_bytes": packed_bytes(part.module),
                      "convert_s": round(time.perf_counter() - t, 2)}
        variants[name] = part
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(601.0)
    outs = {}

    def call(name):
        def run():
            outs[name] = variants[name].module(x, t, ctx)
        return run

    before = load()
    with torch.inference_mode():
        ms = alternate({k: call(k) for k in variants}, repeats)
    for name in variants:
        row = {"kind": "unet", "variant": name, "ms": ms[name], "speedup": round(ms["fp32"] / ms[name], 3),
               "loadavg_before": before, "loadavg": load(), **info.get(name, {})}
        if name != "fp32":
            row["rel_err"] = rel(outs[name], outs["fp32"])
            row["max_abs_err_over_max_abs"] = round(float((outs[name] - outs["fp32"]).abs().max()
                                                          / outs["fp32"].abs().max()), 5)
        print(json.dumps(row), flush=True)
    for part in variants.values():
        part.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/sdlite-sd15-fp16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unet-repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="*", default=None)
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--no-unet", action="store_true")
    ap.add_argument("--no-convs", action="store_true", help="skip the UNet variant with int8 1x1 convs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = args.engines or [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    flags = sorted(f for f in read_cpu_features().flags if any(k in f for k in ("vnni", "amx", "bf16", "dotprod", "i8mm")))
    print(json.dumps({"kind": "env", "torch": torch.__version__, "engines": engines,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags,
                      "threads": args.threads, "loadavg": load()}), flush=True)
    if not args.no_shapes:
        rows = [bench_shape(*s, engines, args.repeats) for s in shapes()]
        methods = [k[:-3] for k in rows[0] if k.endswith("_ms")]
        totals = {m: round(sum(r[f"{m}_ms"] * r["calls_per_step"] for r in rows
                               if not r["what"].startswith(("proj", "attn2 k/v"))), 1) for m in methods}
        print(json.dumps({"kind": "linear_total", "note": "per UNet step: Linear layers of SD 1.5 (attn q/k/v/out,"
                          " ff), without the 1x1 proj convs and the cached text K/V", "ms": totals,
                          "speedup": {m: round(totals["fp32"] / v, 2) for m, v in totals.items()},
                          "loadavg": load()}), flush=True)
    if not args.no_unet:
        bench_unet(args.model, args.unet_repeats, not args.no_convs)


if __name__ == "__main__":
    main()
