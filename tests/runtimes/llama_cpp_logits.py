"""Run in an environment with llama-cpp-python (not loratool's): the llama.cpp side of
tests/test_gguf.py's runtime test.

    python llama_cpp_logits.py tokenizer BASE_DIR
        writes BASE_DIR/tokenizer.model, a tiny SentencePiece model of the base's vocabulary size,
        so that llama.cpp's convert_hf_to_gguf.py can convert the base;
    python llama_cpp_logits.py logits BASE.gguf ADAPTER.gguf OUT.json '[ids]'
        writes {"base": logits, "adapted": logits} for the ids, one row per position.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path


def tokenizer(base: Path) -> None:
    import sentencepiece as spm

    size = json.loads((base / "config.json").read_text())["vocab_size"]
    words = ["low", "lower", "newest", "widest", "adapter", "merge", "rank", "tensor", "model", "weight"]
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=size,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    (base / "tokenizer.model").write_bytes(model.getvalue())


def logits(base: str, adapter: str, out: str, ids: list[int]) -> None:
    import numpy as np
    from llama_cpp import Llama

    result = {}
    for name, lora in (("base", None), ("adapted", adapter)):
        llm = Llama(model_path=base, lora_path=lora, n_ctx=64, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        result[name] = np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "tokenizer":
        tokenizer(Path(sys.argv[2]))
    else:
        logits(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
