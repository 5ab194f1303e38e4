"""Cosmos-Reason as a backend: multiple-choice next-action decisions with chain-of-thought.

    agent serve --backend cosmos --model nvidia/Cosmos-Reason1-7B     # a checkpoint, as it is
    agent serve --backend cosmos --model CKPT                          # post-trained versions

One `decide` call turns every robot's observation into a prompt (scene image,
optionally the last few frames, the instruction, the skills executed so far
and the current skill menu as a multiple-choice question), runs ONE
left-padded `generate` over the batch, parses each completion, retries the
unparseable ones with more tokens and a slightly higher temperature (as the
official benchmark does) and answers what is still unparseable with a
configurable fallback. Model output never raises.

`--model` is a hub id or a `save_pretrained` directory (served as it is), or
what `python -m trainer.cosmos` publishes: a CKPT root (the newest version,
and each newer one hot-reloaded off the serving thread) or one CKPT/vNNNNNN.
A version is verified before it is served (manifest hashes, finite weights,
a parseable answer to its own warm-up decision) and asked the way it was
trained (its `PromptSpec`); loading, swapping and per-episode versions are
`VersionedBackend`'s. The model itself is `agent.cosmos.inference.CosmosModel`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import versions
from agent.backends.base import Backend, BackendError, BadObservation, EnvInfo
from agent.backends.versioned import VersionedBackend, VersionedOptions
from agent.cosmos.reasoning import STYLES, PromptSpec, parse_answer, style_for_model_type
from agent.messages import Decision, Observation

FALLBACKS = ("oracle", "first", "noop")
MAX_EPISODE_HISTORIES = 1024
PRETRAINED = "pretrained"  # the one "version" of a checkpoint served as it is


@dataclass
class CosmosOptions(VersionedOptions):
    """Backend options (`--backend-opt KEY=VALUE` or keyword arguments; see `parse_options`)."""

    temperature: float = 0.6  # official sampling; 0 = greedy
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    max_new_tokens: int = 4096
    min_new_tokens: int = 0  # benchmarks: a fixed decode length (end of turn suppressed)
    retries: int = 2  # extra attempts for unparseable answers
    retry_token_factor: float = 2.0  # max_new_tokens grows by this per retry...
    max_retry_tokens: int = 8192  # ...up to this
    retry_temperature_step: float = 0.1  # temperature grows by this per retry
    fallback: str = "oracle"  # oracle (needs sim state, else first) | first | noop
    style: str = ""  # reason1 | reason2; default: the version's, else the checkpoint's model_type
    history: int = -1  # executed skills in the prompt; -1: the version's (12 for a checkpoint)
    camera: str = ""  # which image to show; default: the first one sent
    frames: int = 1  # >1: the last N frames of the episode as a short video
    fps: float = 4.0  # frame rate the video is presented at (Reason1 was trained at 4)
    points: bool = False  # also offer {"point_2d": [x, y]} answers (Reason2)
    max_batch: int = 64  # most observations per generate call
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = ""  # default: bfloat16 on cuda, float32 on cpu
    compile: str = "auto"  # static cache + torch.compile: auto (cuda only) | on | off
    seed: int = -1  # >= 0: seed torch before each generate (reproducible sampling)

    def check(self) -> None:
        super().check()
        if self.fallback not in FALLBACKS:
            raise BackendError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.style and self.style not in STYLES:
            raise BackendError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.compile not in ("auto", "on", "off"):
            raise BackendError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.max_new_tokens < 1 or self.frames < 1 or self.max_batch < 1 or self.retries < 0:
            raise BackendError("max_new_tokens, frames and max_batch must be >= 1, retries >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise BackendError("temperature must be >= 0 and top_p in (0, 1]")
        if self.min_new_tokens < 0 or self.retry_token_factor < 1 or self.max_retry_tokens < 1:
            raise BackendError(
                "min_new_tokens must be >= 0, retry_token_factor >= 1, max_retry_tokens >= 1"
            )
        if not (self.repetition_penalty > 0 and self.fps > 0 and self.retry_temperature_step >= 0):
            raise BackendError(
                "repetition_penalty and fps must be > 0, retry_temperature_step >= 0"
            )
        if self.history < -1:
            raise BackendError(f"history must be >= 0 (or -1: the version's), got {self.history}")


@dataclass
class CosmosCounters:
    parsed: int = 0
    point_answers: int = 0
    retried: int = 0
    fallbacks: int = 0
    fallback_oracle: int = 0
    fallback_first: int = 0
    fallback_noop: int = 0
    generate_calls: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    max_batch_seen: int = 0


class CosmosBackend(VersionedBackend):
    """Cosmos-Reason1 (Qwen2.5-VL) or Cosmos-Reason2 (Qwen3-VL) behind `Backend.decide`."""

    name = "cosmos"
    Options = CosmosOptions
    extra = "cosmos"
    model_help = (
        "MODEL: a hub id such as nvidia/Cosmos-Reason1-7B, a checkpoint directory, or a "
        "trainer.cosmos CKPT (or one CKPT/vNNNNNN)"
    )
    served = "Cosmos-Reason"
    _preloaded: Any = None  # from_loaded: a CosmosModel already in memory

    @classmethod
    def from_loaded(
        cls, env: EnvInfo, model_id: str, model: Any, processor: Any, **options: Any
    ) -> CosmosBackend:
        """Wrap a model already in memory (benchmarks: random 7B-shaped weights on the GPU)."""
        from agent.cosmos.inference import CosmosModel

        self = cls.__new__(cls)
        self._preloaded = CosmosModel(model.eval(), processor, compiled=_compiled(options, model))
        cls.__init__(self, env, model_id, **options)
        return self

    # ------------------------------------------------------------------ versions

    def setup(self, model: str) -> None:
        from agent.cosmos import checkpoint

        _check_video(self.options)
        self.answers = CosmosCounters()
        self.versioned = self._preloaded is None and checkpoint.is_versioned(model)
        path = Path(model)
        self.follow = self.versioned and not versions.is_version(path)
        self.root = path if self.follow else path.parent
        self._fallback_backend: Backend | None = None
        self._histories: OrderedDict[str, dict[int, np.ndarray]] = OrderedDict()

    def newest(self) -> str | None:
        if not self.versioned:
            return PRETRAINED
        return versions.latest_name(self.root) if self.follow else Path(str(self.model)).name

    def load(self, key: str) -> ServedCosmos:
        opts: CosmosOptions = self.options
        placement = dict(device=opts.device, dtype=opts.dtype, compile=opts.compile, fps=opts.fps)
        if self._preloaded is not None:
            cosmos, version = self._preloaded, "local"
        elif not self.versioned:
            from agent.cosmos.inference import CosmosModel
            from agent.cosmos.loading import model_type_of

            try:  # missing files, weights, tokenizer or processor; another architecture
                style = opts.style or style_for_model_type(model_type_of(str(self.model)))
                spec = PromptSpec(style)  # type: ignore[arg-type]
                cosmos = CosmosModel.load(str(self.model), spec=spec, **placement)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"cannot load Cosmos-Reason checkpoint {self.model!r}: {exc}"
                ) from None
            version = str(getattr(cosmos.model.config, "_commit_hash", None) or "local")
        else:
            cosmos, version = self._load_version(key, placement)
        if opts.style or opts.history >= 0 or opts.points:  # the operator asks otherwise
            cosmos.spec = dataclasses.replace(
                cosmos.spec,
                style=opts.style or cosmos.spec.style,
                history=opts.history if opts.history >= 0 else cosmos.spec.history,
                points=opts.points,
            )
        return ServedCosmos(self, cosmos, version)

    def _load_version(self, key: str, placement: dict[str, Any]) -> tuple[Any, str]:
        """A published version, verified: hashes, finite weights, a parseable warm-up answer."""
        import torch

        from agent.cosmos import checkpoint

        cosmos, version = checkpoint.load(self.root / key, **placement)
        bad = [n for n, p in cosmos.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"version {key} has non-finite weights ({len(bad)} tensors)")
        if not checkpoint.answers_warmup(cosmos, version.warmup, self.options.max_new_tokens):
            raise ValueError(f"version {key} gives no parseable answer to its warm-up decision")
        return cosmos, key

    @property
    def style(self) -> str:
        return self.current.cosmos.spec.style

    @property
    def model_type(self) -> str:
        return self.current.cosmos.model_type

    @property
    def compiled(self) -> bool:
        return self.current.cosmos.compiled

    def warmup(self) -> None:
        self.current.cosmos.warm_up()

    def stats(self) -> dict[str, Any]:
        c: dict[str, Any] = dataclasses.asdict(self.answers)
        steps, calls = c["decode_steps"], c["generate_calls"]
        c["ms_per_decode_step"] = 1e3 * c["decode_s"] / steps if steps else None
        c["prefill_ms"] = 1e3 * c["prefill_s"] / calls if calls else None
        cosmos = self.current.cosmos
        c.update(
            style=cosmos.spec.style,
            history=cosmos.spec.history,
            model_type=cosmos.model_type,
            device=cosmos.device,
            compiled=cosmos.compiled,
        )
        return {**super().stats(), **c}

    # ------------------------------------------------------------------ what a version needs

    def pick_image(self, obs: Observation) -> np.ndarray | None:
        if not obs.images:
            return None
        camera = self.options.camera
        if camera and camera not in obs.images:
            raise BadObservation(f"camera {camera!r} not sent; robot sent {sorted(obs.images)}")
        image = obs.images[camera] if camera else next(iter(obs.images.values()))
        return np.ascontiguousarray(image, dtype=np.uint8)

    def frames(self, obs: Observation, image: np.ndarray) -> list[np.ndarray]:
        """This episode's video up to `obs.step` (the number of remembered episodes is bounded)."""
        if self.options.frames <= 1:
            return []
        key = f"{obs.robot_id}/{obs.episode_id}"
        history, frames = remember_frame(
            self._histories.pop(key, {}), obs.step, image, self.options.frames
        )
        self._histories[key] = history
        while len(self._histories) > MAX_EPISODE_HISTORIES:
            self._histories.popitem(last=False)
        return frames

    def fall_back(self, obs: Observation, text: str | None) -> Decision:
        """The decision for what the model could not answer (text None: nothing to ask)."""
        note = (
            "[cosmos fallback: no options to choose from]"
            if text is None
            else f"[cosmos fallback: unparseable answer] {text.strip()[:2000]}".strip()
        )
        decision = self._oracle(obs) if self.options.fallback == "oracle" else None
        kind = "oracle"
        if decision is None:
            kind = "first" if obs.options and self.options.fallback != "noop" else "noop"
            decision = self._first_or_noop(obs, kind)
        decision.reasoning = f"{note}\n{decision.reasoning or ''}".strip()
        decision.decided_by = f"fallback:{kind}"
        self.answers.fallbacks += 1
        setattr(self.answers, f"fallback_{kind}", getattr(self.answers, f"fallback_{kind}") + 1)
        return decision

    def _oracle(self, obs: Observation) -> Decision | None:
        if obs.sim is None or not obs.options:
            return None
        if self._fallback_backend is None:
            from agent.backends import load_backend

            self._fallback_backend = load_backend("oracle", self.env)
        decision = self._fallback_backend.decide([obs])[0]
        return decision if isinstance(decision, Decision) else None

    def _first_or_noop(self, obs: Observation, kind: str) -> Decision:
        if kind == "first":
            return Decision(skill_index=0, skill=obs.options[0])
        if self.env.action_shape is not None:
            return Decision(action=np.zeros(self.env.action_shape, np.float32))
        return Decision()


class ServedCosmos:
    """One loaded Cosmos version as `VersionedBackend` serves it: prompts, one batched
    generate with retries, answers to decisions, fallbacks for the rest."""

    def __init__(self, backend: CosmosBackend, cosmos: Any, model_version: str) -> None:
        self.backend, self.cosmos, self.model_version = backend, cosmos, model_version

    def check(self, obs: Observation) -> None:
        self.backend.pick_image(obs)  # BadObservation for a camera it does not have

    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        backend, opts, counters = self.backend, self.backend.options, self.backend.answers
        counters.max_batch_seen = max(counters.max_batch_seen, len(batch))
        decisions: list[Decision | None] = [None] * len(batch)
        askable = [i for i, obs in enumerate(batch) if obs.options or self.cosmos.spec.allow_point]
        prompts = {}
        for i in askable:
            obs = batch[i]
            image = backend.pick_image(obs)
            frames = backend.frames(obs, image) if image is not None else []
            prompts[i] = self.cosmos.prompt(
                obs.instruction, obs.options, obs.history, image, frames
            )
        completions: dict[int, str] = {}
        pending = askable
        for attempt in range(opts.retries + 1):
            if not pending:
                break
            if attempt:
                counters.retried += len(pending)
            tokens = min(
                int(opts.max_new_tokens * opts.retry_token_factor**attempt),
                max(opts.max_new_tokens, opts.max_retry_tokens),
            )
            temperature = (
                opts.temperature + attempt * opts.retry_temperature_step
                if opts.temperature > 0
                else 0.0
            )
            texts = self._generate([prompts[i] for i in pending], tokens, temperature)
            still = []
            for i, text in zip(pending, texts, strict=True):
                completions[i] = text
                decision = self._to_decision(batch[i], text)
                if decision is None:
                    still.append(i)
                else:
                    decisions[i] = decision
            pending = still
        return [
            d if d is not None else backend.fall_back(batch[i], completions.get(i))
            for i, d in enumerate(decisions)
        ]

    def _generate(self, prompts: list[Any], max_new_tokens: int, temperature: float) -> list[str]:
        opts, counters = self.backend.options, self.backend.answers
        texts: list[str] = []
        for start in range(0, len(prompts), opts.max_batch):
            out = self.cosmos.generate(
                prompts[start : start + opts.max_batch],
                max_new_tokens,
                temperature=temperature,
                top_p=opts.top_p,
                repetition_penalty=opts.repetition_penalty,
                min_new_tokens=opts.min_new_tokens,
                seed=opts.seed if opts.seed >= 0 else None,
            )
            counters.generate_calls += 1
            counters.prefill_s += out.prefill_s
            counters.decode_s += out.decode_s
            counters.decode_steps += out.decode_steps
            counters.generated_tokens += sum(len(t) for t in out.tokens)
            texts += out.texts
        return texts

    def _to_decision(self, obs: Observation, text: str) -> Decision | None:
        spec, counters = self.cosmos.spec, self.backend.answers
        parsed = parse_answer(text, spec.style, len(obs.options))
        if parsed.point is not None and spec.allow_point:
            counters.parsed += 1
            counters.point_answers += 1
            return Decision(point=parsed.point, reasoning=text.strip())
        if parsed.choice is not None:
            counters.parsed += 1
            return Decision(
                skill_index=parsed.choice, skill=obs.options[parsed.choice], reasoning=text.strip()
            )
        return None


def remember_frame(
    history: dict[int, np.ndarray], step: int, image: np.ndarray, n: int
) -> tuple[dict[int, np.ndarray], list[np.ndarray]]:
    """Add `step`'s image to an episode's frames: (the last `n` kept, the video up to `step`).

    Keyed by step, so a retried step replaces its frame instead of adding it twice.
    """
    history = {**history, step: image}
    kept = {s: history[s] for s in sorted(history)[-n:]}
    return kept, [frame for s, frame in kept.items() if s <= step]


def _compiled(options: dict[str, Any], model: Any) -> bool:
    compile = str(options.get("compile", "auto"))
    return compile == "on" or (compile == "auto" and str(model.device).startswith("cuda"))


def _check_video(opts: CosmosOptions) -> None:
    from agent.cosmos.loading import has_video_support

    if opts.frames > 1 and not has_video_support():
        raise BackendError(
            "frames > 1 sends video, which needs torchvision for the "
            "Qwen-VL video processor; install torchvision or use frames=1"
        )
