"""Data-parallel sweeps (torchrun): the pieces in-process, then 2 real processes end to end.

In-process, each rank's work is run one shard after the other and combined as the
collectives would combine it; every combination is also shown to fail when done the naive way
(a dropped shard, a per-rank normalisation, per-rank clipping, per-rank readings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entropy_lab.distributed import shard_bounds
from entropy_lab.entropy import SequenceSums, readings
from entropy_lab.rollout import inverse_cdf_sample, sample_responses
from entropy_lab.theory import directional_derivatives, readings_derivatives, sums_jet
from entropy_lab.update import UpdateBatch, group_advantages

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]


def _shards(n: int, world: int) -> list[list[int]]:
    return [list(range(*shard_bounds(n, r, world))) for r in range(world)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# -- sharding -----------------------------------------------------------------------------------


def _is_balanced_partition(shards: list[list[int]], n: int) -> bool:
    sizes = [len(s) for s in shards]
    return [i for s in shards for i in s] == list(range(n)) and max(sizes) - min(sizes) <= 1


def test_shards_partition_the_rows_in_order():
    for world in range(1, 6):
        for n in range(world, 40):
            shards = _shards(n, world)
            assert _is_balanced_partition(shards, n), (n, world, shards)
            # planted: a dropped shard, or a rank's rows taken twice, is not a partition
            assert not _is_balanced_partition(shards[:-1], n)
            assert not _is_balanced_partition([*shards[:-1], shards[0]], n) or world == 1


# -- sampling -----------------------------------------------------------------------------------


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).expand(6, 5)
    u = torch.tensor([0.0, 0.25, 0.5 - 1e-12, 0.5, 0.75, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 1, 3, 3, 3]
    # planted: searchsorted's default side picks the truncated token 0 at u = 0
    cdf = probs.cumsum(-1)
    assert int(torch.searchsorted(cdf[:1], u[:1, None] * cdf[:1, -1:])) == 0


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(inverse_cdf_sample(probs, u), minlength=4).double() / 20000
    assert torch.allclose(freq, probs[0], atol=0.015), freq
    planted = torch.bincount(inverse_cdf_sample(probs.flip(-1), u), minlength=4).double() / 20000
    assert not torch.allclose(planted, probs[0], atol=0.015)


def _response_tokens(batch, row: int) -> list[int]:
    return batch.input_ids[row][batch.response_mask[row].bool()].tolist()


def test_a_subset_of_rows_samples_the_tokens_of_the_full_batch(setup64):
    """Rows sampled on their own (in another order, other batch sizes) get their full-batch
    tokens; naive sharding (a rank numbering its rows from 0) does not."""
    policy, tokenizer = setup64.checkpoint.policy, setup64.checkpoint.tokenizer
    problems = setup64.update_pool[:12]
    kw = dict(temperature=2.0, max_new_tokens=4, seed=11)  # T = 2: many tokens are in play
    full = sample_responses(policy, tokenizer, problems, 3, **kw)
    rows = [35, 4, 17, 5, 1, 30, 31, 32, 33, 34]
    part = sample_responses(policy, tokenizer, problems, 3, **kw, rows=rows, batch_rows=4)
    for i, row in enumerate(rows):
        assert _response_tokens(part, i) == _response_tokens(full, row), row
        assert int(part.prompt_index[i]) == row // 3
    naive = sample_responses(policy, tokenizer, problems[10:], 3, **kw)  # rows 30..35 as 0..5
    mismatches = sum(
        _response_tokens(naive, i) != _response_tokens(full, 30 + i) for i in range(len(naive))
    )
    assert mismatches > 0


# -- gradient -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_update(setup64) -> UpdateBatch:
    """6 prompts × G = 4: two micro-batches of 4 prompts in one process, other splits per rank."""
    policy, tokenizer = setup64.checkpoint.policy, setup64.checkpoint.tokenizer
    prompts = setup64.update_pool[:6]
    seqs = sample_responses(
        policy, tokenizer, prompts, 4, temperature=1.5, max_new_tokens=4, seed=3
    )
    rewards = torch.tensor(
        [
            setup64.task.reward(r, prompts[int(i)])
            for r, i in zip(seqs.responses, seqs.prompt_index)
        ],
        dtype=torch.float64,
    )
    assert rewards.std() > 0  # a non-zero gradient
    return UpdateBatch(seqs, rewards, group_advantages(rewards, seqs.prompt_index), 4, 4)


def _rank_update(update: UpdateBatch, prompts: list[int]) -> UpdateBatch:
    """What a rank holds: whole groups of its prompts, advantages from its own rewards."""
    rows = [i for i, q in enumerate(update.sequences.prompt_index.tolist()) if q in prompts]
    seqs = update.sequences.select(rows)
    rewards = update.rewards[rows]
    return UpdateBatch(seqs, rewards, group_advantages(rewards, seqs.prompt_index), 4, 4)


def _combined(updater, update, world, *, normalise_by=None, drop_last=False, clip_per_rank=False):
    """Per-rank gradients summed as the all-reduce sums them, then clipped."""
    total, loss = None, 0.0
    shards = _shards(6, world)[: world - 1 if drop_last else world]
    norm = updater.normalisers(update)  # the whole batch's counts, as every rank sums them
    for prompts in shards:
        rank = _rank_update(update, prompts)
        grads, part_loss, _ = updater.local_gradient(
            rank, updater.normalisers(rank) if normalise_by == "local" else norm
        )
        if clip_per_rank:
            grads = updater._clipped(grads, part_loss).grads
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
        loss += part_loss
    return updater._clipped(total, loss)


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = torch.sqrt(sum(((a[n] - b[n]).double() ** 2).sum() for n in b))
    return float(num / torch.sqrt(sum((g.double() ** 2).sum() for g in b.values())))


def test_rank_gradients_sum_to_the_single_process_gradient(setup64, small_update):
    updater = setup64.updater
    saved_clip = updater.grad_clip
    try:
        for clip in (0.0, 0.5):  # off, then engaged (a fraction of the norm): global norm
            updater.grad_clip = 0.0
            updater.grad_clip = clip * updater.gradient(small_update).grad_norm
            full = updater.gradient(small_update)
            assert full.clipped == (clip > 0)
            for world in (2, 3, 4):  # 3+3, 2+2+2 and 2+2+1+1 prompts per rank
                combined = _combined(updater, small_update, world)
                assert _max_rel_diff(combined.grads, full.grads) <= 1e-12, (clip, world)
                assert _rel(combined.grad_norm, full.grad_norm) <= 1e-12
                assert abs(combined.loss - full.loss) <= 1e-12 * max(1.0, abs(full.loss))
            planted = {"dropped shard": _combined(updater, small_update, 2, drop_last=True)}
            if clip:
                planted["per-rank clipping"] = _combined(
                    updater, small_update, 2, clip_per_rank=True
                )
            else:  # (clipping to the global norm would hide a uniform factor)
                planted["per-rank normalisation"] = _combined(
                    updater, small_update, 2, normalise_by="local"
                )
            for name, wrong in planted.items():
                print(f"{name}: {_max_rel_diff(wrong.grads, full.grads):.3g} relative")
                assert _max_rel_diff(wrong.grads, full.grads) > 1e-3, name
    finally:
        updater.grad_clip = saved_clip


# -- entropy and its derivatives --------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_part(setup64):
    """The first 40 rows of E (uneven shards over 3 ranks: 14 + 13 + 13)."""
    rows = list(range(40))
    return setup64.eval_batch.select(rows), setup64.reference_logprob[rows]


@pytest.fixture(scope="module")
def small_vector(setup64, small_update):
    return setup64.updater.update_vector(setup64.updater.gradient(small_update))


def test_gathered_jets_give_the_single_process_readings_and_derivatives(
    setup64, small_vector, eval_part
):
    scorer, theta0 = setup64.scorer, setup64.updater.theta0
    batch, reference = eval_part
    single = directional_derivatives(scorer, batch, reference, theta0, small_vector)
    jets = [sums_jet(scorer, batch.select(rows), theta0, small_vector) for rows in _shards(40, 3)]
    slope, curvature = readings_derivatives(torch.cat(jets), reference)
    for got, want in [
        (slope[0], single.slope_conditional),
        (slope[1], single.slope_policy),
        (curvature[0], single.curvature_conditional),
        (curvature[1], single.curvature_policy),
    ]:
        assert _rel(float(got), want) <= 1e-9, (float(got), want)
    # The jets' values are the per-sequence sums: gathered, they give H(θ₀) of one process.
    values = torch.cat(jets)[..., 0]
    gathered = readings(SequenceSums(*values.unbind(1)), reference)
    with torch.no_grad():
        full = readings(scorer(batch), reference)
    assert all(_rel(float(g), float(f)) <= 1e-12 for g, f in zip(gathered, full))

    # planted: per-rank readings combined afterwards. Token-weighted means are exact for the
    # conditional reading (its denominator does not move) but not for the policy reading,
    # whose importance weights are normalised over the rank's rows instead of all of E.
    tokens = [float(j[:, 2, 0].sum()) for j in jets]
    per_rank = [readings_derivatives(j, reference[rows]) for j, rows in zip(jets, _shards(40, 3))]
    weighted = sum(t * float(s[0][1]) for t, s in zip(tokens, per_rank)) / sum(tokens)
    print(f"policy slope {single.slope_policy:.6g}, token-weighted per-rank {weighted:.6g}")
    assert _rel(weighted, single.slope_policy) > 1e-6, (weighted, single.slope_policy)
    summed = sum(float(s[0][0]) for s in per_rank)  # "the sum of the jvps"
    assert _rel(summed, single.slope_conditional) > 0.5
    dropped = readings(SequenceSums(*values[:27].unbind(1)), reference[:27])
    assert _rel(float(dropped[1]), float(full[1])) > 1e-6


# -- pytest -n 2: one GPU per xdist worker ------------------------------------------------------

PIN_TABLE = [
    (("gw0", None, 2), "0"),
    (("gw1", None, 2), "1"),
    (("gw2", None, 2), "0"),
    (("gw3", None, 2), "1"),
    (("gw1", "3,5", 8), "5"),  # the inherited CUDA_VISIBLE_DEVICES is respected
    (("gw2", "3, 5", 8), "3"),
    (("gw1", None, 0), None),  # no GPU: leave the environment alone
    (("gw0", "", 2), None),  # CUDA_VISIBLE_DEVICES="" hides every GPU
    (("master", None, 2), None),
]


def _pins_as_specified(pin) -> bool:
    return all(pin(*args) == expected for args, expected in PIN_TABLE)


def test_xdist_worker_k_gets_gpu_k_mod_n():
    from entropy_lab.pytest_plugin import worker_gpu

    assert _pins_as_specified(worker_gpu)

    def planted(worker, visible, count):  # ignores CUDA_VISIBLE_DEVICES
        return str(int(worker[2:]) % count) if worker[2:].isdigit() and count else None

    assert not _pins_as_specified(planted)


def test_pinning_counts_gpus_without_initialising_cuda(monkeypatch):
    from entropy_lab import pytest_plugin

    def initialises_the_driver():
        raise AssertionError("torch.cuda.is_available() runs cuInit: too late to pin after it")

    monkeypatch.setattr(torch.cuda, "is_available", initialises_the_driver)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # NVML-based in torch
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytest_plugin._pin_worker_gpu("gw3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    pytest_plugin._pin_worker_gpu("gw1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


# -- two real processes -------------------------------------------------------------------------


QUICK_ARGS = [
    "quick",
    "--no-progress",
    "--learning-rates",
    "1e-7,1e-6",
    "--num-repeats",
    "2",
    "--eval-size",
    "64",
    "--buffer-size",
    "8",
    # 3-prompt micro-batches: one process groups the 8 prompts 3+3+2, each rank 3+1
    "--microbatch-size",
    "3",
    "--threads",
    "1",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# The torchrun tests share one xdist worker (`--dist loadgroup` in pytest.ini): two elastic
# agents starting at once each pick a "free" port and release it before their workers bind it.
# All three of their sweeps run in one launch (tests/_dp_sweeps.py), built once for the module.
@pytest.fixture(scope="module")
def two_processes(
    tiny_checkpoint, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess, float]:
    """torchrun, two processes: the fp64 and fp32 sweeps, then one in which rank 1 fails.
    Returns the output root, the launch, and when it ended (unix time)."""
    root = tmp_path_factory.mktemp("torchrun")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, str(ROOT / "tests" / "_dp_sweeps.py"), str(root), *QUICK_ARGS]
    launch = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    return root, launch, time.time()


def _records(out: Path) -> dict[tuple[float, int], dict]:
    (folder,) = out.glob("entropy_lr_experiment_*")
    raw = json.loads((folder / "raw_results.json").read_text())
    return {(r["learning_rate"], r["repeat"]): r for r in raw}


def _sweep_pair(tmp_path: Path, two_processes, dtype: str) -> tuple[dict, dict]:
    # The one-process reference runs in this process (what is tested is the two-process run:
    # a subprocess here would only add its imports and checkpoint load, ~12 s of CPU).
    from entropy_lab.cli import main

    root, launch, _ = two_processes
    assert (root / f"two_{dtype}").is_dir(), launch.stderr[-3000:]
    one = tmp_path / f"one_{dtype}"
    assert main([*QUICK_ARGS, "--dtype", dtype, "--output-dir", str(one)]) == 0
    return _records(one), _records(root / f"two_{dtype}")


def _max_differences(single: dict, dual: dict) -> dict[str, float]:
    assert single.keys() == dual.keys() and len(single) == 4
    assert all(r["success"] for r in [*single.values(), *dual.values()])
    return {
        field: max(_rel(dual[k][field], single[k][field]) for k in single)
        for field in ("entropy_change", "first_order_prediction", "identity_slope")
    }


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_torchrun_two_processes_reproduce_one_process_fp64(tmp_path, two_processes):
    single, dual = _sweep_pair(tmp_path, two_processes, "fp64")
    diff = _max_differences(single, dual)
    print(f"fp64, 2 processes vs 1: max relative difference {diff}")
    assert all(d <= 1e-6 for d in diff.values()), diff
    # rank 0 alone writes and prints: one analysis per finished sweep (fp64, fp32)
    root, launch, _ = two_processes
    assert launch.stdout.count("LINEARITY ANALYSIS") == 2
    assert len(list((root / "two_fp64").glob("entropy_lr_experiment_*"))) == 1
    (folder,) = (root / "two_fp64").glob("entropy_lr_experiment_*")
    assert json.loads((folder / "run_meta.json").read_text())["environment"]["world_size"] == 2
    # planted: one record off by 1e-5 relative is caught by the same comparison
    key = next(iter(dual))
    for field in diff:
        off = {**dual, key: {**dual[key], field: dual[key][field] * (1 + 1e-5)}}
        assert _max_differences(single, off)[field] > 1e-6


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_torchrun_fp32_difference_is_small(tmp_path, two_processes, record_property):
    """fp32: reported (record_property and stdout); bounded loosely, as summation order may
    differ between one process and two."""
    single, dual = _sweep_pair(tmp_path, two_processes, "fp32")
    diff = _max_differences(single, dual)
    print(f"fp32, 2 processes vs 1: max relative difference {diff}")
    for field, value in diff.items():
        record_property(f"fp32_max_rel_diff_{field}", value)
    assert diff["first_order_prediction"] <= 1e-4, diff


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_a_failing_rank_fails_the_run_with_its_error(two_processes):
    """Rank 1 raises in its first measurement while rank 0 waits in a collective: the run
    must end (not hang) with a non-zero status and rank 1's message."""
    from tests._dp_sweeps import FAILING_SWEEP_STARTS

    _, launch, ended = two_processes
    output = launch.stdout + launch.stderr
    stamps = [
        float(line.split(FAILING_SWEEP_STARTS)[1])
        for line in launch.stderr.splitlines()
        if FAILING_SWEEP_STARTS in line
    ]
    assert len(stamps) == 2, output[-3000:]  # both ranks finished fp64 and fp32 first
    assert launch.returncode != 0
    assert "planted failure on rank 1" in output
    assert ended - min(stamps) < 120, ended - min(stamps)
