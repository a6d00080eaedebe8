"""The one-pass entropy (issue 23) against the plain formula: log π and H from
log_softmax(z/T) and −Σ p·log p in fp64, within 1e-12 relative; and its derivatives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import jvp

from entropy_lab import entropy
from entropy_lab.entropy import ModelLogits, blocked_statistics, logit_statistics

pytestmark = pytest.mark.cpu

RTOL = 1e-12
# Below H ≈ 1e-3 the relative bound gives way to an absolute one: log s (s = Σ exp y ≥ 1) is
# rounded alike by both formulas, and against an 80-bit reference both err by ≤ 7e-16
# absolute (test_tiny_entropies_err_as_little_as_before), so a tiny H is relatively no
# better known in either.
ATOL = 1e-15


class _Head(nn.Module):
    """Just what ModelLogits reads: an output projection and a config."""

    def __init__(self, hidden, vocab, dtype, bias=False, softcap=None):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=bias).to(dtype)
        self.config = SimpleNamespace(final_logit_softcapping=softcap)

    def get_output_embeddings(self):
        return self.lm_head


def reference(z: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The formula before issue 23, verbatim."""
    logp_all = torch.log_softmax(z.double() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def worst_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= RTOL * b.abs() + ATOL).all())


def _case(dtype, scale, bias=False, softcap=None, tokens=37, hidden=16, vocab=1000, seed=0):
    torch.manual_seed(seed)
    head = ModelLogits(_Head(hidden, vocab, dtype, bias, softcap))
    # scale: large makes nearly deterministic tokens, whose H is tiny (≈1e-20 at 60)
    states = scale * torch.randn(tokens, hidden, dtype=dtype)
    targets = torch.randint(0, vocab, (tokens,))
    targets[0] = vocab - 1  # the last, partial, vocabulary block
    return head, states, targets


CASES = [
    (torch.float64, 1.0, False, None, 1.0),
    (torch.float64, 60.0, False, None, 1.0),  # tiny entropies
    (torch.float64, 3.0, True, 30.0, 0.7),  # bias, Gemma's softcap, T ≠ 1
    (torch.float32, 1.0, False, None, 1.0),  # the model's dtype, reductions in fp64
    (torch.float32, 20.0, True, None, 1.3),
]


@pytest.mark.parametrize("dtype,scale,bias,softcap,temperature", CASES)
def test_both_paths_match_the_plain_formula(monkeypatch, dtype, scale, bias, softcap, temperature):
    head, states, targets = _case(dtype, scale, bias, softcap)
    with torch.no_grad():
        want_logp, want_h = reference(head(states), targets, temperature)
        # the differentiable path (one chunk of logits)
        logp, h = logit_statistics(head(states), targets, temperature)
        assert close(logp, want_logp) and close(h, want_h)
        # the plain path, in many vocabulary blocks (the last one partial)
        monkeypatch.setattr(entropy, "BLOCK_BYTES", 8 * len(targets) * 96)
        assert head.writes_into(states)
        logp, h = blocked_statistics(head, states, targets, temperature)
        assert close(logp, want_logp) and close(h, want_h)
    if scale == 60.0:
        assert float(want_h.min()) < 1e-12  # the case of tiny H is really exercised


def test_planted_fp32_reductions_exceed_the_tolerance():
    # What the check must catch: the same one-pass formula with the reductions in fp32.
    head, states, targets = _case(torch.float32, 1.0)
    with torch.no_grad():
        z = head(states)
        want_logp, want_h = reference(z, targets, 1.0)
        _, h32 = logit_statistics(z, targets, 1.0)
        y = z - z.amax(-1, keepdim=True)
        e = y.exp()
        bad_h = e.sum(-1).log() - (e * y).sum(-1) / e.sum(-1)
    assert close(h32, want_h)
    assert not close(bad_h.double(), want_h)


def test_tiny_entropies_err_as_little_as_before():
    # Against log-sum-exp and Σ p·y in 80-bit long double (x86; a 64-bit mantissa elsewhere
    # makes the bound weaker, not false): absolute errors of the fp64 formulas, old and new.
    np = pytest.importorskip("numpy")
    head, states, targets = _case(torch.float64, 60.0)
    with torch.no_grad():
        z = head(states)
        _, old = reference(z, targets, 1.0)
        _, new = logit_statistics(z, targets, 1.0)
        _, blocked = blocked_statistics(head, states, targets, 1.0)
    y = z.numpy().astype(np.longdouble)
    y -= y.max(-1, keepdims=True)
    e = np.exp(y)
    exact = np.log(e.sum(-1)) - (e * y).sum(-1) / e.sum(-1)
    errors = {k: float(np.abs(v.numpy() - exact).max()) for k, v in
              (("old", old), ("new", new), ("blocked", blocked))}  # fmt: skip
    assert float(exact.min()) < 1e-12 and max(errors.values()) <= ATOL, errors


def test_token_statistics_takes_the_plain_path_only_without_derivatives():
    head, states, _ = _case(torch.float64, 1.0)
    assert not head.writes_into(states)  # grad mode, a weight that requires grad
    with torch.no_grad():
        assert head.writes_into(states)
    seen = []
    with torch.no_grad():  # forward mode, as the jvps run
        jvp(lambda s: seen.append(head.writes_into(s)) or s, (states,), (states,))
    assert seen == [False]


def test_forward_and_reverse_derivatives_match_the_plain_formula():
    head, states, targets = _case(torch.float64, 2.0)
    tangent = torch.randn_like(states)

    def ours(s):
        return torch.stack(logit_statistics(head(s), targets, 0.9))

    def plain(s):
        return torch.stack(reference(head(s), targets, 0.9))

    with torch.no_grad():
        (_, d_ours), (_, d_plain) = (
            jvp(ours, (states,), (tangent,)),
            jvp(plain, (states,), (tangent,)),
        )
    assert float((d_ours - d_plain).abs().max()) < 1e-11 * float(d_plain.abs().max())
    x = states.clone().requires_grad_()
    (g_ours,) = torch.autograd.grad(ours(x).sum(), x)
    (g_plain,) = torch.autograd.grad(plain(x).sum(), x)
    assert float((g_ours - g_plain).abs().max()) < 1e-11 * float(g_plain.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_covariance_matches_its_definition(dtype):
    """Cui et al.'s Cov_π(log π, ż), shifted frame and one exp, against Σ p·(log p − E log p)·
    (ż − E ż) from log_softmax in fp64, with a top-k-truncated row (−inf logits)."""
    from entropy_lab.theory import _logit_covariance

    g = torch.Generator().manual_seed(3)
    z = 4 * torch.randn(6, 3000, generator=g, dtype=dtype)
    z_dot = torch.randn(6, 3000, generator=g, dtype=dtype)
    z[0, 50:] = -float("inf")
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    kept = torch.isfinite(logp)
    centred_logp = torch.where(kept, logp - (p * logp.nan_to_num(neginf=0)).sum(-1, True), 0)
    centred_dot = z_dot.double() - (p * z_dot.double()).sum(-1, True)
    expected = (p * centred_logp * centred_dot).sum(-1)
    got = _logit_covariance(z, z_dot)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=RTOL * 100, atol=0)


def _first_order_case(dtype, scale, bias, softcap, moving_head):
    """A head and states with tangents; ``moving_head``: the projection moves along v too."""
    head, states, targets = _case(dtype, scale, bias, softcap)
    gen = torch.Generator().manual_seed(3)

    def like(t):
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)

    proj = head.projection
    tangents = entropy.PlainTangents(
        like(states),
        like(proj.weight) if moving_head else None,
        like(proj.bias) if moving_head and bias else None,
    )
    return head, states, tangents, targets


def _forward_ad_first_order(head, states, tangents, targets, temperature):
    """The forward-mode AD path through ``logit_statistics``: (logp, ḋlogp, H, Ḣ)."""
    import torch.autograd.forward_ad as fwAD

    proj = head.projection
    saved = proj.weight, proj.bias
    with torch.no_grad(), fwAD.dual_level():
        dual = {"weight": proj.weight, "bias": proj.bias}
        for name, dot in (("weight", tangents.weight), ("bias", tangents.bias)):
            if dot is not None:
                dual[name] = fwAD.make_dual(dual[name].detach(), dot)
        del proj.weight, proj.bias  # plain attributes for the duals
        proj.weight, proj.bias = dual["weight"], dual["bias"]
        try:
            z = head(fwAD.make_dual(states, tangents.states))
            logp, h = (fwAD.unpack_dual(t) for t in logit_statistics(z, targets, temperature))
        finally:
            del proj.weight, proj.bias
            proj.weight, proj.bias = (nn.Parameter(t) if t is not None else None for t in saved)
    return logp.primal, logp.tangent, h.primal, h.tangent


@pytest.mark.parametrize("moving_head", [False, True])
@pytest.mark.parametrize("dtype,scale,bias,softcap,temperature", CASES)
def test_closed_form_first_order_matches_forward_mode_ad(
    monkeypatch, dtype, scale, bias, softcap, temperature, moving_head
):
    """``blocked_first_order`` (d log π = ẏ_a − E ẏ, dH = −Cov(y, ẏ), merged over blocks)
    against forward-mode AD through ``logit_statistics``, within 1e-12 relative per token."""
    head, states, tangents, targets = _first_order_case(dtype, scale, bias, softcap, moving_head)
    want = _forward_ad_first_order(head, states, tangents, targets, temperature)
    monkeypatch.setattr(entropy, "BLOCK_BYTES", 8 * len(targets) * 96)  # many blocks
    with torch.no_grad():
        got = entropy.blocked_first_order(head, states, tangents, targets, temperature)
    names = ("logp", "logp_dot", "entropy", "entropy_dot")
    scales = [float(w.abs().max()) for w in want]  # tiny H / Ḣ: relative to the row's scale
    for name, w, s in zip(names, want, scales):
        g = getattr(got, name)
        assert bool(((g - w).abs() <= RTOL * (w.abs() + 1e-3 * s) + 1e-300).all()), name


def test_planted_missing_frame_shift_fails_the_closed_form_check(monkeypatch):
    """What the check must catch: Σ e·y·ẏ merged across blocks without the frame term δ_b·a_b
    (each block's y_b = y − δ_b)."""
    head, states, tangents, targets = _first_order_case(torch.float64, 3.0, False, None, False)
    want = _forward_ad_first_order(head, states, tangents, targets, 1.0)
    monkeypatch.setattr(entropy, "BLOCK_BYTES", 8 * len(targets) * 96)
    real_merge = entropy.merge_blocks

    def without_frame_term(delta, sums, slopes, dots, cross):
        s, means = real_merge(delta, sums, slopes, dots, cross)
        scale = delta.exp()
        y_yd = (scale * torch.stack(cross, -1)).sum(-1) / s
        return s, entropy.BlockMeans(means.yd, means.y, y_yd)

    with torch.no_grad():
        good = entropy.blocked_first_order(head, states, tangents, targets, 1.0)
        monkeypatch.setattr(entropy, "merge_blocks", without_frame_term)
        bad = entropy.blocked_first_order(head, states, tangents, targets, 1.0)
    assert close(good.entropy_dot, want[3])
    assert not close(bad.entropy_dot, want[3])


def test_the_closed_form_serves_only_an_unnested_forward_mode_pass():
    """``first_order_tangents``: under torch.autograd.forward_ad with no reverse graph; not
    without a tangent, under grad mode with a weight that requires grad, nor inside
    torch.func (nested jets keep forward-mode AD)."""
    import torch.autograd.forward_ad as fwAD

    head, states, _ = _case(torch.float64, 1.0)
    dot = torch.randn_like(states)
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(states, dot)
        tangents = entropy.first_order_tangents(head, dual)
        assert tangents is not None and torch.equal(tangents.states, dot)
        assert tangents.weight is None and tangents.bias is None
        assert entropy.first_order_tangents(head, states) is None  # no tangent
    with fwAD.dual_level():  # grad mode on, the weight requires grad: a reverse graph
        assert entropy.first_order_tangents(head, fwAD.make_dual(states, dot)) is None
    seen = []
    with torch.no_grad():
        jvp(lambda s: seen.append(entropy.first_order_tangents(head, s)) or s, (states,), (dot,))
    assert seen == [None]
