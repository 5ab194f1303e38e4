"""Post-train Cosmos-Reason on the runtime's episodes: Physical-AI SFT, then GRPO.

    horovodrun -np 2 -H localhost:2 python -m trainer.cosmos sft --episodes DIR --out CKPT \\
        [--base tiny:qwen2_5_vl | tiny:qwen3_vl | nvidia/Cosmos-Reason1-7B | DIR] [--lora-rank R]
    horovodrun -np 2 -H localhost:2 python -m trainer.cosmos grpo --episodes DIR --out CKPT2 \\
        --init CKPT [--group 8] [--kl 0.005]

Both run on one process too, with `--follow`, `--sync`, `--max-steps/--max-minutes`
and `--json` as the student's trainer. Read top to bottom: arguments; data
(every rank reads every episode, keeps its shard; rank 0 the held-out
episodes); the model (a tiny look-alike built from the episodes' words, a
`from_pretrained` checkpoint, or a published version; LoRA for large
ones); the optimizer and how replicas stay together; the loop (an SFT or a
GRPO step, logging, validation by generating, publishing); the end. The
step maths are `trainer.cosmos.grpo` and `trainer.cosmos.rewards`; the
prompts are the backend's (`agent.cosmos.inference`). See docs/cosmos.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent import versions
from agent.cosmos import checkpoint
from agent.cosmos.inference import CosmosModel
from agent.cosmos.reasoning import DEFAULT_HISTORY, PromptSpec, style_for_model_type
from agent.cosmos.tiny import TinySize, build_tiny_vlm
from agent.files import weights_digest
from agent.store import Episode
from trainer.cosmos.data import (
    Example,
    Examples,
    augment,
    completion_batch,
    target_ids,
    token_logprobs,
)
from trainer.cosmos.evaluate import Evaluation, evaluate
from trainer.cosmos.grpo import group_advantages, policy_loss
from trainer.cosmos.rewards import reward
from trainer.episodes import Data, follow_episodes, wait_for_episodes
from trainer.loop import (
    Replicas,
    add_job_args,
    check_job_args,
    learning_rate,
    progress_bar,
    recorded_args,
    run,
    set_threads,
)
from trainer.metrics import Metrics
from trainer.ranks import Ranks

TINY = "tiny:"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LARGE = 200e6  # parameters above which LoRA is the default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.cosmos", description=__doc__.splitlines()[0]
    )
    p.add_argument("algorithm", choices=("sft", "grpo"), help="the post-training stage")
    add_job_args(p, lr=1e-3, warmup_steps=50)
    p.add_argument(
        "--base",
        default="tiny:qwen2_5_vl",
        help="what SFT starts from: a hub id or directory (from_pretrained), or tiny:qwen2_5_vl / "
        "tiny:qwen3_vl (a Reason1 / Reason2 look-alike built here from the episodes' words)",
    )
    p.add_argument("--init", type=Path, help="start from this published version (GRPO: the SFT)")
    p.add_argument("--fresh", action="store_true", help="do not continue from CKPT's LATEST")
    p.add_argument(
        "--batch-size", type=int, default=16, help="SFT examples / GRPO prompts, per rank"
    )
    p.add_argument("--lora-rank", type=int, default=None, help="0: full fine-tuning (default for "
                   "models under 200 M parameters); R: LoRA of rank R on the language model")  # fmt: skip
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument(
        "--history", type=int, default=DEFAULT_HISTORY, help="executed skills a prompt shows"
    )
    p.add_argument("--no-image", action="store_true", help="a text-only model (the blind baseline)")
    p.add_argument("--no-think", action="store_true", help="SFT targets without the rationale")
    p.add_argument("--shuffle", type=float, default=None, help="share of prompts whose menu is "
                   "shuffled (default: 0 for SFT, 1 for GRPO, the paper's)")  # fmt: skip
    p.add_argument("--drop-history", type=float, default=0.0, help="share of prompts without "
                   "the history line (so the camera has to tell)")  # fmt: skip
    p.add_argument("--tiny-size", default="128x2x64", help="tiny: HIDDENxLAYERSxVISION")
    p.add_argument("--image-pixels", type=int, default=112 * 112, help="tiny: image budget")
    p.add_argument(
        "--validation-limit", type=int, default=256, help="held-out decisions per validation"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per answer")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="", help="default: bfloat16 on cuda, float32 on cpu "
                   "(tiny look-alikes: float32)")  # fmt: skip
    grpo = p.add_argument_group("GRPO")
    grpo.add_argument("--group", type=int, default=8, help="completions per prompt")
    grpo.add_argument("--kl", type=float, default=0.005, help="weight of the KL to the reference")
    grpo.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    grpo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    grpo.add_argument("--updates", type=int, default=2, help="optimizer steps per sampled batch")
    args = p.parse_args(argv)
    check_job_args(p, args, 1000, ("batch_size", "group", "updates", "max_new_tokens"))
    if args.algorithm == "grpo" and args.init is None and versions.latest_name(args.out) is None:
        p.error("grpo needs --init CKPT (an SFT version to start from)")
    if not args.temperature > 0:
        p.error("--temperature must be > 0 (GRPO samples its completions)")
    if args.shuffle is None:
        args.shuffle = 1.0 if args.algorithm == "grpo" else 0.0
    for name in ("shuffle", "drop_history"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be within 0..1")
    try:
        args.tiny = TinySize(*(int(v) for v in args.tiny_size.split("x")), args.image_pixels)
    except (TypeError, ValueError):
        p.error(f"--tiny-size must be HIDDENxLAYERSxVISION, got {args.tiny_size!r}")
    return args


# --------------------------------------------------------------------------- the model


def texts_of(episodes: list[Episode]) -> list[str]:
    """Every distinct sentence the episodes hold (instructions, menus, rationales): what a tiny
    look-alike's tokenizer learns its words from."""
    seen: set[str] = set()
    for episode in episodes:
        for name in ("instruction", "reasoning", "teacher_reasoning", "skill"):
            seen.update(t for t in episode.column(name) if isinstance(t, str))
        for menu in episode.column("options"):
            seen.update(menu or [])
    return sorted(seen)


def start_model(
    args: argparse.Namespace, episodes: list[Episode], ranks: Ranks
) -> tuple[CosmosModel, str, str | None]:
    """What this run starts from: a published version (--init, or CKPT's LATEST: a warm start,
    the weights without the optimizer), a tiny look-alike built from the episodes' words, or a
    checkpoint; (model, what it is, the checkpoint a LoRA adapter applies to)."""
    placement = dict(device=args.device, dtype=args.dtype, compile="off")
    init = args.init
    if not args.fresh and versions.latest_name(args.out) is not None:
        init = args.out  # the same command again continues where it stopped
    if init is not None:
        try:
            version = checkpoint.read(init)
        except checkpoint.CheckpointError as exc:
            raise SystemExit(f"trainer.cosmos: cannot start from {init}: {exc}") from None
        asked = PromptSpec(version.spec.style, args.history, image=not args.no_image)
        if (asked.history, asked.image) != (version.spec.history, version.spec.image):
            ranks.say(f"continues {version.path} as it was trained: history "
                      f"{version.spec.history}, image {'on' if version.spec.image else 'off'} "
                      "(--history and --no-image shape new models only)")  # fmt: skip
        if version.base is None:
            cosmos = CosmosModel.load(str(version.path), spec=version.spec, **placement)
        else:  # a LoRA version: its adapter, trained further over its base
            from peft import PeftModel

            cosmos = CosmosModel.load(version.base, spec=version.spec, **placement)
            cosmos.model = PeftModel.from_pretrained(
                cosmos.model, str(version.path), is_trainable=True
            )
        return cosmos, str(version.path), version.base
    if args.base.startswith(TINY):
        model_type = args.base[len(TINY) :]
        try:
            model, processor = build_tiny_vlm(
                model_type, texts_of(episodes), args.tiny, seed=args.seed
            )
        except ValueError as exc:
            raise SystemExit(f"trainer.cosmos: --base {args.base}: {exc}") from None
        vocab = json.dumps(sorted(processor.tokenizer.get_vocab().items()))
        digest = hashlib.sha256(vocab.encode()).hexdigest()
        if len(set(ranks.gather_text(digest, "cosmos.tokenizer"))) != 1:
            raise SystemExit("trainer.cosmos: ranks built different tokenizers (other episodes?)")
        spec = PromptSpec(style_for_model_type(model_type), args.history, image=not args.no_image)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device, getattr(torch, args.dtype or "float32"))
        return CosmosModel(model, processor, spec), args.base, None
    try:
        cosmos = CosmosModel.load(args.base, **placement)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"trainer.cosmos: cannot load --base {args.base}: {exc}") from None
    cosmos.spec = PromptSpec(cosmos.spec.style, args.history, image=not args.no_image)
    return cosmos, args.base, None


def add_lora(
    cosmos: CosmosModel, args: argparse.Namespace, lora_base: str | None, from_version: bool
) -> str | None:
    """LoRA on the language model's linear layers (the vision tower frozen) for large models, or
    full fine-tuning; returns the checkpoint the adapter applies to (None: full)."""
    if lora_base is not None:
        return lora_base  # a LoRA version, trained further as it is
    if from_version:  # a fully fine-tuned version goes on in full: an adapter would drop it
        if args.lora_rank:
            raise SystemExit("trainer.cosmos: --lora-rank starts from --base MODEL, not from "
                             "a fully fine-tuned version")  # fmt: skip
        return None
    count = sum(p.numel() for p in cosmos.model.parameters())
    rank = args.lora_rank if args.lora_rank is not None else (16 if count > LARGE else 0)
    if rank <= 0:
        return None
    if args.base.startswith(TINY):
        raise SystemExit("trainer.cosmos: LoRA needs --base MODEL, a checkpoint to apply it to")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=args.lora_alpha or 2 * rank, target_modules=LORA_TARGETS)
    cosmos.model = get_peft_model(cosmos.model, config)
    local = Path(args.base)
    return str(local.resolve()) if local.is_dir() else args.base  # loadable from anywhere


# --------------------------------------------------------------------------- the steps


def sft_step(
    cosmos: CosmosModel, examples: list[Example], args: argparse.Namespace
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the assistant's tokens only (the prompt's are not learned), weighted by
    each example's episode weight, averaged over target tokens."""
    prompts = [e.prompt(cosmos) for e in examples]
    targets = target_ids(cosmos, [e.target(cosmos.spec.style, not args.no_think) for e in examples])
    batch = completion_batch(cosmos, prompts, targets)
    weights = torch.tensor([e.weight for e in examples], device=batch["input_ids"].device)
    mask = batch["completion_mask"].float() * weights[:, None]
    logp = token_logprobs(cosmos.model, batch, suppressed=cosmos.media_ids)
    loss = -(logp * mask).sum() / mask.sum().clamp_min(1e-9)
    return loss, {"target_tokens": float(batch["completion_mask"].sum()) / len(examples)}


class GrpoStep:
    """Sample G completions per prompt (each with its own shuffled menu), score them, and
    hold what `updates` clipped-ratio steps need."""

    def __init__(self, cosmos: CosmosModel, args: argparse.Namespace, replicas: Replicas):
        self.cosmos, self.args, self.replicas = cosmos, args, replicas
        self.lora = hasattr(cosmos.model, "disable_adapter")
        self.reference = None  # the frozen start (the SFT model); LoRA: the adapter turned off
        if args.kl > 0 and not self.lora:
            self.reference = copy.deepcopy(cosmos.model).eval().requires_grad_(False)
        self.groups = self.flat_groups = 0

    def sample(self, examples: list[Example], rng: np.random.Generator) -> dict[str, Any] | None:
        """Completions, rewards and advantages; None when every group earned one reward."""
        args, cosmos, style = self.args, self.cosmos, self.cosmos.spec.style
        group = [
            augment(e, rng, args.shuffle, args.drop_history)
            for e in examples
            for _ in range(args.group)
        ]
        prompts = [e.prompt(cosmos) for e in group]
        with self.replicas.exclusive():  # the weights that sample are those whose log-probs count
            out = cosmos.generate(prompts, args.max_new_tokens, temperature=args.temperature)
            finished = [bool(t) and t[-1] == cosmos.end_id for t in out.tokens]
            rewards = [
                reward(text, style, e.label, done)
                for text, e, done in zip(out.texts, group, finished, strict=True)
            ]
            totals = torch.tensor([r.total for r in rewards]).view(len(examples), args.group)
            advantages, flat = group_advantages(totals)
            keep = [i for i, f in enumerate(flat.repeat_interleave(args.group).tolist()) if not f]
            batch = old = None
            if keep:
                batch = completion_batch(
                    cosmos, [prompts[i] for i in keep], [out.tokens[i] for i in keep]
                )
                with torch.no_grad():
                    old = token_logprobs(cosmos.model, batch, args.temperature, cosmos.media_ids)
        self.groups += len(examples)
        self.flat_groups += int(flat.sum())
        stats = {
            "reward": float(totals.mean()),
            "accuracy_reward": float(np.mean([r.accuracy for r in rewards])),
            "format_reward": float(np.mean([r.format for r in rewards])),
            "zero_variance_groups": float(flat.float().mean()),
            "completion_tokens": float(np.mean([len(t) for t in out.tokens])),
            "truncated": float(1 - np.mean(finished)),
        }
        if batch is None:
            return {"stats": stats}
        ref = None
        if args.kl > 0:
            with torch.no_grad():
                if self.lora:
                    with cosmos.model.disable_adapter():
                        ref = token_logprobs(
                            cosmos.model, batch, args.temperature, cosmos.media_ids
                        )
                else:
                    ref = token_logprobs(self.reference, batch, args.temperature, cosmos.media_ids)
        return {
            "batch": batch,
            "old": old,
            "ref": ref,
            "advantages": advantages.view(-1)[keep].to(batch["input_ids"].device),
            "stats": stats,
        }

    def loss(self, sampled: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = sampled["batch"]
        logp = token_logprobs(
            self.cosmos.model, batch, self.args.temperature, self.cosmos.media_ids
        )
        loss, stats = policy_loss(
            logp,
            sampled["old"],
            sampled["ref"],
            sampled["advantages"],
            batch["completion_mask"],
            clip=self.args.clip,
            beta=self.args.kl,
        )
        return loss, {"kl": stats.kl, "clipped": stats.clipped, "ratio": stats.ratio}


# --------------------------------------------------------------------------- publishing


class Publisher:
    """Rank 0: validates the weights by generating on held-out decisions, and publishes them as
    a Cosmos version unless they answer worse than the best published one (a resumed run:
    than the version it continues)."""

    def __init__(self, args: argparse.Namespace, metrics: Metrics, lora_base: str | None):
        self.args, self.metrics, self.lora_base = args, metrics, lora_base
        self.last_time, self.last_step = time.monotonic(), -1
        self.published, self.latest = 0, None
        self.best: float | None = None  # the best held-out accuracy published
        latest = None if args.fresh else versions.latest_name(args.out)
        if latest is not None:  # verified by start_model: its manifest only, not the hashes again
            manifest = json.loads((Path(args.out) / latest / versions.MANIFEST).read_text())
            self.best = ((manifest.get("metrics") or {}).get("validation") or {}).get("accuracy")
        self.last: Evaluation | None = None

    def due(self, step: int) -> bool:
        every = self.args.publish_every_steps
        by_steps = every is not None and step - max(self.last_step, 0) >= every
        return by_steps or time.monotonic() - self.last_time >= self.args.publish_every_s

    def consider(
        self,
        cosmos: CosmosModel,
        validation: list[Example],
        warmup: Example,
        step: int,
        watermark: dict[str, Any],
        final: bool,
    ) -> None:
        self.last_time, self.last_step = time.monotonic(), step
        result = evaluate(cosmos, validation, max_new_tokens=self.args.max_new_tokens)
        self.last = result
        accuracy = None if result is None else result.accuracy
        warm = {
            "instruction": warmup.instruction,
            "options": list(warmup.options),
            "history": list(warmup.history or ()),
            "image_size": 0 if warmup.image is None else int(warmup.image.shape[0]),
        }
        if result is not None and self.best is not None and result.accuracy < self.best:
            refusal = f"held-out accuracy {accuracy:.3f} < {self.best:.3f}; kept"
        elif result is not None and result.parse_rate == 0:
            refusal = "no held-out answer parses yet; not published"
        elif not checkpoint.answers_warmup(cosmos, warm, self.args.max_new_tokens):
            refusal = "its warm-up decision gets no parseable answer (the backend would refuse it)"
        else:
            refusal = None
        self.metrics.log(
            {
                "step": step,
                "validation_accuracy": accuracy,
                "validation": None if result is None else result.as_dict(),
                "published": refusal is None,
            }
        )
        if refusal is not None:
            say(f"step {step}: {refusal}")
            return
        path = checkpoint.publish(
            self.args.out,
            cosmos.model,
            cosmos.processor,
            cosmos.spec,
            warmup=warm,
            step=step,
            base=self.lora_base,
            args=recorded_args(self.args),
            watermark=watermark,
            metrics={"validation": None if result is None else result.as_dict(), "final": final},
            keep=self.args.keep,
            extra_files=lambda directory: self.metrics.plot(
                directory / "learning_curves.png", *CURVES[self.args.algorithm]
            ),
        )
        self.published += 1
        self.latest = path.name
        if result is not None:
            self.best = result.accuracy
        acc = "n/a" if result is None else f"{result.accuracy:.3f} (parsed {result.parse_rate:.2f})"
        say(f"published {path} (step {step}, held-out accuracy {acc})")


CURVES = {"sft": ("loss", "training loss", True), "grpo": ("reward", "mean reward", False)}


def say(message: str) -> None:
    print(f"[trainer.cosmos] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    return run(train, parse_args(argv))


def train(args: argparse.Namespace, ranks: Ranks) -> int:
    set_threads(args, ranks)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1000 * ranks.rank)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()

    # -- data and the model: every rank reads every episode, keeps its shard
    episodes = wait_for_episodes(args.episodes, args.min_episodes, args.follow, ranks, stop)
    cosmos, start, lora_base = start_model(args, episodes, ranks)
    lora_base = add_lora(cosmos, args, lora_base, start != args.base)
    model = cosmos.model
    style, camera = cosmos.spec.style, "image" if cosmos.spec.image else None
    data = Data(Examples(style, camera), Examples(style, camera), args.failed_weight)
    data.add_first(episodes, ranks)
    follower = None
    if args.follow:
        follower = threading.Thread(
            target=follow_episodes, args=(args.episodes, ranks, data, stop), daemon=True
        )
        follower.start()

    # -- the optimizer, and how replicas stay together
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    replicas = Replicas(ranks, args, model, optimizer)  # every rank now holds rank 0's weights
    optimizer = replicas.optimizer
    grpo = GrpoStep(cosmos, args, replicas) if args.algorithm == "grpo" else None
    total = sum(p.numel() for p in model.parameters())
    ranks.say(
        f"{args.algorithm} from {start} ({style}, {total / 1e6:.2f} M parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trained{', LoRA' if lora_base else ''})"
        f" · {len(data.seen)} episodes: {data.train.size} decisions on rank 0's shard, "
        f"{data.validation.size} held out · {ranks.size} rank(s), sync {replicas.label}"
    )

    # -- the loop (from here on no rank waits for another longer than --sync-timeout-s)
    ranks.timeout_s = args.sync_timeout_s
    metrics = Metrics(args.out, enabled=ranks.rank == 0)
    metrics.log({"step": 0, "args": recorded_args(args), "start": start})
    publisher = Publisher(args, metrics, lora_base) if ranks.rank == 0 else None
    if ranks.rank == 0:
        versions.remove_stale_tmp(args.out)

    def publish(final: bool) -> None:
        assert publisher is not None
        validation = data.validation.all(args.validation_limit)  # grows with --follow
        warmup = (validation or data.train.all(1))[0]
        with replicas.exclusive():  # whole weights: no sync round in the middle
            publisher.consider(cosmos, validation, warmup, step, dict(data.watermark), final)

    bar = progress_bar(ranks, args, 0)
    step, samples_seen, train_s, window_samples = 0, 0, 0.0, 0
    window: dict[str, list[float]] = {}
    t_window = time.perf_counter()
    while True:
        reason = replicas.stop_reason(step, 0, started, stop)
        if reason:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        model.train()
        examples = data.train.sample(args.batch_size, rng)
        if grpo is None:
            examples = [augment(e, rng, args.shuffle, args.drop_history) for e in examples]
            loss, logged = sft_step(cosmos, examples, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            replicas.step()
            logged["loss"] = loss.item()
        else:
            sampled = grpo.sample(examples, rng)
            logged = dict(sampled["stats"])
            for _ in range(args.updates):  # as many steps on every rank, signal or not:
                optimizer.zero_grad(set_to_none=True)  # allreduce pairs them, ShadowSync ticks
                if "batch" in sampled:
                    loss, more = grpo.loss(sampled)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    logged.update(more, loss=loss.item())
                replicas.step()  # no gradient: AdamW leaves the weights; allreduce sends zeros
        train_s += time.perf_counter() - t0
        step += 1
        samples_seen += len(examples) * (args.group if grpo else 1)
        window_samples += len(examples) * (args.group if grpo else 1)
        for key, value in logged.items():
            window.setdefault(key, []).append(value)
        if step % 10 == 0:
            now = time.perf_counter()
            record = {k: float(np.mean(v)) for k, v in window.items()}
            record.update(
                step=step,
                samples_per_s=ranks.size * window_samples / max(now - t_window, 1e-9),
                sync_rounds=replicas.rounds,
                train_decisions=data.train.size,
            )
            metrics.log(record)
            window, t_window, window_samples = {}, now, 0
            if bar is not None:
                shown = {k: f"{record[k]:.3f}" for k in ("loss", "reward") if k in record}
                bar.set_postfix(**shown, sps=f"{record['samples_per_s']:.0f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if publisher is not None and publisher.due(step):
            publish(final=False)

    # -- the end: every rank leaves the loop, replicas are averaged, rank 0 publishes last
    if bar is not None:
        bar.close()
    stop.set()
    stats = replicas.finish()
    if follower is not None:
        follower.join(10)
    counts = ranks.sum([samples_seen, train_s], "cosmos.totals")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    digests = ranks.gather_text(weights_digest(trained), "cosmos.digest")
    if publisher is not None and step > 0 and (publisher.last_step != step or stats is not None):
        publish(final=True)
    summary = {
        "algorithm": args.algorithm,
        "stopped": reason,
        "steps": step,
        "ranks": ranks.size,
        "sync": replicas.label,
        "samples": int(counts[0]),
        "samples_per_s": counts[0] / max(counts[1] / ranks.size, 1e-9),
        "seconds": time.monotonic() - started,
        "episodes": len(data.seen),
        "train_decisions_rank0": data.train.size,
        "validation_decisions": data.validation.size,
        "start": start,
        "lora_base": lora_base,
        "parameters": total,
        "trained_parameters": sum(p.numel() for p in trained.values()),
        "versions_published": publisher.published if publisher else 0,
        "latest": publisher.latest if publisher else None,
        "validation": publisher.last.as_dict() if publisher and publisher.last else None,
        "zero_variance_groups": grpo.flat_groups / max(grpo.groups, 1) if grpo else None,
        "sync_stats": stats,
        "replica_digests": digests,  # after the final average: equal with ShadowSync
    }
    metrics.close()
    if ranks.rank == 0:
        result = summary["validation"]
        acc = "n/a" if result is None else f"{result['accuracy']:.3f}"
        ranks.say(
            f"stopped ({reason}) after {step} steps · {summary['samples_per_s']:.1f} samples/s · "
            f"held-out accuracy {acc} · {summary['versions_published']} version(s) published, "
            f"latest {summary['latest']}"
        )
        if args.json:
            print(json.dumps(summary), flush=True)
    if ranks.hvd is not None:
        ranks.hvd.shutdown()
    return 0
