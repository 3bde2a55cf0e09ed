"""A cost model of the reference code's training pattern, for side-by-side benchmarks (not used by the library).

It computes the same function as the library (same logits for the same weights and images, up to float
rounding: the ``round`` section checks this), but pays what the reference implementation's pattern pays:

- the frozen image encoder runs on every training batch (no feature cache);
- every prompt is the full context_length (77) tokens: no truncation at the EOT, no shared prefix;
- the K non-local experts are encoded once per round, each expert in its own pass of all C prompts
  (the reference swaps each expert's context into its prompt learner and runs the text encoder);
- the gate is an eager multi-head attention applied with the classes as the batch: the image query is
  repeated for every class, projected C times, and the mixed text features T_MoE [C, B, d] are
  materialised and projected before a batched dot product with the image (nothing fused);
- one optimiser step per batch over the prompt and the gate (plain SGD with momentum and weight decay).

This is our own code written to cost what that pattern costs; it shares nothing with the reference
implementation but the arithmetic of the method (SPEC.md). The reference code's gate also computes the
head-averaged attention on every call; so does this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfedmoap.gates import reduce_features
from pfedmoap.model.clip import FrozenCLIP


class RefStylePrompts:
    """CoOp prompts at the full context length: [SOS] ctx <class tokens> . [EOT] pad ... (77 tokens)."""

    def __init__(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int):
        self.clip = clip
        tower = clip.text
        placeholder = " ".join(["X"] * n_ctx)
        tokens = clip.tokenize([f"{placeholder} {c.replace('_', ' ')}." for c in classnames])
        with torch.no_grad():
            emb = tower.token_embedding(tokens).float()  # [C, context_length, W]
        self.prefix = emb[:, :1]
        self.suffix = emb[:, 1 + n_ctx :]
        self.eot = tower.eot_positions(tokens)
        self.num_classes = len(classnames)
        self.length = tokens.shape[1]

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """One prompt context [n_ctx, W] -> normalised text features [C, D], all C x 77 tokens in one pass."""
        seqs = torch.cat([self.prefix, ctx[None].expand(self.num_classes, -1, -1), self.suffix], dim=1)
        feats = self.clip.text.encode_embeddings(seqs, self.eot).float()
        return F.normalize(feats, dim=-1)


class RefStyleGate(nn.Module):
    """Eager multi-head attention gate, applied with classes as the batch (parameter names as AttentionGate)."""

    def __init__(self, dim: int, heads: int, scaling: float):
        super().__init__()
        self.dim, self.heads, self.scaling = dim, heads, float(scaling)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [C, L, d] -> [C, H, L, d/H]
        n, length, _ = x.shape
        return x.view(n, length, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, d]; experts [E, C, d] -> T_MoE [C, B, d] (materialised) and mean attention [C, B, E]."""
        n_cls = experts.shape[1]
        q = query[None].repeat(n_cls, 1, 1)  # [C, B, d]: the query is repeated for every class
        kv = experts.permute(1, 0, 2)  # [C, E, d]
        qh = self._split(self.q_proj(q))
        kh = self._split(self.k_proj(kv))
        vh = self._split(self.v_proj(kv))
        probs = torch.softmax(torch.matmul(qh, kh.transpose(-2, -1)) * self.scaling, dim=-1)  # [C, H, B, E]
        mixed = torch.matmul(probs, vh).transpose(1, 2).contiguous().view(n_cls, -1, self.dim)  # [C, B, d]
        return self.out_proj(mixed), probs.mean(dim=1)


def refstyle_logits(
    image: torch.Tensor,
    local_text: torch.Tensor,
    expert_text: list[torch.Tensor],
    gate: RefStyleGate,
    gamma: float,
    lam: float,
    d_gate: int,
) -> torch.Tensor:
    """logits = lam * l_loc + gamma * <reduce(i_b), T_MoE[b, c]>, computed the eager way."""
    local = gamma * image @ local_text.t()
    query = reduce_features(image, d_gate)
    experts = torch.stack([reduce_features(local_text, d_gate)] + [reduce_features(t, d_gate) for t in expert_text])
    moe, _ = gate(query, experts)  # [C, B, d]
    moe_logits = gamma * torch.bmm(query.unsqueeze(1), moe.permute(1, 2, 0)).squeeze(1)  # [B, C]
    return lam * local + moe_logits


class RefStyleClient:
    """One client's local update, the reference code's way (see the module docstring)."""

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int,
        d_gate: int,
        heads: int,
        scaling: float = 10.0,
        lam: float = 0.5,
        lr_prompt: float = 0.002,
        lr_gate: float = 0.01,
    ):
        self.clip = clip
        self.prompts = RefStylePrompts(clip, classnames, n_ctx)
        self.d_gate, self.lam = d_gate, lam
        self.gate = RefStyleGate(d_gate, heads, scaling).to(clip.device)
        self.ctx = nn.Parameter(torch.zeros(n_ctx, clip.width, device=clip.device))
        self.expert_text: list[torch.Tensor] = []
        self.lrs = (lr_prompt, lr_gate)
        self.opt = self._optimiser()

    def _optimiser(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [self.ctx], "lr": self.lrs[0]},
            {"params": list(self.gate.parameters()), "lr": self.lrs[1]},
        ]
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)

    def load_prompt(self, prompt: torch.Tensor) -> None:
        with torch.no_grad():
            self.ctx.copy_(prompt.to(self.ctx.device))

    def start_round(self, start_prompt: torch.Tensor, experts: torch.Tensor) -> None:
        """Load the start prompt and encode the K experts, each in its own pass (no grad)."""
        self.load_prompt(start_prompt)
        self.expert_text = [self.encode_expert(e) for e in experts]

    @torch.no_grad()
    def encode_expert(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.prompts.encode(ctx.to(self.clip.device, torch.float32))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.clip.encode_images(images)  # the frozen image encoder, on every batch
        text = self.prompts.encode(self.ctx)
        return refstyle_logits(feats, text, self.expert_text, self.gate, self.clip.gamma, self.lam, self.d_gate)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        loss = F.cross_entropy(self.logits(images), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)
