"""``entropy-lab track`` on a real TRL GRPOTrainer run of the tiny base (4 steps, a checkpoint
at each): the sweep at every checkpoint equals a standalone sweep of it, the trainer's lr is
read back as the trainer recorded it, an interrupted track resumes to the same track.json,
the base is loaded once; and each check of the track fails on a planted bad case."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from entropy_lab import protocol, track
from entropy_lab.cli import main
from entropy_lab.errors import CheckpointError, EntropyLabError
from tests.trl_runs import TRACKED_RUN, train_trl

pytestmark = [pytest.mark.cpu, pytest.mark.xdist_group("track")]  # its run built once

STEPS = 4


@pytest.fixture(scope="module")
def trl_run(tiny_checkpoint, tmp_path_factory):
    """A linear-decay schedule, so every step has its own lr."""
    return train_trl(
        tiny_checkpoint,
        tmp_path_factory.mktemp("trl_track"),
        max_steps=STEPS,
        **TRACKED_RUN,
    )


MEASUREMENT = [
    "--dtype",
    "fp64",
    "--learning-rates",
    "1e-6,1e-5",
    "--num-repeats",
    "2",
    "--eval-size",
    "8",
    "--buffer-size",
    "4",
]  # fmt: skip  (the pytest plugin's options too)
FLAGS = [*MEASUREMENT, "--no-progress", "--threads", "1"]


def _data_flags(trl_run):
    return ["--prompts", str(trl_run / "prompts.jsonl"), "--reward", f"{trl_run}/rewards.py:exact"]


TOKENIZED: Counter[str] = Counter()  # texts the track's tokenizer calls took, how often


@pytest.fixture(scope="module")
def tracked(trl_run, tmp_path_factory):
    """One uninterrupted track of the whole run, counting base-model loads and the texts its
    tokenizer calls tokenize (into TOKENIZED)."""
    from transformers import AutoModelForCausalLM
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    out = tmp_path_factory.mktemp("track_out")
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    real_call = PreTrainedTokenizerBase.__call__

    def counted(cls, source, *args, **kwargs):
        loads.append(str(source))
        return real(cls, source, *args, **kwargs)

    def tokenize(self, text=None, *args, **kwargs):
        TOKENIZED.update([text] if isinstance(text, str) else text or [])
        return real_call(self, text, *args, **kwargs)

    TOKENIZED.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
        mp.setattr(PreTrainedTokenizerBase, "__call__", tokenize)
        argv = ["track", str(trl_run / "run"), *_data_flags(trl_run), *FLAGS]
        assert main([*argv, "--output-dir", str(out)]) == 0
    (folder,) = out.glob("entropy_track_*")
    return folder, json.loads((folder / "track.json").read_text()), loads


def test_track_measures_every_checkpoint_in_step_order_loading_the_base_once(tracked, capsys):
    folder, data, loads = tracked
    assert data["schema_version"] == track.TRACK_SCHEMA_VERSION
    assert [e["step"] for e in data["checkpoints"]] == list(range(1, STEPS + 1))
    assert len(loads) == 1  # the base, at checkpoint-1; the others swapped their adapters in
    assert data["costs"]["base_loads"] == 1 and data["costs"]["adapter_swaps"] == STEPS - 1
    for e in data["checkpoints"]:
        sweep = folder / f"step_{e['step']}"
        for name in ("analysis.json", "raw_results.json", "run_meta.json", "eval_batch.json"):
            assert (sweep / name).is_file(), name
        meta = json.loads((sweep / "run_meta.json").read_text())
        assert meta["checkpoint"]["saved_step"] == e["step"]
        assert e["alpha"]["ci_low"] < e["alpha"]["value"] < e["alpha"]["ci_high"]
    assert (folder / "track.png").stat().st_size > 10_000
    assert [h["from_step"] for h in data["history"]["intervals"]] == [1, 2, 3]


def test_e_prompts_are_tokenized_once_per_track(tracked, trl_run):
    """Common random numbers: the same E prompts at all four checkpoints, each tokenized once
    (the adapter swaps share the tokenizer); U's prompts likewise."""
    from transformers import AutoTokenizer

    folder, _, _ = tracked
    tokenizer = AutoTokenizer.from_pretrained(trl_run / "run" / "checkpoint-1")
    rows = json.loads((folder / "step_1" / track.H0_SEQUENCES).read_text())["prompt_tokens"]
    e_prompts = {tokenizer.decode(r) for r in rows}
    assert len(e_prompts) == 8 and all(TOKENIZED[p] == 1 for p in e_prompts), TOKENIZED
    assert max(TOKENIZED.values()) == 1


def test_prompt_token_ids_are_cached_per_tokenizer():
    """The cache the track relies on: a text tokenized once per tokenizer and vocabulary; a
    cleared cache (planted: no cache), another tokenizer or an added token tokenize again."""
    from entropy_lab import rollout
    from entropy_lab.tiny import build_tokenizer

    calls = Counter()

    class Counting(type(build_tokenizer())):
        def __call__(self, text, *args, **kwargs):
            calls[id(self), text] += 1
            return super().__call__(text, *args, **kwargs)

    def counting_tokenizer():
        t = build_tokenizer()
        t.__class__ = Counting
        return t

    one, other = counting_tokenizer(), counting_tokenizer()
    texts = ["1+2=", "3+4="]
    first = rollout.prompt_token_ids(one, texts)
    assert rollout.prompt_token_ids(one, texts) == first == [[22, 16, 23, 34], [24, 16, 25, 34]]
    assert [calls[id(one), t] for t in texts] == [1, 1]
    rollout._PROMPT_IDS.pop(one)  # planted: the cache gone, the count sees each call
    rollout.prompt_token_ids(one, texts)
    assert [calls[id(one), t] for t in texts] == [2, 2]
    rollout.prompt_token_ids(other, texts[:1])
    assert calls[id(other), texts[0]] == 1
    one.add_tokens(["1+"])  # the vocabulary changed: the old ids no longer hold
    assert rollout.prompt_token_ids(one, texts[:1]) != first[:1]
    assert calls[id(one), texts[0]] == 3


def test_track_alpha_equals_a_standalone_sweep_of_the_checkpoint(tracked, trl_run, tmp_path):
    folder, data, _ = tracked
    step = 3  # an adapter swapped into the base loaded for checkpoint-1
    checkpoint = trl_run / "run" / f"checkpoint-{step}"
    argv = ["sweep", "--checkpoint", str(checkpoint), *_data_flags(trl_run), *FLAGS]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    (alone,) = tmp_path.glob("entropy_lr_experiment_*")
    mine = json.loads((folder / f"step_{step}" / "analysis.json").read_text())
    theirs = json.loads((alone / "analysis.json").read_text())
    a, b = mine["summary"]["mixed_model"]["slope"], theirs["summary"]["mixed_model"]["slope"]
    assert a == pytest.approx(b, rel=1e-12, abs=0)
    entry = next(e for e in data["checkpoints"] if e["step"] == step)
    assert entry["alpha"]["value"] == a
    raw = [
        json.loads((f / "raw_results.json").read_text()) for f in (folder / f"step_{step}", alone)
    ]
    for r, s in zip(*raw):
        assert r["entropy_change"] == pytest.approx(s["entropy_change"], rel=1e-12, abs=0)


def test_recorded_lr_is_the_trainers_own(tracked, trl_run):
    _, data, _ = tracked
    state = json.loads((trl_run / "run" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    for e in data["checkpoints"]:
        scheduler = torch.load(
            trl_run / "run" / f"checkpoint-{e['step']}" / "scheduler.pt", weights_only=True
        )
        assert e["lr"]["this_step"] == logged[e["step"]]
        assert e["lr"]["next_step"] == scheduler["_last_lr"][0]
        assert e["alpha_times_lr"] == e["alpha"]["value"] * scheduler["_last_lr"][0]
    # linear decay from 1e-3 over 4 steps: the next step's lr at checkpoints 1..4
    assert [e["lr"]["next_step"] for e in data["checkpoints"]] == pytest.approx(
        [7.5e-4, 5e-4, 2.5e-4, 0.0]
    )


def test_lr_outside_the_window_is_flagged(tracked, capsys):
    folder, data, _ = tracked
    # the grid [1e-6, 1e-5] lies below every lr this run stepped at: each is flagged
    assert data["lr_outside_window"] == [1, 2, 3]
    assert [e["lr_in_window"] for e in data["checkpoints"]] == ["above"] * 3 + ["no step (lr 0)"]
    from entropy_lab.report import format_track_tables

    table = format_track_tables(data)
    assert table.count("<-- lr outside the window") == 3
    assert track.window_status(5e-6, 1e-6, 1e-5) == "inside"
    assert track.window_status(1e-7, 1e-6, 1e-5) == "below"
    assert track.window_status(1e-6, None, None) == "no window"


def test_history_pairs_h0_on_the_same_prompts(tracked):
    folder, data, _ = tracked
    seqs = [json.loads((folder / f"step_{s}" / track.H0_SEQUENCES).read_text()) for s in (1, 2)]
    assert seqs[0]["prompt_tokens"] == seqs[1]["prompt_tokens"]  # common random numbers
    interval = data["history"]["intervals"][0]
    h0 = [data["checkpoints"][k]["h0"]["value"] for k in (0, 1)]
    assert interval["observed"]["value"] == pytest.approx(h0[1] - h0[0], rel=1e-12)
    a = data["checkpoints"][0]
    # consecutive saves: the prediction is α at checkpoint 1 times the lr of step 2
    assert interval["predicted"]["value"] == pytest.approx(a["alpha"]["value"] * 7.5e-4)
    planted = dict(seqs[1], prompt_tokens=seqs[1]["prompt_tokens"][::-1])
    with pytest.raises(EntropyLabError, match="evaluation prompts differ"):
        track.paired_change(seqs[0], planted)


@pytest.mark.slow
def test_pytest_suite_on_the_run_records_tracks_alpha_per_checkpoint(
    tracked, trl_run, pytester, monkeypatch
):
    """``pytest -m gpu --checkpoint=RUN`` on the same run folder, two xdist workers: the
    aggregate tests per checkpoint (``[step_N]``), each (checkpoint, η) measured once, and
    the α it records per checkpoint (JUnit and the JSON report) is track's to 1e-12."""
    from xml.etree import ElementTree

    from tests.conftest import run_suite

    _, data, _ = tracked
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # track's --threads 1
    out = pytester.path
    result = run_suite(
        pytester,
        *("-m", "gpu", "--device", "cpu", f"--checkpoint={trl_run / 'run'}", "-n", "2"),
        *_data_flags(trl_run),
        *MEASUREMENT,
        f"--basetemp={out / 'bt'}",
        f"--junitxml={out / 'junit.xml'}",
        f"--entropy-json={out / 'report.json'}",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == STEPS * (2 + 4), outcomes
    logs = sorted((out / "bt").glob("entropy_store/*/measure_log.jsonl"))
    assert len(logs) == STEPS  # one store per checkpoint, each η measured once across workers
    for log in logs:
        assert sorted(json.loads(line)["eta"] for line in log.read_text().splitlines()) == [
            1e-6,
            1e-5,
        ]
    track_alpha = {e["step"]: e["alpha"]["value"] for e in data["checkpoints"]}
    report = json.loads((out / "report.json").read_text())
    entries = report["checkpoints"]
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1)) and report["analysis"] == []
    for e, t in zip(entries, data["checkpoints"]):
        assert e["label"] == f"step_{e['step']}" and e["digest"] == t["digest"]
        assert {x["properties"]["checkpoint"] for x in e["tests"]} == {e["label"]}
        assert len(e["tests"]) == 2 + 4
        assert e["analysis"]["mixed_model"]["slope"] == pytest.approx(
            track_alpha[e["step"]], rel=1e-12, abs=0
        )
    cases = {
        c.get("name"): c for c in ElementTree.parse(out / "junit.xml").getroot().iter("testcase")
    }
    verdicts = {e["step"]: e["verdict"] for e in data["checkpoints"]}
    for step, alpha in track_alpha.items():
        case = cases[f"test_linear_window_covers_grid[step_{step}]"]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["checkpoint"] == f"step_{step}" and props["verdict"] == verdicts[step]
        assert float(props["mixed_slope"]) == pytest.approx(alpha, rel=1e-12, abs=0)
        failed = case.find("failure") is not None
        assert failed == (verdicts[step] != "linear")  # the verdict test is track's verdict
    # the comparison tells the checkpoints apart: a report mislabelled by one step fails it
    shifted = [e["analysis"]["mixed_model"]["slope"] for e in entries[1:]]
    assert all(a != pytest.approx(track_alpha[s], rel=1e-12) for a, s in zip(shifted, track_alpha))


def test_interrupted_track_resumes_to_the_same_track_json(tracked, trl_run, tmp_path, monkeypatch):
    _, data, _ = tracked
    steps = [str(trl_run / "run" / f"checkpoint-{s}") for s in (2, 4, 1, 3)]  # a list, any order
    argv = ["track", *steps, *_data_flags(trl_run), *FLAGS, "--output-dir", str(tmp_path)]
    real, calls = protocol.measure_point, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # checkpoint-2, its second point
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "measure_point", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 130
    monkeypatch.setattr(protocol, "measure_point", real)
    (folder,) = tmp_path.glob("entropy_track_*")
    assert main([*argv[:-2], "--resume", str(folder)]) == 0
    resumed = json.loads((folder / "track.json").read_text())
    assert resumed["costs"]["kept"] == [1]  # finished before the interruption: not re-measured
    assert resumed["costs"]["base_loads"] == 1  # checkpoint-2 (resumed), then 3 and 4 swapped
    # the run was named differently (four folders, not the run folder) and cost differently
    for key in set(data) - {"settings", "costs"}:
        assert resumed[key] == _close(data[key]), key
    changed = [*argv[:-2], "--resume", str(folder), "--seed", "1"]
    assert main(changed) == 2  # settings differ from the interrupted track: refused


def _close(value):
    """Numbers to 1e-12 (a resumed checkpoint re-samples E and U from the same seeds)."""
    if isinstance(value, dict):
        return {k: _close(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_close(v) for v in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-12, abs=1e-300)
    return value


# -- planted bad cases, no sweep needed ------------------------------------------------------


def test_a_changed_checkpoint_is_refused_on_resume(tracked, trl_run, tmp_path):
    folder, _, _ = tracked
    sweep = tmp_path / "step_1"
    shutil.copytree(folder / "step_1", sweep)
    cp = track.RunCheckpoint(1, trl_run / "run" / "checkpoint-1")
    args = type("Args", (), {"learning_rates": "1e-6,1e-5", "num_repeats": 2})()
    assert track._finished(sweep, cp, args)
    meta = json.loads((sweep / "run_meta.json").read_text())
    meta["checkpoint"]["digest"] = "0" * 64
    (sweep / "run_meta.json").write_text(json.dumps(meta))
    with pytest.raises(EntropyLabError, match="another checkpoint"):
        track._finished(sweep, cp, args)


def test_a_disagreeing_lr_record_is_an_error(trl_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trl_run / "run", run)
    checkpoints = track.run_checkpoints([run]).checkpoints
    assert track.trainer_learning_rates(checkpoints).at(2) == 7.5e-4
    state_path = run / f"checkpoint-{STEPS}" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][1]["learning_rate"] = 1e-3  # step 2; checkpoint-1's scheduler says 7.5e-4
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="scheduler.pt sets lr 0.00075 for step 2"):
        track.trainer_learning_rates(checkpoints)


def test_step_final_is_dropped_only_where_it_repeats_a_step(tiny_checkpoint, tmp_path):
    from entropy_lab.tiny import write_rl_practice_run

    run = write_rl_practice_run(tiny_checkpoint, tmp_path / "run", steps=(1, 2))
    found = track.run_checkpoints([run])
    assert [(c.step, c.path.name) for c in found.checkpoints] == [(1, "step_1"), (2, "step_2")]
    assert len(found.skipped) == 1 and "step_final" in found.skipped[0]
    assert track.run_checkpoints([run / "training_state"]).checkpoints == found.checkpoints
    info_path = run / "training_state" / "step_final" / "training_info.json"
    info = json.loads(info_path.read_text())
    info["step"] = info["global_step"] = 3  # a final save after the last numbered one
    info_path.write_text(json.dumps(info))
    assert [c.step for c in track.run_checkpoints([run]).checkpoints] == [1, 2, 3]
    info["step"] = info["global_step"] = 1
    info_path.write_text(json.dumps(info))
    other = tmp_path / "elsewhere" / "step_1"
    shutil.copytree(run / "training_state" / "step_1", other)
    with pytest.raises(CheckpointError, match="both saved at step 1"):
        track.run_checkpoints([run / "training_state" / "step_1", other])


def test_each_checkpoint_of_a_run_has_its_own_store(tiny_checkpoint, tmp_path):
    """The pytest plugin's store per checkpoint of a run: the same folder in every process
    that asks (xdist workers), another for each step even where two saves hold the same
    content (this fixture's steps do), where one checkpoint's key is its content alone."""
    import dataclasses

    from entropy_lab.pytest_plugin import MeasurementStore, SuiteSettings, run_of
    from entropy_lab.tiny import write_rl_practice_run

    run = write_rl_practice_run(tiny_checkpoint, tmp_path / "run", steps=(1, 2))
    cps = run_of(str(run))
    assert [c.label for c in cps] == ["step_1", "step_2"] and run_of(None) is None
    for one in (cps[0].path, run / "training_state" / "step_latest"):
        assert run_of(str(one)) is None  # a checkpoint folder: the suite as before
    settings = SuiteSettings("gpu", "", None, None, [1e-6], 2, "cpu", "fp64", 8, 0.95)

    def store(cp, of_run=True):
        mine = dataclasses.replace(settings, checkpoint=str(cp.path))
        return MeasurementStore(tmp_path / "store", mine, cp if of_run else None)

    first, second, again = store(cps[0]), store(cps[1]), store(cps[0])
    assert first.digest == second.digest  # two saves of one content
    assert first.key_dir != second.key_dir and again.key_dir == first.key_dir
    # planted: keyed by content alone (a single checkpoint's store), the two steps collide
    assert store(cps[0], of_run=False).key_dir == store(cps[1], of_run=False).key_dir


def test_rl_practice_lr_is_its_warmup_schedule_held_to_scheduler_pt(tmp_path):
    """RL_Practice's reference config: const schedule, 64 steps, lr 1e-6 (warmup 3): steps
    1..5 ran at 0, 3.33e-7, 6.67e-7, 1e-6, 1e-6 (its FACTS, h); scheduler.pt says the next."""
    from transformers import get_constant_schedule_with_warmup

    cfg = {"lr": 1e-6, "lr_scheduler": "const", "total_steps": 64}
    used = track.rl_practice_schedule(cfg, 5)
    assert list(used.values()) == pytest.approx([0, 1e-6 / 3, 2e-6 / 3, 1e-6, 1e-6], abs=1e-20)
    folders = []
    for n in (1, 2):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-6)
        scheduler = get_constant_schedule_with_warmup(optimizer, 3)
        for _ in range(n):
            optimizer.step()
            scheduler.step()
        step = tmp_path / f"step_{n}"
        (step / "model").mkdir(parents=True)
        (step / "optimizer.pt").write_bytes(b"")
        torch.save(scheduler.state_dict(), step / "scheduler.pt")
        info = {"step": n, "global_step": n, "training_config": cfg}
        (step / "training_info.json").write_text(json.dumps(info))
        folders.append(track.RunCheckpoint(n, step))
    (tmp_path / "step_1" / "model" / "config.json").write_text("{}")
    (tmp_path / "step_2" / "model" / "config.json").write_text("{}")
    rates = track.trainer_learning_rates(folders)
    assert (rates.at(2), rates.at(3)) == pytest.approx((1e-6 / 3, 2e-6 / 3))
    cfg_planted = dict(cfg, total_steps=200)  # warmup 10: not what the scheduler ran
    for f in folders:
        info = json.loads((f.path / "training_info.json").read_text())
        (f.path / "training_info.json").write_text(
            json.dumps(dict(info, training_config=cfg_planted))
        )
    with pytest.raises(CheckpointError, match="does not match RL_Practice's schedule"):
        track.trainer_learning_rates(folders)


def test_an_adapter_missing_a_tensor_is_refused_when_swapped(trl_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from entropy_lab.checkpoint import load_checkpoint

    broken = tmp_path / "checkpoint-2"
    shutil.copytree(trl_run / "run" / "checkpoint-2", broken)
    weights = load_file(broken / "adapter_model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, broken / "adapter_model.safetensors")
    first = load_checkpoint(trl_run / "run" / "checkpoint-1", dtype="fp32")
    with pytest.raises(CheckpointError, match="the adapter has no tensor for"):
        load_checkpoint(broken, dtype="fp32", reuse=first)
    swapped = load_checkpoint(trl_run / "run" / "checkpoint-2", dtype="fp32", reuse=first)
    assert swapped.metadata["base_load"].startswith("shared with checkpoint-1")
    assert swapped.metadata["saved_step"] == 2


def test_a_swapped_adapter_is_verified_as_a_fresh_load(trl_run, monkeypatch):
    """Faithful fp64: the swap's adapter tensors are the file's, and its precision audit and H
    against the stock fp32 model are a fresh load's; a tensor altered after the swap, or a
    base whose faithful patch came off, is refused."""
    import peft.utils

    from entropy_lab.checkpoint import load_checkpoint

    run = trl_run / "run"
    fresh = load_checkpoint(run / "checkpoint-2", dtype="fp64")
    first = load_checkpoint(run / "checkpoint-1", dtype="fp64")
    swapped = load_checkpoint(run / "checkpoint-2", dtype="fp64", reuse=first)
    assert swapped.metadata["base_load"].startswith("shared with checkpoint-1")
    mine, theirs = swapped.metadata["faithful"], fresh.metadata["faithful"]
    assert mine["entropy_vs_stock_fp32"] == theirs["entropy_vs_stock_fp32"] > 0
    assert mine["precision_audit"] == theirs["precision_audit"]
    assert mine["patched"] == theirs["patched"] > 0

    real = peft.utils.set_peft_model_state_dict

    def altered(model, weights, *args, **kwargs):  # planted: one tensor off after the copy
        result = real(model, weights, *args, **kwargs)
        lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            lora[0, 0] += 1e-9
        return result

    monkeypatch.setattr(peft.utils, "set_peft_model_state_dict", altered)
    with pytest.raises(CheckpointError, match="lora_B.weight differs from the adapter file's"):
        load_checkpoint(run / "checkpoint-3", dtype="fp64", reuse=swapped)
    monkeypatch.setattr(peft.utils, "set_peft_model_state_dict", real)
    patched = next(iter(swapped.faithful_report.patched))  # planted: a patch came off the base
    del swapped.policy.get_submodule(patched).forward
    with pytest.raises(CheckpointError, match="faithful fp64 refused .* precision audit"):
        load_checkpoint(run / "checkpoint-3", dtype="fp64", reuse=swapped)
