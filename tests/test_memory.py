"""The memory forecast (issue #23 item 3) against measured peaks on CPU proxies.

Measured: torch's own running total of live tensor bytes (``memory.peak_allocated``), the
CPU analogue of ``torch.cuda.max_memory_allocated``, from the start of the measured phases
(the model and its optimizer state are loaded before): it is compared with the forecast's
peak less what was loaded (weights, optimizer state as loaded).
"""

from __future__ import annotations

import pytest

from entropy_lab.errors import EntropyLabError
from entropy_lab.memory import (
    MemoryForecastError,
    ModelShape,
    Workload,
    check_fits,
    compared,
    forecast,
    misses,
    within,
)

pytestmark = pytest.mark.cpu

# -- the tiny checkpoint: a sweep's phases through the protocol ---------------------------


def _tiny_sweep(tiny_checkpoint, dtype: str):
    """(forecast, measured peak): prepare, one direction and one point of a small sweep."""
    from entropy_lab.bench import sweep_memory_peaks
    from entropy_lab.config import Measurement
    from entropy_lab.protocol import configure

    configured = configure(
        tiny_checkpoint,
        [1e-6],
        measurement=Measurement(num_repeats=2, eval_size=256),
        dtype=dtype,
        settings={"buffer_size": "8"},
    )
    return sweep_memory_peaks(configured, 1e-6)


@pytest.fixture(scope="module")
def tiny_fp64(tiny_checkpoint):
    return _tiny_sweep(tiny_checkpoint, "fp64")


def test_forecast_within_20_percent_on_the_tiny_checkpoint(tiny_fp64):
    prediction, measured = tiny_fp64
    assert len(compared(prediction, measured)) > 1, "no forecast phase was measured"
    assert misses(prediction, measured) == {}


def test_an_underforecast_fails_on_the_tiny_checkpoint(tiny_fp64):
    """Planted: the largest term of the peak phase dropped; another phase then sets a peak
    close to the measured one, so the per-phase comparison is what catches it."""
    prediction, measured = tiny_fp64
    largest = max(
        (t for t in prediction.terms if t.phase == prediction.peak_phase), key=lambda t: t.bytes
    )
    assert prediction.peak_phase in misses(prediction.without(largest.name), measured)


# -- a proxy with Qwen2.5's vocabulary: the phases called directly -------------------------

# proxy_fp32 (conftest, session-scoped: test_bench judges bench's target on it too): every
# phase of a sweep on a random Qwen2 with V = 151,936.


def test_forecast_within_20_percent_at_the_real_vocabulary(proxy_fp32):
    prediction, measured = proxy_fp32
    assert len(compared(prediction, measured)) > 1, "no forecast phase was measured"
    assert misses(prediction, measured) == {}


@pytest.mark.parametrize(
    "term",
    [
        "E's logits chunk (reverse mode)",
        "micro-batch logits chunk (reverse mode)",
        "covariance over a logits chunk",
        "logits block and tangent (closed form)",
        "prefill logits and sampler",
    ],
)
def test_an_underforecast_fails_at_the_real_vocabulary(proxy_fp32, term):
    """Planted: one term of a phase dropped (Cui's chunk is the peak phase's in fp32)."""
    prediction, measured = proxy_fp32
    assert misses(prediction.without(term), measured) != {}


def _jvp_phase(dtype: str) -> tuple[int, int, int]:
    """(forecast, measured, trainable bytes) of the first-order jvp on a proxy whose LoRA
    (rank 128 on hidden 128) outweighs its head, so v's tangent decides the phase."""
    import torch

    from entropy_lab.entropy import EntropyScorer
    from entropy_lab.memory import loaded_adamw, peak_allocated
    from entropy_lab.phases import phase_mark
    from entropy_lab.proxy import build_proxy, random_batch
    from entropy_lab.theory import directional_derivatives

    model = build_proxy(512, 128, 1, dtype, rank=128, max_positions=32, seed=0, faithful=True)
    shape = ModelShape.of(model, loaded_adamw(model))
    batch = random_batch(512, 2, 24, 16, "cpu", 0)
    scorer = EntropyScorer(model, 1.0, 16)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    v = {n: torch.randn_like(p, dtype=torch.float64) for n, p in theta0.items()}  # as v is kept
    with torch.no_grad():
        reference = scorer(batch).logprob
    work = Workload(2, 4, 2, prompt_tokens=16, response_tokens=8, eval_chunk_tokens=16)
    with peak_allocated("cpu") as measured, phase_mark("JET"):
        directional_derivatives(scorer, batch, reference, theta0, v, second_order=False)
    predicted, peak = compared(forecast(shape, work), measured)["jvp to order 1"]
    return predicted, peak, shape.trainable_bytes


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_the_jvp_tangent_copy_is_forecast_only_where_v_is_cast(dtype):
    """v is kept in fp64: fp32 casts it to a tangent of the trainable size, fp64 takes it as
    it is. Planted: the copy counted in fp64 (the forecast before) or dropped in fp32 misses."""
    predicted, peak, trainable = _jvp_phase(dtype)
    assert within(predicted, peak), (predicted, peak)
    planted = predicted + trainable if dtype == "fp64" else predicted - trainable
    assert not within(planted, peak), (planted, peak)


# -- the check on CUDA, with the free memory injected ---------------------------------------


def _small_forecast(runtime_bytes: int = 4):
    shape = ModelShape(
        vocab=151_936,
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        head_dim=128,
        runtime_bytes=runtime_bytes,
        weight_bytes=7 * 2**30,
        trainable=18_000_000,
        trainable_bytes=72_000_000,
        optimizer_bytes=144_000_000,
        lora_rank=16,
        lora_modules=7,
    )
    work = Workload(64, 128 * 8, 32, 200, 512, 256, cuda=True)
    return forecast(shape, work)


def test_cuda_refuses_what_does_not_fit_with_advice():
    """Qwen2.5-1.5B's shapes, the default sweep in fp32: nothing said when it fits; a warning
    when only the smaller batches of the out-of-memory retries fit; an error (one line, with
    advice) when even those do not."""
    prediction = _small_forecast()
    need, floor = (p - prediction.loaded for p in (prediction.peak, prediction.smallest_peak))
    assert floor < need
    gib = 80 * 2**30
    check_fits(prediction, "cuda", free_memory=lambda dev: (2 * need, gib))  # fits: silent
    with pytest.warns(RuntimeWarning, match="out-of-memory retries"):
        check_fits(prediction, "cuda", free_memory=lambda dev: (2 * floor, gib))
    with pytest.raises(MemoryForecastError, match="free") as err:
        check_fits(prediction, "cuda", free_memory=lambda dev: (floor, gib))
    assert isinstance(err.value, EntropyLabError)  # the CLI prints it as one line
    assert "smallest batching" in str(err.value)
    assert "--dtype" not in str(err.value)  # already fp32: no dtype to advise


def test_the_advice_names_fp32_only_to_an_fp64_run():
    prediction = _small_forecast(runtime_bytes=8)
    with pytest.raises(MemoryForecastError, match="--dtype fp32 instead of fp64"):
        check_fits(prediction, "cuda", free_memory=lambda dev: (0, 80 * 2**30))


def test_cpu_only_prints():
    prediction = _small_forecast()
    check_fits(prediction, "cpu", free_memory=lambda dev: (0, 0))  # never asks, never refuses
    table = prediction.table()
    assert "MEMORY FORECAST" in table and prediction.peak_phase in table
    assert prediction.to_dict()["peak_bytes"] == prediction.peak


def test_the_cli_prints_the_forecast_and_a_refusal_leaves_no_folder(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """Before sampling: the table after the setup table; a refused run (here the check made
    to refuse, as on a CUDA device without room) exits 2 with the advice, no results folder."""
    from entropy_lab import cli, memory

    def refuse(prediction, device, free_memory=None):
        check_fits(prediction, "cuda", free_memory=lambda dev: (0, 2**30))

    monkeypatch.setattr(memory, "check_fits", refuse)
    args = ["quick", "--output-dir", str(tmp_path), "--eval-size", "32", "--buffer-size", "8"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert "MEMORY FORECAST" in captured.out and "setting" in captured.out
    assert "free" in captured.err and "--dtype fp32" in captured.err
    assert not list(tmp_path.iterdir())
