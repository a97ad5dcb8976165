"""Rebuild ``tiny_tokenizer/spiece.model``: the SentencePiece model of the ``tiny`` preset's tokenizer.

The tiny preset must run with no download and nothing outside this package, so it ships a small
SentencePiece model trained on ``tiny_corpus.txt`` with T5's special ids (pad 0, eos 1, unk 2, no bos).
``T5Tokenizer`` adds 100 extra ids on top of the 150 pieces: 250 ids, inside the tiny T5's vocab of 256.

    python models/assets/build_tiny_tokenizer.py
"""

from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent


def main() -> None:
    spm.SentencePieceTrainer.train(
        input=str(HERE / "tiny_corpus.txt"),
        model_prefix=str(HERE / "tiny_tokenizer" / "spiece"),
        vocab_size=150,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    (HERE / "tiny_tokenizer" / "spiece.vocab").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
