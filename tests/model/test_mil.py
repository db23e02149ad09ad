"""Gated-attention MIL: masking, permutation invariance, and learning a bag-level signal."""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from calciscope.model import GatedAttentionMIL, create_model


def test_attention_sums_to_one_over_real_tiles_and_is_zero_on_padding():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(8, 3, hidden_dim=16).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    logits, attention = mil(x, mask)
    assert logits.shape == (2, 3) and attention.shape == (2, 6, 3)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2, 3), atol=1e-6)
    assert torch.all(attention[0, 4:] == 0)
    # padding does not change the result: the first bag alone, unpadded, gives the same logits
    alone, _ = mil(x[0, :4])
    assert torch.allclose(alone, logits[0], atol=1e-5)


def test_all_padded_bag_gives_zero_attention_not_nan():
    mil = GatedAttentionMIL(8, 2, hidden_dim=16)
    logits, attention = mil(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.all(attention == 0) and torch.all(torch.isfinite(logits))


def test_shared_attention_branch_is_repeated_for_every_label():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(8, 3, hidden_dim=16, multi_branch=False)
    _, attention = mil(torch.randn(5, 8))
    assert attention.shape == (5, 3)
    assert torch.equal(attention[:, 0], attention[:, 2])


def test_permuting_tiles_leaves_slide_logits_unchanged_and_permutes_attention():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(8, 2, hidden_dim=16).eval()
    x = torch.randn(7, 8)
    perm = torch.randperm(7)
    logits, attention = mil(x)
    p_logits, p_attention = mil(x[perm])
    assert torch.allclose(logits, p_logits, atol=1e-5)
    assert torch.allclose(attention[perm], p_attention, atol=1e-6)


def test_mil_slide_model_runs_a_bag_of_tile_images():
    torch.manual_seed(0)
    model = create_model("tiny", ["a", "b"], head="mil", mil_hidden_dim=16).eval()
    with torch.no_grad():
        logits, attention = model(torch.randn(2, 4, 3, 64, 64))
    assert logits.shape == (2, 2) and attention.shape == (2, 4, 2)


def _bags(rng, n_bags, dim=16, n_tiles=24, n_signal=3):
    """Label l is positive when the bag holds a few embeddings shifted along direction l."""
    directions = np.eye(dim)[:2] * 4.0  # 4 SD along one axis, in 3 of 24 tiles
    x = rng.normal(size=(n_bags, n_tiles, dim))
    y = rng.integers(0, 2, size=(n_bags, 2))
    for b in range(n_bags):
        for label in range(2):
            if y[b, label]:
                x[b, rng.choice(n_tiles, n_signal, replace=False)] += directions[label]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def test_mil_head_learns_bag_labels_from_a_few_signal_tiles():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x_train, y_train = _bags(rng, 256)
    x_test, y_test = _bags(rng, 128)
    mil = GatedAttentionMIL(16, 2, hidden_dim=32)
    opt = torch.optim.Adam(mil.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.from_numpy(rng.choice(256, 32, replace=False))
        logits, _ = mil(x_train[idx])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores, _ = mil(x_test)
    for label in range(2):
        assert roc_auc_score(y_test[:, label], scores[:, label]) >= 0.95
