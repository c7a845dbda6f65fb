"""DynamicLayerwiseDistiller: the loss, the monotonic dynamic mapping, narrower students."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from sparsekernels.distill import DistillConfig, DynamicLayerwiseDistiller
from sparsekernels.speedup import ModelSpeedup
from tests.speedup.families import apply_masks, head_masks, hidden_masks, ffn_masks, merge


def bert(layers=4, hidden=32):
    cfg = tf.BertConfig(hidden_size=hidden, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=layers, vocab_size=50, max_position_embeddings=16,
                        num_labels=3)
    return tf.BertForSequenceClassification(cfg)


def batch():
    ids = torch.randint(0, 50, (8, 10))
    mask = torch.ones_like(ids)
    mask[:3, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (8,))


def test_default_loss_is_nni_recipe():
    teacher, student = bert(), bert()
    d = DynamicLayerwiseDistiller(student, teacher).eval()  # no dropout: recomputable
    inputs, labels = batch()
    out = d(labels=labels, **inputs)
    s = student(**inputs).logits.detach()
    t = teacher(**inputs).logits
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    ce = F.cross_entropy(s, labels)
    assert torch.allclose(out.kl, kl, atol=1e-5) and torch.allclose(out.ce, ce, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), 0.1 * ce + 0.9 * (kl + out.hidden), atol=1e-5, rtol=1e-5)


def test_identical_student_matches_its_own_layers():
    teacher = bert().eval()
    student = copy.deepcopy(teacher).eval()  # eval: no dropout, so hidden states coincide
    d = DynamicLayerwiseDistiller(student, teacher).eval()
    inputs, labels = batch()
    out = d(labels=labels, **inputs)
    assert out.matching == [1, 2, 3, 4]
    assert float(out.hidden) < 1e-10


def test_loss_falls_and_mapping_stays_monotonic():
    torch.manual_seed(torch.initial_seed() % 2**31)
    teacher, student = bert(layers=4), bert(layers=2)
    d = DynamicLayerwiseDistiller(student, teacher, DistillConfig(teacher_layers=(2, 4)))
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    inputs, labels = batch()
    losses = []
    for _ in range(15):
        out = d(labels=labels, **inputs)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert out.matching == sorted(out.matching) and all(1 <= j <= 2 for j in out.matching)
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_narrower_pruned_student_and_hidden_resize():
    teacher = bert().eval()
    student = copy.deepcopy(teacher)
    inputs, labels = batch()
    masks = merge(head_masks(student), ffn_masks(student, inputs, "row"), hidden_masks(student, inputs))
    apply_masks(student, masks)
    d = DynamicLayerwiseDistiller(student, teacher)
    before = d(labels=labels, **inputs).loss.item()
    kept = (student.bert.embeddings.word_embeddings.weight != 0).any(0).nonzero().view(-1)
    ModelSpeedup(student, inputs, masks, mode="resize").speedup_model()
    assert student.bert.embeddings.word_embeddings.weight.shape[1] == len(kept) < 32
    with pytest.raises(RuntimeError, match="resize_student_hidden"):
        d(labels=labels, **inputs)
    d.resize_student_hidden(kept)
    student.eval()
    d.eval()
    after = d(labels=labels, **inputs).loss.item()
    assert after == pytest.approx(before, rel=1e-4)  # same student function, map restricted


def test_errors():
    m = bert()
    with pytest.raises(ValueError, match="same object"):
        DynamicLayerwiseDistiller(m, m)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillConfig(temperature=0)
