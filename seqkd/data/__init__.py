"""Data pipelines. One module per data family; ``text`` is language modelling."""

from seqkd.data.text import (
    PTB_FILES,
    PTB_HUB_COLUMN,
    PTB_HUB_NAME,
    SPLITS,
    StreamBatches,
    encode_stream,
    find_split_files,
    group_texts,
    load_ptb,
    load_text_splits,
    read_text_file,
    stream_dataloader,
    train_bpe_tokenizer,
    train_word_tokenizer,
)

__all__ = [
    "PTB_FILES",
    "PTB_HUB_COLUMN",
    "PTB_HUB_NAME",
    "SPLITS",
    "StreamBatches",
    "encode_stream",
    "find_split_files",
    "group_texts",
    "load_ptb",
    "load_text_splits",
    "read_text_file",
    "stream_dataloader",
    "train_bpe_tokenizer",
    "train_word_tokenizer",
]
