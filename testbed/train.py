"""Train the composition testbed (issue 9): base text-to-image model, five concept LoRAs, the detector.

    python testbed/train.py --out DIR            # on the GPU machine (≈ 6 min on an H200)
    python testbed/train.py --out DIR --smoke    # a few steps on the CPU, to check the plumbing

Everything is seeded (data generator, init, dropout), so a run is reproducible up to GPU kernel
non-determinism. Outputs in DIR: unet.safetensors, clip.safetensors (fp16, the EMA weights), one kohya
LoRA per category in loras/ (``--rank``, alpha = rank; the committed ones: 16), diffusers-style
``lora_unet_down_blocks_…`` keys, UNet only,
detector.safetensors and train_log.json (losses, steps, seconds, detector accuracy on held-out renders).

Objective (DDPM, Ho et al. 2020, in ComfyUI's EPS parameterisation): t ~ U{0..999}, σ = sigmas[t],
x_t = x_0 + σ·ε, the UNet sees x_t / √(σ²+1) and timestep t and predicts ε; loss ‖ε̂ − ε‖². Captions are
dropped (empty prompt) 10 % of the time so classifier-free guidance works.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from boot import boot_comfy  # noqa: E402

boot_comfy()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.utils  # noqa: E402
import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import world  # noqa: E402

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


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
    scenes = world.random_scenes(size, gen, concepts)
    keep = (torch.rand(size, generator=gen) >= drop).tolist()
    texts = [world.caption(scenes, i) if keep[i] else "" for i in range(size)]
    return world.render(scenes, gen, device=device), texts


def eps_loss(unet, sigmas, x0, context, gen, device):
    t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = sigmas[t].view(-1, 1, 1, 1)
    x_in = (x0 + sigma * noise) / torch.sqrt(sigma ** 2 + 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = unet(x_in, timesteps=t.float(), context=context)
    return F.mse_loss(pred.float(), noise)


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
    return float(torch.stack(losses[-100:]).mean())


def train_base(patcher, clip, steps, batch_size, seconds, gen, device, log, peak_lr=3e-4):
    unet = patcher.model.diffusion_model.to(device)
    text = clip.cond_stage_model.to(device)
    sigmas = patcher.model.model_sampling.sigmas.to(device)
    captions = Captions(clip)
    params = [p for p in unet.parameters()] + [p for n, p in text.named_parameters() if "token_embedding" not in n]
    for n, p in text.named_parameters():
        p.requires_grad_("token_embedding" not in n)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        progress = progress_of(step, steps, time.perf_counter() - start, seconds)
        if progress >= 1:
            print(f"base: time budget reached at step {step}", flush=True)
            break
        images, texts = batch(gen, batch_size, device)
        context = comfy_model.encode_ids(clip, captions.rows(texts)).to(device)
        loss = eps_loss(unet, sigmas, world.to_latent(images.to(device)), context, gen, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, peak_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.detach())
        if step % 250 == 0:
            print(f"base {step}/{steps} loss {mean_loss(losses):.4f} {time.perf_counter() - start:.0f}s", flush=True)
    else:
        step = steps
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    log["base"] = {"steps": step, "batch": batch_size, "seconds": round(time.perf_counter() - start, 1),
                   "loss_last_100": round(mean_loss(losses), 4)}


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


def lora_targets(unet):
    return {name: m for name, m in unet.named_modules()
            if any(name.endswith(t) for t in LORA_TARGETS) and hasattr(m, "weight")}


def train_lora(patcher, clip, category, steps, batch_size, rank, gen, device, log, seconds=float("inf")):
    unet = patcher.model.diffusion_model
    sigmas = patcher.model.model_sampling.sigmas.to(device)
    captions = Captions(clip)
    for p in list(unet.parameters()) + list(clip.cond_stage_model.parameters()):
        p.requires_grad_(False)
    layers, handles = {}, []
    for name, module in lora_targets(unet).items():
        layers[name] = LoraLayer(module, rank, gen).to(device)
        handles.append(module.register_forward_hook(layers[name].hook))
    params = [p for layer in layers.values() for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    try:
        for step in range(steps):
            progress = progress_of(step, steps, time.perf_counter() - start, seconds)
            if progress >= 1:
                print(f"lora {category}: time budget reached at step {step}", flush=True)
                break
            images, texts = batch(gen, batch_size, device, (category,))
            with torch.no_grad():
                context = comfy_model.encode_ids(clip, captions.rows(texts)).to(device)
            loss = eps_loss(unet, sigmas, world.to_latent(images.to(device)), context, gen, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress, 1e-3, warmup=50)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if step % 100 == 0:
                print(f"lora {category} {step}/{steps} loss {mean_loss(losses):.4f} {time.perf_counter() - start:.0f}s",
                      flush=True)
        else:
            step = steps
    finally:
        for h in handles:
            h.remove()
    log[f"lora_{category}"] = {"steps": step, "rank": rank, "seconds": round(time.perf_counter() - start, 1),
                               "loss_last_100": round(mean_loss(losses), 4)}
    print(f"lora {category}: {log[f'lora_{category}']}", flush=True)
    return kohya_state(patcher, layers, rank)


def kohya_state(patcher, layers, rank) -> dict:
    """kohya keys (diffusers block names, ``lora_unet_…``) for the trained factors, fp16, alpha = rank."""
    ldm_to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config).items()}
    state = {}
    for name, layer in layers.items():
        key = ldm_to_diffusers[f"{name}.weight"][:-len(".weight")].replace(".", "_")
        extra = (1, 1) if layer.conv else ()
        state[f"lora_unet_{key}.lora_down.weight"] = layer.down.detach().reshape(layer.down.shape + extra).half().cpu()
        state[f"lora_unet_{key}.lora_up.weight"] = layer.up.detach().reshape(layer.up.shape + extra).half().cpu()
        state[f"lora_unet_{key}.alpha"] = torch.tensor(float(rank))
    return state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=6000)
    parser.add_argument("--base-seconds", type=float, default=300)
    parser.add_argument("--lora-steps", type=int, default=600)
    parser.add_argument("--lora-seconds", type=float, default=float("inf"), help="time budget of each LoRA")
    parser.add_argument("--detector-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resume", help="folder with unet/clip.safetensors to continue training from")
    parser.add_argument("--base-lr", type=float, default=3e-4)
    parser.add_argument("--loras-only", nargs="+", metavar="CATEGORY",
                        help="only (re)train these LoRAs on the base in --resume")
    parser.add_argument("--no-detector", action="store_true", help="keep the detector of --resume")
    parser.add_argument("--no-loras", action="store_true", help="train the base only")
    parser.add_argument("--smoke", action="store_true", help="tiny run on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.base_steps, args.lora_steps, args.detector_steps, args.batch = 3, 2, 20, 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(os.path.join(args.out, "loras"), exist_ok=True)
    log = {"seed": args.seed, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    if args.loras_only:
        patcher, clip = comfy_model.load_testbed(args.resume, device=device)
        patcher.model.diffusion_model.to(device)
        clip.cond_stage_model.to(device)
        for category in args.loras_only:
            state = train_lora(patcher, clip, category, args.lora_steps, args.batch // 2, args.rank, gen, device, log,
                               args.lora_seconds)
            save_file(state, os.path.join(args.out, "loras", f"testbed_{category}.safetensors"))
        with open(os.path.join(args.out, f"train_log_loras_{'_'.join(args.loras_only)}.json"), "w") as f:
            json.dump(log, f, indent=2)
        print(json.dumps(log), flush=True)
        return
    if args.no_detector:
        if not args.resume:
            parser.error("--no-detector keeps the detector of --resume: give --resume")
        shutil.copyfile(os.path.join(args.resume, "detector.safetensors"), os.path.join(args.out, "detector.safetensors"))
    else:
        net, accuracy = detector_lib.train_detector(args.detector_steps, gen, device)
        save_file({k: v.half().cpu().contiguous() for k, v in net.state_dict().items()},
                  os.path.join(args.out, "detector.safetensors"))
        log["detector_accuracy"] = accuracy
        print(json.dumps(accuracy), flush=True)
    if args.resume:
        patcher, clip = comfy_model.load_testbed(args.resume, device=device)
        log["resumed_from"] = args.resume
    else:
        clip = comfy_model.build_clip(device=device)
        patcher = comfy_model.build_unet(device=device)
    train_base(patcher, clip, args.base_steps, args.batch, args.base_seconds, gen, device, log, args.base_lr)
    unet_state = {f"diffusion_model.{k}": v.detach().half().cpu().contiguous()
                  for k, v in patcher.model.diffusion_model.state_dict().items()}
    save_file(unet_state, os.path.join(args.out, "unet.safetensors"))
    save_file(comfy_model.trained_clip_state(clip), os.path.join(args.out, "clip.safetensors"))
    # LoRAs are trained on the fp16-rounded base the users will load.
    patcher.model.diffusion_model.load_state_dict({k[len("diffusion_model."):]: v.float() for k, v in unet_state.items()})
    for category in () if args.no_loras else world.CATEGORIES:
        state = train_lora(patcher, clip, category, args.lora_steps, args.batch // 2, args.rank, gen, device, log,
                           args.lora_seconds)
        save_file(state, os.path.join(args.out, "loras", f"testbed_{category}.safetensors"))
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
