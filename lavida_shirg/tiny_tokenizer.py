"""A tiny byte-level BPE tokenizer (512 text tokens + `<image>`) for tests and the offline demo, built in memory.

Its special tokens sit at fixed ids that the "tiny" preset of `ShirgConfig` uses (`SPECIAL_TOKENS`); `<image>`
takes id 512 = the preset's image_token_id, just past the LM vocabulary, so that tokens added later
(`add_tokens`) can never take the image id. It adds no
bos/eos by itself: LaViDa's chat template writes `<|startoftext|>` literally, and special tokens written in the
text are matched as single ids. Byte-level BPE encodes any text; the merges are learned from `CORPUS`, words of
LaViDa's prompts and of synthetic OCR images, so that those encode in few tokens. Numbers are split into single
digits by a pre-tokenizer rule before the byte-level split (as LLaMA-style tokenizers split numbers into short digit
chunks), so no merge ever joins digits: "497" is `4` `9` `7`, one token per digit.

LaViDa's FIM tokens `<|reserved_token_1|>` (the infill marker) and `<|reserved_token_2|>` (the filler) take the ids
of the byte tokens of 0xFE and 0xFF (`FIM_TOKENS`): bytes that never occur in UTF-8, so no text ever encoded to those
ids, and every other id and every tokenization stays as it was.
"""

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512  # text tokens = configuration_lavida_shirg.TINY_TEXT_VOCAB
IMAGE_TOKEN = "<image>"  # id VOCAB_SIZE = the tiny preset's image_token_id
# Dream's ChatML tokens of the tiny-dream preset, just past `<image>` (its LM vocabulary is larger to hold them)
DREAM_CHAT_TOKENS = {"<|im_start|>": VOCAB_SIZE + 1, "<|im_end|>": VOCAB_SIZE + 2}

SPECIAL_TOKENS = {
    "<|endoftext|>": 0,  # eos and pad
    "<|startoftext|>": 1,  # bos
    "<|mdm_mask|>": 2,  # the masked-diffusion mask
    "<|start_header_id|>": 3,
    "<|end_header_id|>": 4,
    "<|eot_id|>": 5,
}

# FIM token -> the byte it replaces in the BPE vocabulary (0xFE, 0xFF: never in UTF-8 text), ids 192 and 193 =
# the tiny presets' fim_token_id / fill_token_id
FIM_TOKENS = {"<|reserved_token_1|>": 0xFE, "<|reserved_token_2|>": 0xFF}
FIM_TOKEN_IDS = {"<|reserved_token_1|>": 192, "<|reserved_token_2|>": 193}

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

CORPUS = [
    SYSTEM_PROMPT,
    "system user assistant",
    "Answer the question using a single word or phrase.",
    "What is written in the image? What is the price? What colour is the box? What is the total?",
    "Describe the image in detail. How many items are in the table? Which row has the largest value?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 15 20 25 30 42 50 64 75 99 100 128 250 365 500 1000 2024 2025",
    "$0.99 $1.50 $2.25 $3.75 $4.00 $5.49 $9.99 $12.00 $19.95 $24.50 $49.99 $100.00 3.14 0.5 1.25 %",
    "price total tax sum cost sale discount receipt invoice amount each item qty unit",
    "red green blue yellow orange purple pink brown black white gray grey colour color dark light",
    "Alice Bob Carol David Emma Frank Grace Henry Olivia Liam Noah Mia Lucas Sophia James Anna",
    "table row column cell header value name age city country date year month day week time",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June",
    "the a an of to and in is it that this for on with as at by from be are was were has have had not",
    "yes no one two three four five six seven eight nine ten first second third last left right top bottom",
    "what which who where when why how many much number text word words letter sign title label caption",
    "image picture photo chart graph plot bar line axis legend figure document page screen menu map",
    "cat dog car bus tree house man woman person people street shop store book cup bottle apple",
    "small large big little high low long short old new good best more most less least same other",
    "open closed stop exit entrance sale coffee tea milk bread cheese pizza water juice cake",
    "shows written says reads contains there here above below next between inside outside near",
    "Question: Answer: Options: A B C D Please answer directly. The answer is",
]


def _trained_bpe() -> Tokenizer:
    """Train the byte-level BPE on `CORPUS` with the special tokens first (ids 0..5), all 256 bytes, digits split."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # every digit its own pre-token: no digit merges
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def with_fim_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The byte-level BPE with the vocabulary entries of the bytes in `FIM_TOKENS` renamed to the FIM tokens (no
    merge uses those bytes), which are then added as special tokens at those same ids. Byte-level BPE writes a byte
    of 0xAE..0xFF as the character of that code point."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for token, byte in FIM_TOKENS.items():
        vocab[token] = vocab.pop(chr(byte))
    renamed = Tokenizer.from_str(json.dumps(spec))
    renamed.add_special_tokens(list(FIM_TOKENS))
    return renamed


def build_tiny_tokenizer(chat_format: str = "llada") -> PreTrainedTokenizerFast:
    """The tiny tokenizer: 512 text tokens and `<image>` (id 512); with chat_format "dream" also Dream's ChatML
    tokens `<|im_start|>` 513 and `<|im_end|>` 514 (`DREAM_CHAT_TOKENS`; the tiny-dream preset's LM reads them).
    Raises if the ids are not the fixed ones."""
    backend = with_fim_tokens(_trained_bpe())
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the tiny BPE has {backend.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    chat_tokens = DREAM_CHAT_TOKENS if chat_format == "dream" else {}
    backend.add_special_tokens([IMAGE_TOKEN, *chat_tokens])
    fixed = {**SPECIAL_TOKENS, **FIM_TOKEN_IDS, IMAGE_TOKEN: VOCAB_SIZE, **chat_tokens}
    for token, expected in fixed.items():
        if backend.token_to_id(token) != expected:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", IMAGE_TOKEN, *FIM_TOKENS,
                              *chat_tokens],
    )
