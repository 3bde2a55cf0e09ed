"""The client side of a round, shared by every engine: one client's local update and one client's evaluation.

:class:`ClientRuntime` holds what all clients of a run share read-only (the frozen CLIP and prompt encoder, the
method, the loop's settings, the gate factory, the DP noise level); the state it works on is the client's own.
The in-process engine calls it for each sampled client, a Flower node for its one client.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base.tracing import timed
from ..config import GLOBAL_SCORED_SPLITS
from ..federated import wire as comm
from ..federated.client import Client, Objective, TrainSettings, accuracy
from ..federated.privacy import run_noise_multiplier
from ..gates import create_gate
from ..methods import ClientContext, EvalState, GlobalState, Method, Payload, Upload
from ..model.precision import autocast
from ..ops import REFERENCE, OpTable
from .lockstep import train_together

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from .world import World


class ClientRuntime:
    """Runs clients' local updates and evaluations for one run (the engines' shared client half)."""

    def __init__(self, cfg: Config, world: World, method: Method, ops: OpTable = REFERENCE):
        self.cfg = cfg
        self.world = world
        self.method = method
        self.ops = ops
        self.clip = world.clip
        self.encoder = world.encoder
        self.device = world.device
        self.settings = TrainSettings.from_config(cfg, self.device)
        # what the methods see of this run (not the runtime itself)
        self.context = ClientContext(self.encoder, self.clip.gamma, self.device, self.make_gate)
        self.dp_noise_multiplier = run_noise_multiplier(cfg)
        # the target protocols also score the federation's global model (Method.global_scorer) on every shared set,
        # once per global state: (its version, its prompt) and the accuracies by column name ("global@<set>")
        self.scores_global = cfg.eval_split in GLOBAL_SCORED_SPLITS
        self._global: tuple[int, torch.Tensor, dict[str, float]] | None = None

    def eval_needs_global(self, client: Client) -> bool:
        """:meth:`Method.eval_needs_global`, and always under a protocol that scores the global model: then every
        evaluation reports the round's global accuracies (the same on every client)."""
        return self.scores_global or self.method.eval_needs_global(client)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The run's ``--precision`` autocast on its device, for forward passes (nothing at fp32)."""
        return autocast(self.cfg.precision, self.device)

    def make_gate(self) -> nn.Module:
        """A fresh gate of the run's kind, with the run's fused ops (clients call it under their own seed)."""
        return create_gate(self.cfg, self.ops)

    def local_update(
        self, client: Client, payload: Payload, state: GlobalState, phases: dict[str, float] | None = None
    ) -> Upload | None:
        """One sampled client's work after its download (``payload`` in float32): build the method's objective
        (pFedMoAP encodes its K frozen experts here, once), train, keep the new local state, and return the
        upload as it goes on the wire (DP noise added when on), or None when the method uploads nothing."""
        return self.local_updates([(client, payload)], state, phases)[0]

    def local_updates(
        self,
        jobs: Sequence[tuple[Client, Payload]],
        state: GlobalState,
        phases: dict[str, float] | None = None,
        together: int = 1,
    ) -> list[Upload | None]:
        """:meth:`local_update` for several clients of one round, in order; up to ``together`` of them (0: all)
        train in lock step, sharing each step's text-encoder pass (:mod:`pfedmoap.engine.lockstep`)."""
        phases = phases if phases is not None else defaultdict(float)
        size = len(jobs) if together <= 0 else together
        uploads: list[Upload | None] = []
        for start in range(0, len(jobs), max(1, size)):
            chunk = jobs[start : start + max(1, size)]
            with timed(phases, "prepare"), self.autocast():  # pFedMoAP encodes its experts here
                objectives = [self.method.objective(self.context, state, client, payload) for client, payload in chunk]
            with timed(phases, "train"):
                batchable = [o.batchable and o.encoder is self.encoder for o in objectives]
                if len(chunk) > 1 and all(batchable):
                    train_together([c for c, _ in chunk], objectives, self.settings, self.clip)
                else:
                    for (client, _), objective in zip(chunk, objectives, strict=True):
                        client.train(objective, self.settings, self.clip)
            uploads += [self._finish(c, p, o) for (c, p), o in zip(chunk, objectives, strict=True)]
        return uploads

    def _finish(self, client: Client, payload: Payload, objective: Objective) -> Upload | None:
        """After training: keep the client's new local state, return its upload as it goes on the wire."""
        cfg, method = self.cfg, self.method
        prompt = getattr(objective, "prompt", None)  # None: a method that trains no prompt (pFedMMA)
        client.prompt = None if prompt is None else prompt.detach().cpu()
        client.private = {**client.private, **{k: v.detach().cpu() for k, v in objective.private_state().items()}}
        client.expert_ids = list(payload.expert_ids)
        client.expert_prompts = payload.expert_prompts
        text = objective.expert_text
        client.expert_text = None if text is None else (client.version, text)
        upload = method.upload(client, objective)
        if upload is None:
            return None
        if self.dp_noise_multiplier is not None and upload.prompt is not None:
            from ..federated.privacy import privatize_update

            start = payload.global_prompt.to(upload.prompt.device)
            noisy = privatize_update(upload.prompt - start, cfg.dp_clip, self.dp_noise_multiplier, client.generator)
            upload.prompt = start + noisy  # the client keeps its clean prompt; only the upload is noised
        return upload.map(lambda t: comm.to_wire(t, cfg.comm_dtype))

    @torch.no_grad()
    def evaluate_client(
        self, client: Client, state: GlobalState, shared_text: dict[tuple, torch.Tensor] | None = None
    ) -> float:
        """Accuracy (%) of one client with the state its method evaluates it with, on its own test split; with
        an ``--eval-split`` also on its shared sets, and the global model on them (``client.split_acc``). An unchanged
        state keeps its accuracies (exact: same state, same data). ``shared_text`` shares text features between
        clients evaluated with the same prompt (e.g. every never-trained client with P_g), and holds those
        :meth:`prefetch_text` encoded for all clients at once."""
        shared_text = {} if shared_text is None else shared_text
        view = self.method.eval_state(state, client)
        if client.eval_key == view.key and client.accuracy is not None:
            acc = client.accuracy
        else:
            with self.autocast():
                acc = self._evaluate(client, view, shared_text)
        if self.scores_global:  # a kept evaluation still reports this round's global model
            client.split_acc = {**client.split_acc, **self.global_accuracies(state, shared_text)}
        return acc

    def global_accuracies(self, state: GlobalState, shared_text: dict[tuple, torch.Tensor]) -> dict[str, float]:
        """The global model's accuracy on each shared evaluation set, by column name ``global@<set>`` (computed once
        per global state; {} for a method without one, :meth:`Method.global_scorer`)."""
        prompt = state.global_prompt.detach().float().cpu()
        kept = self._global
        if kept is not None and kept[0] == state.global_version and torch.equal(kept[1], prompt):
            return kept[2]
        out: dict[str, float] = {}
        with self.autocast():
            for es in self.world.eval_sets():
                text = self._text_source(None, es.name, shared_text)
                scorer = self.method.global_scorer(self.context, state, text)
                if scorer is None:
                    break
                out[f"global@{es.name}"] = accuracy(scorer, es.features, es.labels, self.cfg.eval_batch_size)[0]
        self._global = (state.global_version, prompt, out)
        return out

    def _evaluate(self, client: Client, view: EvalState, shared_text: dict[tuple, torch.Tensor]) -> float:
        method, batch = self.method, self.cfg.eval_batch_size
        scorer = method.scorer(self.context, client, view, self.encoder, self._text_source(client, "own", shared_text))
        acc = client.evaluate_with(scorer, batch, weights=view.use_gate)
        split_acc = {}
        for es in self.world.eval_sets():
            same = es.encoder is self.encoder  # base classes: the client's own label space
            score = (
                scorer
                if same
                else method.scorer(
                    self.context, client, view, es.encoder, self._text_source(client, es.name, shared_text)
                )
            )
            split_acc[es.name] = accuracy(score, es.features, es.labels, batch)[0]
        client.split_acc = split_acc
        client.eval_key, client.accuracy = view.key, acc
        return acc

    @torch.no_grad()
    def prefetch_text(
        self, clients: Sequence[Client], state: GlobalState, shared_text: dict[tuple, torch.Tensor]
    ) -> int:
        """Encode the text features the evaluation of ``clients`` will ask for, all of them in one text-encoder
        pass per class set (chunked to :data:`EVAL_TEXT_ROWS` class sequences), into ``shared_text``; the
        evaluations then find them there. Each method's scorer is asked what it needs with placeholders on the
        meta device (no compute). Returns the number of encoder passes."""
        spaces: dict[str, tuple[PromptEncoder, dict[tuple, torch.Tensor]]] = {"own": (self.encoder, {})}
        for es in self.world.eval_sets():
            if es.encoder is not self.encoder:
                spaces[es.name] = (es.encoder, {})
        for client in clients:
            view = self.method.eval_state(state, client)
            if client.eval_key == view.key and client.accuracy is not None:
                continue  # kept: evaluate_client will not encode
            for space, (encoder, wanted) in spaces.items():
                self.method.scorer(
                    self.context, client, view, encoder, self._text_source(client, space, shared_text, wanted)
                )
        passes = 0
        with self.autocast():
            for encoder, wanted in spaces.values():
                passes += self._encode_all(encoder, wanted, shared_text)
        return passes

    def _encode_all(
        self, encoder: PromptEncoder, wanted: dict[tuple, torch.Tensor], shared_text: dict[tuple, torch.Tensor]
    ) -> int:
        """Encode ``wanted`` (key -> prompts over ``encoder``'s classes) in as few passes as fit; returns the count."""
        chunks = _row_chunks(list(wanted.items()), encoder.num_classes, EVAL_TEXT_ROWS)
        for chunk in chunks:
            stacks = [p if p.dim() == 3 else p[None] for _, p in chunk]
            feats = encoder.encode(torch.cat([s.to(self.device, torch.float32) for s in stacks]))
            for (key, prompts), part in zip(chunk, feats.split([s.shape[0] for s in stacks]), strict=True):
                shared_text[key] = part if prompts.dim() == 3 else part[0]
        return len(chunks)

    def _text_source(
        self,
        client: Client | None,
        space: str,
        shared_text: dict[tuple, torch.Tensor],
        wanted: dict[tuple, torch.Tensor] | None = None,
    ) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
        """A scorer's ``text(key, prompts)`` for ``client`` (None: no client's, the global model's) over one class set
        (``space``: "own" or an evaluation set's name): the expert features this round's update encoded, else
        ``shared_text``, else encoded now; with
        ``wanted``, a request is recorded there instead and answered with a placeholder on the meta device."""
        encoder = self.encoder
        if space != "own":
            encoder = next(es.encoder for es in self.world.eval_sets() if es.name == space)

        def text(key: tuple, prompts: torch.Tensor) -> torch.Tensor:
            if client is not None and space == "own" and key[:1] == ("experts",):
                cached = client.expert_text  # encoded by this round's update already
                if cached is not None and cached[0] == client.version:
                    return cached[1]
            full = (space, *key)
            if full not in shared_text:
                if wanted is not None:
                    wanted.setdefault(full, prompts)
                    shape = (*prompts.shape[:-2], encoder.num_classes, self.clip.embed_dim)
                    return torch.empty(shape, device="meta")
                shared_text[full] = encoder.encode(prompts)
            return shared_text[full]

        return text


EVAL_TEXT_ROWS = 8192
"""At most this many class sequences (prompts x classes) per text-encoder pass of :meth:`ClientRuntime.prefetch_text`
(with RN50's 77-token, 512-wide text tower, about 1.3 GB of activations per layer in float32)."""


def _row_chunks(
    items: list[tuple[tuple, torch.Tensor]], classes: int, limit: int
) -> list[list[tuple[tuple, torch.Tensor]]]:
    """Consecutive groups of requests whose prompts x classes stay within ``limit`` (a larger request alone)."""
    chunks: list[list[tuple[tuple, torch.Tensor]]] = []
    rows = 0
    for item in items:
        n = (item[1].shape[0] if item[1].dim() == 3 else 1) * classes
        if not chunks or rows + n > limit:
            chunks.append([])
            rows = 0
        chunks[-1].append(item)
        rows += n
    return chunks
