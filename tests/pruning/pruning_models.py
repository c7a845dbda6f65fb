"""Tiny random models (built from configs, no downloads) shared by the pruning tests."""

from __future__ import annotations

import torch

VOCAB = 50


class MLP(torch.nn.Module):
    def __init__(self, d_in=12, hidden=24, d_out=6):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def build_mlp() -> torch.nn.Module:
    return MLP()


def build_bert(head: bool = False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg) if head else BertModel(cfg)


def build_gpt2(lm: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg) if lm else GPT2Model(cfg)


def build_t5():
    from transformers import T5Config, T5Model
    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB,
                   dropout_rate=0.0, decoder_start_token_id=0)
    return T5Model(cfg)


def build_vit():
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=16, patch_size=4,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(cfg)


BUILDERS = {"mlp": build_mlp, "bert": build_bert, "gpt2": build_gpt2, "t5": build_t5,
            "vit": build_vit}


def dummy_input(kind: str, batch: int = 2, seq: int = 8):
    if kind == "mlp":
        return torch.randn(batch, seq, 12)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16)}
    ids = torch.randint(1, VOCAB, (batch, seq))
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (batch, 5))}
    return {"input_ids": ids}


def run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out[0]





class NormMLP(torch.nn.Module):
    """An MLP with LayerNorm and BatchNorm scaling factors (for SlimPruner)."""

    def __init__(self, d_in=12, hidden=16, d_out=3):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.ln = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        h = torch.relu(self.ln(self.fc1(x)))
        h = torch.relu(self.bn(self.fc2(h)))
        return self.fc3(h)


def make_batches(n=6, batch=4, d_in=12, classes=3, seq=None):
    shape = (batch, d_in) if seq is None else (batch, seq, d_in)
    return [(torch.randn(*shape), torch.randint(0, classes, (batch,))) for _ in range(n)]


def classification_step(batch, model):
    x, y = batch
    logits = model(x)
    if logits.dim() == 3:
        logits = logits.mean(1)
    return torch.nn.functional.cross_entropy(logits, y)


def make_training_func(batches):
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        step = 0
        while True:
            for batch in batches:
                if max_steps is not None and step >= max_steps:
                    return
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()
                step += 1
            if max_steps is None:
                return
    return training_func


def make_torch_evaluator(model, batches, lr=0.1, evaluating_func=None, dummy_input=None):
    from sparsekernels.pruning import TorchEvaluator
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return TorchEvaluator(make_training_func(batches), opt, classification_step,
                          dummy_input=dummy_input, evaluating_func=evaluating_func)
