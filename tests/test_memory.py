"""The memory forecast (issue #23 item 3) against measured peaks on CPU proxies.

Measured: torch's own running total of live tensor bytes (``memory.peak_allocated``), the
CPU analogue of ``torch.cuda.max_memory_allocated``, from the start of the measured phases
(the model and its optimizer state are loaded before): it is compared with the forecast's
peak less what was loaded (weights, optimizer state as loaded).
"""

from __future__ import annotations

import pytest
import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.memory import (
    FORECAST_PHASE,
    MemoryForecastError,
    ModelShape,
    Workload,
    check_fits,
    forecast,
    peak_allocated,
)
from entropy_lab.phases import Phase, phase_mark

pytestmark = pytest.mark.cpu

TOLERANCE = 0.20  # the bound: the forecast within 20 % of the measured peak


def within(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


def above_loaded(prediction) -> int:
    return prediction.peak - prediction.loaded


def misses(prediction, measured: dict) -> dict[str, tuple[int, int]]:
    """Where the forecast is not within 20 % of the measurement: the peak above what was
    loaded, and each forecast phase's transient against the largest measured of the sweep's
    phases it stands for. Empty when every one is within."""
    pairs = {"peak": (above_loaded(prediction), measured["peak"])}
    jvp = next((t.phase for t in prediction.terms if t.phase.startswith("jvp to order")), "")
    phases: dict[str, int] = {}
    for name, peak in measured["phases"].items():
        # A sweep's marks are protocol's Phase names; the proxy's, the forecast's own names.
        if name in Phase.__members__:
            if Phase[name] not in FORECAST_PHASE:  # e.g. UPDATE_VECTOR: no forecast term
                continue
            name = jvp if Phase[name] is Phase.JET else FORECAST_PHASE[Phase[name]]
        phases[name] = max(phases.get(name, 0), peak)
    assert phases, "no forecast phase was measured"
    pairs.update({p: (prediction.phase_total(p), m) for p, m in phases.items()})
    return {k: (f, m) for k, (f, m) in pairs.items() if not within(f, m)}


# -- the tiny checkpoint: a sweep's phases through the protocol ---------------------------


def _tiny_sweep(tiny_checkpoint, dtype: str):
    """(forecast, measured peak): prepare, one direction and one point of a small sweep."""
    from entropy_lab.config import Measurement
    from entropy_lab.protocol import configure, direction, measure_point, memory_forecast, prepare

    configured = configure(
        tiny_checkpoint,
        [1e-6],
        measurement=Measurement(num_repeats=2, eval_size=256),
        dtype=dtype,
        settings={"buffer_size": "8"},
    )
    prediction = memory_forecast(configured)
    with peak_allocated() as measured:
        setup = prepare(configured, forecast=prediction)
        d = direction(setup, 0)
        measure_point(setup, d, 1e-6)
    return prediction, measured


@pytest.fixture(scope="module")
def tiny_fp64(tiny_checkpoint):
    return _tiny_sweep(tiny_checkpoint, "fp64")


def test_forecast_within_20_percent_on_the_tiny_checkpoint(tiny_fp64):
    prediction, measured = tiny_fp64
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

PROXY_G = 4


def _proxy_phases(dtype: str):
    """(forecast, measured peak) of every phase of a sweep on a random Qwen2 with V = 151,936
    (hidden 64, 2 layers, LoRA r 8): sampling U's rows, scoring E, ∇H, one micro-batch's
    gradient, v, the jvp, Cui's identity and one step + scoring."""
    from entropy_lab.entropy import EntropyScorer, readings
    from entropy_lab.proxy import QWEN25_VOCAB, build_proxy, random_batch
    from entropy_lab.rollout import _sample_chunk
    from entropy_lab.theory import (
        covariance_identity_slope,
        directional_derivatives,
        entropy_gradient,
    )
    from entropy_lab.update import PolicyUpdate, UpdateBatch, group_advantages

    model = build_proxy(QWEN25_VOCAB, 64, 2, dtype, rank=8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for p in params:  # a loaded state: AdamW moments for every trainable tensor
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    prompt, length, chunk = 8, 24, 16
    eval_batch = random_batch(QWEN25_VOCAB, 2, length, prompt, seed=1)
    update = random_batch(QWEN25_VOCAB, 2 * PROXY_G, length, prompt, seed=2)
    update.prompt_index = torch.arange(2 * PROXY_G) // PROXY_G
    rewards = torch.arange(2 * PROXY_G, dtype=torch.float64) % 3
    work = Workload(
        eval_rows=2,
        update_rows=2 * PROXY_G,
        micro_rows=PROXY_G,
        prompt_tokens=prompt,
        response_tokens=length - prompt,
        eval_chunk_tokens=chunk,
    )
    prediction = forecast(ModelShape.of(model, optimizer), work)
    with peak_allocated() as measured:
        scorer = EntropyScorer(model, 1.0, chunk)
        updater = PolicyUpdate(
            model, optimizer, temperature=1.0, microbatch_size=1, chunk_tokens=chunk
        )
        with torch.no_grad(), phase_mark("rollout"):
            uniforms = torch.rand(2 * PROXY_G, length - prompt, dtype=torch.float64)
            prompts = [row[:prompt].tolist() for row in update.input_ids]
            base = model.get_base_model()
            _sample_chunk(base, prompts, 1, 1.0, length - prompt, 0, 1.0, uniforms, "cpu")
        with torch.no_grad(), phase_mark("score E"):
            sums = scorer.global_sums(eval_batch)
        _, policy, _ = readings(sums, sums.logprob)
        with phase_mark("∇H at θ₀"):
            grad_h = entropy_gradient(scorer, eval_batch, updater.params, float(policy), "policy")
        batch = UpdateBatch(
            update, rewards, group_advantages(rewards, update.prompt_index), PROXY_G, 32
        )
        with phase_mark("gradient micro-batch"):
            gradient = updater.gradient(batch)
        v = updater.update_vector(gradient)
        momentum = updater.update_vector(gradient.zero())
        with phase_mark("jvp to order 1"):
            directional_derivatives(scorer, eval_batch, sums.logprob, updater.theta0, v, False)
        with phase_mark("Cui identity"):
            covariance_identity_slope(scorer, eval_batch, updater.theta0, v)
        updater.step(1e-6, gradient)
        with phase_mark("score E"):
            scorer.measure(eval_batch, sums.logprob)
        updater.restore()
        del grad_h, momentum
    return prediction, measured


@pytest.fixture(scope="module")
def proxy_fp32():
    return _proxy_phases("fp32")


def test_forecast_within_20_percent_at_the_real_vocabulary(proxy_fp32):
    prediction, measured = proxy_fp32
    assert misses(prediction, measured) == {}


@pytest.mark.parametrize(
    "term",
    [
        "E's fp64 logits kept for backward",
        "micro-batch fp64 logits kept",
        "covariance over a logits chunk",
        "logits block and tangent (closed form)",
        "prefill logits and sampler",
    ],
)
def test_an_underforecast_fails_at_the_real_vocabulary(proxy_fp32, term):
    """Planted: one term of a phase dropped (Cui's chunk is the peak phase's in fp32)."""
    prediction, measured = proxy_fp32
    assert misses(prediction.without(term), measured) != {}


# -- the check on CUDA, with the free memory injected ---------------------------------------


def _small_forecast():
    shape = ModelShape(
        vocab=151_936,
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        head_dim=128,
        runtime_bytes=4,
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
    assert "--dtype fp32" in str(err.value) and "smallest batching" in str(err.value)


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
