"""Training batches, masks, labels and loss against an independent restatement of LaViDa's training code.

LaViDa's code (github.com/jacklishufan/LaViDa) cannot run here (no GitHub in CI, and none of it is committed), so
each `lavida_*` function below restates, from reading that code, the LaViDa function named in its docstring, in
LaViDa's own layout: text records with one image placeholder, padded by the collator, then expanded to image
positions. The tests give it the records our processor makes and the random draws our model makes, and compare
masks, labels and loss for both complementary copies, first on a batch padded to its longest sample, then through
train.py's collation (with LaViDa's random extra EOS padding). The records have different answer lengths and one
image size (equal image-token counts: see `lavida_multimodal` for what LaViDa does otherwise).
"""

import copy

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from PIL import Image

import train
from lavida_shirg import ShirgConfig
from lavida_shirg.masked_diffusion import sample_complementary_masks
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.batching import BatchBuilder, SampleEncoder, collate_samples, lavida_extra_padding
from shirg_tools.budget_schedule import parse_budget_entries

IGNORE = -100  # llava/constants.py IGNORE_INDEX
PLACEHOLDER = -200  # llava/constants.py IMAGE_TOKEN_INDEX: the one id that stands for an image in a text record
LAVIDA_FIM_ID = 126085  # llava_llada.py forward: FIM positions are neither masked nor predicted (outside our vocab)
ANSWERS = ["7", "red 42 blue", "a much longer answer of many words"]


# ---- LaViDa, restated ------------------------------------------------------------------------------------------------


def lavida_collate(records, pad_id, extra_pad):
    """llava/train/train.py DataCollatorForSupervisedDataset.__call__ with pad_sequence (padding_side right).

    The first longest record gets `extra_pad` more pad ids (labels IGNORE) when extra_pad > 0 (LaViDa draws it with
    np.random.randint(-128, 128)); then every record is right-padded to the longest, ids with pad_id, labels with
    IGNORE; attention_mask = ids != pad_id. Returns input_ids, labels, attention_mask (B, W).
    """
    ids = [list(record["input_ids"]) for record in records]
    labels = [list(record["labels"]) for record in records]
    longest = int(np.argmax([len(row) for row in ids]))  # the first of the longest
    if extra_pad > 0:
        ids[longest] += [pad_id] * extra_pad
        labels[longest] += [IGNORE] * extra_pad
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels])
    return input_ids, labels, input_ids != pad_id


def lavida_multimodal(input_ids, labels, attention_mask, image_counts):
    """llava/model/llava_arch.py prepare_inputs_labels_for_multimodal (right padding), its ids and labels.

    Per row: the positions with attention_mask False are dropped, the placeholder becomes image_counts[row]
    positions (id PLACEHOLDER, label IGNORE); rows are right-padded to the longest with label IGNORE (their
    embeddings are zeros; `filler` marks them). With equal image counts no row needs filler.
    Returns ids, labels, filler (B, L).
    """
    rows_ids, rows_labels = [], []
    for ids, row_labels, keep, count in zip(input_ids.tolist(), labels.tolist(), attention_mask.tolist(),
                                            image_counts):
        kept = [(i, label) for i, label, k in zip(ids, row_labels, keep) if k]
        expanded = []
        for i, label in kept:
            expanded += [(PLACEHOLDER, IGNORE)] * count if i == PLACEHOLDER else [(i, label)]
        rows_ids.append([i for i, _ in expanded])
        rows_labels.append([label for _, label in expanded])
    length = max(map(len, rows_ids))
    filler = torch.tensor([[False] * len(row) + [True] * (length - len(row)) for row in rows_ids])
    ids = torch.tensor([row + [IGNORE] * (length - len(row)) for row in rows_ids])
    labels = torch.tensor([row + [IGNORE] * (length - len(row)) for row in rows_labels])
    return ids, labels, filler


def lavida_masks(input_ids, labels, attention_mask, image_counts, eos_id, eps, seed):
    """llava/model/language_model/llava_llada.py LlavaLladaForMaskedDiffusion.forward with labels, and its
    forward_process (policy 'uniform'), up to the LM call.

    EOS positions become attended targets (labels = eos_id there); the multimodal layout above; from the global
    RNG (seeded with `seed`): t ~ U(0, 1) (B,), then u ~ U(0, 1) (B, L) over the whole sequence; p = (1 - eps) t
    + eps; m = u <= max(p, min over all L of u); first copy = m & targets & ~FIM, second = ~m & targets & ~FIM;
    each copy's labels are IGNORE outside it. Returns ids, labels (B, L), first, second (B, L), labels of the two
    copies (2B, L) and p (B,).
    """
    is_eos = input_ids == eos_id
    attention_mask = attention_mask | is_eos
    labels = torch.where(is_eos, eos_id, labels)
    ids, labels, _ = lavida_multimodal(input_ids, labels, attention_mask, image_counts)
    targets, fim = labels != IGNORE, labels == LAVIDA_FIM_ID
    torch.manual_seed(seed)
    t = torch.rand(labels.shape[0])
    p = ((1 - eps) * t + eps)[:, None]  # (B, 1)
    u = torch.rand(labels.shape)  # (B, L)
    masked = u <= torch.max(p, u.min(-1, keepdim=True).values)
    first, second = masked & targets & ~fim, ~masked & targets & ~fim
    copy_labels = torch.cat((labels.masked_fill(~first, IGNORE), labels.masked_fill(~second, IGNORE)))
    return ids, labels, first, second, copy_labels, p[:, 0]


def lavida_loss(logits, copy_labels, num_items_in_batch=None):
    """llava/model/language_model/llada/modeling_llada.py LLaDAModelLM.forward's loss over the 2B rows (first
    copies, then second copies): cross-entropy averaged over the labels != IGNORE, or, under
    ENFORCE_NUM_ITEMIN_BATCH, summed and divided by num_items_in_batch: in LlavaLladaForMaskedDiffusion.forward,
    the count of those labels averaged over processes (accelerate's reduce) and cast to an integer (floored)."""
    flat_logits, flat_labels = logits.flatten(0, 1).float(), copy_labels.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels)
    return F.cross_entropy(flat_logits, flat_labels, reduction="sum") / num_items_in_batch.long()


# ---- our side ---------------------------------------------------------------------------------------------------------


def text_record(processor, prompt, image_size, answer, layout):
    """LaViDa's text record of one sample: our processor's unpadded ids and labels with the run of image tokens
    collapsed into one PLACEHOLDER; and the image-token count."""
    text = processor.text_inputs([prompt], [[image_size]], [answer], layout)
    ids, labels = text["input_ids"][0].tolist(), text["labels"][0].tolist()
    image = [i == processor.image_token_id for i in ids]
    first = image.index(True)
    count = sum(image)
    assert not any(image[first + count:]), "one run of image tokens"
    record = {"input_ids": ids[:first] + [PLACEHOLDER] + ids[first + count:],
              "labels": labels[:first] + [IGNORE] + labels[first + count:]}
    return record, count


def noisy_copy_logits(model, inputs, copies):
    """Logits (2B, T, V) of the two copies, each a plain forward of input_ids with the copy's positions set to
    the mask token (an independent path to the masked inputs: no labels, no generator)."""
    config = model.config
    batch = inputs["input_ids"].shape[0]
    plain = {name: value for name, value in inputs.items() if name != "labels"}
    logits = []
    for copy_mask in (copies[:batch], copies[batch:]):
        noisy = inputs["input_ids"].masked_fill(copy_mask, config.mask_token_id)
        with torch.no_grad():
            logits.append(model(**{**plain, "input_ids": noisy}).logits)
    return torch.cat(logits)


def check_against_lavida(model, inputs, records, counts, extra_pad, seed, entry):
    """Our masks, labels and loss (model(labels=...) with generator seed `seed`) equal LaViDa's computation of the
    same records with extra_pad and global seed `seed`, for both copies."""
    config = model.config
    with torch.no_grad():
        output = model(**inputs, generator=torch.Generator().manual_seed(seed), output_logits=True)
    ids, labels, first, second, copy_labels, _ = lavida_masks(
        *lavida_collate(records, config.pad_token_id, extra_pad), counts, config.eos_token_id,
        config.min_mask_probability, seed)
    assert ids.shape == inputs["input_ids"].shape, (entry.label, "LaViDa's multimodal length")
    assert not bool((ids == IGNORE).any()), "no zero-vector filler (equal image-token counts)"
    on_image = ids == PLACEHOLDER
    assert torch.equal(on_image, inputs["input_ids"] == config.image_token_id)
    assert torch.equal(ids[~on_image], inputs["input_ids"][~on_image])
    assert torch.equal(labels, inputs["labels"]), "targets: answer, eot and every EOS of the padding"
    assert torch.equal(output.diffusion_masks, torch.cat((first, second))), "both copies' masks"
    assert torch.equal(first | second, labels != IGNORE) and not (first & second).any(), "each target in one copy"
    logits = noisy_copy_logits(model, inputs, output.diffusion_masks)
    torch.testing.assert_close(output.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.loss, lavida_loss(logits, copy_labels), rtol=1e-5, atol=1e-6)
    # ENFORCE_NUM_ITEMIN_BATCH with W = 3 processes: LaViDa divides by the floored mean count over processes, our
    # model by Trainer's sum over processes, which Trainer then multiplies by W (average_tokens_across_devices);
    # the same when W divides the sum (otherwise LaViDa's floor differs by < 1 / mean count, relatively)
    count = int((copy_labels != IGNORE).sum())
    counts_per_process = torch.tensor([count, 17, 40 + (-(count + 57)) % 3])
    with torch.no_grad():
        ours = model(**inputs, generator=torch.Generator().manual_seed(seed),
                     num_items_in_batch=counts_per_process.sum()).loss * len(counts_per_process)
    torch.testing.assert_close(ours, lavida_loss(logits, copy_labels, counts_per_process.float().mean()), rtol=1e-5,
                               atol=1e-6)
    return labels, copy_labels, logits


@pytest.fixture(scope="module")
def setting():
    model = build_tiny_model(seed=5)
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    entries = parse_budget_entries("32,pooled", "shirg-fixed", {}, has_budget_head=False)
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in ANSWERS]
    return model, processor, entries, images


def sample_records(processor, entry, batch):
    layout = processor.selection(entry.method, entry.budget, entry.options)
    pairs = [text_record(processor, prompt, tuple(size), answer, layout)
             for prompt, size, answer in zip(batch["prompts"], batch["image_sizes"].tolist(), batch["answers"])]
    return [record for record, _ in pairs], [count for _, count in pairs]


@pytest.mark.parametrize("extra_pad", [-5, 9])
def test_masks_labels_and_loss_equal_lavidas(setting, extra_pad):
    """Padded to the longest (LaViDa's draws <= 0) and by 9 more EOS (a draw of 9), every budget entry."""
    model, processor, entries, images = setting
    encoder = SampleEncoder(processor, entries)
    batch = collate_samples([{**encoder.encode(image, "What is written?", answer), "skipped": []}
                             for image, answer in zip(images, ANSWERS)])
    for entry in entries:
        inputs = BatchBuilder(processor).build(batch, entry, max(extra_pad, 0))
        records, counts = sample_records(processor, entry, batch)
        assert len(set(len(r["input_ids"]) for r in records)) == len(ANSWERS), "different answer lengths"
        for seed in (0, 1, 2):
            labels, _, _ = check_against_lavida(model, inputs, records, counts, extra_pad, seed, entry)
            answer_lengths = (labels != IGNORE).sum(1)
            assert int(answer_lengths.min()) > max(extra_pad, 0) and len(set(answer_lengths.tolist())) == 1


def test_the_at_least_one_rule_is_over_the_whole_sequence():
    """For small t the first copy can hold no target (the smallest u of the sequence sits on a prompt or image
    position) and the complement then holds them all; a row of targets only always masks one."""
    config = ShirgConfig.from_preset("tiny")
    eps = config.min_mask_probability
    targets = torch.zeros(4000, 30, dtype=torch.bool)
    targets[:, 20:] = True
    targets[:2, :] = True  # rows of targets only
    masked, complement, p = sample_complementary_masks(targets, eps, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    t = torch.rand(4000, generator=generator)
    u = torch.rand(4000, 30, generator=generator)
    torch.testing.assert_close(p, (1 - eps) * t + eps)
    assert torch.equal(masked, targets & (u <= torch.maximum(p, u.amin(1))[:, None]))
    empty = ~masked.any(1)
    assert empty.any() and torch.equal(complement[empty], targets[empty]), "some first copies mask no target"
    assert masked[:2].any(1).all()


# ---- through train.py ---------------------------------------------------------------------------------------------


def test_extra_padding_draws_follow_lavidas_distribution():
    draws = np.array([lavida_extra_padding(11, step, micro_batch) for step in range(2000) for micro_batch in (0, 1)])
    assert draws.min() == 0 and draws.max() <= 127 and draws.max() >= 120
    assert abs((draws == 0).mean() - 128 / 256) < 0.02, "n ~ U{-128..127}: 0 for the 128 values n <= 0"
    assert abs(draws.mean() - 127 * 128 / 2 / 256) < 2.0, "31.75 positions on average"
    assert [lavida_extra_padding(11, 5, 1) for _ in range(3)] == [lavida_extra_padding(11, 5, 1)] * 3
    assert len({lavida_extra_padding(seed, 5, 1) for seed in range(20)}) > 5


def test_extra_padding_appends_eos_targets_up_to_the_lm_length(setting):
    """n extra positions: EOS ids and labels, attended, after the unchanged batch; never past model_max_length
    (where LaViDa truncates its sequences)."""
    _, processor, entries, images = setting
    encoder = SampleEncoder(processor, entries)
    batch = collate_samples([{**encoder.encode(image, "What is written?", answer), "skipped": []}
                             for image, answer in zip(images, ANSWERS)])
    plain = BatchBuilder(processor).build(batch, entries[1])
    width = plain["input_ids"].shape[1]
    padded = BatchBuilder(processor).build(batch, entries[1], 13)
    assert padded["input_ids"].shape[1] == width + 13
    for name in ("input_ids", "labels", "attention_mask", "question_mask"):
        assert torch.equal(padded[name][:, :width], plain[name]), name
    eos = processor.eos_token_id
    assert bool((padded["input_ids"][:, width:] == eos).all()) and bool((padded["labels"][:, width:] == eos).all())
    assert bool(padded["attention_mask"][:, width:].all()) and not bool(padded["question_mask"][:, width:].any())
    short = copy.copy(processor)
    short.model_max_length = width + 5
    assert BatchBuilder(short).build(batch, entries[1], 13)["input_ids"].shape[1] == width + 5


def records_dataset(folder, images):
    table = datasets.Dataset.from_dict({"image": images, "question": ["What is written?"] * len(images),
                                        "answers": [[answer] for answer in ANSWERS]})
    table.save_to_disk(str(folder))
    return str(folder)


def test_train_py_collation_equals_lavidas(setting, tmp_path):
    """The records through train.py's dataset, collator and trainer (step 0, micro-batch 0: its extra padding and
    its noise seed) give LaViDa's masks, labels and loss; --extra_eos_padding false pads to the longest only."""
    _, _, _, images = setting
    common = ["--data_format", "vqa", "--data_path", records_dataset(tmp_path / "vqa", images),
              "--per_device_train_batch_size", "3", "--use_cpu", "--lora_projector_dropout", "0",
              "--budgets", "32,pooled", "--report_to", "none"]
    for seed, padding in ((3, "true"), (1, "true"), (3, "false")):
        run = train.build_run([*common, "--output_dir", str(tmp_path / f"{seed}{padding}"), "--seed", str(seed),
                               "--extra_eos_padding", padding])
        trainer, processor = run.trainer, run.processor
        model = trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[index] for index in range(len(ANSWERS))])
        (inputs,), num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        info = inputs.pop("shirg_step")
        entry = trainer.schedule.entries[info["budget_index"]]
        extra = trainer.batch_builder.extra_positions(0, 0)
        assert extra == (lavida_extra_padding(seed, 0, 0) if padding == "true" else 0)
        records, counts = sample_records(processor, entry, batch)
        longest = max(len(r["input_ids"]) + c - 1 for r, c in zip(records, counts))
        assert inputs["input_ids"].shape[1] == longest + extra
        labels, copy_labels, logits = check_against_lavida(model, inputs, records, counts, extra,
                                                           info["noise_seed"], entry)
        assert int(num_items) == int((labels != IGNORE).sum()), "Trainer counts LaViDa's targets"
        loss = trainer.compute_loss(model, {**inputs, "shirg_step": info}, num_items_in_batch=num_items)
        torch.testing.assert_close(loss.detach(), lavida_loss(logits, copy_labels), rtol=1e-5, atol=1e-6)
    assert lavida_extra_padding(3, 0, 0) > 0 and lavida_extra_padding(1, 0, 0) == 0, "both cases were run"
