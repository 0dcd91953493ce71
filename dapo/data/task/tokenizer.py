"""Byte-level tokenizer of the embedded default task.

A `tokenizers` BPE model with an empty merge list: every UTF-8 byte is one
token (ids 0-255, in byte order) and ``<|endoftext|>`` (id 256) serves as EOS
and padding. The normalizer, pre-tokenizer and decoder are the Qwen2 ones, so
the tokenizer survives the round trip through ``AutoTokenizer``, which in
transformers 5 rebuilds a ``Qwen2Tokenizer`` for a ``qwen2`` model directory
from the saved vocabulary and (empty) merges.

No chat template is saved: default-task prompts are bare problems such as
``17+25=`` and the rollout renders them verbatim, which keeps prompts a few
bytes long (generation on CPU costs one forward pass per token).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
VOCAB_SIZE = 257

# The Qwen2 pre-tokenization split (contractions, letter runs, single digits,
# punctuation runs, whitespace). With one token per byte the split changes no
# ids; it is kept so the saved tokenizer equals what Qwen2Tokenizer rebuilds.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_to_symbol() -> dict[int, str]:
    """The byte-level alphabet: each byte maps to one printable unicode character.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls,
    space, soft hyphen ...) take the code points 256, 257, ... in byte order.
    This is the mapping the ByteLevel pre-tokenizer and decoder use.
    """
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    )
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def build_byte_tokenizer() -> Tokenizer:
    """A merge-free byte-level BPE: token id == byte value, plus EOS at 256."""
    vocab = {symbol: byte for byte, symbol in byte_to_symbol().items()}
    vocab[EOS_TOKEN] = EOS_ID
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def save_byte_tokenizer(directory: Path, *, model_max_length: int = 512) -> None:
    """Write tokenizer.json + tokenizer_config.json into ``directory``."""
    # Imported here: transformers is heavy and only needed when writing files.
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=build_byte_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=model_max_length,
    )
    wrapped.save_pretrained(str(directory))
