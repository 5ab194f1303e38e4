"""Cosmos-Reason post-training with real processes: SFT under horovodrun, versions served by a real
`agent serve` to real robots, hot reload, refused versions, GRPO on a fixed batch.

The model is the tiny Qwen2.5-VL look-alike built from the recorded episodes' words
(`--base tiny:qwen2_5_vl`), trained briefly on the oracle episodes of `recorded`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from agent import versions
from agent.client import AgentClient
from agent.cosmos import checkpoint
from agent.cosmos.reasoning import PromptSpec
from agent.launch import run, run_robots, serving, trainer_command
from agent.store import iter_episodes
from trainer.cosmos.data import Examples, completion_batch, target_ids, token_logprobs
from trainer.cosmos.train import GrpoStep, parse_args
from trainer.loop import Replicas
from trainer.ranks import Ranks

pytestmark = pytest.mark.timeout(300)
ENV_ID = "tabletop/PickPlace-v0"
SFT = (
    "--tiny-size", "64x2x32", "--batch-size", "8", "--lr", "3e-3", "--no-think",
    "--validation-limit", "16", "--max-new-tokens", "24", "--quiet", "--json",
)  # fmt: skip
GREEDY = ("--backend-opt", "temperature=0", "--backend-opt", "max_new_tokens=24")


@pytest.fixture(scope="module")
def sft(recorded, tmp_path_factory):
    """`python -m trainer.cosmos sft` under `horovodrun -np 2` (ShadowSync) on `recorded`."""
    out = tmp_path_factory.mktemp("cosmos") / "sft"
    cmd = trainer_command(
        2, "sft", "--episodes", str(recorded), "--out", str(out), "--max-steps", "120",
        "--publish-every-steps", "60", *SFT, module="trainer.cosmos",
    )  # fmt: skip
    return out, run(cmd, timeout_s=280, what="the Cosmos-Reason SFT")


def test_sft_under_two_ranks_lowers_its_loss_and_publishes_what_every_replica_holds(sft):
    out, summary = sft
    assert summary["ranks"] == 2 and summary["sync"] == "ma" and 0 < summary["steps"] <= 120
    assert len(set(summary["replica_digests"])) == 1  # the final average: one model
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    version = checkpoint.read(out)
    assert version.name == summary["latest"] and version.version.kind == "cosmos"
    assert version.version.manifest["args"]["algorithm"] == "sft"  # the arguments, recorded
    assert version.spec.style == "reason1" and version.base is None
    assert (version.path / "learning_curves.png").is_file()


def test_a_published_version_serves_real_robots(sft):
    out, _ = sft
    with serving(ENV_ID, "--backend", "cosmos", "--model", str(out), *GREEDY) as (endpoint, _):
        summary = run_robots(endpoint, ENV_ID, 2, seed=1_000_000, robots=2, timeout_s=240)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            stats = client.stats()
    assert summary["episodes"] == 2 and summary["decisions"] > 0
    backend = stats["backend"]
    assert backend["version"] == versions.latest_name(out)
    assert backend["parsed"] == backend["decisions"] and backend["fallbacks"] == 0


def test_a_post_trained_cosmos_teaches_the_student_and_its_rationale_is_recorded(
    sft, trained, tmp_path
):
    """`--teacher cosmos --teacher-model CKPT`: Cosmos labels every step the student takes and
    acts where it is unsure; its rationale goes into the episode as `teacher_reasoning`."""
    out, _ = sft
    record = tmp_path / "episodes"
    teacher = ("--teacher", "cosmos", "--teacher-model", str(out), "--escalate-below", "0.9")
    opts = ("--teacher-opt", "temperature=0", "--teacher-opt", "max_new_tokens=24")
    args = (
        "--backend",
        "policy",
        "--model",
        str(trained),
        *teacher,
        *opts,
        "--record",
        str(record),
    )
    with serving(ENV_ID, *args) as (endpoint, _):
        run_robots(endpoint, ENV_ID, 2, seed=1_000_000, robots=2, timeout_s=240)
    steps = [s for episode in iter_episodes(record) for s in episode.steps()]
    assert steps and all(s.decision.teacher is not None for s in steps)
    assert {s.decision.teacher.model for s in steps} == {str(out)}
    assert all(s.decision.teacher.decision.reasoning.startswith("<think>") for s in steps)
    rows = [r for episode in iter_episodes(record) for r in episode.column("teacher_reasoning")]
    assert all(r and "<answer>" in r for r in rows)  # recorded, format 3


def corrupt_copy_of_latest(root):
    """The newest version again, one weight byte flipped after hashing, put in place as publish
    would (a manifest that no longer matches)."""
    names = versions.version_names(root)
    name = f"v{int(names[-1][1:]) + 1:06d}"
    staging = root / ".tmp" / name
    shutil.copytree(root / names[-1], staging)
    weights = staging / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    staging.rename(root / name)
    (root / ".tmp" / "LATEST").write_text(name + "\n")
    (root / ".tmp" / "LATEST").rename(root / "LATEST")
    return name


def republish(root, source):
    """Version `source`'s model published again as a new version (what a trainer does)."""
    cosmos, version = checkpoint.load(root / source)
    return checkpoint.publish(
        root, cosmos.model, cosmos.processor, cosmos.spec, warmup=version.warmup, step=2
    ).name


def test_new_versions_are_hot_reloaded_without_a_failed_request_and_corrupt_ones_refused(
    sft, recorded, tmp_path
):
    out, _ = sft
    root = tmp_path / "ckpt"
    shutil.copytree(out, root)
    first = versions.latest_name(root)
    step = next(iter_episodes(recorded / "PickPlace-v0")).steps()[1]
    fields = {
        "images": step.observation.images,
        "state": step.observation.state,
        "instruction": step.observation.instruction,
        "options": step.observation.options,
    }
    served, errors, stop = [], [], threading.Event()
    backend = ("--backend", "cosmos", "--model", str(root), "--reload-every-s", "0.1", *GREEDY)
    with serving(ENV_ID, *backend) as (endpoint, _):

        def robot():
            with AgentClient(endpoint, timeout_ms=20_000) as client:
                n = 0
                while not stop.is_set():
                    try:
                        served.append(client.decide(episode_id="e", step=n, **fields).model_version)
                    except Exception as exc:
                        errors.append(exc)
                    n += 1

        thread = threading.Thread(target=robot)
        thread.start()
        try:
            time.sleep(0.5)
            bad = corrupt_copy_of_latest(root)
            time.sleep(1.5)
            good = republish(root, first)
            deadline = time.monotonic() + 60
            while good not in served and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            thread.join(60)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            stats = client.stats()
    assert not errors
    assert served[0] == first and served[-1] == good and bad not in served
    assert stats["versions_refused"] == 1 and "sha256" in stats["backend"]["refused"][bad]


def test_a_version_without_a_parseable_answer_is_refused(recorded, tmp_path):
    """A version whose model cannot answer its own warm-up decision never serves."""
    from agent.backends import BackendError, EnvInfo, load_backend
    from agent.cosmos.tiny import build_tiny_vlm
    from trainer.cosmos.train import texts_of

    episodes = list(iter_episodes(recorded / "PickPlace-v0"))
    model, processor = build_tiny_vlm("qwen2_5_vl", texts_of(episodes))  # random: babbles
    spec = PromptSpec("reason1")
    warmup = {"instruction": "put it there", "options": ["grasp", "lift"], "history": []}
    checkpoint.publish(tmp_path, model, processor, spec, warmup=warmup, step=0)
    env = EnvInfo(ENV_ID, action_shape=(4,), has_skills=True)
    with pytest.raises(BackendError, match="no parseable answer"):
        load_backend("cosmos", env, str(tmp_path), temperature="0", max_new_tokens="8")


def test_sampled_completions_never_hold_a_vision_placeholder(recorded):
    """A model that prefers `<|image_pad|>` above all still never emits it (GRPO once sampled
    one, and the training forward then found an image token without features)."""
    from agent.cosmos.inference import CosmosModel
    from agent.cosmos.tiny import build_tiny_vlm
    from trainer.cosmos.train import texts_of

    model, processor = build_tiny_vlm("qwen2_5_vl", texts_of(list(iter_episodes(recorded))))
    cosmos = CosmosModel(model, processor, PromptSpec("reason1"))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert pad in cosmos.media_ids

    def prefer_pad(module, inputs, logits):
        logits[..., pad] += 1e4
        return logits

    model.lm_head.register_forward_hook(prefer_pad)
    examples = _examples(recorded / "PickPlace-v0", cosmos)[:4]
    prompts = [e.prompt(cosmos) for e in examples]
    out = cosmos.generate(prompts, 12, temperature=1.0, seed=0)
    assert not any(set(t) & set(cosmos.media_ids) for t in out.tokens)
    batch = completion_batch(cosmos, prompts, out.tokens)  # would raise on a placeholder
    logp = token_logprobs(cosmos.model, batch, 1.0, cosmos.media_ids)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_the_trainer_does_not_publish_what_the_backend_would_refuse(recorded, tmp_path):
    """A model that cannot answer its warm-up decision is not published (the backend's check)."""
    from agent.cosmos.inference import CosmosModel
    from agent.cosmos.tiny import build_tiny_vlm
    from trainer.cosmos.train import Publisher, texts_of
    from trainer.metrics import Metrics

    args = parse_args(["sft", "--episodes", str(recorded), "--out", str(tmp_path / "o")])
    model, processor = build_tiny_vlm("qwen2_5_vl", texts_of(list(iter_episodes(recorded))))
    cosmos = CosmosModel(model, processor, PromptSpec("reason1"))  # random: babbles
    warmup = _examples(recorded / "PickPlace-v0", cosmos)[0]
    metrics = Metrics(args.out)
    Publisher(args, metrics, None).consider(cosmos, [], warmup, 1, {}, final=True)
    assert versions.latest_name(args.out) is None
    assert metrics.records[-1]["published"] is False


def test_the_training_forward_sees_no_later_token(sft, recorded):
    """Teacher-forced log-probs of the prompt's last token equal what generation computes from
    the prompt alone: the multimodal positions of a training batch do not leak its length."""
    out, _ = sft
    cosmos, _ = checkpoint.load(out)
    example = _examples(recorded / "PickPlace-v0", cosmos)[1]
    prompt = example.prompt(cosmos)
    batch = completion_batch(cosmos, [prompt], target_ids(cosmos, [example.target("reason1")]))
    with torch.no_grad():
        full = cosmos.model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits
        alone = cosmos.model(**cosmos.encode([prompt])).logits
    n = alone.shape[1]
    torch.testing.assert_close(full[0, n - 1], alone[0, -1], rtol=1e-4, atol=1e-4)
    logp = token_logprobs(cosmos.model, batch)
    assert torch.isfinite(logp).all()


def _examples(root, cosmos):
    examples = Examples(cosmos.spec.style)
    for episode in iter_episodes(root):
        examples.add_episode(episode)
    return examples.items


def test_a_grpo_step_on_a_fixed_batch_raises_the_reward_of_the_sampled_answers(
    sft, recorded, tmp_path
):
    """After GRPO's updates on one sampled batch, the policy puts more probability on the
    completions that earned more: their reward, weighted by the new policy (self-normalised
    over each group's samples), rises above the group's plain mean."""
    out, _ = sft
    args = parse_args(
        [
            "grpo", "--episodes", str(recorded), "--out", str(tmp_path), "--init", str(out),
            "--group", "16", "--max-new-tokens", "24", "--lr", "1e-3", "--updates", "4",
            "--shuffle", "1",
        ]
    )  # fmt: skip
    cosmos, _ = checkpoint.load(out)
    fixed = _examples(recorded / "PickPlace-v0", cosmos)[:2]
    optimizer = torch.optim.AdamW(cosmos.model.parameters(), lr=args.lr)
    replicas = Replicas(Ranks(), args, cosmos.model, optimizer)
    grpo = GrpoStep(cosmos, args, replicas)
    torch.manual_seed(0)
    sampled = grpo.sample(fixed, np.random.default_rng(0))
    assert "batch" in sampled, "every group earned one reward: nothing to learn from"
    batch, mask = sampled["batch"], sampled["batch"]["completion_mask"]
    rewards = sampled["advantages"]  # within each kept group, higher advantage = more reward
    before = (sampled["old"] * mask).sum(1)
    for _ in range(args.updates):
        loss, stats = grpo.loss(sampled)
        optimizer.zero_grad()
        loss.backward()
        replicas.step()
    with torch.no_grad():
        after = token_logprobs(cosmos.model, batch, args.temperature, cosmos.media_ids)
        after = (after * mask).sum(1)
    weights = torch.exp(after - before)
    groups = len(rewards) // args.group
    gained = [
        float((w * r).sum() / w.sum() - r.mean())
        for w, r in zip(weights.view(groups, -1), rewards.view(groups, -1), strict=True)
    ]
    assert min(gained) > 0.2, gained  # in advantage units (standard deviations of the reward)
    assert stats["kl"] > 0 and grpo.flat_groups <= grpo.groups


def test_the_cosmos_trainer_says_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["grpo", "--episodes", str(tmp_path), "--out", str(tmp_path / "o")])
    cmd = trainer_command(1, "--help", module="trainer.cosmos")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "sft" in done.stdout and "grpo" in done.stdout


def test_the_documented_commands_parse():
    """Every `python -m trainer.cosmos` command of README.md and docs/cosmos.md is one the
    trainer accepts (run for real by the tests above and the benchmark)."""
    root = Path(__file__).resolve().parents[1]
    commands = []
    for doc in ("README.md", "docs/cosmos.md"):
        text = (root / doc).read_text().replace("\\\n", " ")
        commands += [line for line in text.splitlines() if "-m trainer.cosmos " in line]
    assert len(commands) >= 4, commands
    for line in commands:
        argv = shlex.split(line.split("-m trainer.cosmos ", 1)[1])
        args = parse_args(argv)
        assert args.algorithm in ("sft", "grpo") and args.episodes and args.out, line


def test_lora_versions_hold_an_adapter_that_loads_merged_over_its_base(sft, recorded, tmp_path):
    """`--lora-rank`: the language model's linear layers get adapters, the vision tower stays
    frozen, a version holds the adapter and names its base; loading merges it."""
    from agent.cosmos.inference import CosmosModel

    trained, _ = sft
    base = trained / versions.latest_name(trained)  # a save_pretrained folder that answers
    model = CosmosModel.load(str(base), compile="off").model
    out = tmp_path / "lora"
    cmd = trainer_command(
        1, "sft", "--episodes", str(recorded), "--out", str(out), "--base", str(base),
        "--lora-rank", "4", "--max-steps", "20", "--publish-every-s", "1e9", *SFT,
        "--validation-limit", "0", module="trainer.cosmos",
    )  # fmt: skip
    summary = run(cmd, timeout_s=240, what="a LoRA SFT")
    assert (
        summary["lora_base"] == str(base.resolve())
        and summary["trained_parameters"] < summary["parameters"] / 4
    )
    version = checkpoint.read(out)
    assert (
        version.base == str(base.resolve()) and "adapter_model.safetensors" in version.version.files
    )
    assert "model.safetensors" not in version.version.files  # the adapter only
    merged, _ = checkpoint.load(out)
    after = dict(merged.model.named_parameters())
    assert not any("lora" in name for name in after)  # merged into the base's layers
    before = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in before.items() if "visual" in k)  # frozen
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert changed and all("language_model" in k and "proj" in k for k in changed)
