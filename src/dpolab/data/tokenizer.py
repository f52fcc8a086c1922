"""Train a byte-level BPE tokenizer locally (no download), wrapped as a Hugging Face fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, split_digits: bool = False):
    """A byte-level BPE with ``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2), trained on ``texts``.

    Byte-level means any text can be encoded. The result saves and loads with ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained``. ``split_digits`` makes every digit its own token (as Llama's and
    Qwen's tokenizers do), which small models need to learn arithmetic digit by digit.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)
