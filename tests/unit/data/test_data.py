"""Data pipeline: real files in tmp dirs, loaded through `datasets`, tokenized with the real tokenizer."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import datasets
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mistral_ft.data import (
    IGNORE_INDEX,
    PAD_DOCUMENT_ID,
    Collator,
    DataError,
    MistralDataModule,
    ResumableDataLoader,
    ResumableSampler,
    build_datasets,
    pack_examples,
)
from mistral_ft.data.loading import PROJECT_ROOT
from mistral_ft.tokenizer import MistralTokenizer
from helpers.data import datasets_cache_in_tmp, tok  # noqa: F401 (fixtures)

BOS, EOS = 1, 2


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def sp(tok: MistralTokenizer, text: str) -> list[int]:
    """sentencepiece on one piece alone (no BOS / EOS), as the v1 rule in DESIGN.md says."""
    return tok.encode(text, add_bos=False, add_eos=False)


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# ----------------------------------------------------------------------------- formats


def test_text_format_every_token_after_bos_is_a_target(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world"}, {"text": "The cat sat."}])
    train, val, info = build_datasets({"train_file": str(f), "format": "text"}, tok)
    ex = train[0]
    assert ex["input_ids"] == [BOS] + sp(tok, "Hello world") + [EOS]
    assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]
    assert val is None and info.train_examples == 2 and info.task == "causal_lm"
    assert info.train_target_tokens == info.train_tokens - 2


def test_alpaca_masks_prompt_and_trains_output_and_eos(tmp_path, tok):
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "hi there"},  # optional input missing
            {"instruction": "Say bye.", "input": "", "output": "bye"},
        ],
    )
    train, _, _ = build_datasets({"train_file": str(f), "format": "alpaca"}, tok)
    prompt = [BOS] + sp(tok, "[INST] Add the numbers.\n\n2 and 3 [/INST]")
    answer = sp(tok, "5") + [EOS]
    assert train[0]["input_ids"] == prompt + answer
    assert train[0]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert train[1]["input_ids"] == [BOS] + sp(tok, "[INST] Say hi. [/INST]") + sp(tok, "hi there") + [EOS]
    assert train[2]["input_ids"][: len(sp(tok, "[INST] Say bye. [/INST]")) + 1] == [BOS] + sp(tok, "[INST] Say bye. [/INST]")


def test_messages_system_weight_and_multi_turn(tmp_path, tok):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    }
    f = write_jsonl(tmp_path / "m.jsonl", [row, chat("Q", "A")])
    train, _, _ = build_datasets({"train_file": str(f), "format": "messages"}, tok)
    u1 = [BOS] + sp(tok, "[INST] Be brief.\n\nHi [/INST]")
    a1 = sp(tok, "Hello") + [EOS]
    u2 = sp(tok, "[INST] Bye [/INST]")
    a2 = sp(tok, "Goodbye") + [EOS]
    assert train[0]["input_ids"] == u1 + a1 + u2 + a2
    assert train[0]["labels"] == [IGNORE_INDEX] * (len(u1) + len(a1) + len(u2)) + a2


def test_classification_label_map_sorted_from_train_and_saved(tmp_path, tok):
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": f"t{i}", "label": l} for i, l in enumerate(["pos", "neg", "mid", "pos"])])
    va = write_jsonl(tmp_path / "va.jsonl", [{"text": "v", "label": "neg"}])
    train, val, info = build_datasets(
        {"train_file": str(tr), "validation_file": str(va), "format": "classification"}, tok
    )
    assert info.id2label == {0: "mid", 1: "neg", 2: "pos"} and info.num_labels == 3
    assert [train[i]["label"] for i in range(4)] == [2, 1, 0, 2] and val[0]["label"] == 1
    assert train[0]["input_ids"] == [BOS] + sp(tok, "t0")  # BOS, no EOS: the head pools the last token
    info.save(tmp_path / "info.json")
    assert json.loads((tmp_path / "info.json").read_text())["id2label"] == {"0": "mid", "1": "neg", "2": "pos"}
    assert info.label2id == {"mid": 0, "neg": 1, "pos": 2}


def test_classification_given_labels_and_int_ids(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "b"}, {"text": "b", "label": "a"}])
    _, _, info = build_datasets({"train_file": str(f), "format": "classification", "labels": ["b", "a"]}, tok)
    assert info.id2label == {0: "b", 1: "a"}
    g = write_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    train, _, info = build_datasets({"train_file": str(g), "format": "classification"}, tok)
    assert info.id2label == {0: "0", 1: "1", 2: "2"} and train[0]["label"] == 2


def test_csv_regression_and_custom_fields(tmp_path, tok):
    f = write_csv(tmp_path / "r.csv", ["sentence", "score"], [["good film", "4.5"], ["007 is back", "3"]])
    train, _, info = build_datasets(
        {"train_file": str(f), "format": "regression", "text_field": "sentence", "label_field": "score"}, tok
    )
    assert info.num_labels == 1 and info.id2label is None
    assert train[0]["label"] == 4.5 and train[1]["label"] == 3.0
    # CSV cells stay strings: "007" is text, not the number 7
    assert train[1]["input_ids"] == [BOS] + sp(tok, "007 is back")


def test_csv_classification_and_messages_cell(tmp_path, tok):
    f = write_csv(tmp_path / "c.csv", ["text", "label"], [["x", "1"], ["y", "0"]])
    train, _, info = build_datasets({"train_file": str(f), "format": "classification"}, tok)
    assert info.id2label == {0: "0", 1: "1"} and train[0]["label"] == 1
    m = write_csv(tmp_path / "m.csv", ["messages"], [[json.dumps(chat("Q", "A")["messages"])]])
    train, _, _ = build_datasets({"train_file": str(m), "format": "messages"}, tok)
    assert train[0]["input_ids"][-1] == EOS


def test_parquet_and_json_array(tmp_path, tok):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["Do it.", "Again."], "output": ["done", "ok"]}), p)
    train, _, _ = build_datasets({"train_file": str(p), "format": "alpaca"}, tok)
    assert len(train) == 2 and train[1]["input_ids"][-1] == EOS
    j = tmp_path / "arr.json"
    j.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    train, _, _ = build_datasets({"train_file": str(j), "format": "text"}, tok)
    assert train[1]["input_ids"] == [BOS] + sp(tok, "two") + [EOS]


# ----------------------------------------------------------------------------- bad input


BAD_JSONL = [
    ("malformed", "messages", [chat("a", "b"), '{"messages": [', chat("c", "d")], ":2: malformed JSON"),
    ("missing", "alpaca", [{"instruction": "i", "output": "o"}, {"instruction": "i"}], ":2: field 'output': missing"),
    ("wrong type", "text", [{"text": "ok"}, {"text": "ok"}, {"text": 5}], ":3: field 'text': expected a string"),
    ("unknown role", "messages", [{"messages": [{"role": "bot", "content": "x"}]}], ":1: field 'messages[0].role': unknown role 'bot'"),
    ("empty text", "messages", [chat("q", "  ")], ":1: field 'messages[1].content': empty text"),
    ("alternation", "messages", [{"messages": [{"role": "assistant", "content": "x"}]}], ":1: field 'messages[0].role': expected 'user'"),
    ("weight", "messages", [{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}], ":1: field 'messages[0].weight': only allowed on assistant"),
    ("bool label", "classification", [{"text": "t", "label": True}], ":1: field 'label': expected a label name"),
    ("mixed labels", "classification", [{"text": "t", "label": "a"}, {"text": "t", "label": 1}], ":2: field 'label': int label"),
    ("not an object", "text", ["[1, 2]"], ":1: field '<row>': expected a JSON object"),
    ("duplicate key", "text", [{"text": "ok"}, '{"text": "a", "text": "b"}'], ":2: duplicate key 'text'"),
    ("too deep", "text", [{"text": "ok"}, '{"text": ' + "[" * 100000 + "]" * 100000 + "}"], ":2: malformed JSON: nested deeper"),
]


@pytest.mark.parametrize("name,fmt,rows,expected", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_bad_rows_name_file_line_and_field(tmp_path, tok, name, fmt, rows, expected):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": str(f), "format": fmt}, tok)
    assert f"{f}{expected}" in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_file_and_missing_file(tmp_path, tok):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        build_datasets({"train_file": str(empty), "format": "text"}, tok)
    blank = write_jsonl(tmp_path / "b.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"b\.jsonl: empty file"):
        build_datasets({"train_file": str(blank), "format": "text"}, tok)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        build_datasets({"train_file": str(tmp_path / "nope.jsonl"), "format": "text"}, tok)


def test_label_errors_in_validation_file(tmp_path, tok):
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    va = write_jsonl(tmp_path / "va.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=rf"{va}:2: field 'label': unknown label name 'z'"):
        build_datasets({"train_file": str(tr), "validation_file": str(va), "format": "classification"}, tok)
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    with pytest.raises(DataError, match=rf"{ids}:2: field 'label': label id 3 out of range \[0, 2\)"):
        build_datasets({"train_file": str(ids), "format": "classification", "labels": ["x", "y"]}, tok)


def test_csv_and_parquet_errors_name_rows(tmp_path, tok):
    f = write_csv(tmp_path / "bad.csv", ["text", "label"], [["a", "1.5"], ["b", "oops"]])
    with pytest.raises(DataError, match=rf"{f}:row 2: field 'label': expected a number, got 'oops'"):
        build_datasets({"train_file": str(f), "format": "regression"}, tok)
    g = write_csv(tmp_path / "cols.csv", ["sentence"], [["a"]])
    with pytest.raises(DataError, match=rf"{g}:row 1: field 'text': missing \(fields present: sentence\)"):
        build_datasets({"train_file": str(g), "format": "text"}, tok)
    cells = tmp_path / "cells.csv"
    cells.write_text("text,label\nok,1\nx,2,3\n")
    with pytest.raises(DataError, match=rf"{cells}:row 2: malformed CSV: 3 cells, header has 2"):
        build_datasets({"train_file": str(cells), "format": "classification"}, tok)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\nok,1\ncaf\xe9,2\n")
    with pytest.raises(DataError, match=rf"{latin}:3: not UTF-8 text"):
        build_datasets({"train_file": str(latin), "format": "classification"}, tok)
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["fine", ""]}), p)
    with pytest.raises(DataError, match=rf"{p}:row 2: field 'text': empty text"):
        build_datasets({"train_file": str(p), "format": "text"}, tok)


def test_skip_invalid_counts_and_loads_the_rest(tmp_path, tok):
    rows = [chat("a", "b"), "{not json", {"messages": []}, chat("c", "d"), {"other": 1}]
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    train, _, info = build_datasets({"train_file": str(f), "format": "messages", "skip_invalid": True}, tok)
    assert len(train) == 2 and info.skipped == {"train": 3, "validation": 0}
    g = write_jsonl(tmp_path / "all_bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no valid rows"):
        build_datasets({"train_file": str(g), "format": "messages", "skip_invalid": True}, tok)


def test_truncation_counts_and_fully_masked_rows(tmp_path, tok):
    long_prompt = " ".join(["word"] * 50)
    f = write_jsonl(tmp_path / "t.jsonl", [chat("hi", "a long answer " * 10), chat(long_prompt, "ok")])
    with pytest.raises(DataError, match=rf"{f}:2: every target token was cut by truncation to max_length=16"):
        build_datasets({"train_file": str(f), "format": "messages", "max_length": 16}, tok)
    train, _, info = build_datasets(
        {"train_file": str(f), "format": "messages", "max_length": 16, "skip_invalid": True}, tok
    )
    assert len(train) == 1 and len(train[0]["input_ids"]) == 16
    assert info.truncated["train"] == 2 and info.skipped["train"] == 1


def test_config_errors(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"unknown key\(s\) \['max_lenght'\]"):
        build_datasets({"train_file": str(f), "format": "text", "max_lenght": 8}, tok)
    with pytest.raises(DataError, match="field 'format'"):
        build_datasets({"train_file": str(f), "format": "chat"}, tok)
    with pytest.raises(DataError, match="does not fit task"):
        MistralDataModule({"train_file": str(f), "format": "text"}, tok, "classification", 2)


def test_hub_name_offline_says_to_use_a_local_file(monkeypatch, tok):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="not a local file.*point the data config at a local"):
        build_datasets({"train_file": "someone/some_dataset", "format": "text"}, tok)


# ----------------------------------------------------------------------------- split, pack, collate


def test_val_fraction_is_seeded_and_disjoint(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)])
    cfg = {"train_file": str(f), "format": "text", "val_fraction": 0.25, "seed": 3}
    a_train, a_val, info = build_datasets(cfg, tok)
    b_train, b_val, _ = build_datasets(cfg, tok)
    assert (info.train_examples, info.val_examples) == (15, 5)
    val_ids = {tuple(a_val[i]["input_ids"]) for i in range(len(a_val))}
    train_ids = {tuple(a_train[i]["input_ids"]) for i in range(len(a_train))}
    assert not val_ids & train_ids
    assert [b_val[i]["input_ids"] for i in range(5)] == [a_val[i]["input_ids"] for i in range(5)]


def test_packing_boundaries_positions_documents_and_first_token(tmp_path, tok):
    rows = [chat(f"q{i}", f"answer {i}") for i in range(12)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    plain, _, _ = build_datasets({"train_file": str(f), "format": "messages"}, tok)
    packed, _, info = build_datasets({"train_file": str(f), "format": "messages", "pack": True, "max_length": 40}, tok)
    assert info.packed and info.train_rows == len(packed) < info.train_examples == 12
    originals = {tuple(plain[i]["input_ids"]): plain[i]["labels"] for i in range(12)}
    seen = 0
    for r in range(len(packed)):
        row = packed[r]
        assert len(row["input_ids"]) <= 40
        docs = row["document_ids"]
        assert docs[0] == 0 and all(b - a in (0, 1) for a, b in zip(docs, docs[1:]))
        for d in sorted(set(docs)):
            idx = [i for i, x in enumerate(docs) if x == d]
            ids = [row["input_ids"][i] for i in idx]
            labels = [row["labels"][i] for i in idx]
            assert [row["position_ids"][i] for i in idx] == list(range(len(idx)))
            assert ids[0] == BOS and labels[0] == IGNORE_INDEX  # the shift never crosses a boundary
            assert originals[tuple(ids)] == labels
            seen += 1
    assert seen == 12
    batch = Collator()([packed[i] for i in range(len(packed))])
    pad = batch["attention_mask"] == 0
    assert (batch["document_ids"][pad] == PAD_DOCUMENT_ID).all() and (batch["labels"][pad] == IGNORE_INDEX).all()


def test_pack_examples_rejects_a_target_first_token():
    rows = pack_examples([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7]), ([1, 8, 9], [-100, 8, 9])], 5)
    assert [r["input_ids"] for r in rows] == [[1, 5, 6, 1, 7], [1, 8, 9]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1] and rows[0]["document_ids"] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="first token is a target"):
        pack_examples([([1, 5], [-100, 5]), ([7, 8], [7, 8])], 8)


def test_collator_right_pads_and_rounds_length():
    feats = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    b = Collator(pad_token_id=0, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[1, 5, 6, 0], [1, 7, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6, -100], [-100, 7, -100, -100]]
    assert "document_ids" not in b
    c = Collator()([{"input_ids": [1, 5], "label": 2}, {"input_ids": [1], "label": 0}])
    assert c["labels"].tolist() == [2, 0] and c["labels"].dtype == torch.long
    r = Collator()([{"input_ids": [1, 5], "label": 0.5}])
    assert r["labels"].dtype == torch.float32


# ----------------------------------------------------------------------------- sampling and resume


class _Lengths(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_sampler_state_restores_position():
    ds = _Lengths(10)
    dl = ResumableDataLoader(ds, batch_size=2, sampler=ResumableSampler(ds, seed=7))
    full = [b.tolist() for b in dl]
    it = iter(dl)
    [next(it) for _ in range(3)]
    state = dl.state_dict()
    assert state["samples"] == 6 and state["epoch"] == 0
    fresh = ResumableDataLoader(ds, batch_size=2, sampler=ResumableSampler(ds, seed=7))
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[3:]
    assert [b.tolist() for b in fresh] == full  # the skip applies once; the next pass is a whole epoch
    fresh.sampler.set_epoch(1)
    assert [b.tolist() for b in fresh] != full  # a new epoch reshuffles
    with pytest.raises(ValueError, match="seed"):
        ResumableDataLoader(ds, batch_size=2, sampler=ResumableSampler(ds, seed=8)).load_state_dict(state)


def test_sampler_shards_ranks_and_groups_lengths():
    ds = _Lengths(11)
    shards = [list(ResumableSampler(ds, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6 and set(shards[0]) | set(shards[1]) == set(range(11))
    lengths = [(i * 37) % 100 for i in range(200)]
    ds = _Lengths(200)
    grouped = list(ResumableSampler(ds, seed=1, lengths=lengths, batch_size=4, megabatch_mult=5))
    plain = list(ResumableSampler(ds, seed=1))
    assert sorted(grouped) == list(range(200))

    def padding(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[k : k + 4]) * 4 - sum(lengths[i] for i in order[k : k + 4]) for k in range(0, 200, 4))

    assert padding(grouped) < padding(plain) / 3


class _Recorder(L.LightningModule):
    """Records the first example of each training batch; the parameter only exists for the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][0].tolist())
        return (self.w * batch["attention_mask"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_mid_epoch_continues_with_the_next_batch(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"example number {i}"} for i in range(20)])
    cfg = {"train_file": str(f), "format": "text", "group_by_length": True}

    def fit(ckpt=None, callbacks=()):
        dm = MistralDataModule(cfg, tok, "causal_lm", batch_size=2)
        module = _Recorder()
        trainer = L.Trainer(
            max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tmp_path,
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return module.seen

    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    full = fit(callbacks=[ckpt_cb])
    assert len(full) == 10
    resumed = fit(ckpt=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    assert resumed == full[3:]


# ----------------------------------------------------------------------------- bundled data


def _make_data_module():
    spec = importlib.util.spec_from_file_location("make_data", PROJECT_ROOT / "scripts" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundled_data_is_fresh_and_loads(tok):
    make_data = _make_data_module()
    for name, text in make_data.build().items():
        path = PROJECT_ROOT / "data" / name
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python scripts/make_data.py"
    total = sum((PROJECT_ROOT / "data" / n).stat().st_size for n in make_data.build())
    assert total < 1_000_000
    _, val, info = build_datasets(
        {"train_file": "data/instruct_train.jsonl", "validation_file": "data/instruct_val.jsonl", "format": "messages", "max_length": 128},
        tok,
    )
    assert info.train_examples == 400 and info.val_examples == 60 and info.skipped["train"] == info.truncated["train"] == 0
    _, _, info = build_datasets(
        {"train_file": "data/classify_train.jsonl", "validation_file": "data/classify_val.jsonl", "format": "classification"},
        tok,
    )
    assert info.id2label == {0: "food", 1: "sports", 2: "weather"} and info.val_examples == 60


def test_datamodule_from_hydra_config_classification_batch(tmp_path, tok):
    from omegaconf import OmegaConf

    f = write_jsonl(tmp_path / "c.jsonl", [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(6)])
    cfg = OmegaConf.create({"_target_": "ignored", "train_file": str(f), "format": "classification", "labels": ["b", "a"], "val_fraction": 0.34})
    dm = MistralDataModule(cfg, tok, "classification", batch_size=4)
    dm.setup()
    assert dm.info.id2label == {0: "b", 1: "a"} and (dm.info.train_examples, dm.info.val_examples) == (4, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[0] == 4
    assert len(next(iter(dm.val_dataloader()))["labels"]) == 2
    state = dm.state_dict()  # what Lightning stores in the checkpoint
    assert state["data_info"]["id2label"] == {"0": "b", "1": "a"}
    dm.load_state_dict(state)
    with pytest.raises(DataError, match="checkpoint was trained with labels"):
        dm.load_state_dict({"data_info": {"id2label": {"0": "a", "1": "b"}}})


def test_json_array_error_has_the_line(tmp_path, tok):
    f = tmp_path / "arr.json"
    f.write_text('[\n  {"text": "a"},\n  {"text": ""}\n]\n')
    with pytest.raises(DataError, match=rf"{f}:3: field 'text': empty text"):
        build_datasets({"train_file": str(f), "format": "text"}, tok)
    f.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    with pytest.raises(DataError, match=rf"{f}:3: malformed JSON"):
        build_datasets({"train_file": str(f), "format": "text"}, tok)


def test_best_fit_packing_keeps_every_example_and_fills_rows():
    import random as _random

    rnd = _random.Random(0)
    lengths = [min(512, max(4, int(rnd.lognormvariate(4.5, 0.9)))) for _ in range(400)]
    examples = [([1] + [7 + i % 50] * (n - 1), [-100] + [7 + i % 50] * (n - 1)) for i, n in enumerate(lengths)]
    greedy = pack_examples(examples, 512)
    best = pack_examples(examples, 512, strategy="best_fit")
    assert len(best) < len(greedy)
    total = sum(lengths)
    assert total / (512 * len(best)) > 0.95 > total / (512 * len(greedy))
    assert all(len(r["input_ids"]) <= 512 for r in best)
    seen = sorted(len(r["document_ids"]) for r in best)
    assert sum(seen) == total
    # every example exactly once, whole: split each row back into its documents
    docs = sorted(tuple(row["input_ids"][j] for j in range(len(row["input_ids"])) if row["document_ids"][j] == d)
                  for row in best for d in set(row["document_ids"]))
    assert docs == sorted(tuple(e[0]) for e in examples)
    for row in best:  # positions restart per document, first token of each document is not a target
        for j, d in enumerate(row["document_ids"]):
            if j == 0 or row["document_ids"][j - 1] != d:
                assert row["position_ids"][j] == 0 and row["labels"][j] == -100
    with pytest.raises(ValueError, match="pack strategy"):
        pack_examples(examples, 512, strategy="tight")
