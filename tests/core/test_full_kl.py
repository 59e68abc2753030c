"""Full-vocab KL: hand-computed values, backend dispatch, the hidden-state variant, and the Triton kernels (CUDA)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from trl_regularizers.core.full_kl import full_vocab_kl, full_vocab_kl_from_hidden, resolve_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def naive(logits, ref_logits, direction):
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1) if direction == "reverse" else (logq.exp() * (logq - logp)).sum(-1)


@pytest.mark.parametrize(
    "direction, kl, grad",
    [
        # p = (1/2, 1/2), q = (3/4, 1/4)
        ("reverse", 0.5 * math.log(2 / 3) + 0.5 * math.log(2), None),
        ("forward", 0.75 * math.log(1.5) + 0.25 * math.log(0.5), (-0.25, 0.25)),
    ],
)
def test_two_token_values_and_gradients_by_hand(direction, kl, grad):
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    value = full_vocab_kl(logits, ref_logits, direction=direction, backend="torch")
    value.sum().backward()
    if grad is None:  # reverse: p_v (log p_v - log q_v - KL)
        grad = tuple(0.5 * (math.log(0.5 / q) - kl) for q in (0.75, 0.25))
    assert value.item() == pytest.approx(kl, abs=1e-7)  # math runs in float32
    assert logits.grad[0].tolist() == pytest.approx(list(grad), abs=1e-7)


def test_auto_backend_is_torch_on_cpu_and_never_imports_the_kernels():
    """In a fresh interpreter (this one may have imported them already): a CPU call resolves to torch and leaves
    Triton and the kernels unimported."""
    code = (
        "import sys, torch; from trl_regularizers.core.full_kl import full_vocab_kl, resolve_backend;"
        "full_vocab_kl(torch.randn(2, 3, 5), torch.randn(2, 3, 5));"
        "print(resolve_backend('auto', torch.device('cpu')));"
        "print(sorted(m for m in sys.modules if m.startswith(('triton', 'trl_regularizers.kernels'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["torch", "[]"], result.stdout


def test_backend_errors_name_the_choice():
    with pytest.raises(ValueError, match="Unknown full-vocab KL backend 'cuda'.*auto, torch, triton"):
        resolve_backend("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
            full_vocab_kl(torch.randn(2, 5), torch.randn(2, 5), backend="triton")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_torch_backend_is_independent_of_chunking_and_strides(direction):
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 41)[:, :-1]  # non-contiguous positions, like logits[:, :-1] in a trainer
    ref_logits = torch.randn(3, 7, 41)
    values = [full_vocab_kl(logits, ref_logits, direction=direction, chunk_size=c, backend="torch") for c in (1, 5, 1024)]
    expected = naive(logits.double(), ref_logits.double(), direction)
    for value in values:
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_from_hidden_equals_explicit_logits_values_and_gradients(direction, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(33, 8, dtype=torch.float64, requires_grad=True)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(2, 5, 8, dtype=torch.float64)
    ref_weight = (weight.detach() + 0.3 * torch.randn(33, 8, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    coef = torch.randn(2, 5, dtype=torch.float64)  # a non-uniform upstream gradient

    ours = full_vocab_kl_from_hidden(hidden, ref_hidden, weight, ref_weight, mask, direction, chunk_size, backend="torch")
    ours_grads = torch.autograd.grad((coef * ours).sum(), (hidden, weight))
    expected = naive(hidden @ weight.T, ref_hidden @ ref_weight.detach().T, direction) * mask
    expected_grads = torch.autograd.grad((coef * expected).sum(), (hidden, weight))

    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)  # float32 math
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert ref_weight.grad is None


def test_from_hidden_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"weight \(33, 7\).*must be \[V, 8\]"):
        full_vocab_kl_from_hidden(torch.randn(2, 8), torch.randn(2, 8), torch.randn(33, 7), torch.randn(33, 7))


@needs_cuda
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("vocab", [151936, 50257, 1000])
def test_triton_matches_naive_float32_values_and_gradients(direction, vocab):
    torch.manual_seed(0)
    z = (2 * torch.randn(2, 33, vocab, device="cuda")).to(torch.bfloat16)
    r = (z.float() + 0.5 * torch.randn(2, 33, vocab, device="cuda")).to(torch.bfloat16)
    z_triton = z[:, :-1].requires_grad_()  # strided rows, as in a trainer's logits[:, :-1]
    ours = full_vocab_kl(z_triton, r[:, :-1], direction=direction, backend="triton")
    (grad,) = torch.autograd.grad((ours * torch.linspace(0, 1, 32, device="cuda")).sum(), z_triton)
    z32 = z[:, :-1].float().requires_grad_()
    expected = naive(z32, r[:, :-1].float(), direction)
    (expected_grad,) = torch.autograd.grad((expected * torch.linspace(0, 1, 32, device="cuda")).sum(), z32)

    assert (ours - expected).abs().max().item() < 1e-5
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), expected_grad, rtol=2**-7, atol=1e-7)
    torch.testing.assert_close(full_vocab_kl(z[:, :-1], r[:, :-1], direction=direction, backend="torch"), ours, rtol=0, atol=1e-5)


@needs_cuda
def test_auto_backend_picks_triton_on_cuda():
    pytest.importorskip("triton", reason="Triton is not installed")
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@needs_cuda
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_triton_from_hidden_matches_torch_backend(direction):
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = (0.2 * torch.randn(5000, 64, device="cuda")).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 0.9
    results = []
    for backend in ("triton", "torch"):
        kl = full_vocab_kl_from_hidden(hidden, ref_hidden, weight, ref_weight, direction=direction, chunk_size=128, backend=backend)
        results.append((kl, *torch.autograd.grad(kl.sum(), (hidden, weight))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# Masked vocabulary entries (-inf logits) and masked positions ------------------------------------------------

NEG_INF = float("-inf")


def sub_vocab_reference(logits, ref_logits, keep_p, keep_q, direction):
    """float64 KL and dKL/dlogits when p lives on ``keep_p`` and q on ``keep_q`` (the entries that are not -inf)."""
    z = logits.double().masked_fill(~keep_p, NEG_INF).requires_grad_()
    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(ref_logits.double().masked_fill(~keep_q, NEG_INF), -1)
    x, y = (logp, logq) if direction == "reverse" else (logq, logp)
    support = (keep_p if direction == "reverse" else keep_q).expand_as(x)
    kl = (x.exp() * (x - y).where(support, torch.zeros((), dtype=x.dtype))).sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad.nan_to_num(0.0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_entries_masked_on_both_sides_contribute_nothing(direction):
    """A padded / top-k vocabulary: -inf on both sides is 0 log 0 = 0, value and gradient (was NaN)."""
    torch.manual_seed(0)
    keep = torch.tensor([True, True, False, True, False, True])
    logits = torch.randn(3, 6).masked_fill(~keep, NEG_INF).requires_grad_()
    ref_logits = torch.randn(3, 6).masked_fill(~keep, NEG_INF)
    value = full_vocab_kl(logits, ref_logits, direction=direction, chunk_size=2, backend="torch")
    (grad,) = torch.autograd.grad(value.sum(), logits)
    expected, expected_grad = sub_vocab_reference(logits.detach(), ref_logits, keep, keep, direction)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert (grad[:, ~keep] == 0).all()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_entry_masked_on_the_zero_mass_side_only_keeps_the_kl_finite(direction):
    """reverse: p_v = 0 < q_v adds nothing; forward: q_v = 0 < p_v adds nothing (the KL averages over the other)."""
    torch.manual_seed(1)
    logits, ref_logits = torch.randn(2, 5), torch.randn(2, 5)
    masked = torch.tensor([False, True, False, False, True])
    everything = torch.ones(5, dtype=torch.bool)
    if direction == "reverse":
        logits, keep_p, keep_q = logits.masked_fill(masked, NEG_INF), ~masked, everything
    else:
        ref_logits, keep_p, keep_q = ref_logits.masked_fill(masked, NEG_INF), everything, ~masked
    logits.requires_grad_()
    value = full_vocab_kl(logits, ref_logits, direction=direction, backend="torch")
    (grad,) = torch.autograd.grad(value.sum(), logits)
    expected, expected_grad = sub_vocab_reference(logits.detach(), ref_logits, keep_p, keep_q, direction)
    assert torch.isfinite(value).all() and (value > 0).all()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "direction, side, message",
    [
        ("reverse", "ref", r"KL\(pi\|\|pi_ref\) is not finite at 1 of 4 positions \(first at \(1, 0\).*ref_logits is -inf at tokens where logits is not"),
        ("forward", "policy", r"KL\(pi_ref\|\|pi\) is not finite at 1 of 4 positions \(first at \(1, 0\).*logits is -inf at tokens where ref_logits is not"),
    ],
)
def test_mass_on_one_side_only_raises_unless_the_position_is_masked_out(direction, side, message):
    """p_v > 0 = q_v (reverse) makes the KL +inf: a clear error naming the position, not inf and NaN gradients;
    with that position masked out it is exactly 0 and the others are unchanged."""
    torch.manual_seed(2)
    logits, ref_logits = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    (ref_logits if side == "ref" else logits)[1, 0, 3] = NEG_INF
    with pytest.raises(ValueError, match=message):
        full_vocab_kl(logits, ref_logits, direction=direction, backend="torch")
    mask = torch.tensor([[1, 1], [0, 1]])
    logits.requires_grad_()
    value = full_vocab_kl(logits, ref_logits, mask, direction=direction, backend="torch")
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert value[1, 0] == 0 and (grad[1, 0] == 0).all() and torch.isfinite(grad).all()
    expected = naive(logits.detach().double(), ref_logits.double(), direction)
    torch.testing.assert_close(value[mask.bool()].double(), expected[mask.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_masked_out_rows_give_exactly_zero_and_no_gradient_whatever_they_hold(direction):
    """Rows with mask 0 holding NaN, +inf, only -inf or one-sided masks: 0 and zero gradient (a fully -inf row
    gave NaN, and NaN gradients leaked into the batch); included rows are unaffected."""
    torch.manual_seed(3)
    logits, ref_logits = torch.randn(5, 4), torch.randn(5, 4)
    logits[1, 2] = float("nan")
    ref_logits[2, 0] = float("inf")
    logits[3], ref_logits[3] = NEG_INF, NEG_INF
    ref_logits[4, :3] = NEG_INF
    logits[4, 3] = NEG_INF  # no overlap at all: +inf KL both ways
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    logits.requires_grad_()
    value = full_vocab_kl(logits, ref_logits, mask, direction=direction, chunk_size=2, backend="torch")
    (grad,) = torch.autograd.grad((value * torch.arange(1.0, 6.0)).sum(), logits)
    assert value[1:].tolist() == [0.0] * 4 and (grad[1:] == 0).all()
    expected = naive(logits[:1].detach(), ref_logits[:1], direction)
    torch.testing.assert_close(value[:1], expected)
    assert torch.isfinite(grad).all()


def test_a_row_without_any_finite_logit_raises_when_it_is_included():
    logits = torch.randn(2, 3)
    logits[1] = NEG_INF
    with pytest.raises(ValueError, match=r"first at \(1,\).*every entry of logits is -inf"):
        full_vocab_kl(logits, logits.clone(), backend="torch")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_nan_in_logits_or_mask_of_an_included_position_raises(direction):
    logits, ref_logits = torch.randn(3, 4), torch.randn(3, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"first at \(2,\).*logits hold NaN or \+inf"):
        full_vocab_kl(logits, ref_logits, direction=direction, backend="torch")
    with pytest.raises(ValueError, match=r"first at \(0,\).*mask is NaN or inf there"):
        full_vocab_kl(ref_logits, ref_logits, torch.tensor([float("nan"), 1.0, 1.0]), direction=direction, backend="torch")


def test_tied_logits_of_large_magnitude_keep_their_probabilities():
    """softmax([1e30, 1e30]) is (1/2, 1/2): with log p = z - logsumexp(z), the log 2 was rounded away (p = 1
    each) and the KL came out twice too large; log p = (z - max) - log sum exp(z - max) keeps it."""
    logits = torch.tensor([[1e30, 1e30]], requires_grad=True)
    ref_logits = torch.tensor([[1e30, 0.0]])
    value = full_vocab_kl(logits, ref_logits, backend="torch")  # 1/2 log(1/2) + 1/2 (log(1/2) + 1e30)
    assert value.item() == pytest.approx(5e29, rel=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), logits)  # p (log p - log q - KL) = (-2.5e29, 2.5e29)
    assert grad[0].tolist() == pytest.approx([-2.5e29, 2.5e29], rel=1e-6)
    forward = full_vocab_kl(ref_logits, logits.detach(), direction="forward", backend="torch")
    assert forward.item() == pytest.approx(5e29, rel=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_from_hidden_masked_rows_with_nan_hidden_states_leave_the_gradients_finite(direction):
    """Left-padding positions can carry NaN hidden states: with mask 0 they give 0 and no NaN into the
    LM-head gradient (0 * NaN was NaN)."""
    torch.manual_seed(4)
    hidden = torch.randn(2, 3, 4)
    hidden[0, 0] = float("nan")
    hidden.requires_grad_()
    weight = torch.randn(7, 4, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(2, 3, 4), torch.randn(7, 4)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    value = full_vocab_kl_from_hidden(hidden, ref_hidden, weight, ref_weight, mask, direction, chunk_size=2, backend="torch")
    grad_hidden, grad_weight = torch.autograd.grad(value.sum(), (hidden, weight))
    assert value[0, 0] == 0 and torch.isfinite(value).all()
    assert (grad_hidden[0, 0] == 0).all() and torch.isfinite(grad_hidden).all() and torch.isfinite(grad_weight).all()
    clean = hidden.detach().clone()
    clean[0, 0] = 0.0
    clean.requires_grad_()
    weight2 = weight.detach().clone().requires_grad_()
    expected = naive(clean @ weight2.T, ref_hidden @ ref_weight.T, direction) * mask
    expected_grads = torch.autograd.grad(expected.sum(), (clean, weight2))
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, expected_grads[1], rtol=1e-4, atol=1e-5)


def test_from_hidden_overflowing_logits_raise_instead_of_nan():
    """float16 logits beyond 65504 are inf: a ValueError that says so, not a NaN KL (5 * 13104 = 65520)."""
    hidden = torch.tensor([[0.0]], dtype=torch.float16, requires_grad=True)
    weight = torch.zeros(2, 1, dtype=torch.float16, requires_grad=True)
    ref_hidden, ref_weight = torch.tensor([[5.0]], dtype=torch.float16), torch.tensor([[0.0], [13104.0]], dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow torch.float16"):
        full_vocab_kl_from_hidden(hidden, ref_hidden, weight, ref_weight, backend="torch")


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, float("nan"), True, "8"])
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    for call in (
        lambda: full_vocab_kl(torch.randn(2, 5), torch.randn(2, 5), chunk_size=chunk_size),
        lambda: full_vocab_kl_from_hidden(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 3), torch.randn(5, 3), chunk_size=chunk_size),
    ):
        with pytest.raises(ValueError, match=f"chunk_size must be an integer >= 1, got {chunk_size!r}"):
            call()


def test_mask_must_have_the_positions_shape():
    """A [B, T, 1] mask broadcast against [B, T] KLs silently built a [B, T, T] result."""
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"mask \(2, 3, 1\) must have the positions' shape \(2, 3\)"):
        full_vocab_kl(logits, logits, torch.ones(2, 3, 1))
    assert full_vocab_kl(logits, logits + 1, torch.ones(3)).shape == (2, 3)  # broadcasting to [B, T] is fine


@needs_cuda
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_triton_masked_entries_and_rows_match_the_torch_backend(direction):
    """-inf on both sides, on the zero-mass side only, rows excluded by the mask (NaN, all -inf, one-sided):
    the kernels follow the torch backend's semantics, and an included one-sided row raises the same error."""
    torch.manual_seed(5)
    z = torch.randn(6, 5000, device="cuda").to(torch.bfloat16)
    r = (z.float() + 0.5 * torch.randn(6, 5000, device="cuda")).to(torch.bfloat16)
    z[:, 4000:], r[:, 4000:] = NEG_INF, NEG_INF  # a padded vocabulary
    (z if direction == "reverse" else r)[1, :100] = NEG_INF  # zero-mass side only: finite KL
    z[2, 7] = float("nan")
    z[3], r[3] = NEG_INF, NEG_INF
    (r if direction == "reverse" else z)[4, 0] = NEG_INF  # mass on the averaged side only: +inf
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.5], device="cuda")
    results = []
    for backend in ("triton", "torch"):
        logits = z.clone().requires_grad_()
        kl = full_vocab_kl(logits, r, mask, direction=direction, backend=backend)
        (grad,) = torch.autograd.grad((kl * torch.arange(1.0, 7.0, device="cuda")).sum(), logits)
        results.append((kl, grad.float()))
    (kl, grad), (kl_torch, grad_torch) = results
    assert (kl[2:5] == 0).all() and (grad[2:5] == 0).all() and (grad[:, 4000:] == 0).all()
    torch.testing.assert_close(kl, kl_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_torch, rtol=2**-7, atol=1e-7)
    with pytest.raises(ValueError, match=r"1 of 6 positions \(first at \(4,\).*is -inf at tokens where"):
        full_vocab_kl(z, r, torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0], device="cuda"), direction=direction, backend="triton")
