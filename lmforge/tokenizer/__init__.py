"""Tokenizers: train a byte-level BPE (``train.train_tokenizer``), load ``tokenizer.json`` / SentencePiece
(``core.load_tokenizer``), one small interface (``core.Tokenizer``), chat templates (``chat_template``)."""
