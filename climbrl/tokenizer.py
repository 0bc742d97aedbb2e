"""Byte-level BPE tokenizer training with `tokenizers`, saved as a transformers fast tokenizer.

Used by pretraining (climbrl.pretrain) and by the tiny test models (climbrl.tinymodel), so it
lives in the core and imports neither. Nothing is downloaded: the tokenizer is trained on text
you pass in.

    from climbrl.tokenizer import train_bpe_tokenizer
    tok = train_bpe_tokenizer(["some text", ...], vocab_size=512, out_dir="tok/")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML, the template Qwen models use, so vLLM's chat endpoint and TRL's SFT work unchanged.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
    extra_special_tokens: list[str] | None = None,
    split_digits: bool = False,
):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    The vocabulary always holds the 256 byte symbols, the special tokens and then merges up to
    `vocab_size`. If `out_dir` is given, the tokenizer is saved there with `save_pretrained`.
    With `split_digits`, every digit is its own token (as in Llama/Qwen), which arithmetic needs.
    """
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + list(extra_special_tokens or [])
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END] + list(extra_special_tokens or []),
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
