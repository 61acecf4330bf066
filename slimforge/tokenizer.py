"""Byte-level BPE tokenizer for the embedded model, digits split into single tokens.

Byte-level means any user text encodes (no unknown tokens); single-digit tokens (as in Llama-3 and
Qwen) keep arithmetic learnable, because every number is spelled digit by digit.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from slimforge import SlimforgeError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int, must_be_single: Iterable[str] = ()
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`. Each string in `must_be_single` (e.g. the judge verdicts
    " yes", " A") must come out as one token; otherwise the judge could not read its answer from
    one next-token distribution, so we fail loudly rather than build a subtly broken judge."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # BOS in front of every encoded text, as Llama's tokenizers do: the model is trained with it, so
    # stock `tokenizer(prompt)` + `generate` (or `pipeline()`) must see it too.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)
    for s in must_be_single:
        ids = fast.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            raise SlimforgeError(f"tokenizer splits {s!r} into {len(ids)} tokens; raise vocab_size "
                                 f"(now {vocab_size}) so every judge verdict is one token")
    return fast
