"""Tests of the selection-quality measures (shirg_tools/selection_quality.py) and of the harness
(benchmarks/bench_selection_quality.py) on constructed inputs with known answers."""

import math

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

    rows = bench_selection_quality.main(["--images", "2", "--photos", "3", "--budgets", "32", "--only-extra",
                                         "--threads", "1", "--variants", "shirg-fixed:relevance_weight=0:"
                                         "detail_weight=1:detail_term=pixel-contrast:coverage_region_size=1,shirg-fixed:"
                                         "relevance_weight=0:detail_term=variance:coverage_region_size=1,divprune",
                                         "--json", str(tmp_path / "rows.json")])
    output = capsys.readouterr().out
    assert "| extra | divprune | - |" in output and "256 high-resolution tokens" in output
    assert "### side by side (AUC, recall@K)" in output and "| divprune | - | " in output
    assert list(rows) == ["synthetic", "photo"]
    for name, measured in rows.items():
        assert [row["variant"] for row in measured][2] == "divprune" and measured[2]["auc"] is None
        # on random weights too, the pixel contrast finds the ink and the seed's variance does not
        assert measured[0]["auc"] > 0.7 and measured[1]["auc"] < measured[0]["auc"], name
        assert all(0 <= row["recall"][32] <= 1 and 0 <= row["answer_recall"][32] <= 1 for row in measured)
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["sets"]["photo"]["images"] == 3
    assert saved["sets"]["synthetic"]["rows"][0]["recall"]["32"] == rows["synthetic"][0]["recall"][32]
    # deterministic
    again = bench_selection_quality.main(["--sets", "photo", "--photos", "3", "--budgets", "32", "--only-extra",
                                          "--threads", "1", "--variants", "divprune"])
    assert again["photo"][0]["recall"] == rows["photo"][2]["recall"]


def test_harness_on_a_dream_folder(tmp_path):
    """The harness loads a LaViDa-Dream folder (its "dream" prompts give relevance its question): the pixel-contrast
    row, which reads pixels only, measures what it measures on the tiny LLaDA preset; the relevance row runs."""
    import bench_selection_quality
    from conftest import save_tiny_dream_folder

    save_tiny_dream_folder(tmp_path / "dream", seed=1)
    variants = ["--variants", "shirg-fixed:relevance_weight=0:detail_weight=1:detail_term=pixel-contrast:"
                "coverage_region_size=1,shirg-fixed:relevance_weight=1:detail_weight=0:coverage_region_size=1"]
    common = ["--sets", "synthetic", "--images", "2", "--budgets", "32", "--only-extra", "--threads", "1", *variants]
    dream = bench_selection_quality.main(["--model", str(tmp_path / "dream"), *common])["synthetic"]
    llada = bench_selection_quality.main(common)["synthetic"]
    assert dream[0]["auc"] == llada[0]["auc"] > 0.7 and dream[0]["recall"] == llada[0]["recall"]
    assert 0 <= dream[1]["auc"] <= 1 and 0 <= dream[1]["recall"][32] <= 1


def test_photo_set_is_deterministic_with_ink_on_its_text():
    from shirg_tools.photo_text import REAL_TEXT, photo_set, photo_sample

    samples = photo_set(6, canvas=96, patch=4, seed=3)
    assert [s["question"] for s in samples[:2]] == [question for question, _, _ in REAL_TEXT.values()]
    for sample in samples:
        ink, (width, height) = sample["ink_mask"], sample["image"].size
        assert ink.shape == (height, width) and 0 < ink.mean() < 0.6
        x0, y0, x1, y1 = sample["text_boxes"][sample["answer_box"]]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and ink[y0:y1, x0:x1].any()
    for composite in samples[2:]:
        assert composite["image"].size == (96, 96) and composite["ink_mask"].mean() < 0.1
        # every ink pixel lies in a strip's box, and the ink has the strip's own colour (dark or light text)
        inside = np.zeros_like(composite["ink_mask"])
        for x0, y0, x1, y1 in composite["text_boxes"]:
            inside[y0:y1, x0:x1] = True
        assert not (composite["ink_mask"] & ~inside).any()
    again = photo_sample(0, canvas=96, patch=4, seed=3)
    assert np.array_equal(np.asarray(again["image"]), np.asarray(samples[2]["image"]))
    assert not np.array_equal(np.asarray(photo_sample(0, canvas=96, patch=4, seed=4)["image"]),
                              np.asarray(again["image"]))


def test_local_contrast_cancels_a_uniformly_busy_background():
    from lavida_shirg.shirg_selection import local_contrast, pixel_contrast

    generator = torch.Generator().manual_seed(0)
    # 8 x 8 patches of 4 px: a busy texture everywhere (std ~0.29), one patch with a stronger contrast (the "text")
    pixels = torch.rand(1, 1, 32, 32, generator=generator).expand(1, 3, 32, 32).clone()
    pixels[:, :, 12:16, 12:16] = torch.tensor([0.0, 1.0]).repeat(8)[:16].reshape(4, 4)
    plain, local = pixel_contrast(pixels, (8, 8), 4), local_contrast(pixels, (8, 8), 4)
    text = torch.zeros(1, 64, dtype=torch.bool)
    text[0, 3 * 8 + 3] = True
    assert float(plain.min()) > 0.2  # the texture has contrast everywhere
    assert int(local.argmax()) == 3 * 8 + 3 and float(ranking_auc(local, text)[0]) == 1.0
    # above its neighbourhood's mean: about half the texture patches are at 0, the text patch well above the rest
    assert float((local == 0).float().mean()) > 0.3
    # a flat map: 0 everywhere
    assert torch.equal(local_contrast(torch.zeros(1, 3, 32, 32), (8, 8), 4), torch.zeros(1, 64))


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
        views = source_views((64, 64), settings)
        text = torch.from_numpy(box_token_mask(raw["text_boxes"], cell_boxes(views)))[None]
        kept = torch.zeros_like(text).scatter_(1, entry["indices"], True)
        assert 0 < int(text.sum()) < 256 and result["text_recall"] == float(kept_recall(kept, text)[0])
        if has_scores:
            assert result["text_auc"] == float(ranking_auc(entry["scores"], text)[0])
        else:
            assert result["text_auc"] is None
