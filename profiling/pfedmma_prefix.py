"""pFedMMA's training step two ways, side by side in one run: on cached token states (the frozen blocks below the
first adapted one run once per image, :mod:`pfedmoap.model.towers`) against running the whole towers per step (the
published code: every step embeds the images and runs the frozen lower blocks again, and the text tower's too).

    python profiling/pfedmma_prefix.py [--models pfedmoap-tiny-vit,ViT-B-16] [--batch 32] [--classes 40]
                                       [--steps 10] [--repeats 3] [--threads N] [--device cpu|cuda]

Each variant runs ``--steps`` SGD steps (forward, backward, update) of the same adapters on the same batch; the
variants alternate ``--repeats`` times and the median is reported, as steps per second. Random weights (the cost
does not depend on them); the first step's losses of the two variants are compared (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pfedmoap.methods.pfedmma import MultiModalAdapters
from pfedmoap.model import towers
from pfedmoap.model.clip import load_clip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    clip = load_clip(model, "none", device, progress=False)
    text_depth, image_depth = len(towers.text_blocks(clip)), len(towers.vision_blocks(clip))
    n = -(-2 * min(text_depth, image_depth) // 3)  # pFedMMA's two thirds
    t_start, i_start = text_depth - n, image_depth - n
    width = int(clip.model.visual.class_embedding.shape[-1])
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, clip.image_size, clip.image_size, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    sentences = [f"a photo of a class number {c}." for c in range(args.classes)]
    cached_images = towers.vision_states(clip, images, i_start)  # once, as the feature cache does
    cached_text, eot = towers.text_states(clip, sentences, t_start)

    def make():
        torch.manual_seed(0)
        adapters = MultiModalAdapters(n, clip.width, width, 32, 0.001).to(device)
        return adapters, torch.optim.SGD(adapters.parameters(), lr=0.001, momentum=0.9)

    def step(adapters, opt, image_states, text_states, text_eot):
        text = towers.text_from_states(clip, text_states, text_eot, t_start, adapters.adapters("text"))
        image = towers.vision_from_states(clip, image_states, i_start, adapters.adapters("image"))
        loss = F.cross_entropy(clip.gamma * image @ text.t(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def cached():
        adapters, opt = make()
        return [step(adapters, opt, cached_images, cached_text, eot) for _ in range(args.steps)]

    def whole():
        adapters, opt = make()
        losses = []
        for _ in range(args.steps):
            image_states = towers.vision_states(clip, images, i_start)  # the frozen lower blocks, again
            text_states, text_eot = towers.text_states(clip, sentences, t_start)
            losses.append(step(adapters, opt, image_states, text_states, text_eot))
        return losses

    variants = {"cached states": cached, "whole towers": whole}
    first = {name: fn() for name, fn in variants.items()}  # warm-up, and the losses to compare
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    rate = {name: args.steps / statistics.median(s) for name, s in samples.items()}
    diff = max(abs(a - b) for a, b in zip(first["cached states"], first["whole towers"], strict=True))
    return {
        "model": model,
        "blocks": f"{i_start + 1}-{image_depth} of {image_depth} / {t_start + 1}-{text_depth} of {text_depth}",
        "cached": rate["cached states"],
        "whole": rate["whole towers"],
        "diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="pfedmoap-tiny-vit,ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} | {args.device} | {torch.get_num_threads()} threads | batch {args.batch} | "
        f"{args.classes} classes | {args.steps} steps x {args.repeats} repeats (median)\n"
    )
    print("| model | adapted blocks (image / text) | cached states, steps/s | whole towers, steps/s | speed-up "
          "| max Δloss over the steps |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        r = bench(model, args)
        print(
            f"| {r['model']} | {r['blocks']} | {r['cached']:.3g} | {r['whole']:.3g} | {r['cached'] / r['whole']:.2f}x "
            f"| {r['diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
