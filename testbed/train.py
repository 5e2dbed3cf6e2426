"""Train the composition testbed v3: detector, base models (UNet, Flux-architecture DiT), concept LoRAs.

    python testbed/train.py --stage detector --out DIR
    python testbed/train.py --stage base --arch unet|dit --out DIR [--base-seconds S]
    python testbed/train.py --stage loras --arch unet|dit --out DIR --resume DIR --loras-only CATEGORY ...
    python testbed/train.py ... --smoke        # a few steps of tiny batches on the CPU, to check the plumbing
    python testbed/train.py --stage base --arch unet|dit --out DIR --profile 20   # steps/s and the top operators

``testbed/gpu_runs.sh`` runs these as two device calls. Everything is seeded (data generator, init, dropout), so
a run is reproducible up to GPU kernel non-determinism. Outputs (``objectives.folder``): the UNet's unet/clip/
loras in DIR, the DiT's dit/clip/loras in DIR/dit (fp16, the EMA weights), detector.safetensors in DIR, and a
train_log_*.json per process (steps, seconds, losses, detector accuracy on held-out renders).

Data: the base sees scenes of the base distribution (``world.random_scenes``: plain shapes and generic class
members — creatures, lamps, vests, walls — captioned by class, "a red creature"); each LoRA sees scenes that all
hold its concept, captioned trigger + class ("a zorb creature"), the rest of the scene from the base distribution.
Captions are dropped (empty prompt) 10 % of the time so classifier-free guidance works. Losses: ``objectives``.
Base: AdamW, linear warm-up then cosine decay over the step or time budget, EMA of the weights, UNet/DiT and the
text encoder's layers trained together (the embedding table stays the seeded random one). LoRA: rank ``--rank``,
alpha = rank, on ``objectives.*_LORA_TARGETS``, base and text encoder frozen.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from boot import boot_comfy  # noqa: E402

boot_comfy()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import objectives  # noqa: E402
import world  # noqa: E402

LORA_TARGETS = objectives.UNET_LORA_TARGETS  # v2 name, kept for callers


class Captions:
    """Token rows per caption string, cached (ComfyUI's tokenizer is slow per call)."""

    def __init__(self, clip):
        self.clip, self.cache = clip, {}

    def rows(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            if text not in self.cache:
                self.cache[text] = comfy_model.token_ids(self.clip, text)[0]
            out.append(self.cache[text])
        return out


def batch(gen, size, device, concepts=(), drop=0.1):
    """Renders [B,3,64,64] and captions of ``size`` training scenes (``concepts`` in every one)."""
    scenes = world.random_scenes(size, gen, concepts)
    keep = (torch.rand(size, generator=gen) >= drop).tolist()
    texts = [world.caption(scenes, i) if keep[i] else "" for i in range(size)]
    return world.render(scenes, gen, device=device), texts


def lr_at(step, progress, peak, warmup=200):
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` ∈ [0, 1] of the run."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def progress_of(step, steps, elapsed, seconds):
    """How far a run is: by steps or by its time budget, whichever is further (so a run cut by its budget
    still ends its cosine schedule; with the step limit binding, the schedule is reproducible)."""
    return max(step / steps, elapsed / seconds)


def mean_loss(losses) -> float:
    """Mean of the last 100 loss tensors (one host sync; the training loops never sync per step)."""
    return float(torch.stack(losses[-100:]).mean()) if losses else float("nan")


def base_step(arch, patcher, clip, captions, opt, params, batch_size, gen, device, forward=None) -> torch.Tensor:
    """One optimiser step of the base on a fresh batch; returns the loss (not synced). ``forward``:
    ``objectives.model_forward``'s callable (default: eager)."""
    images, texts = batch(gen, batch_size, device)
    context, pooled = comfy_model.encode_ids_pooled(clip, captions.rows(texts))
    loss = objectives.denoise_loss(arch, patcher, objectives.to_model_space(arch, images.to(device)),
                                   context.to(device), pooled.to(device), gen, device, forward)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


def base_params(patcher, clip, device) -> list[torch.nn.Parameter]:
    """The trained parameters: the whole diffusion model and the text encoder but its embedding table."""
    dm = patcher.model.diffusion_model.to(device)
    text = clip.cond_stage_model.to(device)
    for p in dm.parameters():
        p.requires_grad_(True)  # ComfyUI ≥ 0.33 builds its weights with requires_grad off
    for n, p in text.named_parameters():
        p.requires_grad_("token_embedding" not in n)
    return list(dm.parameters()) + [p for n, p in text.named_parameters() if "token_embedding" not in n]


def profile_base(arch, patcher, clip, steps, batch_size, gen, device, compile=False) -> None:
    """Steps per second of ``steps`` base steps after 5 warm-up steps, then the operators that take the time over
    5 more (torch.profiler, by device time on CUDA); nothing is saved. ``compile``: the model's forward under
    ``torch.compile`` (the warm-up's time, which holds the compilation, is printed too)."""
    params = base_params(patcher, clip, device)
    opt, captions = torch.optim.AdamW(params, lr=1e-5), Captions(clip)
    forward = objectives.model_forward(arch, patcher, compile)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(5):
        base_step(arch, patcher, clip, captions, opt, params, batch_size, gen, device, forward)
    sync()
    print(f"{arch} base{' compiled' if compile else ''}: 5 warm-up steps {time.perf_counter() - start:.1f}s",
          flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if device.type == "cuda" else [])
    start = time.perf_counter()
    for _ in range(steps):
        base_step(arch, patcher, clip, captions, opt, params, batch_size, gen, device, forward)
    sync()
    seconds = time.perf_counter() - start
    print(f"{arch} base{' compiled' if compile else ''}: {steps / seconds:.2f} steps/s at batch {batch_size}",
          flush=True)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(min(steps, 5)):
            base_step(arch, patcher, clip, captions, opt, params, batch_size, gen, device, forward)
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


def train_base(arch, patcher, clip, steps, batch_size, seconds, gen, device, log, peak_lr=3e-4, compile=False):
    """Train ``arch``'s model and the text encoder's layers on base captions; the EMA weights end in the model.
    ``compile``: the model's forward under ``torch.compile``."""
    captions = Captions(clip)
    forward = objectives.model_forward(arch, patcher, compile)
    params = base_params(patcher, clip, device)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    start, losses, step = time.perf_counter(), [], 0
    for step in range(steps):
        progress = progress_of(step, steps, time.perf_counter() - start, seconds)
        if progress >= 1:
            print(f"{arch} base: time budget reached at step {step}", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, peak_lr)
        loss = base_step(arch, patcher, clip, captions, opt, params, batch_size, gen, device, forward)
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.detach())
        if step % 250 == 0:
            print(f"{arch} base {step}/{steps} loss {mean_loss(losses):.4f} {time.perf_counter() - start:.0f}s",
                  flush=True)
    else:
        step = steps
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    log[f"{arch}_base"] = {"steps": step, "batch": batch_size, "seconds": round(time.perf_counter() - start, 1),
                           "loss_last_100": round(mean_loss(losses), 4), "compiled": compile}


class LoraLayer(torch.nn.Module):
    """ΔW = up · down · (alpha / rank) added to a Linear or 1×1 Conv output (kohya LoRA)."""

    def __init__(self, module, rank, gen):
        super().__init__()
        conv = module.weight.ndim == 4
        out_f, in_f = module.weight.shape[:2]
        self.conv, self.scale = conv, 1.0  # alpha == rank
        self.down = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        self.up = torch.nn.Parameter(torch.zeros(out_f, rank))

    def hook(self, module, args, output):
        x = args[0]
        if self.conv:
            delta = F.conv2d(F.conv2d(x, self.down[:, :, None, None].to(x.dtype)), self.up[:, :, None, None].to(x.dtype))
        else:
            delta = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return output + self.scale * delta


def train_lora(arch, patcher, clip, category, steps, batch_size, rank, gen, device, log, seconds=float("inf"),
               peak_lr=1e-3) -> dict:
    """Train one kohya LoRA of ``category`` on the frozen base; returns its state dict (fp16 factors)."""
    dm = patcher.model.diffusion_model
    captions = Captions(clip)
    for p in list(dm.parameters()) + list(clip.cond_stage_model.parameters()):
        p.requires_grad_(False)
    layers, handles = {}, []
    for name, module in objectives.lora_targets(arch, dm).items():
        layers[name] = LoraLayer(module, rank, gen).to(device)
        handles.append(module.register_forward_hook(layers[name].hook))
    params = [p for layer in layers.values() for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    start, losses, step = time.perf_counter(), [], 0
    try:
        for step in range(steps):
            progress = progress_of(step, steps, time.perf_counter() - start, seconds)
            if progress >= 1:
                print(f"{arch} lora {category}: time budget reached at step {step}", flush=True)
                break
            images, texts = batch(gen, batch_size, device, (category,))
            with torch.no_grad():
                context, pooled = comfy_model.encode_ids_pooled(clip, captions.rows(texts))
            loss = objectives.denoise_loss(arch, patcher, objectives.to_model_space(arch, images.to(device)),
                                           context.to(device), pooled.to(device), gen, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress, peak_lr, warmup=50)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if step % 100 == 0:
                print(f"{arch} lora {category} {step}/{steps} loss {mean_loss(losses):.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
        else:
            step = steps
    finally:
        for h in handles:
            h.remove()
    log[f"{arch}_lora_{category}"] = {"steps": step, "rank": rank, "layers": len(layers),
                                      "seconds": round(time.perf_counter() - start, 1),
                                      "loss_last_100": round(mean_loss(losses), 4)}
    print(f"{arch} lora {category}: {log[f'{arch}_lora_{category}']}", flush=True)
    return kohya_state(arch, patcher, layers, rank)


def kohya_state(arch, patcher, layers, rank) -> dict:
    """kohya keys (``lora_unet_…``, ``objectives.kohya_prefixes``) for the trained factors, fp16, alpha = rank."""
    state = {}
    for name, key in objectives.kohya_prefixes(arch, patcher, layers).items():
        layer = layers[name]
        extra = (1, 1) if layer.conv else ()
        state[f"{key}.lora_down.weight"] = layer.down.detach().reshape(layer.down.shape + extra).half().cpu()
        state[f"{key}.lora_up.weight"] = layer.up.detach().reshape(layer.up.shape + extra).half().cpu()
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def write_log(out: str, name: str, log: dict) -> None:
    with open(os.path.join(out, f"train_log_{name}.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(json.dumps(log), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", choices=("detector", "base", "loras"), required=True)
    parser.add_argument("--arch", choices=objectives.ARCHS, default="unet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=100000)
    parser.add_argument("--base-seconds", type=float, default=300)
    parser.add_argument("--base-lr", type=float, default=3e-4)
    parser.add_argument("--lora-steps", type=int, default=100000)
    parser.add_argument("--lora-seconds", type=float, default=float("inf"), help="time budget of each LoRA")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--detector-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256, help="base batch")
    parser.add_argument("--lora-batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resume", help="weights folder to continue from (base) or to train LoRAs on (loras)")
    parser.add_argument("--loras-only", nargs="+", metavar="CATEGORY", default=list(world.CATEGORIES),
                        help="LoRAs to train (stage loras)")
    parser.add_argument("--smoke", action="store_true", help="tiny run on the CPU")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="stage base: time and profile STEPS steps (after 5 warm-up steps), save nothing")
    parser.add_argument("--compile", action="store_true",
                        help="stage base: the model's forward under torch.compile (with --profile: eager, then "
                             "compiled, in one process)")
    args = parser.parse_args()
    if args.smoke:
        args.base_steps, args.lora_steps, args.detector_steps, args.batch, args.lora_batch = 3, 2, 20, 4, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # fixed shapes every step: let cuDNN pick its kernels once; TF32 for the matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = args.seed + 1000 * objectives.ARCHS.index(args.arch) + sum(map(ord, "".join(args.loras_only))) * (
        args.stage == "loras")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    os.makedirs(args.out, exist_ok=True)
    log = {"seed": seed, "stage": args.stage, "arch": args.arch, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    if args.stage == "detector":
        net, accuracy = detector_lib.train_detector(args.detector_steps, gen, device)
        save_file({k: v.half().cpu().contiguous() for k, v in net.state_dict().items()},
                  os.path.join(args.out, "detector.safetensors"))
        log["detector_accuracy"] = accuracy
        write_log(args.out, "detector", log)
        return
    if args.stage == "base":
        if args.resume:
            patcher, clip = objectives.load(args.arch, args.resume, device)
            log["resumed_from"] = args.resume
        else:
            patcher, clip = objectives.build(args.arch, device)
        if args.profile:
            profile_base(args.arch, patcher, clip, args.profile, args.batch, gen, device)
            if args.compile:
                profile_base(args.arch, patcher, clip, args.profile, args.batch, gen, device, compile=True)
            return
        train_base(args.arch, patcher, clip, args.base_steps, args.batch, args.base_seconds, gen, device, log,
                   args.base_lr, args.compile)
        objectives.save_base(args.arch, patcher, clip, args.out)
        write_log(args.out, f"{args.arch}_base", log)
        return
    if not args.resume:
        parser.error("--stage loras trains on the base in --resume: give --resume")
    patcher, clip = objectives.load(args.arch, args.resume, device)
    patcher.model.diffusion_model.to(device)
    clip.cond_stage_model.to(device)
    out = os.path.join(objectives.folder(args.arch, args.out), "loras")
    os.makedirs(out, exist_ok=True)
    for category in args.loras_only:
        state = train_lora(args.arch, patcher, clip, category, args.lora_steps, args.lora_batch, args.rank,
                           gen, device, log, args.lora_seconds, args.lora_lr)
        save_file(state, os.path.join(out, objectives.lora_file(args.arch, category)))
    write_log(args.out, f"{args.arch}_loras_{'_'.join(args.loras_only)}", log)


if __name__ == "__main__":
    main()
