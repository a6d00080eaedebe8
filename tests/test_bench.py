"""Benchmarks (issue #8) and issue #3's memory promise: the fp64 entropy is chunked, so no
B×T×V fp64 tensor exists, measured at Qwen's vocabulary (151,936) on a tiny random Qwen2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from entropy_lab.bench import (
    MemorySpec,
    bad_measurements,
    check_targets,
    memory_peaks,
    within_memory_bound,
)

pytestmark = pytest.mark.cpu

# Sections and the measurements each must hold (all finite and > 0).
EXPECTED_FIELDS = {
    "entropy_eval": [
        "entropy_tokens_per_s",
        "forward_tokens_per_s",
        "overhead_ratio",
        "overhead_vs_sorted_forward",
    ],
    "memory": ["chunked_peak_bytes", "naive_peak_bytes", "chunked_over_naive"],
    "eta_sweep": [
        "direction_s",
        "first_eta_s",
        "marginal_eta_s",
        "eval_s",
        "marginal_over_first",
        "marginal_eta_over_eval",
    ],
    "jvp": [
        "jvp_s",
        "nested_jvp_s",
        "third_order_jvp_s",
        "jvp_over_eval",
        "nested_jvp_over_eval",
        "jvp_over_forward",
        "zero_tangent_mm_over_mm",
    ],
    "rollout": ["tokens_per_s", "response_tokens"],
    "sweep": ["theory_s", "measurement_s", "theory_over_measurement"],
    "flops": ["matmul_peak_flops_per_s", "forward_flops_per_s", "eval_fraction_of_peak"],
}


def test_chunked_fp64_entropy_peak_is_a_tenth_of_naive_at_qwen_vocab():
    # 4 × 64 positions × 151,936 × 8 B = 311 MB of fp64 logits for the naive path;
    # the chunked one holds 8 tokens' worth (9.7 MB) per fp64 tensor.
    spec = MemorySpec(batch=4, length=64, chunk_tokens=8)
    assert spec.vocab_size == 151_936 and spec.full_logits_fp64_bytes >= 300e6
    mem = memory_peaks(spec, variants=("chunked", "unchunked", "naive"))
    chunked, unchunked, naive = (mem[f"{v}_peak_bytes"] for v in ("chunked", "unchunked", "naive"))
    full = spec.full_logits_fp64_bytes
    assert within_memory_bound(chunked, naive), (chunked, naive)
    assert chunked < full / 2, "a B×L×V fp64 tensor (or half of one) existed in the chunked path"
    # Planted bad cases, same bound: the naive path, and token_statistics with one chunk
    # holding every response token. Their peaks also show the measurement sees big tensors.
    assert not within_memory_bound(naive, naive) and naive >= full
    assert not within_memory_bound(unchunked, naive) and unchunked >= full / 2


def test_bench_command_smoke(tmp_path, capsys):
    from entropy_lab.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--eval-size=16",
        "--buffer-size=4",
        "--repeats=1",
        "--directions=1",
        "--memory-batch=2",
        "--memory-length=16",
        "--memory-chunk-tokens=2",
        "--flops",
        "--matmul-size=64",
        f"--output={out}",
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    for section, fields in EXPECTED_FIELDS.items():
        for field in fields:
            assert field in results[section], f"{section}.{field} missing"
    assert bad_measurements(results) == {}
    assert set(results["targets"]) >= {
        "entropy_eval.overhead_ratio",
        "memory.chunked_over_naive",
        "eta_sweep.marginal_eta_over_eval",
        "jvp.jvp_over_eval",
        "sweep.theory_over_measurement",
    }
    phases = results["sweep"]["phases"]  # the default sweep's, jet 1: no nested jvp
    assert results["sweep"]["jet"] == 1 and "jvp to order 1" in phases
    points = len(results["settings"]["learning_rates"]) * results["settings"]["directions"]
    assert phases["step + score E at −η"]["calls"] == points
    out = capsys.readouterr().out
    assert "BENCHMARKS" in out and "COST PER PHASE of the default sweep" in out


def test_planted_bad_measurements_and_missed_targets_are_reported():
    doc = {
        "settings": {"seed": 0},  # settings are not measurements
        "jvp": {"jvp_s": math.nan, "jvp_over_eval": 4.0, "eval_s": 0.02},
        "rollout": {"tokens_per_s": 0.0, "seconds": -1.0, "sequences": 3},
        "entropy_eval": {"overhead_ratio": 1.05},
        "sweep": {"theory_over_measurement": 1.6},
        "quick": {"seconds": 12.0, "seconds_over_jet3": 1.0},
    }
    assert set(bad_measurements(doc)) == {"jvp.jvp_s", "rollout.tokens_per_s", "rollout.seconds"}
    targets = check_targets(doc)
    assert targets["jvp.jvp_over_eval"]["met"] is False
    assert targets["entropy_eval.overhead_ratio"]["met"] is True
    assert targets["sweep.theory_over_measurement"]["met"] is False
    assert targets["quick.seconds_over_jet3"]["met"] is False  # "faster": strictly
    assert targets["quick.seconds"]["met"] is True
    assert "memory.chunked_over_naive" not in targets  # not measured: not claimed


def test_jvp_scaling_script_measures_every_ratio(tmp_path, capsys):
    # The script behind README's jvp-scaling table, at a toy size.
    spec = importlib.util.spec_from_file_location(
        "jvp_scaling", Path(__file__).parents[1] / "benchmarks" / "jvp_scaling.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "jvp.json"
    sizes = "--hidden 64 --layers 1 --vocab 256 --rows 2 --length 24 --prompt-length 8"
    result = script.main([*sizes.split(), "--repeats", "1", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["ratios"]) == {
        "eval_over_forward",
        "jvp_over_forward",
        "nested_jvp_over_forward",
        "third_order_jvp_over_forward",
        "jvp_over_eval",
        "trunk_jvp_over_trunk_forward",
        "zero_tangent_mm_over_mm",
    }
    assert bad_measurements(result) == {}
    assert "trunk_jvp_over_trunk_forward" in capsys.readouterr().out
