"""Tests of the selection-quality measures (shirg_tools/selection_quality.py) and of the harness
(benchmarks/bench_selection_quality.py) on constructed inputs with known answers."""

import math
import os
import sys

import numpy as np
import torch

from lavida_shirg.shirg_selection import DETAIL_TERMS, detail_scores, select_tokens
from shirg_tools.selection_quality import (box_token_mask, ink_token_mask, kept_recall, nan_mean, quality_table,
                                           ranking_auc)



def brute_force_auc(scores, positives):
    """Mean over every (text, background) pair of [s_text > s_background] + 0.5 [equal]."""
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0)
             for a, p in zip(scores, positives) if p for b, q in zip(scores, positives) if not q]
    return sum(pairs) / len(pairs)


def test_auc_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0], [0.1, 0.5, 0.5, 0.9]])
    positives = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    # perfect, reversed, all tied, and pos {0.5, 0.9} vs neg {0.1, 0.5}: (1 + 0.5 + 1 + 1) / 4
    assert torch.equal(ranking_auc(scores, positives), torch.tensor([1.0, 0.0, 0.5, 0.875], dtype=torch.float64))


def test_auc_matches_pairwise_count_with_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (5, 40), generator=generator).float()  # many ties
    positives = torch.rand(5, 40, generator=generator) < 0.3
    expected = [brute_force_auc(s.tolist(), p.tolist()) for s, p in zip(scores, positives)]
    torch.testing.assert_close(ranking_auc(scores, positives), torch.tensor(expected, dtype=torch.float64))


def test_auc_and_recall_undefined_without_both_classes():
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    none, every = torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    assert ranking_auc(scores, torch.cat([none, every])).isnan().all()
    recall = kept_recall(torch.tensor([[True, False, True]] * 2), torch.cat([none, every]))
    assert math.isnan(recall[0]) and recall[1] == 2 / 3
    assert nan_mean([math.nan, 0.25, 0.75]) == 0.5 and math.isnan(nan_mean([math.nan]))


def test_recall_by_hand():
    kept = torch.tensor([[True, True, False, False, True]])
    text = torch.tensor([[True, False, True, False, True]])
    assert torch.equal(kept_recall(kept, text), torch.tensor([2 / 3], dtype=torch.float64))


def test_ink_and_box_token_masks_by_hand():
    ink = np.zeros((4, 6), dtype=bool)
    ink[1, 4] = True  # pixel centre (4.5, 1.5)
    # 2 x 3 cells of 2 x 2 pixels, raster order
    cells = np.array([[x, y, x + 2, y + 2] for y in (0, 2) for x in (0, 2, 4)], dtype=float)
    assert ink_token_mask(ink, cells).tolist() == [False, False, True, False, False, False]
    # fractional cells: [4.4, 4.6) holds the centre 4.5, [4.6, 6) does not
    thin = np.array([[4.4, 1.0, 4.6, 2.0], [4.6, 0.0, 6.0, 4.0], [0.0, 0.0, 6.0, 4.0], [7.0, 0.0, 9.0, 4.0]])
    assert ink_token_mask(ink, thin).tolist() == [True, False, True, False]
    # a box touching a cell's edge does not overlap it (zero area)
    assert box_token_mask([[2, 0, 3, 1], [0, 3, 1, 4]], cells).tolist() == [False, True, False, True, False, False]
    assert box_token_mask([], cells).tolist() == [False] * 6


def planted_register_map(seed=0, grid=(8, 8), dim=16):
    """Background tokens = one shared high-variance "register-like" vector (+ small noise); text tokens (a 2 x 3 block
    and a 1 x 2 block) = low-variance random vectors; pixels: flat background, a striped (inked) patch per text token.
    Returns vision features (1, N, D), the text mask (1, N), pixels (1, 3, 4 H, 4 W) for patch size 4."""
    generator = torch.Generator().manual_seed(seed)
    height, width = grid
    text = torch.zeros(height, width, dtype=torch.bool)
    text[2:4, 3:6] = True
    text[6, 0:2] = True
    register = torch.tensor([10.0, -10.0] * (dim // 2))
    features = register + 0.1 * torch.randn(height, width, dim, generator=generator)
    features[text] = torch.randn(int(text.sum()), dim, generator=generator)
    pixels = torch.full((1, 3, 4 * height, 4 * width), 0.9)
    ink = text.repeat_interleave(4, 0).repeat_interleave(4, 1)
    stripes = (torch.arange(4 * width) % 2 == 0).expand(4 * height, -1)
    pixels[0, :, ink & stripes] = -0.8
    return features.reshape(1, -1, dim), text.reshape(1, -1), pixels


def test_planted_register_background_reverses_the_seeds_variance():
    features, text, pixels = planted_register_map()
    auc = {term: float(ranking_auc(detail_scores(term, features, (8, 8), pixels, 4), text)[0])
           for term in DETAIL_TERMS}
    assert auc["variance"] == 0.0  # every background token has a higher variance than every text token
    assert auc["centered-variance"] == 1.0 and auc["pixel-contrast"] == 1.0
    assert auc["edge-density"] > 0.9  # the background next to the text has edges too
    # a selection of K = |text| tokens by the detail term alone keeps no text with the seed's term, all of it with
    # the centred variance or the pixel contrast
    budget = int(text.sum())
    for term, expected in (("variance", 0.0), ("centered-variance", 1.0), ("pixel-contrast", 1.0)):
        selection = select_tokens("shirg-fixed", features, features, (8, 8), budget, relevance_weight=0.0,
                                  detail_weight=1.0, coverage_region_size=1, detail_term=term, pixels=pixels, patch_size=4)
        kept = torch.zeros_like(text).scatter_(1, selection.indices, True)
        assert float(kept_recall(kept, text)[0]) == expected, term


def test_quality_table_lists_every_row_and_budget():
    rows = [{"kind": "term", "label": "a", "variant": "top-norm", "auc": 0.25, "recall": {8: 0.5, 16: 1.0},
             "answer_recall": {8: math.nan, 16: 1.0}},
            {"kind": "baseline", "label": "divprune", "variant": "divprune", "auc": None, "recall": {8: 0.125, 16: 0.0},
             "answer_recall": {8: 0.0, 16: 0.0}}]
    table = quality_table(rows, [8, 16]).splitlines()
    assert table[0] == "| kind | row | AUC | recall@8 | recall@16 | answer@8 | answer@16 | variant |"
    assert table[2] == "| term | a | 0.250 | 0.500 | 1.000 | - | 1.000 | `top-norm` |"
    assert table[3] == "| baseline | divprune | - | 0.125 | 0.000 | 0.000 | 0.000 | `divprune` |"


def test_harness_on_the_tiny_preset(tmp_path, capsys):
    import json

    import bench_selection_quality

    rows = bench_selection_quality.main(["--images", "2", "--budgets", "32", "--only-extra", "--threads", "1",
                                         "--variants", "shirg-fixed:relevance_weight=0:detail_weight=1:"
                                         "detail_term=pixel-contrast:coverage_region_size=1,shirg-fixed:"
                                         "relevance_weight=0:detail_term=variance:coverage_region_size=1,divprune",
                                         "--json", str(tmp_path / "rows.json")])
    output = capsys.readouterr().out
    assert "| extra | divprune | - |" in output and "256 high-resolution tokens" in output
    assert [row["variant"] for row in rows][2] == "divprune" and rows[2]["auc"] is None
    # on random weights too, the pixel contrast finds the ink and the seed's variance does not
    assert rows[0]["auc"] > 0.7 and rows[1]["auc"] < 0.5
    assert all(0 <= row["recall"][32] <= 1 and 0 <= row["answer_recall"][32] <= 1 for row in rows)
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["tokens"] == 256 and saved["rows"][0]["recall"]["32"] == rows[0]["recall"][32]
    # deterministic
    again = bench_selection_quality.main(["--images", "2", "--budgets", "32", "--only-extra", "--threads", "1",
                                          "--variants", "divprune"])
    assert again[0]["recall"] == rows[2]["recall"]



def test_eval_diagnostics_report_text_auc_and_recall():
    from conftest import build_tiny_model

    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
    from shirg_tools.diagnostics import cell_boxes, selection_diagnostics, source_views, token_relevance
    from shirg_tools.eval_tasks import EvalSample
    from shirg_tools.synthetic_ocr import SyntheticOCRConfig, generate_sample

    model = build_tiny_model()
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    raw = generate_sample(0, SyntheticOCRConfig(canvas_size=(64, 64), font_size_range=(5, 6), seed=1))
    sample = EvalSample("0", raw["question"], raw["answers"], raw["image"], text_boxes=raw["text_boxes"],
                        answer_box=raw["answer_box"])
    for method, has_scores in (("shirg-fixed", True), ("divprune", False)):
        inputs = processor(images=[sample.image], text=[processor.build_prompt(sample.question)],
                           selection_method=method, selection_budget=64)
        settings = model.selection_settings(method, 64)
        (result,) = selection_diagnostics(model, inputs, settings, [sample], token_relevance(model, inputs, settings))
        (entry,) = model.inspect_selection(**inputs, selection_method=method, selection_budget=64)
        views = source_views((64, 64), {**model.config.token_layout(), **settings})
        text = torch.from_numpy(box_token_mask(raw["text_boxes"], cell_boxes(views)))[None]
        kept = torch.zeros_like(text).scatter_(1, entry["indices"], True)
        assert 0 < int(text.sum()) < 256 and result["text_recall"] == float(kept_recall(kept, text)[0])
        if has_scores:
            assert result["text_auc"] == float(ranking_auc(entry["scores"], text)[0])
        else:
            assert result["text_auc"] is None
