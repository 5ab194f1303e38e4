"""The student: one multi-task policy that scores each menu option against what it sees.

Plain PyTorch, one module. Inputs are the featuriser's arrays
(`agent.student.features`); normalisation happens inside, so the exported ONNX
graph takes raw uint8 images and raw states.

    context = transformer([instruction words; history skills; state; image])
    option_j = words of option j (+ its menu position), which look at the
               instruction's and the history's words, then at the context
    score_j  = MLP(option_j)                 (masked where the menu is shorter)
    action   = MLP(mean context)             (only with a low-level action head)

* The image goes through a small conv stack with GroupNorm (no BatchNorm:
  replicas are averaged and batches are small), then spatial-softmax
  keypoints (robomimic's recipe); training adds a random shift and drops the
  whole image token at random, so the student cannot lean on memorised scenes.
* Scoring options, not predicting an index, is the multiple-choice question
  Cosmos-Reason answers: menus of any length, labels from any teacher.
* Option words attend to history words: "place in the red bin" finds the
  "red" of "move above the red cube" three skills back.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from agent.student.config import ModelConfig
from agent.student.features import FeatureConfig

NEG = -1e9  # the score of an empty menu slot (finite, so ONNX and softmax stay NaN-free)


class Attention(nn.Module):
    """Multi-head attention written out (exports to ONNX as plain MatMul/Softmax)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h, k = self.heads, w // self.heads
        q = self.q(x).view(b, n, h, k).transpose(1, 2)
        kv = self.kv(context).view(b, context.shape[1], 2, h, k).permute(2, 0, 3, 1, 4)
        logits = (q @ kv[0].transpose(-1, -2)) * (k**-0.5)
        logits = logits.masked_fill(~mask[:, None, None, :], NEG)
        return self.out((logits.softmax(-1) @ kv[1]).transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-norm attention + MLP; attends to itself when no context is given."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self.norm(x)
        x = x + self.drop(self.attn(y, y if context is None else context, mask))
        return x + self.drop(self.mlp(x))


class SpatialSoftmax(nn.Module):
    """Each channel's expected (y, x) position under its softmax: 2 keypoint coordinates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = x.flatten(2).softmax(-1).view(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        return torch.cat([(p.sum(3) * ys).sum(2), (p.sum(2) * xs).sum(2)], 1)


class Student(nn.Module):
    def __init__(self, features: FeatureConfig, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.features = features
        self.config = config = config or ModelConfig()
        w, f = config.width, features
        self.words = nn.Embedding(f.token_count, config.word_dim, padding_idx=0)
        self.word_in = nn.Linear(config.word_dim, w)
        self.word_pos = nn.Parameter(
            torch.randn(max(f.max_instruction_words, f.max_option_words), w) * 0.02
        )
        self.sentence = nn.Sequential(
            nn.Linear(f.max_option_words * config.word_dim, w), nn.GELU(), nn.Linear(w, w)
        )
        self.history_pos = nn.Parameter(torch.randn(max(1, f.history), w) * 0.02)
        self.menu_pos = nn.Parameter(torch.randn(f.max_options, w) * 0.02)
        self.kind = nn.Parameter(torch.randn(4, w) * 0.02)  # instruction, history, state, image
        self.register_buffer("state_mean", torch.tensor(f.state_mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.tensor(f.state_std, dtype=torch.float32))
        self.state = nn.Sequential(nn.Linear(f.state_dim, w), nn.GELU(), nn.Linear(w, w))
        if f.camera is not None:
            layers: list[nn.Module] = []
            channels = (3, *config.channels)
            for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
                conv = (
                    nn.Conv2d(cin, cout, config.patch, config.patch)
                    if i == 0
                    else nn.Conv2d(cin, cout, 3, 1, 1)
                )
                layers += [conv, nn.GroupNorm(min(8, cout), cout), nn.ReLU()]
            self.image = nn.Sequential(*layers, SpatialSoftmax(), nn.Linear(2 * channels[-1], w))
        self.context = nn.ModuleList(
            [Block(w, config.heads, config.dropout) for _ in range(config.layers)]
        )
        self.match = nn.Linear(config.word_dim, config.word_dim, bias=False)
        self.match_out = nn.Linear(f.max_option_words * (f.history + 1), w)
        self.option_words = Block(w, config.heads, config.dropout)
        self.option_context = Block(w, config.heads, config.dropout)
        self.score = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 1))
        if f.action_dim:
            self.action = nn.Sequential(
                nn.LayerNorm(w), nn.Linear(w, w), nn.GELU(), nn.Linear(w, f.action_dim)
            )

    def _sentences(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N, L) word ids -> (B, N, width): one vector per sentence, word order kept."""
        b, n, length = ids.shape
        return self.sentence(self.words(ids).reshape(b, n, length * self.config.word_dim))

    def _word_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., L) word ids -> (..., L, width) with positions."""
        return self.word_in(self.words(ids)) + self.word_pos[: ids.shape[-1]]

    def forward(
        self,
        state: torch.Tensor,
        instruction: torch.Tensor,
        options: torch.Tensor,
        option_mask: torch.Tensor,
        history: torch.Tensor,
        image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Option scores (B, M), masked slots at -1e9; the action (B, A) or None."""
        b = state.shape[0]
        kind = self.kind
        instr = self._word_tokens(instruction) + kind[0]
        instr_mask = instruction != 0
        hist = self._sentences(history) + self.history_pos[: history.shape[1]] + kind[1]
        hist_mask = history[:, :, 0] != 0
        st = self.state((state - self.state_mean) / self.state_std)[:, None] + kind[2]
        tokens = [instr, hist, st]
        masks = [instr_mask, hist_mask, torch.ones(b, 1, dtype=torch.bool, device=state.device)]
        if image is not None:
            tokens.append(self._image(image)[:, None] + kind[3])
            masks.append(self._image_mask(b, state.device))
        ctx, ctx_mask = torch.cat(tokens, 1), torch.cat(masks, 1)
        for block in self.context:
            ctx = block(ctx, ctx_mask)

        # options: their words look at the instruction's and history's words, then at the context
        m, length = options.shape[1], options.shape[2]
        words = self._word_tokens(options) + self.menu_pos[:m, None]
        hist_words = (
            self._word_tokens(history) + self.history_pos[: history.shape[1], None] + kind[1]
        )
        keys = torch.cat([instr, hist_words.reshape(b, -1, hist_words.shape[-1])], 1)
        key_mask = torch.cat([instr_mask, (history != 0).reshape(b, -1)], 1)
        q = self.option_words(words.reshape(b, m * length, -1), key_mask, keys)
        present = (options != 0).to(q.dtype).reshape(b, m * length, 1)
        q = (q * present).reshape(b, m, length, -1).sum(2)
        q = q / present.reshape(b, m, length, 1).sum(2).clamp_min(1.0)
        q = q + self._sentences(options) + self.menu_pos[:m]
        q = q + self.match_out(self._matches(options, history, instruction))
        q = self.option_context(q, ctx_mask, ctx)
        scores = self.score(q).squeeze(-1).masked_fill(~option_mask, NEG)
        action = None
        if self.features.action_dim:
            pooled = (ctx * ctx_mask[..., None]).sum(1) / ctx_mask.sum(1, keepdim=True)
            action = self.action(pooled)
        return scores, action

    def _matches(
        self, options: torch.Tensor, history: torch.Tensor, instruction: torch.Tensor
    ) -> torch.Tensor:
        """(B, M, Lo * (H + 1)): how well each option word is matched in each history skill
        and in the instruction (the best dot product of learned word embeddings; 0 if none)."""
        b, m = options.shape[:2]
        mine = self.match(self.words(options))  # (B, M, Lo, E)
        seen = self.words(history)  # (B, H, Lo, E)
        said = self.words(instruction)  # (B, Li, E)
        to_hist = torch.einsum("bmle,bhke->bmlhk", mine, seen)
        to_hist = to_hist.masked_fill((history == 0)[:, None, None], NEG).amax(-1)
        to_instr = torch.einsum("bmle,bke->bmlk", mine, said)
        to_instr = to_instr.masked_fill((instruction == 0)[:, None, None], NEG).amax(
            -1, keepdim=True
        )
        both = torch.cat([to_hist, to_instr], -1)  # (B, M, Lo, H + 1)
        present = (options != 0)[..., None] & (both > NEG / 2)
        return both.masked_fill(~present, 0.0).reshape(b, m, -1)

    def _image(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - 0.5
        shift = self.config.shift
        if self.training and shift:
            size = x.shape[-2:]
            x = F.pad(x, (shift, shift, shift, shift), mode="replicate")
            dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,)))
            x = x[:, :, dy : dy + size[0], dx : dx + size[1]]
        return self.image(x)

    def _image_mask(self, b: int, device: torch.device) -> torch.Tensor:
        if self.training and self.config.image_dropout:
            return torch.rand(b, 1, device=device) >= self.config.image_dropout
        return torch.ones(b, 1, dtype=torch.bool, device=device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
