"""The training loop's loss components against values computed by hand from the logits."""

import torch
import torch.nn.functional as F

from slimforge.losses import causal_lm_loss, distillation_loss
from tests.helpers import tiny_model


def _batch():
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 4, 3, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, 9], [-100, -100, 3, 2, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_causal_lm_loss_is_cross_entropy_on_response_tokens(tokenizer):
    model, batch = tiny_model("llama", tokenizer), _batch()
    loss, logs = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, _ce(logits, batch["labels"]))
    assert logs == {}


def test_distillation_loss_adds_kl_and_residual_terms(tokenizer):
    student, teacher = tiny_model("llama", tokenizer, seed=0), tiny_model("llama", tokenizer, seed=1)
    batch = _batch()
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    live = batch["attention_mask"].bool()
    p, q = F.log_softmax(t.logits[live].float(), -1), F.log_softmax(s.logits[live].float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    hidden = sum(((a[live] - b[live]) ** 2).mean() / (b[live] ** 2).mean()
                 for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])) / (len(s.hidden_states) - 1)
    ce = _ce(s.logits, batch["labels"])
    loss, logs = distillation_loss(teacher, ce_weight=0.5, kl_weight=2.0, hidden_weight=3.0)(student, batch)
    torch.testing.assert_close(loss, 0.5 * ce + 2.0 * kl + 3.0 * hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["hidden"], hidden, rtol=1e-4, atol=1e-6)
    only_kl, logs = distillation_loss(teacher, ce_weight=0.0, kl_weight=1.0)(student, batch)
    torch.testing.assert_close(only_kl, kl, rtol=1e-4, atol=1e-6)
    assert "hidden" not in logs
    loss.backward()  # gradients reach the student, never the teacher
    assert student.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
