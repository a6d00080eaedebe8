"""The architecture matrix (DESIGN §9), the transformers way: a tiny random checkpoint of each
architecture researchers train (``tiny.ARCHITECTURES``), built once per session, each checked
for load, scorer logits = model logits, rollout logits = scorer logits, faithful H = stock
fp32 H, a clean precision audit (no op below fp64), ΔH/(η·∇H·v) = 1 ± 1e-4 and a symmetric
residual ≤ 0.5 % in fp64 at η = 1e-9, and one fp32 sweep that finishes. Then the planted
faults the issues found (a scorer without the final softcap, an unpatched norm, an activation
left unswapped, Cohere's fp32 rotary, an fp32 round trip in a norm), each shown to fail the
checks.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from entropy_lab import checkpoint, entropy, precision, theory
from entropy_lab.analysis import routing_reason
from entropy_lab.checkpoint import load_checkpoint, verify_model_function
from entropy_lab.cli import main
from entropy_lab.config import Measurement
from entropy_lab.errors import CheckpointError, EntropyLabError
from entropy_lab.protocol import direction, measure_point, open_experiment, run_sweep
from entropy_lab.rollout import sample_responses
from entropy_lab.tiny import (
    ARCHITECTURE_TASK,
    ARCHITECTURES,
    build_tiny_architecture,
    tiny_architecture_config,
)

pytestmark = pytest.mark.cpu

# Each architecture's tests share one xdist worker, so its checkpoint is built once.
ARCHS = [pytest.param(n, marks=pytest.mark.xdist_group(f"arch-{n}")) for n in ARCHITECTURES]
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def arch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("architectures")


def arch_checkpoint(root: Path, name: str) -> Path:
    if name not in _BUILT:
        _BUILT[name] = build_tiny_architecture(name, root / name)
    return _BUILT[name]


def arch_setup(path: Path, dtype: str, **measurement):
    flags = {"buffer_size": 4, "num_generations": 4, "microbatch_size": 2}
    flags["prompts"] = ARCHITECTURE_TASK
    return open_experiment(
        path,
        [1e-9],
        measurement=Measurement(**{"num_repeats": 2, "eval_size": 8, **measurement}),
        dtype=dtype,
        settings=flags,
    )


@pytest.fixture(scope="module")
def fp64_runs() -> dict:
    return {}


def fp64_run(root: Path, name: str, cache: dict):
    """(setup, direction) in faithful fp64, first order only (with ΔH(−η): the symmetric
    check), cached per architecture."""
    if name not in cache:
        setup = arch_setup(
            arch_checkpoint(root, name),
            "fp64",
            jet=1,
            identity_check=False,
        )
        cache[name] = (setup, direction(setup, 0))
    return cache[name]


# -- the matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_loads_with_the_models_own_logits(name, arch_root, fp64_runs, record_property):
    """fp32 and faithful fp64 load; the loader's checks passed and say what they measured."""
    path = arch_checkpoint(arch_root, name)
    meta32 = load_checkpoint(path, dtype="fp32").metadata
    assert meta32["architecture"] == ARCHITECTURES[name][1]
    assert meta32["logits_check"] <= 1e-6
    setup64, _ = fp64_run(arch_root, name, fp64_runs)
    meta64 = setup64.checkpoint.metadata
    assert meta64["logits_check"] <= 1e-10
    softcap = "final_logit_softcapping" in ARCHITECTURES[name][2]
    assert bool(meta64["logits_transform"]) == softcap
    # Every norm-like module is patched or torch's own; MoE routers and RoPE patched too.
    policy = setup64.checkpoint.policy
    norms = [m for m in policy.modules() if precision._is_norm(m)]
    rotary = [m for m in policy.modules() if precision.is_rotary_embedding(m)]
    faithful = meta64["faithful"]
    assert faithful["patched"] + faithful["native"] == len(norms) + len(
        entropy.routers_of(policy)
    ) + len(rotary)
    # The precision audit saw the forward and the jvp and found nothing below fp64.
    audit = faithful["precision_audit"]
    assert audit["below_fp64"] == [] and audit["jvp"] == "passed" and audit["ops_seen"] > 100
    record_property("faithful_vs_stock_probe", faithful["entropy_vs_stock_fp32"])


@pytest.mark.parametrize("name", ARCHS)
def test_faithful_entropy_equals_the_stock_fp32_models_on_E(name, arch_root, fp64_runs):
    """H(θ₀) of E: faithful fp64 against the stock fp32 model scoring the same sequences."""
    setup64, _ = fp64_run(arch_root, name, fp64_runs)
    stock = load_checkpoint(arch_checkpoint(arch_root, name), dtype="fp32").policy
    scorer = entropy.EntropyScorer(stock, setup64.cfg.temperature)
    with torch.no_grad():
        sums = scorer.global_sums(setup64.eval_batch)
    h32 = float(sums.entropy.sum() / sums.tokens.sum())
    h64 = setup64.baseline.conditional
    assert abs(h64 - h32) <= 1e-6 * abs(h32), (h64, h32)


def _rollout_and_scorer_logits(policy, tokenizer, problems, temperature):
    """The logits each sampling step drew from, and the scorer's at the same tokens."""
    lm = policy.get_base_model()
    steps: list[torch.Tensor] = []
    handle = lm.register_forward_hook(lambda m, a, out: steps.append(out.logits[:, -1].detach()))
    try:
        batch = sample_responses(
            policy, tokenizer, problems, 1, temperature=temperature, max_new_tokens=4, seed=3
        )
    finally:
        handle.remove()
    rollout = []
    for row, count in enumerate(batch.response_mask.sum(1).tolist()):
        rollout += [steps[t][row] for t in range(count)]
    decoder, head = entropy.decoder_and_head(policy)
    with torch.no_grad():
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        scorer = head(hidden[:, :-1][batch.response_mask[:, 1:].bool()])
    return torch.stack(rollout), scorer


@pytest.mark.parametrize("name", ARCHS)
def test_rollout_logits_equal_scorer_logits(name, arch_root, fp64_runs):
    """What sampled (KV cache, left padding) is what the scorer scores (full forward)."""
    setup64, _ = fp64_run(arch_root, name, fp64_runs)
    problems = setup64.update_pool[:6]
    rollout, scorer = _rollout_and_scorer_logits(
        setup64.checkpoint.policy, setup64.checkpoint.tokenizer, problems, 1.0
    )
    scale = float(rollout.abs().max())
    assert float((rollout - scorer).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("name", ARCHS)
def test_fp64_first_order_ratio_at_1e_9(name, arch_root, fp64_runs, record_property):
    setup64, d = fp64_run(arch_root, name, fp64_runs)
    record = measure_point(setup64, d, 1e-9)
    ratio = record.entropy_change / record.first_order_prediction
    # η²·vᵀ∇²H v is ~1e-8 of ΔH here: the even part ΔH(η) + ΔH(−η) is forward-pass noise
    symmetric = abs(record.entropy_change + record.entropy_change_negative) / abs(
        record.entropy_change
    )
    record_property("fp64_ratio_1e-9", ratio)
    record_property("fp64_symmetric_residual_1e-9", symmetric)
    assert abs(ratio - 1) <= 1e-4, ratio
    assert symmetric <= 0.005, symmetric
    moe = bool(entropy.routers_of(setup64.checkpoint.policy))
    assert (record.routing_changed_fraction is None) == (not moe)
    if moe:  # routing is discrete: a 1e-9 step changes no token's experts
        assert record.routing_changed_fraction == 0.0


@pytest.mark.parametrize("name", ARCHS)
def test_fp32_sweep_finishes(name, arch_root):
    """Every oracle (nested jvps to the third order, identity, symmetric check)."""
    setup = arch_setup(arch_checkpoint(arch_root, name), "fp32", jet=3)
    records = [r.to_dict() for r in run_sweep(setup, repeats=[0], etas=[1e-3], progress=False)]
    assert [r["success"] for r in records] == [True], records
    r = records[0]
    assert all(math.isfinite(r[k]) for k in ("entropy_change", "curvature", "third_derivative"))
    # fp32 at 1e-3, inside this range, the jvp still predicts ΔH to 5 %
    assert abs(r["entropy_change"] / r["third_order_prediction"] - 1) < 0.05, r


def test_moe_routing_change_is_flagged(arch_root, fp64_runs):
    """A step large enough to move some token's top-k experts is flagged; θ₀ itself is not."""
    setup64, d = fp64_run(arch_root, "qwen3_moe", fp64_runs)
    upd, scorer = setup64.updater, setup64.scorer
    scorer.measure(setup64.eval_batch, setup64.reference_logprob)
    assert scorer.routing_changed_fraction() == 0.0
    try:
        upd.step(3.0, d.gradient)  # far outside any linear window: routing must move
        scorer.measure(setup64.eval_batch, setup64.reference_logprob)
    finally:
        upd.restore()
    assert 0.0 < scorer.routing_changed_fraction() <= 1.0
    # The analysis never calls such a point resolvable (the jet holds routing fixed).
    changed = scorer.routing_changed_fraction()
    assert "routing changed" in routing_reason(changed)
    assert routing_reason(0.0) is None and routing_reason(None) is None


# -- architectures outside the matrix: the logits step and the norm formula, at load -------


@pytest.mark.parametrize(
    "config_class, model_class, step",
    [
        ("CohereConfig", "CohereForCausalLM", "logit_scale"),
        ("GraniteConfig", "GraniteForCausalLM", "logits_scaling"),
    ],
)
def test_logit_scaling_families_pass_the_load_checks(config_class, model_class, step):
    import transformers

    kwargs = {step: 0.25 if step == "logit_scale" else 4.0}
    config = getattr(transformers, config_class)(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kwargs,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).double().eval()
    checks = verify_model_function(model, "fp64", faithful=True)
    assert checks["logits_transform"] == [f"{step} {kwargs[step]:g}"]
    assert checks["faithful"]["entropy_vs_stock_fp32"] <= 1e-6
    # and without the step, the check fails where the issue says it must
    model = getattr(transformers, model_class)(config).double().eval()
    original = entropy.ModelLogits.__init__

    def without_step(self, lm):
        original(self, lm)
        self.scale = self.divisor = None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entropy.ModelLogits, "__init__", without_step)
        with pytest.raises(CheckpointError, match=f"{model_class}: .*after lm_head"):
            verify_model_function(model, "fp32", faithful=False)


def _random_cohere():
    """A random Cohere model in fp64, peaked enough for ∇H·v to be of order 1 (0.71)."""
    import transformers

    config = transformers.CohereConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        logit_scale=1.0,  # Cohere's default 1/16 leaves ΔH at 1e-9 near H's rounding
        eos_token_id=1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.CohereForCausalLM(config).double().eval()


def _resolution_at(model, eta: float) -> tuple[float, float]:
    """(ΔH/(η·∇H·v), |ΔH(η) + ΔH(−η)| / |ΔH(η)|) on eight probe sequences, along a random
    direction of the projections (unit normal entries, as an AdamW step's are of order 1)."""
    scorer = entropy.EntropyScorer(model, temperature=1.0)
    batch = entropy.probe_batch(model, rows=8, length=16)
    params = {n: p for n, p in model.named_parameters() if "proj" in n}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    generator = torch.Generator().manual_seed(1)
    v = {
        n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()
    }
    jet = theory.sums_jet(scorer, batch, theta0, v, 1)
    slope = float(jet[:, 0, 1].sum() / jet[:, 2, 0].sum())

    def entropy_at(s: float) -> float:
        for n, p in params.items():
            p.copy_(theta0[n] + s * v[n])
        sums = scorer(batch)
        return float(sums.entropy.sum() / sums.tokens.sum())

    with torch.no_grad():
        h0, plus, minus = entropy_at(0.0), entropy_at(eta), entropy_at(-eta)
        entropy_at(0.0)
    change = plus - h0
    return change / (eta * slope), abs(change + minus - h0) / abs(change)


def test_cohere_rotary_is_listed_by_the_audit_and_patched():
    """transformers' Cohere casts q and k to fp32 in apply_rotary_pos_emb and computes its
    RoPE angles in fp32: before the patches the audit lists both and faithful mode is refused;
    after them the audit is clean and ΔH resolves at η = 1e-9, where it did not."""
    before = _random_cohere()
    report = precision.make_faithful(before, rotary=False)  # the code before the patches
    assert not any("rotary" in f.lower() for f in report.summary()["formulas"])
    _, audit = checkpoint._audited_probe(before, entropy.probe_batch(before))
    listed = {(e["module"], e["module_type"]) for e in audit["below_fp64"]}
    assert ("model.rotary_emb", "CohereRotaryEmbedding") in listed
    assert ("model.layers.0.self_attn", "CohereAttention") in listed
    casts = [e for e in audit["below_fp64"] if e["module_type"] == "CohereAttention"]
    assert any(e["op"] == "aten._to_copy.default" and "float32" in e["dtypes"] for e in casts)
    assert "model.layers.*.self_attn [CohereAttention]: _to_copy" in audit["summary"]
    # The load check refuses it in one line (CheckpointError: exit 2 from the CLI).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "make_faithful", lambda m: precision.make_faithful(m, rotary=False))
        with pytest.raises(CheckpointError) as caught:
            verify_model_function(_random_cohere(), "fp64", faithful=True)
    message = str(caught.value)
    assert (
        message.startswith(
            "faithful fp64 refused for CohereForCausalLM: the precision audit found "
        )
        and "\n" not in message
    ), message
    assert "model.layers.*.self_attn [CohereAttention]: _to_copy" in message
    ratio, symmetric = _resolution_at(before, 1e-9)
    assert symmetric > 0.005 and abs(ratio - 1) > 1e-4, (ratio, symmetric)  # unresolvable

    after = _random_cohere()
    checks = verify_model_function(after, "fp64", faithful=True)  # patches it
    formulas = checks["faithful"]["formulas"]
    assert formulas["RoPE angles (interleaved)"] == 1
    assert formulas["rotary application (pairs)"] == 2
    assert checks["faithful"]["precision_audit"]["below_fp64"] == []
    ratio, symmetric = _resolution_at(after, 1e-9)
    assert symmetric <= 0.005 and abs(ratio - 1) <= 1e-4, (ratio, symmetric)


@pytest.mark.parametrize("name", ["llama", "gemma3", "phi3", "gpt_neox"])
def test_rotary_patches_compute_the_stock_function(name):
    """The fp64 angles (and layouts: Gemma 3's per layer type, GPT-NeoX's partial rotary)
    agree with the stock fp32 ones to fp32 rounding, on the model's own logits (the rest
    faithful in both: stock fp64 Gemma 3 gives NaN on padded rows, README)."""
    import transformers

    torch.manual_seed(0)
    config = tiny_architecture_config(name)
    stock = getattr(transformers, ARCHITECTURES[name][1])(config).double().eval()
    faithful = copy.deepcopy(stock)
    precision.make_faithful(stock, rotary=False)
    report = precision.make_faithful(faithful)
    assert report.complete and any("RoPE" in f for f in report.patched.values())
    batch = entropy.probe_batch(stock)
    with torch.no_grad():
        a = stock(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        b = faithful(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert float((a - b)[real].abs().max()) <= 1e-5 * float(a[real].abs().max())


# -- planted faults ---------------------------------------------------------------------------


def _fp32_round_trip_norm(self, hidden_states):
    """w·x̂ with an fp32 round trip inside: within the norm probe's and the H check's
    tolerances, so only the precision audit can see it."""
    x = hidden_states.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.faithful_eps)).to(hidden_states.dtype)


def test_a_planted_float_in_a_norm_is_caught_and_named(arch_root, tmp_path, monkeypatch, capsys):
    path = arch_checkpoint(arch_root, "llama")
    capsys.readouterr()
    monkeypatch.setitem(precision.NORM_FORMULAS, "w·x̂", _fp32_round_trip_norm)
    rc, err = _cli(capsys, path, tmp_path / "out", "--dtype", "fp64")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(
        "entropy-lab: error: faithful fp64 refused for LlamaForCausalLM: the precision audit found "
    ), lines[0]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert f"model.layers.*.{norm} [LlamaRMSNorm]: _to_copy" in lines[0], lines[0]
    assert "model.norm [LlamaRMSNorm]" in lines[0]
    assert not list((tmp_path / "out").glob("entropy_lr_experiment_*"))
    # Without the audit the same norm passes every other load check: the H check and the
    # norm probe cannot see an fp32 round trip inside an fp64 model.
    monkeypatch.setattr(precision.PrecisionRecorder, "entries", property(lambda self: []))
    meta = load_checkpoint(path, dtype="fp64").metadata
    assert meta["faithful"]["entropy_vs_stock_fp32"] <= 1e-6


def test_a_scorer_without_the_final_softcap_is_refused_at_load(arch_root, monkeypatch, capsys):
    """The issue's Gemma 2 bug: head(states) without final_logit_softcapping."""
    original = entropy.ModelLogits.__init__

    def no_softcap(self, lm):
        original(self, lm)
        self.softcap = None

    monkeypatch.setattr(entropy.ModelLogits, "__init__", no_softcap)
    path = arch_checkpoint(arch_root, "gemma2")
    for dtype in ("fp32", "fp64"):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path, dtype=dtype)
        message = str(caught.value)
        assert message.startswith("Gemma2ForCausalLM: the scorer's logits differ"), message
        assert "first difference at after lm_head" in message and "\n" not in message


def test_an_unpatched_norm_refuses_faithful_mode(arch_root, monkeypatch):
    """The issue's Gemma bug, both ways: no (1 + w)·x̂ formula (the norm stays unpatched), or
    the w·x̂ formula forced on it (patched, but computing another function)."""
    path = arch_checkpoint(arch_root, "gemma3")
    with monkeypatch.context() as mp:
        formulas = {k: v for k, v in precision.NORM_FORMULAS.items() if k != "(1 + w)·x̂"}
        mp.setattr(precision, "NORM_FORMULAS", formulas)
        with pytest.raises(CheckpointError, match=r"faithful fp64 refused for Gemma3ForCausalLM: "):
            load_checkpoint(path, dtype="fp64")
    with monkeypatch.context() as mp:

        def wrong_formula(module):
            module.faithful_eps = precision._norm_eps(module)
            return "w·x̂", ""

        mp.setattr(precision, "_faithful_norm_formula", wrong_formula)
        with pytest.raises(CheckpointError, match=r"its H on probe sequences differs"):
            load_checkpoint(path, dtype="fp64")
    # fp32 is untouched (stock fp64 Gemma gives non-finite logits: README)
    assert load_checkpoint(path, dtype="fp32").metadata["logits_check"] <= 1e-6


def test_a_faithful_attention_without_softcap_is_refused(arch_root, monkeypatch):
    attention = precision._faithful_attention

    def without_softcap(*args, softcap=None, **kwargs):
        return attention(*args, **kwargs)

    monkeypatch.setattr(precision, "_faithful_attention", without_softcap)
    with pytest.raises(CheckpointError, match=r"Gemma2ForCausalLM: its H on probe sequences"):
        load_checkpoint(arch_checkpoint(arch_root, "gemma2"), dtype="fp64")


def _cli(capsys, path: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(
        [
            "sweep",
            "--checkpoint",
            str(path),
            "--no-progress",
            "--threads",
            "1",
            "--eval-size",
            "8",
            "--buffer-size",
            "4",
            "--num-repeats",
            "2",
            "--learning-rates",
            "1e-3",
            "--output-dir",
            str(out),
            *extra,
        ]
    )
    return rc, capsys.readouterr().err


def test_an_unswapped_activation_fails_before_sampling(arch_root, tmp_path, monkeypatch, capsys):
    """The issue's Phi-3 crash: SiLU left in place under a nested jvp (--jet 2) → one line,
    exit 2, no results folder, nothing sampled; the sweep without the jvp oracles still runs."""
    monkeypatch.setattr(theory, "UNSAFE_ACTIVATIONS", {})
    sampled = []
    monkeypatch.setattr(
        "entropy_lab.protocol.sample_responses", lambda *a, **k: sampled.append(1) or 1 / 0
    )
    path = arch_checkpoint(arch_root, "phi3")
    capsys.readouterr()  # the build's progress bars
    rc, err = _cli(capsys, path, tmp_path / "out", "--dtype", "fp64", "--jet", "2")
    assert rc == 2 and not sampled, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert re.match(
        r"entropy-lab: error: forward-mode AD cannot pass through Phi3ForCausalLM for "
        r"vᵀ∇²H v \(NotImplementedError: .*silu_backward.*\); run with --jet 1 \(first "
        r"order by jvp\)$",
        lines[0],
    ), lines[0]
    assert not list((tmp_path / "out").glob("entropy_lr_experiment_*"))
    monkeypatch.undo()
    monkeypatch.setattr(theory, "UNSAFE_ACTIVATIONS", {})
    rc, err = _cli(capsys, path, tmp_path / "out2", "--no-first-order")
    assert rc == 0, err
    (folder,) = (tmp_path / "out2").glob("entropy_lr_experiment_*")
    assert (folder / "raw_results.json").is_file()


def test_the_first_order_probe_names_its_fix(arch_root, monkeypatch):
    """A model forward-mode AD cannot pass at all: only --no-first-order helps."""

    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with aten::some_kernel")

    monkeypatch.setattr(theory, "sums_jet", no_forward_ad)
    ck = load_checkpoint(arch_checkpoint(arch_root, "llama"), dtype="fp32")
    with pytest.raises(EntropyLabError) as caught:
        theory.check_forward_ad(ck.policy, 1)
    assert str(caught.value).endswith(
        "run with --no-first-order (ΔH is still measured, without the jvp oracles)"
    )


def test_a_trunk_called_differently_is_named_by_its_first_differing_module(arch_root, monkeypatch):
    """The scorer's trunk given positions 0, 2, 4, … (RoPE is relative: a plain shift would
    change nothing): the check names the rotary embedding, the first module whose output
    differs from the model's own forward."""
    decoder_and_head = entropy.decoder_and_head

    def shifted(lm):
        decoder, head = decoder_and_head(lm)

        def call(input_ids, attention_mask):
            positions = 2 * torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
            return decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
            )

        return call, head

    monkeypatch.setattr(entropy, "decoder_and_head", shifted)
    with pytest.raises(CheckpointError, match=r"first difference at model\.rotary_emb "):
        load_checkpoint(arch_checkpoint(arch_root, "llama"), dtype="fp32")


def test_stock_fp64_with_a_sliding_window_is_refused_for_its_non_finite_logits(arch_root):
    """transformers' fp32 softmax over an fp64 mask: a padded query row fully masked → NaN."""
    with pytest.raises(
        CheckpointError, match=r"MistralForCausalLM in fp64: model\(\.\.\.\)\.logits"
    ):
        load_checkpoint(arch_checkpoint(arch_root, "mistral"), dtype="fp64", faithful_fp64=False)
