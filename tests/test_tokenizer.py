"""The tokenizer against transformers' XLMRobertaTokenizer (the official class) on a model the test trains."""

from __future__ import annotations

import pytest
import torch

from traffic_retrieval.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, batch_inputs, train_sentencepiece

CAPTIONS = [
    "This is a white Audi.", "A yellow BMW.", "This is a Microbus.", "A black BESTUNE Sedan.",
    "An orange Jinbei Microbus.", "A female pedestrian is someone who walks on foot, is between 18 and 60 years old, "
    "with her body back to the camera and has a shoulderbag. She is in a tee shirt with short sleeves.",
    "A walking man who is age 18 or younger, with his body back to the camera and with a backpack. He is wearning glasses.",
] * 30


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return train_sentencepiece(CAPTIONS, tmp_path_factory.mktemp("spm") / "demo.spm", vocab_size=120)


def _reference(spm_file, text: str, max_len: int = 64) -> tuple[list[int], list[int]]:
    """What the official RetrievalDataset builds, with transformers<5's XLMRobertaTokenizer."""
    from transformers import XLMRobertaTokenizer

    tok = XLMRobertaTokenizer(str(spm_file))
    ids = tok.convert_tokens_to_ids(tok.tokenize(text))
    ids = ids[: max_len - 2]
    tokens = [tok.bos_token_id] + ids + [tok.eos_token_id]
    n_pad = max_len - len(tokens)
    return tokens + [tok.pad_token_id] * n_pad, [0] * len(tokens) + [1] * n_pad


@pytest.mark.parametrize("text", [CAPTIONS[0], CAPTIONS[3], CAPTIONS[5], "Zebra qx ßø ??", "", " spaces  inside "])
def test_ids_and_mask_match_xlmr(spm_file, text):
    tok = Tokenizer(spm_file)
    assert tok.build_input(tok.encode(text)) == _reference(spm_file, text)


@pytest.mark.parametrize("text", [
    "a <s> b", "a<s>b", "x </s> y", "<pad>red car", "A white <mask> Sedan.", "a<mask>b", "<unk>", "a \t<unk>\n b",
    "<s><s>", "<s> </s>", "< s >", "A <S> car <s", "This is a <car>.",
])
def test_special_token_strings_in_a_text_match_xlmr(spm_file, text):
    """XLMRobertaTokenizer turns the specials' strings into their ids; sentencepiece alone would cut them up."""
    tok = Tokenizer(spm_file)
    assert tok.build_input(tok.encode(text)) == _reference(spm_file, text)


def test_specials_and_truncation(spm_file):
    from transformers import XLMRobertaTokenizer

    ref = XLMRobertaTokenizer(str(spm_file))
    tok = Tokenizer(spm_file, max_len=16)
    assert (BOS_ID, PAD_ID, EOS_ID, UNK_ID) == (ref.bos_token_id, ref.pad_token_id, ref.eos_token_id, ref.unk_token_id)
    assert tok.vocab_size == len(ref) and tok.mask_id == ref.mask_token_id
    tokens, mask = tok(CAPTIONS[5])  # much longer than 16 tokens
    assert tokens.shape == (1, 16) and mask.sum() == 0
    assert tokens[0, 0] == BOS_ID and tokens[0, -1] == EOS_ID
    assert tokens[0, 1:-1].tolist() == tok.encode(CAPTIONS[5])[:14]
    assert tok.decode(tok.encode("A yellow BMW.")) == "A yellow BMW."


def test_batch_call_matches_stored_segments(spm_file):
    tok = Tokenizer(spm_file)
    texts = CAPTIONS[:4]
    tokens, mask = tok(texts)
    t2, m2 = batch_inputs([tok.encode(t) for t in texts])
    assert torch.equal(tokens, t2) and torch.equal(mask, m2) and tokens.dtype == torch.long


def test_bpe_on_small_corpus_keeps_word_pieces(tmp_path):
    # the demo's reason for BPE: pieces must be longer than single characters on a few hundred captions
    tok = Tokenizer(train_sentencepiece(CAPTIONS, tmp_path / "x.spm", vocab_size=150))
    pieces = [tok.sp.IdToPiece(i) for i in range(tok.sp.GetPieceSize())]
    assert sum(len(p.lstrip("\u2581")) > 2 for p in pieces) > 30
    assert len(tok.encode("A yellow BMW.")) < len("A yellow BMW.")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="beit3.spm"):
        Tokenizer(tmp_path / "beit3.spm")
    bad = tmp_path / "bad.spm"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.spm"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["", "  "], tmp_path / "e.spm")
    with pytest.raises(ValueError, match="vocab_size 20 on 210 text.*smaller than required_chars"):
        train_sentencepiece(CAPTIONS, tmp_path / "small.spm", vocab_size=20)  # fewer pieces than characters
    assert not (tmp_path / "small.spm").exists()
