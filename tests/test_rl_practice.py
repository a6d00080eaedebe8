"""RL_Practice's trainer as it really writes and trains (DESIGN §6, §7; issue 20).

The fixture is the built-in checkpoint laid out as RL_Practice's RLRunner writes a run
(``tiny.write_rl_practice_run``): config two levels above the steps, step_final and a
step_latest symlink, the names file per param group, the base named by ``backbone``.
A real RLRunner run cannot be fetched in CI; the README's RL_Practice section reports one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from entropy_lab.checkpoint import load_checkpoint, resolve_layout
from entropy_lab.cli import main
from entropy_lab.config import ExperimentConfig, resolve_training_setup
from entropy_lab.errors import CheckpointError, ConfigError
from entropy_lab.protocol import keep_group, sample_update_batch
from entropy_lab.tasks import load_rewards, load_task
from tests.conftest import make_setup

pytestmark = [pytest.mark.cpu, pytest.mark.xdist_group("rl_practice")]  # one fixture build


@pytest.fixture(scope="module")
def rl_practice_run(tiny_checkpoint, tmp_path_factory):
    from entropy_lab.tiny import write_rl_practice_run

    return write_rl_practice_run(tiny_checkpoint, tmp_path_factory.mktemp("rlp") / "run_x", (2, 4))


@pytest.fixture(scope="module")
def rlp_setup(rl_practice_run):
    """fp32, the trainer's 4-bit FP4 base, U of 4 prompts: the sweep as a user runs it."""
    return make_setup(rl_practice_run, eval_size=16, buffer_size=4, first_order=False)


# ----------------------------------------------------------------------------- layout


def test_run_folder_training_state_and_step(rl_practice_run):
    state = rl_practice_run / "training_state"
    for given in (rl_practice_run, state, state / "step_latest"):
        layout = resolve_layout(given)
        assert layout.root.name == "step_final", given
        assert layout.config_path == rl_practice_run / "config.yaml"
    assert resolve_layout(state / "step_2").root.name == "step_2"


def test_names_file_per_param_group(rl_practice_run, tmp_path):
    ck = load_checkpoint(rl_practice_run)
    assert ck.metadata["optimizer_mapping"] == "param_names"
    assert ck.metadata["step"] == "step_final" and ck.metadata["saved_step"] == 4
    assert ck.metadata["base_model_source"] == "training_info.json: model_config.backbone"
    # planted: the groups do not match the saved state's
    run = shutil.copytree(rl_practice_run, tmp_path / "run", symlinks=True)
    names_file = run / "training_state" / "step_final" / "optimizer_param_names.json"
    names = json.loads(names_file.read_text())
    names_file.write_text(json.dumps([names[0][:10], names[0][10:]]))
    with pytest.raises(CheckpointError, match="lists 2 param groups, the optimizer state has 1"):
        load_checkpoint(run)
    names_file.write_text(json.dumps([names[0][:-1]]))
    with pytest.raises(CheckpointError, match="group 0 names 53 parameters.* has 54"):
        load_checkpoint(run)


# ----------------------------------------------------------------------------- settings


def test_setup_is_rl_practice_trainer(rl_practice_run):
    step = resolve_layout(rl_practice_run).root
    setup = resolve_training_setup(step, generation_config={})
    v, src = setup.values, setup.sources
    assert (v["top_k"], v["top_p"]) == (50, 1.0)
    assert "transformers' default 50" in src["top_k"]
    assert (v["sampling_mode"], v["gradient_mode"]) == ("eval", "train")
    assert (v["base_quantization"], v["base_quant_double"], v["base_load_dtype"]) == (
        "fp4",
        True,
        "bf16",
    )
    assert (v["reject_all_zero"], v["reject_all_max"], v["reward_var_thresh"]) == (True, True, 0.01)
    assert v["loss_type"] == "dr_grpo_rl_practice" and v["stop_after"] == "</answer>"
    assert v["kl_beta"] == 0.0 and "kl_beta" in src["kl_beta"]
    notes = "\n".join(setup.notes)
    assert 'cfg["kl_beta"] = 0.0 is not read' in notes and "ent_coef = 0.0 is not read" in notes
    # the model's generation_config.json comes before transformers' default
    own = resolve_training_setup(step, generation_config={"top_k": 20, "top_p": 0.9})
    assert (own.values["top_k"], own.values["top_p"]) == (20, 0.9)
    assert "generation_config.json" in own.sources["top_k"]


def test_trainer_keys_without_default_are_required(rl_practice_run, tmp_path):
    run = shutil.copytree(rl_practice_run, tmp_path / "run", symlinks=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["reject_all_zero"]  # RL_Practice reads cfg["reject_all_zero"]: no code default
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"no source for reject_all_zero \(--reject-all-zero\)"):
        resolve_training_setup(resolve_layout(run).root, generation_config={})


# ----------------------------------------------------------------------------- quantized base


def _oracle_entropy(base_dir, adapter_dir, batch, temperature) -> float:
    """H on E from a bitsandbytes 4-bit model loaded as RL_Practice loads it (FP4, double
    quant, bf16 weights, peft's prepare_model_for_kbit_training), compute dtype fp32, with
    the step's adapter: plain transformers + peft + bitsandbytes, none of entropy_lab."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=config, dtype=torch.bfloat16, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(prepare_model_for_kbit_training(base), adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = batch.response_mask[:, 1:].bool()
    return float(entropy[mask].sum() / mask.sum())


@pytest.mark.parametrize(
    ("kind", "total", "step", "factor"),
    [
        ("const", 64, 1, "0.333"),  # the reference config: warmup int(3.2) = 3
        ("const", 64, 2, "0.667"),
        ("const", 64, 3, "1"),
        ("cosine", 70, 2, "0.667"),  # warmup int(3.5) = 3 (round(3.5) = 4 gave 0.75)
        ("cosine", 40, 4, "0.993"),  # the real RLRunner run of the README: scheduler.pt 0.99318
    ],
)
def test_schedule_note_is_rl_practices_scheduler_at_the_saved_step(kind, total, step, factor):
    """The sweep's note states the lr factor RL_Practice's scheduler.pt holds after step N
    (what track reads as the next step's lr), with its warmup int(0.05·total_steps)."""
    from entropy_lab.config import _schedule_note, rl_practice_schedule

    cfg = {"lr": 1.0, "lr_scheduler": kind, "total_steps": total}
    note = _schedule_note(cfg, "config.yaml", step)
    assert f"factor {factor} after step {step} of {total}" in note
    assert f"{rl_practice_schedule(cfg, step + 1)[step + 1]:.3g}" == factor


def test_quantized_base_is_the_trainers_4bit_policy(rlp_setup, rl_practice_run):
    meta = rlp_setup.checkpoint.metadata
    assert meta["base_quantization"].startswith("bitsandbytes 4-bit FP4, double quant")
    assert meta["quantized_weights_equal"] and meta["quantized_logits_difference"] <= 1e-5
    step = resolve_layout(rl_practice_run).root
    base = yaml.safe_load((rl_practice_run / "config.yaml").read_text())["backbone"]
    cfg = rlp_setup.cfg
    expected = _oracle_entropy(
        base, step / "model", rlp_setup.eval_batch.to("cpu"), cfg.temperature
    )
    assert abs(rlp_setup.baseline.conditional / expected - 1) <= 1e-5
    # the unquantized base is another function: the gap the setting closes
    plain = load_checkpoint(rl_practice_run)
    from entropy_lab.entropy import EntropyScorer, readings

    with torch.no_grad():
        sums = EntropyScorer(plain.policy, cfg.temperature).global_sums(rlp_setup.eval_batch)
    unquantized = float(readings(sums, sums.logprob)[0])
    assert abs(unquantized / expected - 1) > 100 * 1e-5


def test_a_swapped_adapter_on_the_quantized_base_is_held_to_bitsandbytes(rl_practice_run):
    """An adapter swapped into the 4-bit base is checked against bitsandbytes' own 4-bit model
    with that adapter, as a fresh load is; a changed weight of the shared base is refused."""
    from entropy_lab.quantization import Quantization, quantized_linears

    state = rl_practice_run / "training_state"
    settings = resolve_training_setup(state / "step_2", generation_config={}).values
    quantization = Quantization.of(settings)
    first = load_checkpoint(state / "step_2", quantization=quantization)
    swapped = load_checkpoint(state / "step_4", quantization=quantization, reuse=first)
    meta = swapped.metadata
    assert meta["base_load"].startswith("shared with step_2") and meta["saved_step"] == 4
    assert meta["quantized_weights_equal"] and meta["quantized_logits_difference"] <= 1e-5
    _, layer = quantized_linears(swapped.policy)[0]
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3  # planted: the shared base is no longer bitsandbytes'
    with pytest.raises(CheckpointError, match="dequantized weight differs from bitsandbytes'"):
        load_checkpoint(state / "step_final", quantization=quantization, reuse=swapped)


def test_quantization_mismatch_is_refused(tiny_checkpoint, monkeypatch):
    import entropy_lab.quantization as quantization

    monkeypatch.setattr(quantization, "BLOCKSIZE", 128)  # planted: not bitsandbytes' blocks
    with pytest.raises(CheckpointError, match="does not compute bitsandbytes' 4-bit function"):
        load_checkpoint(tiny_checkpoint, quantization=quantization.Quantization("nf4"))


# ----------------------------------------------------------------------------- filters


def _cfg(**filters) -> ExperimentConfig:
    return ExperimentConfig(learning_rates=[1e-6], **filters)


def test_keep_group_as_rl_practice_decides():
    """Each filter alone (RL_Practice's _accept_prompt_group): population variance strictly
    below the threshold, all rewards 0, all rewards equal to the group's largest."""
    half, zeros, split = torch.full((4,), 0.5), torch.zeros(4), torch.tensor([0.0, 0.0, 1.0, 1.0])
    only_zero, only_max = _cfg(reject_all_zero=True), _cfg(reject_all_max=True)
    assert not keep_group(zeros, only_zero) and keep_group(half, only_zero)
    assert not keep_group(half, only_max) and not keep_group(zeros, only_max)
    assert keep_group(split, only_max) and keep_group(split, only_zero)
    assert keep_group(split, _cfg(reward_var_thresh=0.25))  # variance 0.25: not below
    assert not keep_group(split, _cfg(reward_var_thresh=0.26))
    assert keep_group(zeros, _cfg())  # no filters: every group kept


def test_update_batch_after_the_filters(rlp_setup):
    update = sample_update_batch(rlp_setup, repeat=0)
    groups = update.groups
    assert groups.kept == rlp_setup.cfg.buffer_size and groups.drawn == groups.kept + groups.dropped
    for prompt in update.sequences.prompt_index.unique():
        rewards = update.rewards[update.sequences.prompt_index == prompt]
        assert float(rewards.var(unbiased=False)) >= 0.01
    again = sample_update_batch(rlp_setup, repeat=0)  # seeded: the same U
    assert torch.equal(again.sequences.input_ids, update.sequences.input_ids)


def _reward_module(tmp_path, body: str) -> str:
    path = tmp_path / "rewards_mod.py"
    path.write_text("def score(completions, **kwargs):\n" + body)
    return f"{path}:score"


def test_no_reward_variance_is_refused_before_measuring(rlp_setup, tmp_path, monkeypatch):
    constant = load_rewards(_reward_module(tmp_path, "    return [0.0] * len(completions)\n"))
    monkeypatch.setattr(rlp_setup.task, "reward_functions", constant)
    with pytest.raises(ConfigError, match="no reward variance: under reward"):
        sample_update_batch(rlp_setup, repeat=0)


def test_a_first_round_without_variance_is_refilled_not_refused(rlp_setup, tmp_path, monkeypatch):
    """RL_Practice refills its buffer: on a real RLRunner run of the tiny base (README) 24 of
    1144 groups were kept, so U's first prompts often all fail the filters. Planted: no
    variance in the first round's rewards, variance in every later round's; the sweep refills
    as the trainer does (it used to refuse: 'no reward variance')."""
    path = tmp_path / "late_variance.py"
    path.write_text(
        "CALLS = []\n"
        "def score(completions, **kwargs):\n"
        "    CALLS.append(len(completions))\n"
        "    if len(CALLS) == 1:\n"
        "        return [0.0] * len(completions)\n"
        "    return [float(i % 2) for i in range(len(completions))]\n"
    )
    monkeypatch.setattr(rlp_setup.task, "reward_functions", load_rewards(f"{path}:score"))
    update = sample_update_batch(rlp_setup, repeat=0)
    g, buffer = rlp_setup.cfg.num_generations, rlp_setup.cfg.buffer_size
    # round 0's groups all dropped; the refill (drawn for the acceptance rate seen so far)
    # fills U with its first groups
    assert update.groups.kept == buffer and update.groups.drawn > buffer
    assert torch.equal(update.rewards, torch.arange(buffer * g, dtype=torch.float64) % 2)


def test_unfillable_buffer_is_a_clear_error(rlp_setup, tmp_path, monkeypatch):
    # planted: variance only for prompts whose answer is 7 (a few of the pool)
    body = "    return [float(a == '7' and c.strip() == '7') for c, a in zip(completions, kwargs['answer'])]\n"
    rare = load_rewards(_reward_module(tmp_path, body))
    monkeypatch.setattr(rlp_setup.task, "reward_functions", rare)
    with pytest.raises(ConfigError, match="the update buffer cannot be filled: .* dropped by"):
        sample_update_batch(rlp_setup, repeat=1)


def test_track_on_the_rl_practice_layout(tiny_checkpoint, tmp_path):
    """The run folder as RLRunner writes it (tiny.write_rl_practice_run; the README reports a
    real RLRunner run): steps in order, step_final dropped, the lr of step N+1 from its
    schedule and scheduler.pt, the logged entropy of step N+1 from logs/train_log.jsonl.
    Every step holds the same adapter, so H₀ is the same at each: ΔH₀ = 0 exactly."""
    from entropy_lab.tiny import write_rl_practice_run

    run = write_rl_practice_run(tiny_checkpoint, tmp_path / "run_x", steps=(1, 2))
    flags = [
        "--dtype", "fp64", "--learning-rates", "1e-5,1e-4", "--num-repeats", "2",
        "--eval-size", "4", "--buffer-size", "4", "--no-first-order", "--no-progress",
        "--threads", "1",
    ]  # fmt: skip
    assert main(["track", str(run), *flags, "--output-dir", str(tmp_path / "out")]) == 0
    (folder,) = (tmp_path / "out").glob("entropy_track_*")
    data = json.loads((folder / "track.json").read_text())
    assert [e["step"] for e in data["checkpoints"]] == [1, 2]
    assert len(data["skipped"]) == 1 and "step_final" in data["skipped"][0]
    assert data["costs"]["base_loads"] == 1 and data["costs"]["adapter_swaps"] == 1
    log = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
    for e in data["checkpoints"]:
        scheduler = run / "training_state" / f"step_{e['step']}" / "scheduler.pt"
        state = torch.load(scheduler, weights_only=True)
        assert e["lr"]["next_step"] == state["_last_lr"][0] == 3e-4  # constant, no warmup
        assert e["alpha_times_lr"] == e["alpha"]["value"] * 3e-4
        after = [r["entropy"] for r in log if r["step"] == e["step"] + 1]
        assert e["logged_entropy"]["value"] == (after[0] if after else None)
    (interval,) = data["history"]["intervals"]
    assert interval["observed"]["value"] == 0.0 and interval["logged_entropy_change"] is None
    assert "RL_Practice's logged 'entropy'" in data["history"]["logged_entropy"]
    assert (folder / "track.png").is_file()


# ----------------------------------------------------------------------------- modes


def test_gradient_in_train_mode_is_seeded(rlp_setup):
    updater, update = rlp_setup.updater, sample_update_batch(rlp_setup, repeat=0)
    assert updater.gradient_mode == "train" and update.dropout_seed is not None

    def flat(gradient):
        return torch.cat([g.flatten() for _, g in sorted(gradient.grads.items())])

    first, again = flat(updater.gradient(update)), flat(updater.gradient(update))
    assert torch.equal(first, again)  # the repeat's dropout masks are reproducible
    update.dropout_seed += 1
    other = flat(updater.gradient(update))
    assert not torch.equal(first, other)  # LoRA dropout is on
    updater.gradient_mode = "eval"
    try:
        plain = flat(updater.gradient(update))
    finally:
        updater.gradient_mode = "train"
    assert 0 < float((first - plain).norm() / plain.norm()) < 1
    assert not rlp_setup.checkpoint.policy.training  # E is scored in eval mode after


# ----------------------------------------------------------------------------- sampler


def test_entropy_is_the_full_softmax_under_top_k(tiny_checkpoint):
    setup = make_setup(tiny_checkpoint, eval_size=16, top_k=3, first_order=False)
    batch = setup.eval_batch
    with torch.no_grad():
        logits = setup.checkpoint.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    logp = torch.log_softmax(logits[:, :-1].double() / setup.cfg.temperature, dim=-1)
    mask = batch.response_mask[:, 1:].bool()
    full = float((-(logp.exp() * logp).sum(-1))[mask].sum() / mask.sum())
    assert abs(setup.baseline.conditional / full - 1) < 1e-6
    # every sampled token lies in the top 3 of its step: the sampler truncated
    tokens = batch.input_ids[:, 1:][mask]
    rank = (logits[:, :-1][mask] > logits[:, :-1][mask].gather(-1, tokens[:, None])).sum(-1)
    assert int(rank.max()) < 3


def test_stop_after_ends_responses(tiny_checkpoint):
    from entropy_lab.rollout import sample_responses

    ck = load_checkpoint(tiny_checkpoint)
    task = load_task("arithmetic")
    kwargs = dict(temperature=1.0, max_new_tokens=4, seed=3)
    free = sample_responses(ck.policy, ck.tokenizer, task.problems[:16], 2, **kwargs)
    cut = sample_responses(ck.policy, ck.tokenizer, task.problems[:16], 2, stop_after="1", **kwargs)
    ends = [text for text in cut.responses if "1" in text]
    assert ends and all(text.endswith("1") for text in ends)
    assert any("1" in text and not text.endswith("1") for text in free.responses)


# ----------------------------------------------------------------------------- rewards


def test_rl_practice_reward_interface(tmp_path):
    path = tmp_path / "contains_gold.py"
    path.write_text(
        "import torch\n"
        "PROMPT2GOLD = {}\n"
        "def reward_fn(prompt_id, answers):\n"
        "    gold = PROMPT2GOLD.get(prompt_id)\n"
        "    return torch.tensor([float(gold is not None and gold in a) for a in answers])\n"
    )
    rewards = load_rewards(f"{path}:reward_fn")
    task = load_task("arithmetic", rewards=rewards)
    first, second = task.problems[:2]
    completions = [first.answer, "x", second.answer, first.answer]
    values = task.rewards(completions, [first, first, second, second])
    assert values == [1.0, 0.0, 1.0, float(first.answer == second.answer)]


# ----------------------------------------------------------------------------- KL reference


def test_kl_reference_is_the_starting_adapter_when_named(tiny_checkpoint, tmp_path):
    """TRL handed a PeftModel keeps its starting adapter as the reference: its weights are
    swapped in for the reference log-probs and θ is restored exactly."""
    from safetensors.torch import load_file, save_file

    setup = make_setup(tiny_checkpoint, eval_size=8, buffer_size=2, first_order=False)
    updater, seqs = setup.updater, sample_update_batch(setup, repeat=0).sequences
    start = shutil.copytree(tiny_checkpoint / "model", tmp_path / "start")
    weights = load_file(start / "adapter_model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, start / "adapter_model.safetensors")
    theta = {n: p.detach().clone() for n, p in updater.params.items()}
    own = updater.token_logprobs(seqs)
    starting = updater.reference_logprobs(seqs, reference_adapter=str(start))
    base = updater.reference_logprobs(seqs)
    assert all(torch.equal(p, theta[n]) for n, p in updater.params.items())
    assert torch.equal(updater.token_logprobs(seqs), own)
    assert not torch.allclose(starting, own) and not torch.allclose(starting, base)
    same = updater.reference_logprobs(seqs, reference_adapter=str(tiny_checkpoint / "model"))
    assert torch.allclose(same, own, rtol=0, atol=1e-6)
