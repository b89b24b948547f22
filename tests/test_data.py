"""Packaged GLUE data and user files."""

import pytest

from prune_attattr.tasks import GLUE_TASKS, DataError, glue_path, make_dataloader, read_examples


def _read(task, split):
    spec = GLUE_TASKS[task]
    f = spec.train_file if split == "train" else spec.dev_file
    return read_examples(glue_path(f), text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column, labels=spec.labels)


@pytest.mark.parametrize(
    "task,split,rows",
    [("sst2", "train", 67349), ("sst2", "dev", 872), ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("rte", "train", 2490), ("rte", "dev", 277), ("mnli", "train", 21409), ("mnli", "dev", 9815)],
)
def test_glue_counts(task, split, rows):
    ex = _read(task, split)
    assert len(ex) == rows
    assert (ex.pairs is None) == (task == "sst2")
    assert set(ex.labels) == set(range(len(GLUE_TASKS[task].labels)))


def test_glue_label_counts():
    assert _read("sst2", "dev").labels.count(1) == 444
    assert _read("rte", "dev").labels.count(0) == 146  # entailment
    assert glue_path("PROVENANCE.md").is_file()


def test_custom_files_and_errors(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"good, really",pos\nbad,neg\n')
    ex = read_examples(f, text_column="text", label_column="label", labels=["neg", "pos"])
    assert ex.texts == ["good, really", "bad"] and ex.labels == [1, 0]
    j = tmp_path / "d.jsonl"
    j.write_text('{"a": "x", "b": "y", "y": 2}\n')
    assert read_examples(j, text_column="a", text_pair_column="b", label_column="y", labels=["0", "1", "2"]).labels == [2]
    with pytest.raises(DataError, match="row 3 has label 'neg'"):
        read_examples(f, text_column="text", label_column="label", labels=["pos"])
    with pytest.raises(DataError, match="no column 'txt'"):
        read_examples(f, text_column="txt", label_column="label", labels=["neg", "pos"])
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.tsv", text_column="t", label_column="l", labels=["0"])


def test_dataloader_pads_little():
    from prune_attattr.tasks import Encoded

    data = Encoded([[1] * n for n in (3, 9, 4, 8, 5, 7)], None, [0, 1, 0, 1, 0, 1])
    batches = list(make_dataloader(data, batch_size=2, pad_id=0))
    assert [b["input_ids"].shape[1] for b in batches] == [4, 7, 9]
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 36
    shuffled = list(make_dataloader(data, batch_size=2, pad_id=0, shuffle=True, seed=1))
    assert sorted(int(x) for b in shuffled for x in b["attention_mask"].sum(1)) == [3, 4, 5, 7, 8, 9]
