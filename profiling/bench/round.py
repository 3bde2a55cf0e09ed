"""Section ``round``: one client round at paper shapes, the reference-style pipeline vs ours (reference and fused)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from pfedmoap import ops
from pfedmoap.federated.client import Client, ClientData, TrainSettings
from pfedmoap.federated.prompt import PromptEncoder, init_prompt
from pfedmoap.federated.selection import KnnSelection
from pfedmoap.federated.server import Server
from pfedmoap.gates import AttentionGate, mixture_scorer, pfedmoap_logits
from pfedmoap.methods.pfedmoap import MixtureObjective
from pfedmoap.model.clip import FrozenCLIP
from pfedmoap.ops import OpTable

from .harness import Sizes, backend_label, bench_ops, class_names, fused_differs, measure, sync
from .refstyle import RefStyleClient

ROUND_OPS = ("gate_score", "knn", "assemble_prompts")


def bench_round(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    for n_cls in sizes.classes:
        rows.extend(_round_one(sizes, args, clip, n_cls))
    return rows


def _round_one(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP, n_cls: int) -> list[dict]:
    device = clip.device
    d, k, bsz = sizes.d_gate, sizes.experts, sizes.batch
    names = class_names(n_cls)
    owned = max(1, round(n_cls / sizes.clients))
    n_train = owned * sizes.shots
    steps = sizes.epochs * math.ceil(n_train / bsz)
    g = torch.Generator().manual_seed(1000 + n_cls)
    settings = TrainSettings(epochs=1, batch_size=bsz, momentum=0.9, weight_decay=5e-4)
    lr_prompt, lr_gate, lam = 0.002, 0.01, 0.5
    start = init_prompt(16, clip.width, 0.02, g)
    true_ctx = init_prompt(16, clip.width, 0.02, g)
    experts = torch.stack([true_ctx + init_prompt(16, clip.width, 0.01, g) for _ in range(k)])

    # one timing batch of B random images: the reference style encodes it every step, ours caches its features
    images = torch.randn(bsz, 3, clip.image_size, clip.image_size, generator=g).to(device)
    labels = torch.randint(0, owned, (bsz,), generator=g).to(device)
    eval_images = torch.randn(sizes.eval_batch, 3, clip.image_size, clip.image_size, generator=g).to(device)
    feats = clip.encode_images(images)
    eval_feats = clip.encode_images(eval_images)

    def make_gate(table: OpTable) -> AttentionGate:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            return AttentionGate(d, sizes.heads, 10.0, ops=table).to(device)

    class Column:
        """Ours with one op table, as a run holds it: its encoder, server (KNN) and gate use the table's ops."""

        def __init__(self, table: OpTable):
            self.table = table
            self.encoder = PromptEncoder(clip, names, 16, mode="shared-prefix", assemble=table.assemble_prompts)
            # the server side of selection: a pool of K + 1 clients, this client (0) included
            self.server = Server(
                k + 1, start, [n_train] * (k + 1), 1.0, seed=0, selection=KnnSelection(), knn=table.knn
            )
            self.server.receive(0, start)
            for j in range(k):
                self.server.receive(j + 1, experts[j])
            self.view = self.server.snapshot()
            data = ClientData(
                train_labels=labels.cpu(),
                test_labels=labels[:1].repeat(sizes.eval_batch).cpu(),
                test_features=eval_feats,
                train_features=feats,
            )
            self.client = Client(0, data, seed=4321)
            self.gate = make_gate(table)
            self.expert_text = self.experts()

        def experts(self) -> torch.Tensor:
            with torch.no_grad():
                return self.encoder.encode(experts)

        def step(self) -> None:
            # one local update over one batch: a fresh prompt from the start, the gate trained on (as a round does)
            objective = MixtureObjective(self.encoder, start, lr_prompt, self.gate, self.expert_text, lam, lr_gate)
            self.client.train(objective, settings, clip)

        def select(self) -> list[int]:
            return self.server.select_experts(0, self.view, k)

        def eval(self) -> float:
            with torch.no_grad():
                local = self.encoder.encode(start)
            return self.client.evaluate_with(
                mixture_scorer(local, self.expert_text, self.gate, clip.gamma, lam), weights=self.gate is not None
            )

    reference_column = Column(bench_ops(False))
    expert_text = {"t": reference_column.expert_text}
    encoder = reference_column.encoder

    ref = RefStyleClient(clip, names, 16, d, sizes.heads)
    ref.gate.load_state_dict(make_gate(reference_column.table).state_dict())
    ref.load_prompt(start)
    # its own 77-token pass for one expert (the timed variant runs one pass per repeat; a round costs K of them)
    first_expert = ref.encode_expert(experts[0])
    expert_diff = float((first_expert - expert_text["t"][0]).abs().max())
    ref.expert_text = [first_expert, *expert_text["t"][1:]]
    counter = {"i": 0}

    def ref_expert_pass() -> torch.Tensor:
        counter["i"] += 1
        return ref.encode_expert(experts[counter["i"] % k])

    def ref_step() -> float:
        return ref.step(images, labels)

    def ref_eval() -> torch.Tensor:
        return ref.eval_logits(eval_images)

    # same arithmetic: logits of both pipelines for the same weights and images, before any update
    with torch.no_grad():
        ours_logits, _ = pfedmoap_logits(
            feats, encoder.encode(start), expert_text["t"], reference_column.gate, clip.gamma, lam
        )
        ref_logits = ref.logits(images)
    logit_diff = float((ours_logits - ref_logits).abs().max())
    logit_scale = float(ours_logits.abs().max())

    variants: dict[str, Callable[[], Any]] = {
        "refstyle.step": ref_step,
        "refstyle.expert_pass": ref_expert_pass,
        "refstyle.eval": ref_eval,
        "image_batch": lambda: clip.encode_images(images),
    }
    if sizes.eval_batch != bsz:
        variants["image_eval_batch"] = lambda: clip.encode_images(eval_images)
    columns = [("reference", False)]
    if fused_differs(ROUND_OPS):
        columns.append(("fused", True))
    tables = {label: bench_ops(fused) for label, fused in columns}
    for label, _ in columns:
        col = reference_column if label == "reference" else Column(tables[label])
        variants[f"ours[{label}].step"] = col.step
        variants[f"ours[{label}].experts"] = col.experts
        variants[f"ours[{label}].select"] = col.select
        variants[f"ours[{label}].eval"] = col.eval
    print(f"  round {clip.model_name} C={n_cls}: {steps} steps; timing {len(variants)} variants", file=sys.stderr)
    stats = measure(variants, sizes.repeats, device)
    sec = {name: st["seconds"] for name, st in stats.items()}
    sec.setdefault("image_eval_batch", sec["image_batch"])
    mem = {name: st.get("peak_mib") for name, st in stats.items()}

    # full rounds of ours, one per backend column, same seed: the trained outcome must agree
    outcomes = {}
    if sizes.accuracy_round:
        outcomes = _accuracy_rounds(
            sizes, clip, names, n_cls, owned, start, true_ctx, experts, settings, tables, make_gate
        )

    ref_round = k * sec["refstyle.expert_pass"] + steps * sec["refstyle.step"]
    cache_once = math.ceil(n_train / bsz) * sec["image_batch"]
    common = {
        "model": clip.model_name,
        "classes": n_cls,
        "client_classes": owned,
        "train_images": n_train,
        "steps": steps,
        "experts": k,
        "batch": bsz,
        "prompt_tokens_refstyle": ref.prompts.length,
        "prompt_tokens_ours": encoder.length,
        "logit_max_abs_diff_refstyle_vs_ours": logit_diff,
        "logit_max_abs": logit_scale,
        "expert_feature_max_abs_diff_refstyle_vs_ours": expert_diff,
    }
    rows = [
        {
            **common,
            "variant": "reference-style",
            "backends": "n/a (profiling/bench/refstyle.py, eager torch)",
            "step_s": sec["refstyle.step"],
            "experts_s": k * sec["refstyle.expert_pass"],
            "round_s": ref_round,
            "speedup": 1.0,
            "train_img_s": steps * bsz / ref_round,
            "eval_img_s": sizes.eval_batch / sec["refstyle.eval"],
            "step_peak_mib": mem["refstyle.step"],
        }
    ]
    for label, fused in columns:
        used = backend_label(tables[label], ROUND_OPS)
        p = f"ours[{label}]"
        one_time = sec[f"{p}.select"] + sec[f"{p}.experts"]
        round_s = one_time + steps * sec[f"{p}.step"]
        row = {
            **common,
            "variant": "ours --fused" if fused else "ours (reference ops)",
            "backends": used,
            "step_s": sec[f"{p}.step"],
            "experts_s": sec[f"{p}.experts"],
            "select_s": sec[f"{p}.select"],
            "round_s": round_s,
            "speedup": ref_round / round_s,
            "feature_cache_once_s": cache_once,
            "speedup_incl_feature_cache": ref_round / (round_s + cache_once),
            "train_img_s": steps * bsz / round_s,
            "eval_img_s": sizes.eval_batch / sec[f"{p}.eval"],
            "eval_img_s_incl_image_encoder": sizes.eval_batch / (sec[f"{p}.eval"] + sec["image_eval_batch"]),
            "step_peak_mib": mem[f"{p}.step"],
        }
        if label in outcomes:
            row.update(outcomes[label])
            measured_steps = outcomes[label]["round_measured_epochs"] * math.ceil(n_train / bsz)
            row["round_composed_for_measured_s"] = one_time + measured_steps * sec[f"{p}.step"]
        rows.append(row)
    if len(columns) == 1:
        reasons = ops.unavailable_backends()
        fused_row = dict(rows[-1])
        fused_row["variant"] = "ours --fused"
        label = backend_label(bench_ops(True), ROUND_OPS)
        fused_row["backends"] = label + " (no fused backend runs here: same as above)"
        fused_row["fused_unavailable"] = reasons
        rows.append(fused_row)
    if "reference" in outcomes and "fused" in outcomes:
        ref_prompt, fused_prompt = outcomes["reference"]["_prompt"], outcomes["fused"]["_prompt"]
        rows[-1]["prompt_max_abs_diff_vs_reference"] = float((ref_prompt - fused_prompt).abs().max())
    for r in rows:
        r.pop("_prompt", None)
    for r in rows:
        print(
            f"    {r['variant']:<22} step {r['step_s'] * 1e3:9.1f} ms  round {r['round_s']:8.2f} s  "
            f"x{r['speedup']:.1f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _accuracy_rounds(sizes, clip, names, n_cls, owned, start, true_ctx, experts, settings, tables, make_gate) -> dict:
    """One full local round of ours per op table, same seed, on class-structured features.

    The image features of class c are the text features of class c under a hidden context, plus noise: the
    prompt has something to learn, so the accuracy means something, and both columns must end the same.
    """
    g = torch.Generator().manual_seed(77 + n_cls)
    probe = PromptEncoder(clip, names, 16, mode="shared-prefix")
    with torch.no_grad():
        centres = probe.encode(true_ctx)  # [C, D]
    n_train, n_test = owned * sizes.shots, owned * sizes.shots

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % owned
        noise = torch.randn(n, centres.shape[1], generator=g).to(clip.device) / math.sqrt(centres.shape[1])
        return F.normalize(centres[y.to(clip.device)] + 0.5 * noise, dim=-1), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    epochs = sizes.accuracy_epochs or sizes.epochs
    full = replace(settings, epochs=epochs)
    out = {}
    for label, table in tables.items():
        encoder = PromptEncoder(clip, names, 16, mode="shared-prefix", assemble=table.assemble_prompts)
        data = ClientData(train_labels=train_y, test_labels=test_y, test_features=test_x, train_features=train_x)
        client = Client(0, data, seed=4321)
        gate = make_gate(table)
        t0 = time.perf_counter()
        with torch.no_grad():
            expert_text = encoder.encode(experts)
        objective = MixtureObjective(encoder, start, 0.002, gate, expert_text, 0.5, 0.01)
        client.train(objective, full, clip)
        sync(clip.device)
        seconds = time.perf_counter() - t0
        prompt = objective.prompt.detach()
        with torch.no_grad():
            local = encoder.encode(prompt)
            acc = client.evaluate_with(mixture_scorer(local, expert_text, gate, clip.gamma, 0.5), weights=True)
            start_text = encoder.encode(start)
            start_acc = Client(0, data, seed=4321).evaluate_with(
                mixture_scorer(start_text, None, None, clip.gamma, 0.5)
            )
        out[label] = {
            "round_measured_s": seconds,
            "round_measured_epochs": epochs,
            "final_acc": acc,
            "start_acc": start_acc,
            "_prompt": prompt.cpu(),
        }
    return out
