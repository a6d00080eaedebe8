"""Benchmarks (issue #8) and issue #3's memory promise: the fp64 entropy is chunked, so no
B×T×V fp64 tensor exists, measured at Qwen's vocabulary (151,936) on a tiny random Qwen2."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from entropy_lab.bench import (
    MemorySpec,
    Target,
    bad_measurements,
    check_targets,
    forecast_fields,
    theory_and_measurement,
    within_memory_bound,
)
from entropy_lab.config import ExperimentConfig
from entropy_lab.phases import Phase
from entropy_lab.protocol import PhaseCosts, sweep_phases

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
    "memory_forecast": [
        "forecast_bytes",
        "measured_bytes",
        "forecast_over_measured",
        "worst_forecast_over_measured",
        "seconds",
    ],
    "flops": ["matmul_peak_flops_per_s", "forward_flops_per_s", "eval_fraction_of_peak"],
    **{
        f"real_vocab_{dtype}": [
            "forward_s",
            "eval_s",
            "jvp_s",
            "marginal_eta_s",
            "eval_over_forward",
            "jvp_over_eval",
            "marginal_eta_over_eval",
            "memory_forecast_bytes",
            "memory_measured_bytes",
            "memory_worst_forecast_over_measured",
        ]
        for dtype in ("fp32", "fp64")
    },
}
# A toy proxy (the section's code path, not its default size).
TOY_PROXY = [
    "--proxy-vocab=512",
    "--proxy-hidden=32",
    "--proxy-layers=1",
    "--proxy-rows=2",
    "--proxy-length=12",
    "--proxy-prompt-length=4",
]


def test_chunked_fp64_entropy_peak_is_a_tenth_of_naive_at_qwen_vocab():
    """The bench memory section's variants, in this process, by torch's own count of live
    tensor bytes (memory.peak_allocated; the section's fresh-process RSS runs in the smoke
    test below)."""
    from entropy_lab.bench import memory_inputs, run_memory_variant
    from entropy_lab.memory import peak_allocated

    # 4 × 64 positions × 151,936 × 8 B = 311 MB of fp64 logits for the naive path;
    # the chunked one holds 8 tokens' worth (9.7 MB) per fp64 tensor.
    spec = MemorySpec(batch=4, length=64, chunk_tokens=8)
    assert spec.vocab_size == 151_936 and spec.full_logits_fp64_bytes >= 300e6
    model, batch = memory_inputs(spec)
    peaks = {}
    for variant in ("chunked", "unchunked", "naive"):
        with peak_allocated("cpu") as measured:
            run_memory_variant(variant, model, batch, spec.chunk_tokens)
        peaks[variant] = measured["peak"]
    chunked, unchunked, naive = peaks["chunked"], peaks["unchunked"], peaks["naive"]
    full = spec.full_logits_fp64_bytes
    assert within_memory_bound(chunked, naive), peaks
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
        *TOY_PROXY,
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
        "memory_forecast.worst_forecast_over_measured",
        # issue #23's, judged on the proxy beside the tiny checkpoint
        *(
            f"real_vocab_{dtype}.{field}"
            for dtype in ("fp32", "fp64")
            for field in (
                "eval_over_forward",
                "jvp_over_eval",
                "marginal_eta_over_eval",
                "memory_worst_forecast_over_measured",
            )
        ),
    }
    # The memory pass measured every forecast phase (the toy sizes are not judged here).
    phases = results["real_vocab_fp64"]["memory_phases_forecast_measured_bytes"]
    assert {"peak", "rollout", "score E", "Cui identity", "gradient micro-batch"} <= set(phases)
    assert results["settings"]["clock"] == "process CPU time"
    assert results["real_vocab_fp64"]["response_tokens"] == 2 * (12 - 4)
    phases = results["sweep"]["phases"]  # the default sweep's, jet 1: no nested jvp
    assert results["sweep"]["jet"] == 1 and phases["jvp to order 1"]["kind"] == "theory"
    points = len(results["settings"]["learning_rates"]) * results["settings"]["directions"]
    assert phases["step + score E at −η"]["calls"] == points
    assert phases["sample E"]["calls"] == 1  # prepare's, carried over once
    out = capsys.readouterr().out
    assert "BENCHMARKS" in out and "COST PER PHASE of the default sweep" in out
    assert "TARGETS SIDE BY SIDE" in out and "V=512 fp64" in out


def test_theory_and_measurement_need_every_phase_the_sweep_records():
    cfg = ExperimentConfig(learning_rates=[1e-6])  # jet 1, identity, ±η, rounding check
    costs = PhaseCosts()
    for phase in sweep_phases(cfg):
        with costs.phase(phase, order=cfg.jet):
            pass
    assert costs.labels[Phase.JET] == "jvp to order 1"
    theory, measurement = theory_and_measurement(costs, cfg)
    assert theory == costs.seconds_of(Phase.ENTROPY_GRADIENT, Phase.JET, Phase.IDENTITY)
    assert measurement == costs.seconds_of(Phase.STEP_PLUS, Phase.STEP_MINUS)
    # Planted: protocol stops recording a phase (or records it under another member): the
    # total is an error naming it, not a smaller total that meets the target.
    for dropped in (Phase.JET, Phase.STEP_MINUS):
        planted = costs.only(p for p in costs.seconds if p is not dropped)
        with pytest.raises(KeyError, match=dropped.name):
            theory_and_measurement(planted, cfg)
    # Planted: a phase timed under a free-text name (how a rename used to escape bench).
    with pytest.raises(TypeError, match="Phase"), costs.phase("jvp to order 1"):
        pass
    # Multi-step sweeps have no oracles along v and no −η: not expected, not required.
    multi = ExperimentConfig(learning_rates=[1e-6], steps=2)
    assert Phase.STEP_MINUS not in sweep_phases(multi) and Phase.JET not in sweep_phases(multi)


def test_bench_declares_its_flags_and_the_parser_imports_no_torch():
    code = (
        "import sys; from entropy_lab.cli import build_parser;"
        "a = build_parser().parse_args(['bench', '--proxy-vocab', '128256']);"
        "print(a.proxy_vocab, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["128256", "False"]


def test_planted_bad_measurements_and_missed_targets_are_reported():
    doc = {
        "settings": {"seed": 0},  # settings are not measurements
        "jvp": {"jvp_s": math.nan, "jvp_over_eval": 4.0, "eval_s": 0.02},
        "rollout": {"tokens_per_s": 0.0, "seconds": -1.0, "sequences": 3},
        "entropy_eval": {"overhead_ratio": 1.05},
        "real_vocab_fp64": {"eval_over_forward": 1.2, "jvp_over_eval": 2.9},
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
    assert targets["real_vocab_fp64.eval_over_forward"]["met"] is False  # 1.2 > 1.15
    assert targets["real_vocab_fp64.jvp_over_eval"]["met"] is True
    assert "real_vocab_fp32.jvp_over_eval" not in targets


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


def test_the_proxy_batch_refuses_a_batch_without_response_tokens():
    from entropy_lab.errors import EntropyLabError
    from entropy_lab.proxy import random_batch

    assert random_batch(64, 2, 8, 7).num_response_tokens == 2
    with pytest.raises(EntropyLabError, match="no response tokens"):
        random_batch(64, 2, 8, 8)  # prompt as long as the sequence (planted)


def test_the_memory_target_judges_every_phase_and_misses_a_planted_underforecast(proxy_fp32):
    """bench's memory row on the forecast tests' V = 151,936 proxy: met as forecast; MISSED
    with a term removed, in the peak phase (the largest term) or elsewhere. The second is
    where judging the peak alone would pass."""
    prediction, measured = proxy_fp32

    def judged(forecast) -> dict[str, bool]:
        doc = {
            "memory_forecast": forecast_fields(forecast, measured),
            "real_vocab_fp32": forecast_fields(forecast, measured, "memory_"),
        }
        return {key: t["met"] for key, t in check_targets(doc).items()}

    keys = {
        "memory_forecast.worst_forecast_over_measured",
        "real_vocab_fp32.memory_worst_forecast_over_measured",
    }
    assert judged(prediction) == dict.fromkeys(keys, True)
    largest = max(
        (t for t in prediction.terms if t.phase == prediction.peak_phase), key=lambda t: t.bytes
    )
    assert judged(prediction.without(largest.name)) == dict.fromkeys(keys, False)
    assert prediction.peak_phase != "∇H at θ₀"  # (the gradient micro-batch's, here)
    off_peak = prediction.without("E's logits chunk (reverse mode)")
    assert judged(off_peak) == dict.fromkeys(keys, False)
    peak_only = forecast_fields(off_peak, measured)["forecast_over_measured"]
    assert Target("m", "f", "within", 0.20, "").met(peak_only)  # the peak alone: "met"
    # "within" is two-sided: an over-forecast by more than 20 % misses too.
    assert [Target("m", "f", "within", 0.20, "").met(r) for r in (0.79, 0.8, 1.2, 1.21)] == [
        False,
        True,
        True,
        False,
    ]
