"""Tokenizers built offline, for pico test models and toy experiments: a character-level one,
and a small byte-level BPE trained on given texts (a second, different tokenizer, so pairs that
read the same text through different tokenizers can be built without a download).

One token per character of the alphabet, plus four special tokens: ``<pad>`` (id 0), ``<bos>``,
``<eos>`` and ``<unk>`` (ids 1-3). Characters outside the alphabet become ``<unk>``. Encoding adds
no special tokens on its own, so ``decode(encode(s)) == s`` for any string over the alphabet;
callers that want a leading ``<bos>`` add it themselves (``composer.data`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from composer.config import ConfigError

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order

DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"  # printable ASCII + newline

# Role headers, every message closed by eos (so an assistant turn teaches the model to stop), and
# the assistant header as the generation prompt. bos comes from the template, as in Llama's.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def build_char_tokenizer(
    alphabet: str | None = None, *, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """Build a character-level Hugging Face tokenizer without any download.

    Guarantees: ``<pad>`` is id 0, then ``<bos>``, ``<eos>``, ``<unk>``, then the alphabet's
    characters in order (duplicates dropped); ``pad/bos/eos/unk_token`` are set; encoding adds no
    special tokens; ``decode(encode(s)) == s`` for strings over the alphabet (no spaces are inserted
    between characters); the tokenizer survives ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained``. With ``chat_template=True`` it carries
    :data:`CHAT_TEMPLATE`, which starts with ``<bos>`` and ends every message with ``<eos>``.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    if not isinstance(alphabet, str) or alphabet == "":
        raise ConfigError(
            f"alphabet is {alphabet!r}; expected a non-empty string of the characters to tokenize "
            "(or None for printable ASCII plus newline)"
        )
    chars = list(dict.fromkeys(alphabet))  # dedupe, keep order
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; [\s\S] also matches "\n", unlike ".".
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens as-is; the default would put spaces between

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a."
        model_max_length=1 << 30,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    logger.debug("built a character tokenizer with %d tokens", len(vocab))
    return tokenizer


def build_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 300,
    add_bos: bool = True,
    split_digits: bool = False,  # every digit its own pre-token (as Llama's and Qwen's)
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained on ``texts``.

    Special tokens as the character tokenizer's (``<pad>`` 0, ``<bos>``, ``<eos>``, ``<unk>``);
    with ``add_bos`` encoding puts ``<bos>`` first, as Llama's and Gemma's tokenizers do, so a
    tokenizer with start tokens is covered too. Any text encodes (bytes), and
    ``decode(encode(s)) == s``.
    """
    from tokenizers import processors

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if add_bos:
        bos = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
