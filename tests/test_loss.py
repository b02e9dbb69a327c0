import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon

from hf_sara import js_divergence, sara_alignment_loss

LN2 = math.log(2.0)


def _scipy_js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    # scipy returns the Jensen-Shannon *distance* (the square root of the divergence), natural log by default.
    return jensenshannon(p, q, axis=-1) ** 2


def _random_distributions(shape, seed, concentration=1.0):
    generator = np.random.default_rng(seed)
    return generator.dirichlet(np.full(shape[-1], concentration), size=shape[:-1])


class TestJSDivergence:
    @pytest.mark.parametrize("n_experts", [2, 8, 64, 128])
    def test_matches_scipy_on_random_distributions(self, n_experts):
        p = _random_distributions((32, n_experts), seed=0)
        q = _random_distributions((32, n_experts), seed=1)
        ours = js_divergence(torch.tensor(p), torch.tensor(q)).double().numpy()
        np.testing.assert_allclose(ours, _scipy_js(p, q), rtol=0, atol=1e-6)

    def test_matches_scipy_on_near_degenerate_distributions(self):
        # Sparse Dirichlet draws put almost all mass on one or two experts; add exact one-hots and zeros.
        p = _random_distributions((64, 16), seed=2, concentration=0.01)
        q = _random_distributions((64, 16), seed=3, concentration=0.01)
        p[:8] = np.eye(16)[:8]
        q[:4] = np.eye(16)[:4]  # identical one-hots
        q[4:8] = np.eye(16)[8:12]  # disjoint one-hots: the bound ln 2
        ours = js_divergence(torch.tensor(p), torch.tensor(q)).double().numpy()
        np.testing.assert_allclose(ours, _scipy_js(p, q), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours[4:8], LN2, atol=1e-6)
        assert np.all(ours[:4] == 0)

    def test_broadcasts_like_torch(self):
        p = torch.tensor(_random_distributions((4, 3, 8), seed=4))
        q = torch.tensor(_random_distributions((3, 8), seed=5))
        assert js_divergence(p, q).shape == (4, 3)
        torch.testing.assert_close(js_divergence(p, q)[2], js_divergence(p[2], q))

    def test_computes_in_fp32(self):
        p = torch.tensor(_random_distributions((4, 8), seed=6), dtype=torch.bfloat16)
        q = torch.tensor(_random_distributions((4, 8), seed=7), dtype=torch.bfloat16)
        result = js_divergence(p, q)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, js_divergence(p.float(), q.float()))

    def test_gradient_is_finite_with_zeros(self):
        p = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
        q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
        js_divergence(p, q).sum().backward()
        assert torch.isfinite(p.grad).all()

    @settings(max_examples=200, deadline=None)
    @given(
        arrays(np.float64, (2, 6), elements=st.floats(0, 1, allow_nan=False)),
        st.sampled_from([0, 1, 2, 3]),
    )
    def test_properties(self, raw, n_zeros):
        raw = raw.copy()
        raw[:, :n_zeros] = 0.0  # zeros in the inputs
        raw[:, -1] += 1e-3  # keep each row normalisable
        p, q = torch.tensor(raw / raw.sum(-1, keepdims=True))
        pq, qp = js_divergence(p, q), js_divergence(q, p)
        assert torch.isfinite(pq)
        assert pq == qp  # symmetric
        assert -1e-7 <= pq.item() <= LN2 + 1e-7  # bounded
        assert js_divergence(p, p) == 0  # zero for equal inputs
        if (p - q).abs().max() > 1e-3:
            assert pq > 0  # and only for (nearly) equal inputs


class TestAlignmentLoss:
    def _batch(self, batch=4, layers=6, experts=8, seed=0):
        torch.manual_seed(seed)
        distributions = torch.softmax(torch.randn(batch, layers, experts), -1).requires_grad_()
        anchors = torch.softmax(torch.randn(batch, layers, experts), -1)
        return distributions, anchors

    def test_is_mean_js_over_layers_and_anchored_examples(self):
        distributions, anchors = self._batch()
        has_anchor = torch.tensor([True, False, True, True])
        loss, per_layer = sara_alignment_loss(distributions, anchors, has_anchor, layers=[1, 2, 4])
        expected = js_divergence(distributions, anchors)[has_anchor][:, [1, 2, 4]]
        torch.testing.assert_close(per_layer, expected.mean(0))
        torch.testing.assert_close(loss, expected.mean())

    def test_examples_without_anchor_are_masked_out_not_averaged_as_zero(self):
        # The research script gave such rows a zero anchor and still counted them; the loss must equal the loss of the
        # anchored rows alone, whatever the unanchored rows hold.
        distributions, anchors = self._batch()
        anchors[1] = 0.0
        has_anchor = torch.tensor([True, False, True, True])
        loss, _ = sara_alignment_loss(distributions, anchors, has_anchor, layers="all")
        alone, _ = sara_alignment_loss(distributions[[0, 2, 3]], anchors[[0, 2, 3]], layers="all")
        torch.testing.assert_close(loss, alone)
        loss.backward()
        assert torch.count_nonzero(distributions.grad[1]) == 0
        assert torch.isfinite(distributions.grad).all()

    def test_no_anchored_example_gives_exact_zero_and_zero_gradient(self):
        distributions, anchors = self._batch()
        loss, per_layer = sara_alignment_loss(distributions, anchors * 0, torch.zeros(4, dtype=torch.bool))
        assert loss.item() == 0.0 and torch.all(per_layer == 0)
        loss.backward()
        assert torch.count_nonzero(distributions.grad) == 0

    def test_no_gradient_into_anchors(self):
        distributions, anchors = self._batch()
        anchors.requires_grad_()
        loss, _ = sara_alignment_loss(distributions, anchors, layers="all")
        loss.backward()
        assert anchors.grad is None
        assert distributions.grad.abs().sum() > 0

    def test_default_layers_are_the_published_band(self):
        distributions, anchors = self._batch(batch=2, layers=48, experts=4)
        _, per_layer = sara_alignment_loss(distributions, anchors)
        _, band = sara_alignment_loss(distributions, anchors, layers="7-34")
        assert per_layer.shape == (28,)
        torch.testing.assert_close(per_layer, band)

    def test_rejects_mismatched_shapes(self):
        distributions, anchors = self._batch()
        with pytest.raises(ValueError, match="same model"):
            sara_alignment_loss(distributions, anchors[:, :3])
        with pytest.raises(ValueError, match=r"\[batch, n_moe_layers, n_experts\]"):
            sara_alignment_loss(distributions[0], anchors[0])
        with pytest.raises(ValueError, match="has_anchor"):
            sara_alignment_loss(distributions, anchors, torch.ones(3, dtype=torch.bool))

    def test_rejects_out_of_range_layers(self):
        distributions, anchors = self._batch(layers=6)
        with pytest.raises(ValueError, match="out of range.*6 MoE layers"):
            sara_alignment_loss(distributions, anchors, layers="2-7")
