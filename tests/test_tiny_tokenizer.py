"""The tiny tokenizer: numbers split into single digits by its pre-tokenizer (never merged), words still merged."""

from lavida_shirg.tiny_tokenizer import FIM_TOKENS, IMAGE_TOKEN, SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()


def encode(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def test_every_number_is_one_token_per_digit():
    digit_ids = [encode(str(d)) for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids) and len({ids[0] for ids in digit_ids}) == 10
    for number in [f"{n:03d}" for n in range(1000)] + ["7", "2024", "1234567890", "000000"]:
        assert encode(number) == [digit_ids[int(d)][0] for d in number], number
        assert TOKENIZER.decode(encode(number)) == number


def test_digits_inside_text_stay_single_and_the_text_round_trips():
    for text in ["What is written in the brown box? 497", "$12.99 total", "abc12x", "year 2025, day 07"]:
        ids = encode(text)
        tokens = TOKENIZER.convert_ids_to_tokens(ids)
        assert TOKENIZER.decode(ids) == text
        assert all(len(token) == 1 for token in tokens if any(c.isdigit() for c in token)), tokens
    assert "".join(TOKENIZER.convert_ids_to_tokens(encode("$12.99"))) == "$12.99"


def test_no_vocabulary_entry_joins_a_digit_with_anything():
    joined = [token for token in TOKENIZER.get_vocab() if len(token) > 1 and any(c.isdigit() for c in token)
              and token not in SPECIAL_TOKENS and token not in FIM_TOKENS]
    assert joined == []


def test_words_are_still_merged_and_the_ids_are_fixed():
    assert len(encode(" total")) == 1 and len(encode(" written")) == 1 and len(encode("What")) == 1
    assert len(TOKENIZER) == VOCAB_SIZE + 1 and TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN) == VOCAB_SIZE
    assert all(TOKENIZER.convert_tokens_to_ids(token) == index for token, index in SPECIAL_TOKENS.items())


def test_fim_tokens_take_the_ids_of_bytes_that_utf8_never_has_and_change_no_other_encoding():
    """<|reserved_token_1|> / <|reserved_token_2|> are single special ids (192, 193: the byte tokens of 0xFE and
    0xFF, which no UTF-8 text contains); any other text encodes and decodes as the BPE without them does."""
    import random

    from lavida_shirg.configuration_lavida_shirg import PRESETS
    from lavida_shirg.tiny_tokenizer import CORPUS, _trained_bpe

    ids = [TOKENIZER.convert_tokens_to_ids(token) for token in FIM_TOKENS]
    assert ids == [PRESETS["tiny"]["fim_token_id"], PRESETS["tiny"]["fill_token_id"]] == [192, 193]
    assert encode("a<|reserved_token_2|><|reserved_token_1|> b")[1:3] == [193, 192]
    assert TOKENIZER.decode([192, 193], skip_special_tokens=True) == ""
    plain = _trained_bpe()
    generator = random.Random(0)
    texts = CORPUS + ["\u00fe\u00ff caf\u00e9 \U0001f600"] + [
        "".join(chr(generator.randint(32, 0x2FFF)) for _ in range(200)) for _ in range(20)]
    for text in texts:
        assert encode(text) == plain.encode(text).ids
        assert TOKENIZER.decode(encode(text)) == plain.decode(plain.encode(text).ids) == text
    assert len(TOKENIZER) == VOCAB_SIZE + 1
