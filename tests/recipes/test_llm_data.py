"""The LLM text helpers: BBC-style article files read and deduplicated, split by article
(deterministic, disjoint), cut into token windows, and perplexity."""

import math

import pytest
import torch

from sparsekernels.recipes.llm_data import bbc_articles, perplexity, split_articles, token_windows


def write_corpus(root):
    (root / "tech").mkdir(parents=True)
    (root / "sport").mkdir()
    (root / "tech" / "001.txt").write_text("Chips get faster\n\nA new chip  is fast.")
    (root / "tech" / "002.txt").write_text("Chips get faster\n\nA new chip is fast.\n")  # dup
    (root / "sport" / "001.txt").write_bytes(b"Caf\xe9 wins\n\nThe team won.")   # not UTF-8
    for i in range(20):
        (root / "sport" / f"1{i:02d}.txt").write_text(f"Match {i}\n\nScore {i} to {i + 1}.")


def test_articles_read_deduplicated_in_path_order(tmp_path):
    write_corpus(tmp_path)
    articles = bbc_articles(tmp_path)
    assert len(articles) == 22
    assert articles[0].startswith("Caf\ufffd wins")
    assert sum(a.startswith("Chips get faster") for a in articles) == 1
    with pytest.raises(FileNotFoundError, match="no article files"):
        bbc_articles(tmp_path / "sport")


def test_split_by_article_is_deterministic_and_disjoint():
    articles = [f"article {i}" for i in range(100)] + ["article 3"]
    split = split_articles(articles, seed=7)
    again = split_articles(articles, seed=7)
    assert split == again
    parts = [set(split.calibration), set(split.training), set(split.evaluation)]
    assert len(split.evaluation) == 10 and len(split.calibration) == 10
    assert sum(map(len, parts)) == 100 and set.union(*parts) == set(articles)
    assert split_articles(articles, seed=8).evaluation != split.evaluation
    with pytest.raises(ValueError, match="fractions"):
        split_articles(articles, calibration=0.6, evaluation=0.5)


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def test_token_windows_cut_consecutive_tokens():
    tok = CharTokenizer()
    windows = token_windows(tok, ["abcd", "efgh"], length=3)
    flat = [ord(c) % 97 + 1 for c in "abcd"] + [0] + [ord(c) % 97 + 1 for c in "efgh"] + [0]
    assert windows.shape == (3, 3)
    assert windows.flatten().tolist() == flat[:9]
    assert token_windows(tok, ["abcd", "efgh"], length=2, count=2).shape == (2, 2)
    with pytest.raises(ValueError, match="fewer than 4 windows"):
        token_windows(tok, ["abcd"], length=3, count=4)


def test_perplexity_is_exp_of_mean_token_loss():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=40, max_position_embeddings=32))
    windows = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss   # mean over 3 x 8 predictions
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(float(loss)),
                                                                     rel=1e-5)
    assert model.training     # the mode is restored
