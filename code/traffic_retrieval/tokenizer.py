"""BEiT-3 text tokenizer: a sentencepiece model with the XLM-R / fairseq id scheme.

The official code uses ``XLMRobertaTokenizer(beit3.spm)``. Its ids are the sentencepiece ids shifted by one, with
four fixed specials in front: ``<s>`` 0 (bos, the CLS position), ``<pad>`` 1, ``</s>`` 2 (eos), ``<unk>`` 3; an spm
piece with id 0 (its own unknown) maps to 3 and ``<mask>`` is ``len(spm) + 1``. We apply that offset directly on
``sentencepiece`` instead of going through ``transformers`` (whose 5.x releases silently build a 5-token vocabulary
from a bare ``.spm`` path).

The special tokens' strings written in a text (``"<s>"``, ``"</s>"``, ``"<pad>"``, ``"<unk>"``, ``"<mask>"``) become
their ids, with the whitespace around them dropped, as ``XLMRobertaTokenizer.tokenize`` never lets sentencepiece split
them; the rest of the text is encoded piece by piece between them.

A text becomes the model input as in the official ``RetrievalDataset``: ids truncated to ``max_len - 2``, then
``[bos] + ids + [eos]``, padded with ``pad`` to ``max_len``; the padding mask is 1 at pads and 0 elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

log = logging.getLogger(__name__)

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1  # fairseq puts <s>,<pad>,</s>,<unk> at 0..3 and shifts every other spm piece by one
DEFAULT_MAX_LEN = 64  # --num_max_bpe_tokens in the official recipe
# XLMRobertaTokenizer splits a text at its special tokens' strings and strips the whitespace next to them.
_SPECIAL_TOKEN = re.compile(r"\s*(<s>|</s>|<pad>|<unk>|<mask>)\s*")


class Tokenizer:
    """Sentencepiece tokenizer that returns XLM-R ids (see the module docstring).

    Args:
        model_file: path to a sentencepiece ``.model``/``.spm`` file (``model_pth/beit3.spm`` for the real weights).
        max_len: total sequence length including bos and eos.
    """

    def __init__(self, model_file: str | os.PathLike, max_len: int = DEFAULT_MAX_LEN) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model not found: {path}. Put the official beit3.spm under model_pth/ "
                "(see README) or train one with `python code/train_tokenizer.py`."
            )
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (bos + one token + eos), got {max_len}")
        self.path = path
        self.max_len = max_len
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, ``<mask>`` included (64002 for beit3.spm)."""
        return self.sp.GetPieceSize() + FAIRSEQ_OFFSET + 1

    @property
    def mask_id(self) -> int:
        return self.sp.GetPieceSize() + FAIRSEQ_OFFSET

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos, in the XLM-R id scheme (what the jsonl index stores)."""
        if "<" not in text:  # the common case: no special token's string in the text
            return self._encode_pieces(text)
        specials = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID, "<mask>": self.mask_id}
        ids: list[int] = []
        # re.split with a group alternates text, special, text, ...; the texts may be empty.
        for i, part in enumerate(_SPECIAL_TOKEN.split(text)):
            ids.extend([specials[part]] if i % 2 else self._encode_pieces(part) if part else [])
        return ids

    def _encode_pieces(self, text: str) -> list[int]:
        spm_ids = self.sp.EncodeAsIds(text)
        # spm id 0 is sentencepiece's own <unk>; fairseq maps it to its <unk> (3) instead of shifting it.
        return [i + FAIRSEQ_OFFSET if i != 0 else UNK_ID for i in spm_ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` for ids produced by it (specials are dropped)."""
        return self.sp.DecodeIds([i - FAIRSEQ_OFFSET for i in ids if i > UNK_ID and i < self.mask_id])

    def build_input(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Add bos/eos, truncate and pad ``ids`` to ``max_len``; returns ``(tokens, padding_mask)``."""
        return build_input(ids, self.max_len)

    def __call__(self, texts: str | Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize one text or a batch into ``(tokens [B, max_len], padding_mask [B, max_len])`` long tensors."""
        if isinstance(texts, str):
            texts = [texts]
        return batch_inputs([self.encode(t) for t in texts], self.max_len)


def build_input(ids: Sequence[int], max_len: int = DEFAULT_MAX_LEN) -> tuple[list[int], list[int]]:
    """``[bos] + ids[:max_len - 2] + [eos]`` padded to ``max_len``, and its padding mask (1 at pads)."""
    tokens = [BOS_ID] + list(ids)[: max_len - 2] + [EOS_ID]
    n_pad = max_len - len(tokens)
    return tokens + [PAD_ID] * n_pad, [0] * len(tokens) + [1] * n_pad


def batch_inputs(
    segments: Sequence[Sequence[int]], max_len: int = DEFAULT_MAX_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn stored ``text_segment`` id lists (no bos/eos) into ``(tokens, padding_mask)`` tensors [N, max_len]
    (also for N = 0)."""
    pairs = [build_input(ids, max_len) for ids in segments]
    toks = torch.tensor([t for t, _ in pairs], dtype=torch.long).reshape(len(pairs), max_len)
    masks = torch.tensor([m for _, m in pairs], dtype=torch.long).reshape(len(pairs), max_len)
    return toks, masks


def train_sentencepiece(
    texts: Iterable[str],
    model_file: str | os.PathLike,
    vocab_size: int = 400,
    model_type: str = "bpe",
) -> Path:
    """Train a sentencepiece model on ``texts`` and write it atomically to ``model_file``.

    The demo needs this because ``beit3.spm`` cannot be downloaded here. BPE is the default: on a few thousand
    synthetic captions a unigram model collapsed to about 130 mostly single-character pieces, BPE with 400 did not.
    The spm model reserves ids 0-2 for ``<unk>``, ``<s>``, ``</s>`` as beit3.spm does; the fairseq scheme adds its own
    ``<pad>``.

    Raises:
        ValueError: no text, or sentencepiece cannot train on them (e.g. ``vocab_size`` below the number of distinct
            characters); the message gives sentencepiece's reason.
    """
    lines = [t.strip() for t in texts if t and t.strip()]
    if not lines:
        raise ValueError("cannot train a sentencepiece model on an empty caption list")
    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_file.parent) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "spm"
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                # XLM-R's layout: spm ids 0-2 are <unk>, <s>, </s>, so that after the fairseq +1 shift real pieces start
                # at id 4 and never collide with the fairseq specials (pad 1, eos 2, unk 3).
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                hard_vocab_limit=False,  # a small corpus may not support the requested size; take what it supports
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece reports bad settings as "INTERNAL: file(line) [check] reason"
            reason = str(e).rsplit("] ", 1)[-1].strip()
            raise ValueError(f"sentencepiece could not train a {model_type} model of vocab_size {vocab_size} on "
                             f"{len(lines)} text(s): {reason}") from None
        os.replace(f"{prefix}.model", model_file)
    log.info("wrote sentencepiece model %s (%d captions)", model_file, len(lines))
    return model_file
