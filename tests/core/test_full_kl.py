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
    code = (
        "import sys, torch; from trl_regularizers.core.full_kl import full_vocab_kl, resolve_backend;"
        "full_vocab_kl(torch.randn(2, 3, 5), torch.randn(2, 3, 5));"
        "assert resolve_backend('auto', torch.device('cpu')) == 'torch';"
        "assert not any(m.startswith(('triton', 'trl_regularizers.kernels')) for m in sys.modules), 'kernels imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
