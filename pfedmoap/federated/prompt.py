"""CoOp prompts: learnable context vectors spliced into every class's token sequence.

Class c's sequence is ``[SOS] ctx_1..ctx_n <tokens of "classname."> [EOS] pad...`` (class token at the
end, SPEC §1). The prefix (SOS) and suffix (class tokens, '.', EOS, padding) embeddings are frozen buffers
computed once; a prompt is just the ``[n_ctx, W]`` context tensor, so the same encoder serves the local
prompt (with grad), the K frozen experts (no grad) and the global prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..base.errors import ConfigError
from ..ops import REFERENCE, AssemblePromptsFn
from .seeding import prompt_generator

if TYPE_CHECKING:
    from ..config import Config
    from ..model.clip import FrozenCLIP


def init_prompt(n_ctx: int, width: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A fresh context, N(0, std^2) as CoOp's generic context."""
    return torch.randn(n_ctx, width, generator=generator) * std


def initial_prompt(cfg: Config, width: int, phrase: torch.Tensor | None = None) -> torch.Tensor:
    """P_g^0, the common initial context of a run: from the run seed, so every engine and node derives it alike.

    With ``cfg.ctx_init`` (CoOp's context initialisation from a phrase), ``phrase`` holds the phrase's k token
    embeddings (:func:`phrase_embedding`): they become the last k context vectors, next to the class name, as in
    "[SOS] a photo of a {class}." when n_ctx = k (CoOp's own form); with n_ctx > k the first n_ctx - k vectors
    stay random, a padded phrase. Without it: N(0, ctx_init_std^2) everywhere (CoOp's generic context).
    """
    ctx = init_prompt(cfg.n_ctx, width, cfg.ctx_init_std, prompt_generator(cfg.seed))
    if cfg.ctx_init is None:
        return ctx
    if phrase is None:
        raise ValueError("ctx_init is set: pass the phrase's token embeddings")
    k = phrase.shape[0]
    if k > cfg.n_ctx:
        raise ConfigError(
            f"ctx_init={cfg.ctx_init!r} is {k} tokens, more than n_ctx={cfg.n_ctx}: use --n-ctx {k} (CoOp's form) "
            "or more"
        )
    ctx[cfg.n_ctx - k :] = phrase.to(ctx.dtype)
    return ctx


def phrase_embedding(clip: FrozenCLIP, phrase: str) -> torch.Tensor:
    """The frozen token embeddings [k, W] of ``phrase``'s tokens (without [SOS] / [EOS])."""
    tokens = clip.tokenize([phrase])
    eot = int(clip.text.eot_positions(tokens)[0])
    if eot <= 1:
        raise ConfigError(f"ctx_init={phrase!r} has no tokens")
    with torch.no_grad():
        return clip.text.token_embedding(tokens[0, 1:eot]).float().cpu()


class PromptEncoder:
    """Prompt contexts -> normalised class text features, for a fixed list of class names.

    ``encode(ctx)`` accepts one context ``[n_ctx, W]`` or a stack of E contexts ``[E, n_ctx, W]`` and
    returns ``[C, D]`` or ``[E, C, D]``. All E x C sequences go through the transformer in one pass.

    Modes (all give the same features up to float rounding): ``full`` runs all context_length tokens;
    ``truncated`` stops at the longest EOT; ``shared-prefix`` also computes the [SOS] + context positions
    once per expert instead of once per class (the causal mask makes them identical for every class).
    """

    MODES = ("full", "truncated", "shared-prefix")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int,
        mode: str = "shared-prefix",
        assemble: AssemblePromptsFn = REFERENCE.assemble_prompts,
    ):
        self.clip = clip
        self.assemble_prompts = assemble
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        tower = clip.text
        placeholder = " ".join(["X"] * n_ctx)
        texts = [f"{placeholder} {name.replace('_', ' ')}." for name in self.classnames]
        tokens = clip.tokenize(texts)
        eot = tower.eot_positions(tokens)
        if int(eot.min()) <= n_ctx:
            raise ConfigError(
                f"n_ctx={n_ctx} leaves no room for the class names in {clip.model_name}'s text context of "
                f"{tower.context_length} tokens: use a smaller --n-ctx"
            )
        if mode not in self.MODES:
            raise ConfigError(f"text_encoder={mode!r} is not one of: {', '.join(self.MODES)}")
        if mode == "shared-prefix" and tower.shared_prefix_blocks() is None:
            raise ConfigError(
                f"text_encoder=shared-prefix does not support the text tower of {clip.model_name}; "
                "use --text-encoder truncated"
            )
        self.mode = mode
        length = tower.context_length if mode == "full" else int(eot.max().item()) + 1
        with torch.no_grad():
            embedding = tower.token_embedding(tokens[:, :length]).float()
        self.prefix = embedding[:, :1].contiguous()  # [C, 1, W]: SOS
        self.suffix = embedding[:, 1 + n_ctx :].contiguous()  # [C, L - 1 - n_ctx, W]
        self.eot = eot.to(clip.device)
        self.length = length
        self.tokens = tokens
        self._zero_shot: torch.Tensor | None = None
        self._layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared-prefix layout per expert count
        # the shared-prefix pass this encoder runs (TextTower.encode_shared_prefix's signature); a run with --compile
        # puts a compiled one here (pfedmoap.model.compiled), without touching the CLIP other runs may share
        self.shared_prefix_pass = tower.encode_shared_prefix

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def zero_shot(self) -> torch.Tensor:
        """The handcrafted "a photo of a {class}." text features of these classes [C, D] (computed once)."""
        if self._zero_shot is None:
            self._zero_shot = self.clip.zero_shot_text_features(self.classnames)
        return self._zero_shot

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Contexts [E, n_ctx, W] -> token embeddings [E * C, L, W] (expert-major), via the run's
        ``assemble_prompts`` op."""
        return self.assemble_prompts(self.prefix, self.suffix, ctx.to(self.prefix.dtype))

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """Context(s) -> L2-normalised text features, ``[C, D]`` or ``[E, C, D]``."""
        single = ctx.dim() == 2
        stack = ctx[None] if single else ctx
        stack = stack.to(self.clip.device, self.prefix.dtype)
        experts = stack.shape[0]
        if self.mode == "shared-prefix":
            # [SOS] + context is identical for every class: one copy per expert
            shared = torch.cat([self.prefix[:1].expand(experts, 1, -1), stack], dim=1)
            suffix = self.suffix[None].expand(experts, *self.suffix.shape)
            if experts not in self._layouts:
                self._layouts[experts] = self.clip.text.shared_prefix_layout(
                    self.eot, experts, shared.shape[1], suffix.shape[2]
                )
            feats = self.shared_prefix_pass(shared, suffix, self.eot, self._layouts[experts]).float()
        else:
            seqs = self.assemble(stack)
            feats = self.clip.text.encode_embeddings(seqs, self.eot.repeat(experts)).float()
        feats = F.normalize(feats, dim=-1).view(experts, self.num_classes, -1)
        return feats[0] if single else feats
