"""What the user sees when something is wrong: one line, exit code 2, no traceback.

Four layers, each tested where it lives:

1. bad input to the CLI (`entropy_lab.cli.main`): the exact one-line message per case. The
   loader-level checks behind most of them are tested in test_checkpoint.py and
   test_config_tasks.py; here it is the user-facing surface (exit code, one line, no
   traceback), plus the cases those files do not cover (corrupt or truncated files, a state
   of the wrong dtype, NaN weights, a binary prompt file).
2. the same problems in the pytest suite: a usage error or a failed test with the same text.
3. bad numbers during a run: a non-finite loss, gradient or entropy fails that (η, repeat)
   only, and the analysis counts the failures.
4. CUDA out-of-memory: retried with halved sizes (same result), then a clear error.

Plus the security properties: no unsafe deserialisation or shell strings in the package.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from entropy_lab import protocol, rollout
from entropy_lab.cli import main
from entropy_lab.entropy import EntropyReadings, EntropyScorer
from entropy_lab.errors import EntropyLabError
from entropy_lab.update import PolicyUpdate
from tests.conftest import make_setup, run_suite_here
from tests.test_checkpoint import _first_trainable_with_state, _Payload, _saved_state

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


# ----------------------------------------------------------------------------- 1. CLI


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def _save_state(ck: Path, edit) -> Path:
    """The checkpoint's optimizer.pt with ``edit(saved, saved_id)`` applied."""
    name, saved_id = _first_trainable_with_state(ck)
    saved = _saved_state(ck / "optimizer.pt")
    edit(saved, saved_id)
    torch.save(saved, ck / "optimizer.pt")
    return ck


def _drop_last_param(saved, _):
    saved["param_groups"][-1]["params"].pop()


def _wrong_shape(saved, saved_id):
    saved["state"][saved_id]["exp_avg"] = torch.zeros(3, 3)


def _int_moments(saved, saved_id):
    saved["state"][saved_id]["exp_avg"] = saved["state"][saved_id]["exp_avg"].to(torch.int64)


def _nan_adapter_weight(ck: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = ck / "model" / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[key] = torch.full_like(weights[key], math.nan)
    save_file(weights, str(path))
    return ck


def _without_base_model(tiny: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copytree(tiny / "model", dst / "model")  # its ../base_model is not there
    for f in ("optimizer.pt", "optimizer_param_names.json"):
        shutil.copy(tiny / f, dst / f)
    return dst


def _prompt_config(tmp: Path, name: str, content: bytes) -> Path:
    """A training YAML whose task is a prompt file holding ``content``."""
    prompts = tmp / f"{name}.jsonl"
    prompts.write_bytes(content)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"max_new_tokens: 4\nscheduler:\n  dataset: {prompts}\n")
    return cfg


def _five_prompts() -> bytes:
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(5)]
    return "\n".join(lines).encode()


def _not_tiny(tiny: Path, tmp: Path) -> Path:
    """The tiny checkpoint without its build record and training config: any other
    checkpoint, whose setup has no defaults and no source."""
    ck = _copy(tiny, tmp / "ck")
    (ck / "training_info.json").unlink()
    (ck / "config.yaml").unlink()
    return ck


def _reward_file(tmp: Path, body: str) -> str:
    path = tmp / "my_reward.py"
    path.write_text(body)
    return f"{path}:score"


def _rl_practice_config(tmp: Path, extra: str) -> Path:
    cfg = tmp / "rlp.yaml"
    cfg.write_text(
        "max_new_tokens: 4\nnum_generations: 4\ntemperature: 1.0\ntop_p: 1.0\ntop_k: 0\n"
        "kl_beta: 0.0\nent_coef: 0.0\ngrad_clip: 1.0\nreward_fns: [tag_pref]\n"
        # RL_Practice's trainer reads these with no default (cfg["reject_all_zero"])
        "reward_var_thresh: 0.01\nreject_all_zero: true\nreject_all_max: true\n" + extra
    )
    return cfg


def _args_bin(tiny: Path, tmp: Path) -> Path:
    ck = _copy(tiny, tmp / "ck")
    torch.save({"loss_type": "dapo"}, ck / "training_args.bin")
    return ck


def _ck(build):
    """A case whose arguments are ``--checkpoint <build(tiny, tmp)>``."""
    return lambda tiny, tmp: ["--checkpoint", str(build(tiny, tmp))]


# (case id, argv builder (tiny checkpoint, tmp_path) -> extra argv, message regex)
CLI_CASES = [
    (
        "checkpoint-missing",
        lambda tiny, tmp: ["--checkpoint", str(tmp / "nowhere")],
        r"checkpoint not found: .*nowhere \(pass an existing folder\)",
    ),
    (
        "checkpoint-is-a-file",
        lambda tiny, tmp: ["--checkpoint", str(tiny / "optimizer.pt")],
        r"checkpoint must be a folder, got the file .*optimizer\.pt",
    ),
    (
        "optimizer-missing",
        _ck(lambda tiny, tmp: _unlink(_copy(tiny, tmp / "ck"), "optimizer.pt")),
        r"no optimizer\.pt in .*ck: the experiment needs the AdamW state saved with the adapter "
        r"\(save the optimizer state_dict next to the model\)",
    ),
    (
        "optimizer-empty",
        _ck(lambda tiny, tmp: _write(_copy(tiny, tmp / "ck"), "optimizer.pt", b"")),
        r"cannot read .*optimizer\.pt with torch\.load\(weights_only=True\) \(EOFError\): "
        r"the file is empty, truncated or not a torch\.save file; re-save "
        r"optimizer\.state_dict\(\)",
    ),
    (
        "optimizer-truncated",
        _ck(lambda tiny, tmp: _truncate(_copy(tiny, tmp / "ck"), "optimizer.pt")),
        r"cannot read .*optimizer\.pt with torch\.load\(weights_only=True\) \(RuntimeError: "
        r"PytorchStreamReader failed .*\): the file is empty, truncated or not a torch\.save "
        r"file; re-save optimizer\.state_dict\(\)",
    ),
    (
        "optimizer-count-mismatch",
        _ck(lambda tiny, tmp: _save_state(_copy(tiny, tmp / "ck"), _drop_last_param)),
        r"optimizer state in .*optimizer\.pt does not match the trainable parameters "
        r"\(28 trainable, 53 in the state\) — param_names: 54 parameters vs 53 state entries",
    ),
    (
        "optimizer-shape-mismatch",
        _ck(lambda tiny, tmp: _save_state(_copy(tiny, tmp / "ck"), _wrong_shape)),
        r"optimizer state in .* does not match the trainable parameters .* first mismatch at "
        r"\S+lora_A\S+: "
        r"state exp_avg shape \(3, 3\) vs parameter \(8, 64\)",
    ),
    (
        "optimizer-dtype-mismatch",
        _ck(lambda tiny, tmp: _save_state(_copy(tiny, tmp / "ck"), _int_moments)),
        r"optimizer state in .* does not match the trainable parameters .* \S+lora_A\S+: "
        r"state exp_avg has dtype "
        r"torch\.int64, not a floating-point type",
    ),
    (
        "param-names-corrupt",
        _ck(lambda tiny, tmp: _write(_copy(tiny, tmp / "ck"), "optimizer_param_names.json", b"[")),
        r"cannot read .*optimizer_param_names\.json as JSON \(JSONDecodeError: .*\): "
        r"fix or re-create the file",
    ),
    (
        "adapter-config-corrupt",
        _ck(lambda tiny, tmp: _write(_copy(tiny, tmp / "ck"), "model/adapter_config.json", b"{")),
        r"cannot read .*adapter_config\.json as JSON \(JSONDecodeError: .*\): fix or re-create "
        r"the file",
    ),
    (
        "adapter-weights-corrupt",
        _ck(
            lambda tiny, tmp: _write(
                _copy(tiny, tmp / "ck"), "model/adapter_model.safetensors", b"junk"
            )
        ),
        r"cannot load the adapter in .*model \(SafetensorError: .*\): its files are corrupt or "
        r"incomplete, or made for another base model; re-save the adapter",
    ),
    (
        "base-weights-corrupt",
        _ck(
            lambda tiny, tmp: _write(
                _copy(tiny, tmp / "ck"), "base_model/model.safetensors", b"junk"
            )
        ),
        r"cannot load the model in .*base_model \(SafetensorError: .*\): its files are "
        r"corrupt or incomplete; re-save it with save_pretrained",
    ),
    (
        "weights-nan",
        _ck(lambda tiny, tmp: _nan_adapter_weight(_copy(tiny, tmp / "ck"))),
        r".*ck: parameter \S+lora_B\S+ holds NaN or inf \(a diverged or damaged checkpoint\); "
        r"use an earlier step",
    ),
    (
        "base-model-not-found-offline",
        _ck(lambda tiny, tmp: _without_base_model(tiny, tmp / "ck")),
        r"cannot load the base model '\.\./base_model' offline \(OSError\): pass --base-model "
        r"with a local folder or a cached hub id",
    ),
    (
        "yaml-malformed",
        lambda tiny, tmp: ["--base-config", str(_write(tmp, "bad.yaml", b"lr: [1,\n  x: :\n"))],
        r"malformed YAML in .*bad\.yaml at line 2: fix the syntax",
    ),
    (
        "prompt-file-empty",
        lambda tiny, tmp: ["--base-config", str(_prompt_config(tmp, "empty", b""))],
        r"prompt file .*empty\.jsonl holds no records",
    ),
    (
        "prompt-file-too-small",
        lambda tiny, tmp: ["--base-config", str(_prompt_config(tmp, "small", _five_prompts()))],
        r"prompts '.*small\.jsonl' have 5 records; the sweep needs at least eval_size \+ "
        r"buffer_size = 12 \(lower --eval-size or buffer_size, or give a larger prompt file\)",
    ),
    (
        "non-tiny-checkpoint-without-prompts",
        lambda tiny, tmp: ["--checkpoint", str(_not_tiny(tiny, tmp))],
        r"no source for max_new_tokens \(--max-new-tokens\), .*, prompts \(--prompts\), "
        r"reward \(--reward\): the checkpoint's training config does not set them; pass .* "
        r"or --base-config YAML \(only the built-in tiny checkpoint has defaults\)",
    ),
    (
        "dataset-name-not-offline",
        lambda tiny, tmp: [
            "--checkpoint",
            str(_not_tiny(tiny, tmp)),
            "--base-config",
            str(
                _rl_practice_config(
                    tmp, "scheduler: {dataset_name: gsm8k_r1_template, split: train}\n"
                )
            ),
        ],
        r"the data set 'gsm8k_r1_template' \(split train\) cannot be loaded offline "
        r"\(\w+\): pass --prompts FILE with its records \(JSONL/JSON/CSV/Parquet\)",
    ),
    (
        "unknown-loss-type",
        lambda tiny, tmp: ["--loss-type", "ppo"],
        r"--loss-type: unknown loss type 'ppo' \(--loss-type\): one of dr_grpo, "
        r"dr_grpo_rl_practice, grpo, dapo, bnpo",
    ),
    (
        "reward-does-not-import",
        lambda tiny, tmp: ["--reward", _reward_file(tmp, "import no_such_module\n")],
        r"--reward '.*my_reward\.py:score' does not import \(ModuleNotFoundError: No module "
        r"named 'no_such_module'\)",
    ),
    (
        "reward-wrong-length",
        lambda tiny, tmp: [
            "--reward",
            _reward_file(tmp, "def score(completions, **kw):\n    return [1.0]\n"),
        ],
        r"reward '.*my_reward\.py:score' returned 1 values for \d+ completions: return one "
        r"float per completion",
    ),
    (
        "reward-not-finite",
        lambda tiny, tmp: [
            "--reward",
            _reward_file(
                tmp, "def score(completions, **kw):\n    return [float('nan')] * len(completions)\n"
            ),
        ],
        r"reward '.*my_reward\.py:score' returned nan for completion 0: every reward must be a "
        r"finite number",
    ),
    (
        "training-args-not-an-argument-object",
        _ck(_args_bin),
        r".*training_args\.bin holds a dict, not a training-arguments object "
        r"\(TrainingArguments / GRPOConfig\)",
    ),
    (
        "prompt-file-binary",
        lambda tiny, tmp: ["--base-config", str(_prompt_config(tmp, "bin", b"\xff\xfe\x00"))],
        r"cannot read prompt file .*bin\.jsonl as UTF-8 text \(UnicodeDecodeError\): give a "
        r"JSONL file with one JSON object per line",
    ),
    (
        "learning-rates-not-a-number",
        lambda tiny, tmp: ["--learning-rates", "1e-6,abc"],
        r"--learning-rates: 'abc' is not a number \(write e\.g\. 1e-8,1e-7,1e-6\)",
    ),
    (
        "learning-rates-zero",
        lambda tiny, tmp: ["--learning-rates", "0,1e-6"],
        r"--learning-rates: '0' must be a finite number > 0",
    ),
    (
        "learning-rates-negative",
        lambda tiny, tmp: ["--learning-rates=-1e-6"],
        r"--learning-rates: '-1e-6' must be a finite number > 0",
    ),
    (
        "learning-rates-nan",
        lambda tiny, tmp: ["--learning-rates", "1e-6,nan"],
        r"--learning-rates: 'nan' must be a finite number > 0",
    ),
    (
        "learning-rates-duplicate",
        lambda tiny, tmp: ["--learning-rates", "1e-6,1e-5,0.000001"],
        r"--learning-rates: duplicate values \[1e-06\]: list each η once",
    ),
    (
        "learning-rates-empty",
        lambda tiny, tmp: ["--learning-rates", ","],
        r"--learning-rates: give at least one value, e\.g\. 1e-8,1e-7,1e-6",
    ),
    (
        "num-repeats-1",
        lambda tiny, tmp: ["--num-repeats", "1"],
        r"--num-repeats must be >= 2 \(got 1\): standard errors and the lack-of-fit test need "
        r"repeats",
    ),
    (
        "resume-not-a-results-folder",
        lambda tiny, tmp: ["--resume", str(tmp)],
        r"--resume .*: no run_meta\.json there \(not a results folder\)",
    ),
]


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return folder if folder.name == "ck" else path


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _truncate(folder: Path, name: str) -> Path:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return folder


def run_cli(capsys, tmp_path: Path, *argv: str, command: str = "quick") -> str:
    """Run the CLI; assert exit code 2 and a single stderr line; return the message."""
    base = ["--no-progress", "--threads", "1", "--eval-size", "8", "--buffer-size", "4"]
    rc = main([command, *base, "--output-dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("entropy-lab: error: ")
    return lines[0].removeprefix("entropy-lab: error: ")


@pytest.mark.parametrize(
    "build, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_bad_input_is_one_clear_line(build, message, tiny_checkpoint, tmp_path, capsys):
    torch.set_num_threads(1)
    extra = build(tiny_checkpoint, tmp_path)
    assert re.fullmatch(message, run_cli(capsys, tmp_path, *extra)), message
    # A run refused before its first point leaves no (empty) results folder behind.
    assert not list((tmp_path / "out").glob("entropy_lr_experiment_*"))


def test_cli_sweep_needs_a_checkpoint(tmp_path, capsys):
    message = run_cli(capsys, tmp_path, command="sweep")
    assert message == "sweep needs --checkpoint DIR (or use `entropy-lab quick`)"


def test_cli_debug_shows_the_traceback(tmp_path):
    """--debug re-raises, so the traceback is there for a bug report."""
    with pytest.raises(EntropyLabError, match="checkpoint not found"):
        main(["--debug", "quick", "--checkpoint", str(tmp_path / "nowhere")])


def test_crafted_pickle_is_live_and_refused_without_running(tiny_checkpoint, tmp_path, capsys):
    """The payload of test_checkpoint.py's pickle test really runs code when loaded unsafely
    (so that test can fail); the CLI refuses it by name and the code never runs."""
    live = tmp_path / "live.pt"
    marker = tmp_path / "marker"
    torch.save({"state": _Payload(marker), "param_groups": []}, live)
    torch.load(live, weights_only=False)  # the unsafe load this project never does
    assert marker.read_text() == "pwned"
    marker.unlink()

    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    shutil.copy(live, ck / "optimizer.pt")
    message = run_cli(capsys, tmp_path, "--checkpoint", str(ck))
    assert re.fullmatch(
        r".*optimizer\.pt was refused by torch\.load\(weights_only=True\): it references "
        r"GLOBAL exec, not only tensors; re-save optimizer\.state_dict\(\) with "
        r"torch\.save \(never load an untrusted file with weights_only=False\)",
        message,
    ), message
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. pytest


@pytest.mark.parametrize(
    "option, value",
    [("--num-repeats", "1"), ("--learning-rates", "1e-6,nan"), ("--checkpoint", "nowhere")],
)
def test_pytest_bad_option_is_a_usage_error_with_the_cli_text(tmp_path, capsys, option, value):
    cli_message = run_cli(capsys, tmp_path, option, value)
    result = run_suite_here(tmp_path / "suite", "-m", "cpu", option, value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: {cli_message}" in result.stderr.lines
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_pytest_broken_checkpoint_fails_with_the_cli_text(tiny_checkpoint, tmp_path, capsys):
    ck = _save_state(_copy(tiny_checkpoint, tmp_path / "ck"), _wrong_shape)
    cli_message = run_cli(capsys, tmp_path, "--checkpoint", str(ck))
    result = run_suite_here(
        tmp_path / "suite",
        *("-m", "gpu", "--device", "cpu", f"--checkpoint={ck}", "--learning-rates", "1e-6"),
        *("-k", "test_entropy_change or test_r_squared"),
    )
    result.assert_outcomes(failed=2)
    # One failure section per test prints the message as its own line; the
    # short summary may repeat it (how much depends on the terminal width).
    assert result.stdout.lines.count(f"entropy-lab: error: {cli_message}") == 2
    out = result.stdout.str()
    assert "Traceback" not in out and "raise CheckpointError" not in out


# ----------------------------------------------------------------------------- 3. bad numbers


@pytest.fixture(scope="module")
def _small(tiny_checkpoint):
    torch.set_num_threads(1)
    return make_setup(tiny_checkpoint, dtype="fp64", eval_size=16, buffer_size=8, first_order=False)


@pytest.fixture
def small(_small):
    """The module's setup, with the memory knobs put back after each test."""
    up, sc = _small.updater, _small.scorer
    saved = (up.microbatch_size, up.chunk_tokens, sc.chunk_tokens, sc.max_rows)
    yield _small
    up.microbatch_size, up.chunk_tokens, sc.chunk_tokens, sc.max_rows = saved
    up.restore()


def _at_theta0(setup) -> bool:
    return all(torch.equal(p, setup.updater.theta0[n]) for n, p in setup.updater.params.items())


ETAS = [1e-7, 1e-6, 1e-5]


def test_nan_gradient_fails_its_repeat_only_and_the_verdict_says_so(small, monkeypatch):
    from entropy_lab.report import build_analysis, format_tables

    honest = [
        r.to_dict() for r in protocol.run_sweep(small, repeats=[0, 1], etas=ETAS, progress=False)
    ]
    original = protocol.sample_update_batch

    def nan_advantage_in_repeat_1(setup, repeat):
        update = original(setup, repeat)
        if repeat == 1:  # one bad number reaches the real loss and gradient
            update.advantages[0] = math.nan
        return update

    monkeypatch.setattr(protocol, "sample_update_batch", nan_advantage_in_repeat_1)
    records = [
        r.to_dict() for r in protocol.run_sweep(small, repeats=[0, 1], etas=ETAS, progress=False)
    ]
    assert _at_theta0(small)

    by_repeat = {r: [x for x in records if x["repeat"] == r] for r in (0, 1)}
    assert [x["learning_rate"] for x in by_repeat[1]] == ETAS  # every η of repeat 1 recorded
    assert all(x["success"] for x in by_repeat[0])
    assert (
        by_repeat[0]
        == [  # repeat 0 is untouched by repeat 1's failure
            {**h, "duration_s": x["duration_s"], "direction_seconds": x["direction_seconds"]}
            for h, x in zip(honest[:3], by_repeat[0])
        ]
    )
    for x in by_repeat[1]:
        assert x["success"] is False
        assert re.fullmatch(
            r"FloatingPointError: non-finite loss \(nan\) or gradient norm \(nan\) "
            r"\(update direction of repeat 1\)",
            x["error"],
        ), x["error"]

    meta = {"config": {"dtype": "fp64"}}
    planted = build_analysis(records, meta)["summary"]
    clean = build_analysis(honest, meta)["summary"]
    assert (clean["n_failed"], planted["n_failed"]) == (0, 3)
    assert [(f["learning_rate"], f["repeat"]) for f in planted["failures"]] == [
        (eta, 1) for eta in ETAS
    ]
    assert planted["verdict"] == "inconclusive"
    # Repeat 0 alone is left at every η: no bound over repeats, so nothing can be decided.
    assert "0 resolvable η of 3" in planted["verdict_reason"]
    assert all(
        "fewer than 2 successful repeats" in " ".join(row["unresolvable_reasons"])
        for row in build_analysis(records, meta)["per_learning_rate"].values()
    )
    assert not any(
        "fewer than 2 successful repeats" in " ".join(row["unresolvable_reasons"])
        for row in build_analysis(honest, meta)["per_learning_rate"].values()
    )
    assert "3 failed runs" in format_tables(build_analysis(records, meta))


def test_nan_entropy_fails_that_point_only(small, monkeypatch):
    d = protocol.direction(small, 0)
    original = small.scorer.measure

    def nan_at_1e_6(batch, reference_logprob):
        readings = original(batch, reference_logprob)
        if small.updater.optimizer.param_groups[0]["lr"] == 1e-6:
            return EntropyReadings(math.nan, math.nan, readings.ess)
        return readings

    monkeypatch.setattr(small.scorer, "measure", nan_at_1e_6)
    records = [protocol.measure_point(small, d, eta) for eta in ETAS]
    assert [r.success for r in records] == [True, False, True]
    assert records[1].error == "FloatingPointError: non-finite entropy after the step (nan)"
    assert _at_theta0(small)


# ----------------------------------------------------------------------------- 4. out of memory


def _knobs(setup) -> tuple[int, int, int, int]:
    up, sc = setup.updater, setup.scorer
    return up.microbatch_size, up.chunk_tokens, sc.chunk_tokens, sc.max_rows


def _set_knobs(setup, microbatch: int, chunk: int, rows: int) -> None:
    setup.updater.microbatch_size = microbatch
    setup.updater.chunk_tokens = setup.scorer.chunk_tokens = chunk
    setup.scorer.max_rows = rows


def _oom_on_calls(monkeypatch, cls, name: str, calls: set[int] | None):
    """Make ``cls.name`` raise torch.OutOfMemoryError on the given call numbers (all: None)."""
    original = getattr(cls, name)
    count = {"n": 0}

    def flaky(self, *args, **kwargs):
        count["n"] += 1
        if calls is None or count["n"] in calls:
            raise torch.OutOfMemoryError(OOM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    return count


def test_oom_in_gradient_retries_at_half_size_with_the_same_result(small, monkeypatch):
    # Sizes at which halving changes the work: 8 prompts in micro-batches of 4 → 2.
    _set_knobs(small, microbatch=4, chunk=16, rows=8)
    reference = protocol.direction(small, 0)

    _oom_on_calls(monkeypatch, PolicyUpdate, "backward_on", {1})
    with pytest.warns(
        RuntimeWarning,
        match=r"CUDA out of memory in the update direction of repeat 0: retrying with "
        r"microbatch_size 2, eval_chunk_tokens 8, scoring rows 4",
    ):
        d = protocol.direction_or_failure(small, 0)
    assert _knobs(small) == (2, 8, 8, 4)
    monkeypatch.undo()

    direct = small.updater.gradient(d.update)  # computed at the halved sizes, no OOM
    assert torch.equal(d.update.sequences.input_ids, reference.update.sequences.input_ids)
    for name, g in reference.gradient.grads.items():
        assert torch.equal(d.gradient.grads[name], direct.grads[name]), name
        scale = float(g.abs().max())
        torch.testing.assert_close(d.gradient.grads[name], g, rtol=1e-12, atol=1e-14 * scale)
    assert d.gradient.loss == pytest.approx(reference.gradient.loss, rel=1e-12)


def test_oom_in_scoring_retries_at_half_size_with_the_same_result(small, monkeypatch):
    _set_knobs(small, microbatch=4, chunk=16, rows=8)  # E: 16 rows, so 8 → 4 rows per forward
    d = protocol.direction(small, 0)
    reference = protocol.measure_point(small, d, 1e-5)

    count = _oom_on_calls(monkeypatch, EntropyScorer, "forward", {1})
    with pytest.warns(RuntimeWarning, match=r"CUDA out of memory in the step at η=1e-05: "):
        record = protocol.measure_point(small, d, 1e-5)
    assert count["n"] > 1 and record.success is True
    assert _knobs(small) == (2, 8, 8, 4)
    monkeypatch.undo()

    direct = protocol.measure_point(small, d, 1e-5)  # at the halved sizes, no OOM
    for key in ("entropy_after", "entropy_change", "entropy_change_negative", "ess"):
        assert getattr(record, key) == getattr(direct, key), key
        expected = getattr(reference, key)
        assert getattr(record, key) == pytest.approx(expected, rel=1e-9, abs=1e-15), key


def test_oom_at_the_smallest_sizes_is_a_clear_error(small, monkeypatch):
    d = protocol.direction(small, 0)
    _oom_on_calls(monkeypatch, EntropyScorer, "forward", None)
    with pytest.warns(RuntimeWarning), pytest.raises(EntropyLabError) as e:
        protocol.measure_point(small, d, 1e-5)  # not recorded as a failed point: it stops
    assert str(e.value) == (
        "CUDA out of memory in the step at η=1e-05 even at microbatch_size (--microbatch-size) "
        f"1 and eval_chunk_tokens (--eval-chunk-tokens) 1 ({OOM}): lower max_new_tokens or "
        "num_generations in --base-config, or --buffer-size, or use a GPU with more memory"
    )
    assert _knobs(small) == (1, 1, 1, 1)
    assert _at_theta0(small)


def _sample(setup, batch_rows: int):
    return rollout.sample_responses(
        setup.checkpoint.policy,
        setup.checkpoint.tokenizer,
        setup.update_pool[:6],
        2,
        seed=7,
        **setup.cfg.sampling(),
        batch_rows=batch_rows,
    )


def _oom_above(monkeypatch, rows: int | None) -> list[int]:
    """Generation batches of more than ``rows`` rows (every batch: None) run out of memory."""
    sizes: list[int] = []
    original = rollout._sample_chunk

    def flaky(model, prompts, *args):
        sizes.append(len(prompts))
        if rows is None or len(prompts) > rows:
            raise torch.OutOfMemoryError(OOM)
        return original(model, prompts, *args)

    monkeypatch.setattr(rollout, "_sample_chunk", flaky)
    return sizes


def test_oom_in_sampling_retries_fewer_rows_with_the_same_tokens(small, monkeypatch):
    reference = _sample(small, batch_rows=8)
    sizes = _oom_above(monkeypatch, 2)
    with pytest.warns(RuntimeWarning, match="retrying with 2 rows per batch"):
        again = _sample(small, batch_rows=8)
    # 12 rows: 8 fails, 4 fails, then 2 at a time, and the halved size is kept.
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2]
    assert again.responses == reference.responses
    for name in ("input_ids", "attention_mask", "response_mask", "prompt_index"):
        assert torch.equal(getattr(again, name), getattr(reference, name)), name


def test_oom_sampling_one_row_is_a_clear_error(small, monkeypatch):
    _oom_above(monkeypatch, None)
    with pytest.warns(RuntimeWarning), pytest.raises(EntropyLabError) as e:
        _sample(small, batch_rows=4)
    assert str(e.value) == (
        f"CUDA out of memory sampling responses even one row at a time ({OOM}): lower "
        f"max_new_tokens (now {small.cfg.max_new_tokens}) in --base-config, or use a GPU with "
        "more memory"
    )


def test_oom_in_the_cli_names_the_knobs_and_how_to_resume(tmp_path, capsys, monkeypatch):
    _oom_on_calls(monkeypatch, PolicyUpdate, "backward_on", None)
    with pytest.warns(RuntimeWarning):
        message = run_cli(capsys, tmp_path, "--learning-rates", "1e-6,1e-5", "--num-repeats", "2")
    assert re.fullmatch(
        r"CUDA out of memory in the update direction of repeat 0 even at microbatch_size "
        r"\(--microbatch-size\) 1 and eval_chunk_tokens \(--eval-chunk-tokens\) 1 \(.*\): "
        r"lower max_new_tokens or num_generations in --base-config, or --buffer-size, or use "
        r"a GPU with more memory \(finished points are kept: fix that, then --resume .*\)",
        message,
    ), message


# ----------------------------------------------------------------------------- 5. security


def unsafe_calls(source: str) -> list[str]:
    """Calls that deserialise untrusted data unsafely or hand a string to a shell."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if name == "torch.load" and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in (
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "pickle.load",
            "pickle.loads",
        ):
            found.append(f"line {node.lineno}: {name}")
        if name in ("os.system", "os.popen", "eval", "exec"):
            found.append(f"line {node.lineno}: {name}")
        shell = keywords.get("shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"line {node.lineno}: {name}(shell=...)")
    return found


@pytest.mark.parametrize(
    "snippet, flagged",
    [
        ("torch.load(f)", True),
        ("torch.load(f, weights_only=False)", True),
        ("torch.load(f, map_location='cpu', weights_only=flag)", True),
        ("torch.load(f, map_location='cpu', weights_only=True)", False),
        ("yaml.load(text, Loader=yaml.Loader)", True),
        ("yaml.safe_load(text)", False),
        ("pickle.loads(data)", True),
        ("subprocess.run(f'ls {user_path}', shell=True)", True),
        ("subprocess.run(['ls', user_path])", False),
        ("os.system('rm ' + path)", True),
        ("model.eval()", False),
    ],
)
def test_unsafe_call_detector(snippet, flagged):
    assert bool(unsafe_calls(snippet)) is flagged


def test_package_has_no_unsafe_calls():
    files = sorted((ROOT / "entropy_lab").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    files.append(ROOT / "conftest.py")
    assert len(files) > 10
    problems = [f"{f.relative_to(ROOT)} {p}" for f in files for p in unsafe_calls(f.read_text())]
    assert problems == []


# -- batches without response tokens (issue 23) -------------------------------------------


def _prompt_only(batch: rollout.SequenceBatch) -> rollout.SequenceBatch:
    """The planted case: the same sequences with every response token marked as prompt."""
    return rollout.SequenceBatch(
        batch.input_ids,
        batch.attention_mask,
        torch.zeros_like(batch.response_mask),
        batch.prompt_index,
    )


def test_scoring_a_batch_without_response_tokens_names_the_problem(setup32):
    scorer = setup32.scorer
    scorer(setup32.eval_batch.select([0, 1]))  # a batch with responses scores
    empty = _prompt_only(setup32.eval_batch.select([0, 1]))
    with pytest.raises(EntropyLabError, match=r"^the batch to score has no response tokens "):
        scorer(empty)


def test_a_row_chunk_without_response_tokens_still_scores(setup32):
    # Rows with empty responses may be sorted into a chunk of their own.
    batch = setup32.eval_batch.select([0, 1, 2])
    mask = batch.response_mask.clone()
    mask[1:] = 0
    batch = rollout.SequenceBatch(batch.input_ids, batch.attention_mask, mask, batch.prompt_index)
    scorer = EntropyScorer(setup32.scorer.lm, setup32.scorer.temperature, max_rows=1)
    with torch.no_grad():
        sums = scorer(batch)
    assert sums.tokens.tolist()[1:] == [0.0, 0.0] and sums.tokens[0] > 0


def test_jvp_scaling_refuses_a_prompt_as_long_as_the_sequence(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "jvp_scaling", Path(__file__).parents[1] / "benchmarks" / "jvp_scaling.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.main(["--length", "24", "--prompt-length", "24", "--vocab", "64"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--prompt-length 24 leaves no response tokens in --length 24" in err


def test_an_update_batch_without_response_tokens_names_the_problem(setup32):
    from entropy_lab.update import UpdateBatch

    seqs = _prompt_only(setup32.eval_batch.select([0, 1]))
    update = UpdateBatch(seqs, torch.zeros(2), torch.zeros(2), num_generations=2, max_new_tokens=8)
    with pytest.raises(EntropyLabError, match=r"^the update batch has no response tokens "):
        setup32.updater.normalisers(update)
