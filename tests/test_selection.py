"""Tests of the SHIRG selection functions and the baselines (lavida_shirg/shirg_selection.py)."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from conftest import build_tiny_model
from lavida_shirg import ShirgConfig
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.shirg_selection import (
    DETAIL_TERMS, METHODS, AdaptiveBudgetHead, CoordinateEmbedding, SelectionInputs, TokenSelection, budget_statistics,
    centered_token_variance, detail_scores, distance_aware_selection, dropped_token_summary, edge_density,
    gather_tokens, grid_coordinates, low_resolution_scaffold, normalize_per_sample, pixel_contrast, region_coverage,
    region_labels, relevance_scores, select_tokens, shirg_fixed_scores, shirg_v2_scores, spatial_kmeans,
    token_coordinates, token_variance, truncate_to_budget,
)
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.variants import parse_variant

ALL_METHODS = sorted(name for name, method in METHODS.items() if method.function is not None)  # the selections
SHIRG_METHODS = ["shirg-fixed", "shirg-v2", "shirg-x"]


def make_batch(batch=3, grid=(10, 11), dim=12, embed=16, length=5, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    num = grid[0] * grid[1]
    vision = torch.randn(batch, num, dim, generator=generator)
    # make the samples differ in structure, not only in noise: a bright blob at a different place per sample
    scale = torch.ones(batch, num)
    for b in range(batch):
        scale[b, (b * 7 + 3) % num] = 6.0
    vision = vision * scale.unsqueeze(-1)
    projected = torch.randn(batch, num, embed, generator=generator)
    question = torch.randn(batch, length, embed, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -1] = False  # padding
    attention = torch.rand(batch, num, generator=generator)
    return vision.to(dtype), projected.to(dtype), question.to(dtype), mask, attention


def run(method, vision, projected, grid, budget, question, mask, attention, **options):
    if method == "visionzip":
        options.setdefault("attention_received", attention)
        options.setdefault("visionzip_contextual_tokens", min(3, grid[0] * grid[1] - budget))
    return select_tokens(method, vision, projected, grid, budget, question, mask, **options)


def assert_valid_indices(indices, batch, budget, num):
    assert indices.dtype == torch.long and tuple(indices.shape) == (batch, budget)
    assert bool((indices >= 0).all()) and bool((indices < num).all())
    if budget > 1:
        assert bool((indices.diff(dim=1) > 0).all()), "indices must be strictly ascending (hence distinct)"


# ------------------------------------------------------------------------------------------------ interface


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(ALL_METHODS), height=st.integers(1, 9), width=st.integers(1, 9),
       batch=st.integers(1, 3), fraction=st.floats(0.0, 1.0), region_size=st.integers(1, 5),
       bf16=st.booleans())
def test_exactly_k_distinct_sorted(method, height, width, batch, fraction, region_size, bf16):
    num = height * width
    budget = max(1, round(fraction * num))
    dtype = torch.bfloat16 if bf16 else torch.float32
    vision, projected, question, mask, attention = make_batch(batch, (height, width), dtype=dtype)
    options = {"coverage_region_size": region_size} if method in SHIRG_METHODS else {}
    result = run(method, vision, projected, (height, width), budget, question, mask, attention, **options)
    assert isinstance(result, TokenSelection)
    assert_valid_indices(result.indices, batch, budget, num)
    if result.scores is not None:
        assert result.scores.dtype == torch.float32 and tuple(result.scores.shape) == (batch, num)
    extra = result.extra_tokens
    expected_extra = {"shirg-v2": 1, "shirg-x": 64, "visionzip": min(3, num - budget)}.get(method)
    if expected_extra:
        assert tuple(extra.shape) == (batch, expected_extra, projected.shape[-1]) and extra.dtype == dtype
    else:
        assert extra is None


@pytest.mark.parametrize("budget", [512, 768, 1024])
def test_real_grid_budgets(budget):
    vision, projected, question, mask, attention = make_batch(2, (48, 48), dim=8, embed=8)
    for method in SHIRG_METHODS:
        result = run(method, vision, projected, (48, 48), budget, question, mask, attention)
        assert_valid_indices(result.indices, 2, budget, 2304)
        # every 4 x 4 region of the 48 x 48 grid is represented in every sample
        labels, regions = region_labels((48, 48), 4)
        if method != "shirg-v2":
            for b in range(2):
                assert set(labels[result.indices[b]].tolist()) == set(range(regions))


def test_unknown_method_lists_names():
    with pytest.raises(ValueError, match="selection_method") as info:
        ShirgConfig.from_preset("tiny").selection_settings("shirg-z", 10)
    for name in METHODS:
        assert name in str(info.value)


# ------------------------------------------------------------------------------------------------ coverage


def brute_force_winners(scores, grid, region_size):
    height, width = grid
    winners = []
    for top in range(0, height, region_size):
        for left in range(0, width, region_size):
            cells = [r * width + c for r in range(top, min(top + region_size, height))
                     for c in range(left, min(left + region_size, width))]
            winners.append(max(cells, key=lambda n: (scores[n].item(), -n)))
    return winners


@pytest.mark.parametrize("method", ["shirg-fixed", "shirg-x"])
@pytest.mark.parametrize("grid,region_size", [((10, 11), 4), ((8, 8), 4), ((7, 5), 3), ((3, 2), 4)])
def test_every_region_covered_in_every_sample(method, grid, region_size):
    vision, projected, question, mask, attention = make_batch(4, grid)
    _, regions = region_labels(grid, region_size)
    budget = min(regions + 3, grid[0] * grid[1])
    result = run(method, vision, projected, grid, budget, question, mask, attention, coverage_region_size=region_size)
    per_sample_winners = []
    for b in range(4):
        winners = brute_force_winners(result.scores[b], grid, region_size)
        assert len(winners) == regions
        assert set(winners) <= set(result.indices[b].tolist()), f"sample {b} misses a region winner"
        per_sample_winners.append(tuple(winners))
    assert len(set(per_sample_winners)) > 1, "the samples must differ for this test to mean something"


def test_v2_every_cluster_covered_in_every_sample():
    grid = (10, 11)
    vision, projected, question, mask, attention = make_batch(4, grid)
    result = run("shirg-v2", vision, projected, grid, 40, question, mask, attention)
    labels, clusters = spatial_kmeans(vision, grid, 4, 4, 0.5)
    for b in range(4):
        kept = set(result.indices[b].tolist())
        for c in range(clusters):
            members = (labels[b] == c).nonzero().flatten().tolist()
            if members:
                winner = max(members, key=lambda n: (result.scores[b, n].item(), -n))
                assert winner in kept


@pytest.mark.parametrize("method", SHIRG_METHODS)
def test_budget_smaller_than_region_count_keeps_best_winners(method):
    """Documented: K < number of regions (clusters) keeps the K best-scoring region (cluster) winners."""
    grid, region_size, budget = (12, 12), 3, 5  # 16 regions
    vision, projected, question, mask, attention = make_batch(3, grid)
    result = run(method, vision, projected, grid, budget, question, mask, attention, coverage_region_size=region_size)
    for b in range(3):
        if method == "shirg-v2":
            labels, clusters = spatial_kmeans(vision[b:b + 1], grid, region_size, 4, 0.5)
            groups = [(labels[0] == c).nonzero().flatten().tolist() for c in range(clusters)]
            winners = [max(g, key=lambda n: (result.scores[b, n].item(), -n)) for g in groups if g]
        else:
            winners = brute_force_winners(result.scores[b], grid, region_size)
        best = sorted(winners, key=lambda n: (-result.scores[b, n].item(), n))[:budget]
        assert result.indices[b].tolist() == sorted(best)


def test_grid_smaller_than_one_region_is_one_region():
    labels, regions = region_labels((3, 2), 4)
    assert regions == 1 and labels.tolist() == [0] * 6
    labels, regions = region_labels((5, 6), 4)  # partial regions count: 2 x 2
    assert regions == 4 and labels.tolist() == [0, 0, 0, 0, 1, 1] * 4 + [2, 2, 2, 2, 3, 3]


def test_region_coverage_counts_partial_regions():
    scores = torch.rand(2, 5 * 6)
    assert region_coverage(scores, (5, 6), 4).sum(dim=1).tolist() == [4, 4]


# ------------------------------------------------------------------------------------------------ batch, determinism


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "random"])
def test_batch_permutation_permutes_output(method):
    vision, projected, question, mask, attention = make_batch(4, (9, 10))
    mask[2, 1:] = False  # a different usable length per sample
    perm = torch.tensor([2, 0, 3, 1])
    full = run(method, vision, projected, (9, 10), 30, question, mask, attention)
    permuted = run(method, vision[perm], projected[perm], (9, 10), 30, question[perm], mask[perm], attention[perm])
    assert torch.equal(permuted.indices, full.indices[perm])
    if full.extra_tokens is not None:
        torch.testing.assert_close(permuted.extra_tokens, full.extra_tokens[perm])
    if full.scores is not None:
        torch.testing.assert_close(permuted.scores, full.scores[perm])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_deterministic(method):
    vision, projected, question, mask, attention = make_batch(3, (9, 10))
    first = run(method, vision, projected, (9, 10), 25, question, mask, attention)
    second = run(method, vision.clone(), projected.clone(), (9, 10), 25, question.clone(), mask.clone(),
                 attention.clone())
    assert torch.equal(first.indices, second.indices)
    if first.extra_tokens is not None:
        assert torch.equal(first.extra_tokens, second.extra_tokens)


def test_random_seeded():
    vision, projected, question, mask, attention = make_batch(2, (9, 10))
    a = select_tokens("random", vision, projected, (9, 10), 20, random_seed=1).indices
    b = select_tokens("random", vision, projected, (9, 10), 20, random_seed=1).indices
    c = select_tokens("random", vision, projected, (9, 10), 20, random_seed=2).indices
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ score terms, by hand


def test_normalisation_by_hand():
    scores = torch.tensor([[2.0, 4.0, 6.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 0.0, 1.0, 0.0]])
    expected = torch.tensor([[0.0, 0.5, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.5]])
    assert torch.equal(normalize_per_sample(scores), expected)
    assert normalize_per_sample(scores.bfloat16()).dtype == torch.float32


def test_variance_by_hand():
    features = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 8.0]]])
    assert torch.equal(token_variance(features), torch.tensor([[1.25, 0.0, 12.0]]))


def test_relevance_by_hand():
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]])
    question = torch.tensor([[[0.0, 5.0], [1.0, 0.0], [-1.0, 0.0]]])  # the last one is padding
    mask = torch.tensor([[True, True, False]])
    expected = torch.tensor([[1.0, 1.0, 1 / math.sqrt(2), 0.0]])  # token 3 would be 1.0 with the padding
    torch.testing.assert_close(relevance_scores(projected, question, mask), expected)
    only_first = torch.tensor([[True, False, False]])
    torch.testing.assert_close(relevance_scores(projected, question, only_first),
                               torch.tensor([[0.0, 1.0, 1 / math.sqrt(2), 0.0]]))
    # computed in float32 from bf16 inputs
    assert relevance_scores(projected.bfloat16(), question.bfloat16(), mask).dtype == torch.float32


def test_edge_density_by_hand():
    # channel 0: a single 1 in the middle of a 3 x 3 map; channel 1: constant (no edges, replicate padding)
    channel0 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    features = torch.stack([channel0.reshape(-1), torch.full((9,), 5.0)], dim=-1).unsqueeze(0)  # (1, 9, 2)
    # |Laplacian| of channel 0 with replicate padding: [[0,1,0],[1,4,1],[0,1,0]]; mean over the 2 channels
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.5, 2.0, 0.5, 0.0, 0.5, 0.0]])
    assert torch.equal(edge_density(features, (3, 3)), expected)
    # a 2 x 3 map, one channel: row 0 = [1, 2, 4], row 1 = [0, 0, 0]
    features = torch.tensor([[1.0, 2.0, 4.0, 0.0, 0.0, 0.0]]).reshape(1, 6, 1)
    # (0,0): up 1 + down 0 + left 1 + right 2 - 4 = 0; (0,1): 2+0+1+4-8 = -1; (0,2): 4+0+2+4-16 = -6
    # (1,0): 1+0+0+0 = 1; (1,1): 2; (1,2): 4
    assert torch.equal(edge_density(features, (2, 3)), torch.tensor([[0.0, 1.0, 6.0, 1.0, 2.0, 4.0]]))


def test_fixed_and_v2_scores_by_hand():
    # 4 tokens on a 2 x 2 grid: variances 0, 1.25, 0.25, 0.75 -> normalised 0, 1, .2, .6
    vision = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0],
                            [0.0, 0.0, 0.0, 2.0]]])
    projected = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    question = torch.tensor([[[1.0, 0.0]]])
    mask = torch.tensor([[True]])
    # relevance: cos = 1, 0, 1/sqrt2, -1 -> normalised 1, .5, (1/sqrt2 + 1)/2, 0
    rel = torch.tensor([[1.0, 0.5, (1 / math.sqrt(2) + 1) / 2, 0.0]])
    var = torch.tensor([[0.0, 1.0, 0.2, 0.6]])
    torch.testing.assert_close(shirg_fixed_scores(vision, projected, question, mask), 0.7 * rel + 0.3 * var)
    edge = normalize_per_sample(edge_density(vision, (2, 2)))
    torch.testing.assert_close(shirg_v2_scores(vision, projected, (2, 2), question, mask),
                               0.25 * var + 0.75 * rel + 0.15 * edge)
    # relevance weight 0: no question needed
    torch.testing.assert_close(shirg_fixed_scores(vision, projected, relevance_weight=0.0, detail_weight=1.0), var)


def test_summary_token_by_hand():
    projected = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    indices = torch.tensor([[0, 3, 4]])
    # dropped tokens 1, 2, 5: [[2,3],[4,5],[10,11]] -> mean [16/3, 19/3]
    torch.testing.assert_close(dropped_token_summary(projected, indices), torch.tensor([[[16 / 3, 19 / 3]]]))
    assert torch.equal(dropped_token_summary(projected, torch.arange(6).unsqueeze(0)), torch.zeros(1, 1, 2))


def test_v2_summary_is_mean_of_dropped():
    vision, projected, question, mask, _ = make_batch(2, (6, 6))
    result = select_tokens("shirg-v2", vision, projected, (6, 6), 10, question, mask)
    for b in range(2):
        dropped = sorted(set(range(36)) - set(result.indices[b].tolist()))
        torch.testing.assert_close(result.extra_tokens[b, 0], projected[b, dropped].mean(dim=0))


def test_scaffold_and_coordinates_by_hand():
    tokens = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4 x 4 map of 0..15
    pooled = low_resolution_scaffold(tokens, (4, 4), 2)
    assert torch.equal(pooled.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    coords = grid_coordinates((2, 4))
    assert torch.equal(coords[5], torch.tensor([0.375, 0.75, 0.5, 0.25]))  # row 1, col 1
    picked = token_coordinates(torch.tensor([[0, 5], [7, 1]]), (2, 4))
    assert picked.shape == (2, 2, 4) and torch.equal(picked[1, 0], torch.tensor([0.875, 0.75, 0.5, 0.25]))


def test_distance_aware_selection_spreads():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 64, generator=generator) + 0.1
    indices = distance_aware_selection(scores, (8, 8), 8, rounds=8, radius=1, penalty=1.0)
    assert_valid_indices(indices, 3, 8, 64)
    for b in range(3):
        cells = [(n // 8, n % 8) for n in indices[b].tolist()]
        for i, (r1, c1) in enumerate(cells):
            for r2, c2 in cells[i + 1:]:
                assert max(abs(r1 - r2), abs(c1 - c2)) > 1, "two picks are neighbours"
    # penalty 0 is plain top-k
    plain = distance_aware_selection(scores, (8, 8), 8, penalty=0.0)
    assert torch.equal(plain, scores.topk(8).indices.sort(dim=1).values)


def test_visionzip_by_hand():
    # 6 tokens on 1 x 6; attention picks tokens 4 and 1; the rest (0, 2, 3, 5) merged into 2 centres
    vision = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, 1.0], [5.0, 5.0], [0.1, 0.9]]])
    projected = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    attention = torch.tensor([[0.1, 0.5, 0.0, 0.2, 0.9, 0.1]])
    result = select_tokens("visionzip", vision, projected, (1, 6), 2, attention_received=attention,
                           visionzip_contextual_tokens=2)
    assert result.indices.tolist() == [[1, 4]]
    # targets at stride 4 // 2 = 2 among (0, 2, 3, 5): tokens 0 and 3; 2 joins 0, 5 joins 3
    expected = torch.tensor([[[(0 + 4) / 2, (1 + 5) / 2], [(6 + 10) / 2, (7 + 11) / 2]]])
    torch.testing.assert_close(result.extra_tokens, expected)


def test_divprune_by_hand():
    # the mean direction is ~ +x; the farthest token is -x, then +y, ...
    angles = torch.tensor([0.0, 0.1, 0.2, 1.6, 3.1, 0.05])
    projected = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0)
    result = select_tokens("divprune", projected, projected, (2, 3), 3)
    assert result.indices.tolist() == [[0, 3, 4]]  # -x (4), then +x (0, farthest from it), then +y (3)


def test_budget_statistics_and_head():
    variance = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    stats = budget_statistics(variance, scores)
    torch.testing.assert_close(stats, torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    head = AdaptiveBudgetHead([512, 768, 1024])
    assert head.budgets == (512, 768, 1024)
    budgets = head.choose(head(stats))
    assert budgets.dtype == torch.long and budgets.tolist() == [768, 768, 768]  # untrained: the default
    head = AdaptiveBudgetHead([256, 128], default_budget=128)
    assert head.choose(head(stats)).tolist() == [128, 128, 128]
    # training signal reaches the head
    head(stats).logsumexp(dim=-1).sum().backward()
    assert head.output_weight.grad.abs().sum() > 0


def test_truncate_to_budget():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [0.0, 0.1, 0.2, 0.3, 0.4]])
    indices = torch.tensor([[1, 2, 3, 4], [0, 1, 3, 4]])
    keep = truncate_to_budget(indices, scores, torch.tensor([2, 3]))
    assert keep.tolist() == [[True, False, True, False], [False, True, True, True]]


@pytest.mark.parametrize("budgets", [[], [0, 32], [32, 32], [32, -1], [32.0], ["64"], [True], 64, [32, 257]])
def test_bad_budget_choices_are_refused_by_the_config(budgets):
    with pytest.raises(ValueError, match="budget_choices must be a list of distinct positive integers at most the 256"):
        ShirgConfig.from_preset("tiny", budget_choices=budgets)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradients_reach_the_projector(method):
    torch.manual_seed(0)
    vision, _, question, mask, attention = make_batch(2, (6, 7), dim=12, embed=16)
    projector = torch.nn.Linear(12, 16)
    projected = projector(vision)
    result = run(method, vision, projected, (6, 7), 10, question, mask, attention)
    loss = gather_tokens(projected, result.indices).pow(2).sum()
    if result.extra_tokens is not None:
        loss = loss + result.extra_tokens.pow(2).sum()
    loss.backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0


def test_extra_tokens_carry_gradients():
    vision, _, question, mask, attention = make_batch(2, (6, 7), dim=12, embed=16)
    for method in ("shirg-v2", "shirg-x", "visionzip"):
        projector = torch.nn.Linear(12, 16)
        result = run(method, vision, projector(vision), (6, 7), 10, question, mask, attention)
        result.extra_tokens.sum().backward()
        assert projector.weight.grad.abs().sum() > 0, method


def test_coordinate_embedding_zero_at_init_with_gradient():
    embedding = CoordinateEmbedding(16)
    coords = token_coordinates(torch.tensor([[0, 5, 9], [1, 2, 3]]), (4, 5))
    out = embedding(coords)
    assert out.shape == (2, 3, 16) and torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert embedding.weight.grad.abs().sum() > 0 and embedding.bias.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ synthetic page


def render_page(seed, size=672, patch=14, target=0.25):
    """White canvas with black text at random places until ~`target` of the patches carry a dark pixel."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    words = "the quick brown fox jumps over a lazy dog invoice total 13.50 SHIRG axis legend".split()
    side = size // patch

    def dark_patches(img):
        gray = np.asarray(img.convert("L")) < 128
        return gray.reshape(side, patch, side, patch).any(axis=(1, 3)).reshape(-1)

    while True:
        font = ImageFont.truetype("DejaVuSans.ttf", rng.randint(10, 22))
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        trial = image.copy()
        ImageDraw.Draw(trial).text((rng.randint(0, size - 80), rng.randint(0, size - 20)), text, fill="black",
                                   font=font)
        if dark_patches(trial).mean() > target:
            break
        image = trial
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    features = pixels.reshape(side, patch, side, patch, 3).permute(0, 2, 1, 3, 4).reshape(1, side * side, -1)
    return features, torch.from_numpy(dark_patches(image))


def test_synthetic_page_keeps_text_patches():
    for seed in range(2):
        features, text = render_page(seed)
        assert features.shape == (1, 2304, 14 * 14 * 3)
        assert 0.15 < text.float().mean() < 0.30
        # variance + edge terms only: v2_detail_weight = 1 gives relevance the weight 1 - v2_detail_weight = 0
        result = select_tokens("shirg-v2", features, features, (48, 48), 768, v2_detail_weight=1.0, v2_edge_weight=0.15)
        kept = torch.zeros(2304, dtype=torch.bool)
        kept[result.indices[0]] = True
        recall = (kept & text).sum() / text.sum()
        assert recall >= 0.95, f"seed {seed}: kept {recall:.3f} of the text-bearing patches"


# ------------------------------------------------------------------------------------------------ no host sync


class HostSyncError(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    def forbid(name):
        def raiser(*args, **kwargs):
            raise HostSyncError(f"host sync: Tensor.{name}")
        return raiser

    def guard():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")

    yield guard
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")


def test_guard_catches_a_host_read(no_host_sync):
    mask = torch.tensor([[True, False]])
    no_host_sync()
    with pytest.raises(HostSyncError):
        mask.any(dim=1).tolist()
    with pytest.raises(HostSyncError):
        bool(torch.tensor(1.0) > 0)


def test_selection_has_no_host_sync(no_host_sync):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vision, projected, question, mask, attention = [t.to(device) for t in make_batch(2, (12, 12))]
    head = AdaptiveBudgetHead([32, 40, 48]).to(device)
    embedding = CoordinateEmbedding(projected.shape[-1]).to(device)
    no_host_sync()
    for method in ALL_METHODS:
        result = run(method, vision, projected, (12, 12), 40, question, mask, attention)
        gather_tokens(projected, result.indices)
    embedding(token_coordinates(result.indices, (12, 12)))
    scores = shirg_fixed_scores(vision, projected, question, mask)
    budgets = head.choose(head(budget_statistics(token_variance(vision), scores)))
    truncate_to_budget(result.indices, scores, budgets)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("budget", [0, -3, 257, 2.5, True])
def test_bad_budget_is_refused_at_the_boundary(method, budget):
    """The budget is checked once, by the settings of a call (internal functions trust it)."""
    with pytest.raises(ValueError, match="selection_budget must be a positive integer at most the 256"):
        ShirgConfig.from_preset("tiny").selection_settings(method, budget)


@pytest.mark.parametrize("grid,size", [((48, 48), 8), ((7, 10), 3), ((4, 4), 6)])
def test_scaffold_equals_2d_area_pooling(grid, size):
    tokens = torch.randn(2, grid[0] * grid[1], 5)
    grid_map = tokens.transpose(1, 2).reshape(2, 5, *grid)
    area = torch.nn.functional.adaptive_avg_pool2d(grid_map, (size, size)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(low_resolution_scaffold(tokens, grid, size), area)


# ---- multi-view grids (LaViDa's anyres views left unpooled) ---------------------------------------------------


def test_region_labels_restart_in_every_view():
    labels, regions = region_labels((3, 5, 6), 4)
    single, per_view = region_labels((5, 6), 4)
    assert regions == 3 * per_view == 12
    assert torch.equal(labels.view(3, 30), torch.stack([single + v * per_view for v in range(3)]))


def test_edge_density_is_computed_inside_each_view():
    features = torch.randn(2, 3 * 20, 5)
    stacked = edge_density(features, (3, 4, 5))
    separate = torch.cat([edge_density(features[:, v * 20 : (v + 1) * 20], (4, 5)) for v in range(3)], dim=1)
    torch.testing.assert_close(stacked, separate)


def test_coverage_is_counted_per_view_for_every_sample():
    from lavida_shirg.shirg_selection import shirg_fixed_select

    generator = torch.Generator().manual_seed(0)
    views, side, region = 3, 6, 3
    num = views * side * side
    vision = torch.randn(4, num, 8, generator=generator)
    projected = torch.randn(4, num, 6, generator=generator)
    selection = shirg_fixed_select(vision, projected, (views, side, side), views * 4 + 5, relevance_weight=0.0,
                                   detail_weight=1.0, coverage_region_size=region)
    labels, regions = region_labels((views, side, side), region)
    for sample in range(4):
        assert set(labels[selection.indices[sample]].tolist()) == set(range(regions))


def test_kmeans_clusters_never_span_two_views():
    from lavida_shirg.shirg_selection import spatial_kmeans

    features = torch.randn(2, 2 * 36, 4, generator=torch.Generator().manual_seed(1))
    labels, _ = spatial_kmeans(features, (2, 6, 6), region_size=3, iterations=6)
    view_of = torch.arange(72) // 36
    for sample in range(2):
        for cluster in labels[sample].unique():
            assert view_of[labels[sample] == cluster].unique().numel() == 1


def test_view_boxes_place_coordinates_in_the_canvas():
    from lavida_shirg.shirg_selection import grid_coordinates

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.5, 1.0]])  # global view, right half crop
    coordinates = grid_coordinates((2, 2, 2), view_boxes=boxes)
    # second view, cell (row 1, col 0): x = 0.5 + 0.5 * 0.25, y = 0.75, h = 1 / 2, w = 0.5 / 2
    torch.testing.assert_close(coordinates[4 + 2], torch.tensor([0.625, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(coordinates[:4], grid_coordinates((2, 2)))


# ------------------------------------------------------------------------------------------------ detail terms


def test_centered_variance_and_pixel_contrast_by_hand():
    # 3 tokens of one view, mean token [1, 1]: centred tokens [-1, 1], [0, 0], [1, -1] -> variances 1, 0, 1
    features = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]]])
    assert torch.equal(centered_token_variance(features, (1, 3)), torch.tensor([[1.0, 0.0, 1.0]]))
    # two views of 1 x 2 tokens: each view is centred on its own mean token
    features = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [5.0, 5.0], [5.0, 5.0]]])
    assert torch.equal(centered_token_variance(features, (2, 1, 2)), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    # a 4 x 5 view of patch 2 (the last pixel column is dropped, as by the stride-2 patch embedding): 2 x 2 tokens;
    # grey values: patch (0, 1) holds 0, 0, 2, 2 -> std 1; patch (1, 0) holds 0, 4, 0, 4 -> std 2; the others flat
    gray = torch.zeros(4, 5)
    gray[0:2, 3] = 2.0
    gray[2:4, 1] = 4.0
    gray[:, 4] = 100.0
    pixels = gray.expand(1, 3, 4, 5)
    assert torch.equal(pixel_contrast(pixels, (2, 2), 2), torch.tensor([[0.0, 1.0, 2.0, 0.0]]))
    # luminance weights: a pure-red stripe has 0.299 of the grey stripe's contrast
    red = torch.zeros(1, 3, 4, 5)
    red[0, 0] = gray
    torch.testing.assert_close(pixel_contrast(red, (2, 2), 2), torch.tensor([[0.0, 0.299, 0.598, 0.0]]))


def detail_inputs(batch, grid, patch=3, seed=0):
    views, height, width = (1, *grid) if len(grid) == 2 else grid
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(batch, views * height * width, 6, generator=generator)
    pixels = torch.rand(batch * views, 3, height * patch + 1, width * patch, generator=generator)
    return vision, pixels


@pytest.mark.parametrize("detail", DETAIL_TERMS)
@pytest.mark.parametrize("grid", [(5, 4), (3, 2, 4)])
def test_detail_terms_are_per_sample(detail, grid):
    batch = 3
    vision, pixels = detail_inputs(batch, grid)
    views = 1 if len(grid) == 2 else grid[0]
    together = detail_scores(detail, vision, grid, pixels, 3)
    assert together.dtype == torch.float32 and together.shape == vision.shape[:2]
    alone = torch.cat([detail_scores(detail, vision[b:b + 1], grid, pixels[b * views:(b + 1) * views], 3)
                       for b in range(batch)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("method", SHIRG_METHODS)
def test_seed_formula_is_the_detail_term_variance_bit_for_bit(method):
    vision, projected, question, mask, _ = make_batch(2, (12, 12))
    # the seed's scores, written out: 0.7 norm(rel) + 0.3 norm(var) (v2: 0.25 norm(var) + 0.15 norm(edge) + 0.75 rel)
    rel = normalize_per_sample(relevance_scores(projected, question, mask))
    var = normalize_per_sample(token_variance(vision))
    if method == "shirg-v2":
        seed = 0.25 * var + 0.15 * normalize_per_sample(edge_density(vision, (12, 12))) + 0.75 * rel
    else:
        seed = 0.3 * var + 0.7 * rel
    result = select_tokens(method, vision, projected, (12, 12), 40, question, mask, detail_term="variance")
    assert torch.equal(result.scores, seed)
    # the model's registry entry with a config of detail_term="variance" and the seed's weights gives the same call
    settings = ShirgConfig.from_preset("tiny", relevance_weight=0.7, detail_weight=0.3, v2_detail_weight=0.25,
                                       v2_edge_weight=0.15, detail_term="variance").selection_settings(method, 40)
    inputs = SelectionInputs(vision, projected, (12, 12), None, question, mask, torch.rand(2, 3, 36, 36), 3)
    through_model = METHODS[method].select(inputs, settings)
    assert torch.equal(through_model.scores, seed) and torch.equal(through_model.indices, result.indices)


@pytest.mark.parametrize("method", SHIRG_METHODS)
@pytest.mark.parametrize("detail", DETAIL_TERMS)
def test_every_shirg_method_takes_every_detail_term(method, detail):
    vision, projected, question, mask, _ = make_batch(2, (12, 12))
    pixels = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    result = select_tokens(method, vision, projected, (12, 12), 40, question, mask, detail_term=detail, pixels=pixels,
                           patch_size=4)
    assert_valid_indices(result.indices, 2, 40, 144)
    weights = (0.25, 0.75) if method == "shirg-v2" else (0.3, 0.7)
    expected = weights[0] * normalize_per_sample(detail_scores(detail, vision, (12, 12), pixels, 4))
    if method == "shirg-v2":
        expected = expected + 0.15 * normalize_per_sample(edge_density(vision, (12, 12)))
    expected = expected + weights[1] * normalize_per_sample(relevance_scores(projected, question, mask))
    torch.testing.assert_close(result.scores, expected)


def test_detail_term_errors_name_the_option():
    vision, pixels = detail_inputs(1, (4, 4))
    with pytest.raises(ValueError, match=r"detail_term must be one of \('variance', 'centered-variance'"):
        ShirgConfig.from_preset("tiny").selection_settings("shirg-x", 4, {"detail_term": "contrast"})
    # a zero weight skips the term and its inputs
    scores = shirg_fixed_scores(vision, vision, relevance_weight=0.0, detail_weight=0.0, detail_term="pixel-contrast")
    assert torch.equal(scores, torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"detail_term must be one of \('variance'"):
        ShirgConfig.from_preset("tiny", detail_term="edges")
    assert parse_variant("shirg-x@64:detail_term=pixel-contrast").options == {"detail_term": "pixel-contrast"}


def test_detail_terms_have_no_host_sync(no_host_sync):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vision, projected, question, mask, _ = [t.to(device) for t in make_batch(2, (12, 12))]
    pixels = torch.rand(2, 3, 48, 48, device=device)
    no_host_sync()
    for method in SHIRG_METHODS:
        for detail in DETAIL_TERMS:
            select_tokens(method, vision, projected, (12, 12), 40, question, mask, detail_term=detail,
                          pixels=pixels, patch_size=4)


@pytest.mark.parametrize("source", ["single-view", "anyres-views"])
def test_model_feeds_the_source_pixels_to_the_pixel_contrast(source):
    model = build_tiny_model()
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    image = Image.new("RGB", (70, 50), (230, 230, 230))
    ImageDraw.Draw(image).text((4, 10), "total 12.50", fill=(0, 0, 0))
    options = {"relevance_weight": 0.0, "detail_weight": 1.0, "detail_term": "pixel-contrast",
               "hires_source": source}
    inputs = processor(images=[image, image.transpose(Image.FLIP_LEFT_RIGHT)],
                       text=[processor.build_prompt("What is the total?")] * 2, selection_method="shirg-fixed",
                       selection_budget=40, selection_options=options)
    entries = model.inspect_selection(**inputs, selection_method="shirg-fixed", selection_budget=40,
                                      selection_options=options)
    patch = model.config.vision_config.patch_size
    if source == "single-view":
        (entry,) = entries
        expected = normalize_per_sample(pixel_contrast(inputs["hires_pixel_values"], entry["grid"], patch))
        torch.testing.assert_close(entry["scores"], expected)
    else:
        views = model.model.views_of_images(inputs["pixel_values"], inputs["image_sizes"])
        for entry, ((rows, cols), _, start) in zip(entries, views):
            own = inputs["pixel_values"][start:start + 1 + rows * cols]
            torch.testing.assert_close(entry["scores"], normalize_per_sample(pixel_contrast(own, entry["grid"], patch)))
    assert all(float(entry["scores"].max()) == 1.0 for entry in entries)
