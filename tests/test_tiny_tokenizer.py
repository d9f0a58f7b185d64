"""The tiny tokenizer: numbers split into single digits by its pre-tokenizer (never merged), words still merged."""

from lavida_shirg.tiny_tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_tokenizer

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
              and token not in SPECIAL_TOKENS]
    assert joined == []


def test_words_are_still_merged_and_the_ids_are_fixed():
    assert len(encode(" total")) == 1 and len(encode(" written")) == 1 and len(encode("What")) == 1
    assert len(TOKENIZER) == VOCAB_SIZE + 1 and TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN) == VOCAB_SIZE
    assert all(TOKENIZER.convert_tokens_to_ids(token) == index for token, index in SPECIAL_TOKENS.items())
