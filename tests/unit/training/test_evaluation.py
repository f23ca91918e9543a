"""Generation-based evaluation (mistral_ft.training.evaluation): same tokens as a plain generate loop, the
metric definitions on hand-made predictions, the rank split, and bad eval input refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_ft.errors import ConfigError
from mistral_ft.training.evaluation import (GenerationEval, Reference, evaluate_generation, greedy_answers,
                                            load_references, metrics_from_sums, normalise, score, split_conversation)
from mistral_ft.training.schema import EvalSchema

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    [{"role": "user", "content": "Spell the word cat."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Greet Ann, please, right now."}],
    [{"role": "user", "content": "What is 5 plus 3?"}, {"role": "assistant", "content": "8"},
     {"role": "user", "content": "And 2 plus 2?"}],
]


@pytest.fixture(scope="module")
def tiny():
    """The random tiny model: these tests check decoding mechanics, and the EOS test below relies on random rows."""
    from mistral_ft.generate import load
    from mistral_ft.model.tiny import random_tiny_path

    model, tok, _ = load(random_tiny_path(), device="cpu")
    return model, tok


def _plain_loop(model, tok, max_new_tokens):
    """The reference: one unpadded prompt at a time, stopping at EOS, cut before it."""
    out = []
    for p in PROMPTS:
        ids, _ = tok.encode_chat(p, add_generation_prompt=True)
        new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()
        out.append(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return out


@pytest.mark.parametrize("fixed_steps", [False, True])
def test_batched_left_padded_equals_plain_generate_loop(tiny, fixed_steps):
    model, tok = tiny
    lengths = {len(tok.encode_chat(p, add_generation_prompt=True)[0]) for p in PROMPTS}
    assert len(lengths) == 3  # three prompt lengths: the batch really is left-padded
    expected = _plain_loop(model, tok, 8)
    assert greedy_answers(model, tok, PROMPTS, 8, batch_size=3, fixed_steps=fixed_steps) == expected
    assert greedy_answers(model, tok, PROMPTS, 8, batch_size=2, fixed_steps=fixed_steps) == expected


def test_the_eos_cut_is_exercised(tiny):
    """A model whose only likely token is EOS: every answer is empty, with and without early stopping."""
    model, tok = tiny
    with torch.no_grad():
        saved = model.lm_head.weight[tok.eos_token_id].clone()
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight.abs().max() * 1e3
    try:
        assert greedy_answers(model, tok, PROMPTS, 5, batch_size=3) == [[], [], []]
        assert greedy_answers(model, tok, PROMPTS, 5, batch_size=3, fixed_steps=True) == [[], [], []]
    finally:
        with torch.no_grad():
            model.lm_head.weight[tok.eos_token_id] = saved


def test_metrics_on_hand_made_predictions():
    assert normalise("  Hello,   Ben.\n") == "hello, ben"
    assert normalise("3.5") == "3.5" and normalise("x..") == "x."
    rows = [  # exact, normalised only, neither, exact after strip
        {"exact": True, "normalised": True, "generated_tokens": 4},
        {"exact": False, "normalised": True, "generated_tokens": 6},
        {"exact": False, "normalised": False, "generated_tokens": 0},
        {"exact": True, "normalised": True, "generated_tokens": 2},
    ]
    m = metrics_from_sums(score(rows))
    assert m == {"exact_match": 0.5, "normalised_match": 0.75, "mean_generated_tokens": 3.0}
    assert metrics_from_sums(score(rows), ["exact_match"]) == {"exact_match": 0.5}


class _Scripted(torch.nn.Module):
    """Stands in for a model only where the metric is under test: generate returns fixed answers."""

    def __init__(self, tok, answers):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers = tok, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = [self.tok.encode(self.answers[self.tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)],
                                add_bos=False) + [self.tok.eos_token_id] for r, m in zip(input_ids, attention_mask)]
        width = max(map(len, rows))
        new = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_scores_split_across_ranks_sum_to_the_single_process_scores(tiny):
    _, tok = tiny
    refs = [Reference(f"f:{i}", [{"role": "user", "content": f"q{i}"}], ref)
            for i, ref in enumerate(["Hello Ben.", "4", "a b c", "yes", "no"])]
    answers = {"[INST] q0 [/INST]": "hello  ben", "[INST] q1 [/INST]": "4", "[INST] q2 [/INST]": "a b",
               "[INST] q3 [/INST]": "yes", "[INST] q4 [/INST]": "No."}
    model = _Scripted(tok, answers)
    one = evaluate_generation(model, tok, refs, 8, batch_size=2)
    assert [(r["exact"], r["normalised"]) for r in one] == [(False, True), (True, True), (False, False),
                                                            (True, True), (False, True)]
    assert metrics_from_sums(score(one))["exact_match"] == pytest.approx(2 / 5)
    parts = [evaluate_generation(model, tok, refs, 8, batch_size=2, rank=r, world=2) for r in range(2)]
    assert sorted(r["loc"] for p in parts for r in p) == sorted(r["loc"] for r in one)  # each sample once
    total = {k: sum(score(p)[k] for p in parts) for k in score(one)}
    assert total == score(one)


def test_generation_eval_writes_the_sample_table(tiny, tmp_path):
    model, tok = tiny
    refs = [Reference(f"f:{i}", p, "x") for i, p in enumerate(PROMPTS)]
    ev = GenerationEval(EvalSchema(enabled=True, max_new_tokens=4), refs, tok, tmp_path / "eval_samples.jsonl")
    before = ev.run_before(model)
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["reference"] == "x" for r in rows)
    assert [r["generated"] for r in rows] == [tok.decode(a, skip_special_tokens=True) for a in _plain_loop(model, tok, 4)]
    assert ev.before == before and ev.time_s > 0 and "before fine-tuning" in "\n".join(ev.report_lines())


def test_split_conversation_needs_a_reference():
    prompt, ref = split_conversation([{"role": "user", "content": "q", "weight": 1},
                                      {"role": "assistant", "content": "a", "weight": 1}])
    assert prompt == [{"role": "user", "content": "q"}] and ref == "a"
    with pytest.raises(ConfigError, match="ending with an assistant turn"):
        split_conversation([{"role": "user", "content": "q"}])


def test_eval_sets_without_references_are_refused(tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match="no reference answers"):
        load_references({"train_file": str(text), "validation_file": str(text), "format": "text"}, 4)
    chats = tmp_path / "c.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(10)))
    assert load_references({"train_file": str(chats), "format": "messages"}, 4) == []  # no validation split
    refs = load_references({"train_file": str(chats), "validation_file": str(chats), "format": "messages"}, 4)
    assert [(r.loc.endswith(f"c.jsonl:{i + 1}"), r.reference) for i, r in enumerate(refs)] == \
        [(True, f"a{i}") for i in range(4)]
    # a val_fraction hold-out: the same rows the datamodule validates on
    from mistral_ft.data.dataset import validation_rows

    held = load_references({"train_file": str(chats), "format": "messages", "val_fraction": 0.3}, 32)
    locs, rows, _ = validation_rows({"train_file": str(chats), "format": "messages", "val_fraction": 0.3})
    assert len(held) == 3 and [r.loc for r in held] == locs and [r.reference for r in held] == \
        [row["messages"][-1]["content"] for row in rows]


@pytest.mark.parametrize("override, message", [
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.metrics=[exact_match,bleu]", "unknown metric"),
    ("eval.num_samples=-1", "eval.num_samples"),
])
def test_bad_eval_config_exits_2_and_writes_nothing(tmp_path, capsys, override, message):
    from mistral_ft.train import main

    run_dir = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", override, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_eval_on_rows_without_references_exits_2_and_writes_nothing(tmp_path, capsys):
    from mistral_ft.train import main

    text = tmp_path / "plain.jsonl"
    text.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", "data.format=text", f"data.train_file={text}",
               f"data.validation_file={text}", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no reference answers" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_class_report_on_hand_made_predictions():
    """Confusion counts, per-class precision / recall (torchmetrics' confusion matrix), macro-F1 agreeing."""
    import torchmetrics

    from mistral_ft.training.tasks.classification import class_report

    preds = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])
    target = torch.tensor([0, 0, 1, 1, 1, 0, 2, -100])  # the last row is ignored, like a -100 label in training
    cm = torchmetrics.classification.MulticlassConfusionMatrix(num_classes=3, ignore_index=-100)(preds, target)
    rep = class_report(cm, ["a", "b", "c"])
    assert rep["confusion"] == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert rep["precision"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 1.0})
    assert rep["recall"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 1.0})
    never = class_report(torch.tensor([[1, 0], [1, 0]]), ["x", "y"])  # y never predicted: precision 0, not NaN
    assert never["precision"] == {"x": 0.5, "y": 0.0} and never["recall"] == {"x": 1.0, "y": 0.0}
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(rep["precision"].values(), rep["recall"].values())]
    macro = torchmetrics.classification.MulticlassF1Score(num_classes=3, average="macro", ignore_index=-100)(preds, target)
    assert sum(f1) / 3 == pytest.approx(float(macro))


_ROWS = [{"loc": "f:0", "prompt": [{"role": "user", "content": "Greet Ann."}], "reference": "Hello Ann, nice to meet you!",
          "generated": "Hello Ann, nice to meet you!", "exact": True, "normalised": True, "generated_tokens": 9},
         {"loc": "f:1", "prompt": [{"role": "user", "content": "Repeat after me: a | b"}], "reference": "a | b",
          "generated": "a b", "exact": False, "normalised": False, "generated_tokens": 2}]


def test_sample_table_goes_to_tensorboard_as_text(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mistral_ft.training.evaluation import log_sample_table

    tb = TensorBoardLogger(tmp_path, name="tb")
    log_sample_table([CSVLogger(tmp_path, name="csv"), tb], _ROWS, step=7)  # CSV: no table, no error
    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    [event] = acc.Tensors("eval_samples/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 7
    assert "| prompt | reference | generated | exact |" in text
    assert "| Greet Ann. | Hello Ann, nice to meet you! | Hello Ann, nice to meet you! | True |" in text
    assert "a \\| b" in text  # a cell's | is escaped, so the row keeps four columns


def test_sample_table_goes_to_wandb_as_a_table(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from mistral_ft.training.evaluation import log_sample_table

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    try:
        log_sample_table([logger], _ROWS, step=3)
    finally:
        logger.experiment.finish()
    [table_file] = list(tmp_path.rglob("eval_samples_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["prompt", "reference", "generated", "exact"]
    assert table["data"] == [["Greet Ann.", "Hello Ann, nice to meet you!", "Hello Ann, nice to meet you!", True],
                             ["Repeat after me: a | b", "a | b", "a b", False]]


def test_loss_curve_has_the_eval_score_axis_and_names_the_run(tmp_path):
    from mistral_ft.training.summary import plot_losses

    val = [{"step": 5, "val_loss": 2.0, "val_exact_match": 0.5}, {"step": 10, "val_loss": 1.0, "val_exact_match": 0.9}]
    drawn = plot_losses([(1, 3.0), (10, 1.0)], val, tmp_path / "c.png", title="run7 | recipe instruct_lora | lr 0.005",
                        before={"val_exact_match": 0.0})
    assert drawn == {"title": "run7 | recipe instruct_lora | lr 0.005", "score": "val_exact_match",
                     "legend": ["train loss (token-weighted)", "val loss", "val exact match"]}
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    drawn = plot_losses([(1, 3.0)], [{"step": 1, "val_loss": 2.0, "val_accuracy": 0.7}], tmp_path / "d.png")
    assert drawn["score"] == "val_accuracy" and drawn["legend"][-1] == "val accuracy"
