"""Issue 17: inputs that used to crash mid fine-tuning are one line found right after loading, and a model
at chance is said so loudly and never exported by the ``export.max_drop`` rule."""

import json
import shutil
import random

import pytest
import torch
from conftest import WORDS, save_tiny_classifier, tiny_config, tiny_model

from prune_attattr.checks import chance_level, check_max_length, export_refusal, position_limit
from prune_attattr.cli import main
from prune_attattr.config import load_recipe
from prune_attattr.errors import RunError
from prune_attattr.models import forward_logits

# --- chance level: a pure function ------------------------------------------------------------------


def test_chance_level_accuracy_binomial_margin():
    """SST-2 dev's class counts (428 / 444): majority 50.9%, 2 binomial standard errors = 3.4 points."""
    labels = [0] * 428 + [1] * 444
    c = chance_level("accuracy", 0.495, labels, ["negative", "positive"])
    p = 444 / 872
    assert c["trivial"] == pytest.approx(p) and c["margin"] == pytest.approx(2 * (p * (1 - p) / 872) ** 0.5)
    assert c["threshold"] == pytest.approx(0.5431, abs=1e-4) and c["trivial_prediction"] == "always 'positive'"
    assert c["at_chance"] and c["examples"] == 872
    assert chance_level("accuracy", 0.543, labels)["at_chance"]
    assert not chance_level("accuracy", 0.60, labels)["at_chance"]
    # MRPC dev (129 / 279): the DeBERTa at the majority class, 68.5%, is at chance
    mrpc = [0] * 129 + [1] * 279
    assert chance_level("accuracy", 0.685, mrpc)["at_chance"] and not chance_level("accuracy", 0.80, mrpc)["at_chance"]
    # the margin shrinks as 1/sqrt(n): 16 examples cannot tell 70% from chance, 1,600 can
    assert chance_level("accuracy", 0.70, [0, 1] * 8)["at_chance"]
    assert not chance_level("accuracy", 0.70, [0, 1] * 800)["at_chance"]


def test_chance_level_f1_and_unknown_metric():
    """F1 of class 1: always predicting 1 scores 2q/(1+q) (q = share of class 1), which the model must clear."""
    mrpc = [0] * 129 + [1] * 279
    q = 279 / 408
    c = chance_level("f1", 0.81, mrpc)
    assert c["trivial"] == pytest.approx(2 * q / (1 + q)) and c["at_chance"]
    assert not chance_level("f1", 0.90, mrpc)["at_chance"]
    # a minority positive class: predicting it always still scores F1 > 0, the majority class scores 0
    assert chance_level("f1", 0.0, [0] * 90 + [1] * 10)["trivial"] == pytest.approx(2 * 0.1 / 1.1)
    assert chance_level("pearson", 0.5, [0, 1]) is None and chance_level("accuracy", 0.5, []) is None


def test_export_rule_refuses_at_chance_only_for_max_drop():
    at = chance_level("accuracy", 0.5, [0, 1] * 20)
    learned = chance_level("accuracy", 0.95, [0, 1] * 20)
    why = export_refusal(load_recipe(None, ["export.max_drop=0.02"]), at)
    assert "export.max_drop has nothing to choose from, so nothing is exported" in why and "export.heads" in why
    assert "\n" not in why and "accuracy 50.0%" in why
    assert export_refusal(load_recipe(None, ["export.heads=10"]), at) is None  # an explicit count still exports
    assert export_refusal(load_recipe(None, ["export.enabled=false"]), at) is None
    assert export_refusal(load_recipe(None, []), learned) is None
    assert export_refusal(load_recipe(None, []), None) is None


# --- position limits, read from each family's model ---------------------------------------------


@pytest.mark.parametrize(
    "kind,limit",
    [("bert", 64), ("electra", 64), ("distilbert", 64), ("roberta", 62), ("xlm-roberta", 62), ("deberta-v2-separate", 64),
     ("deberta-v2", None), ("modernbert", None)],
)
def test_position_limit_is_what_the_model_can_run(kind, limit):
    """The limit is the longest input the model runs: one token more fails (RoBERTa-like models number
    positions from padding_idx + 1); relative (DeBERTa-v3) and rotary (ModernBERT) models have none."""
    model = tiny_model(kind)
    found = position_limit(model)

    def runs(n):
        ids = torch.randint(5, 100, (1, n))
        try:
            forward_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            return True
        except (RuntimeError, IndexError):
            return False

    if limit is None:
        assert found is None and runs(150)
        return
    assert found[0] == limit
    assert runs(limit) and not runs(limit + 1)


def test_check_max_length_names_key_and_limit():
    model = tiny_model("roberta")
    check_max_length(62, model, None, "m")
    with pytest.raises(RunError) as err:
        check_max_length(200, model, None, "m")
    assert str(err.value) == (
        "model.max_length 200 exceeds the 62 positions of the model in m (max_position_embeddings 64 minus 2 rows before "
        "the first position (padding_idx 1)); set model.max_length to at most 62"
    )


# --- the three crashes, through the CLI ----------------------------------------------------------


def _data(tmp_path, words_per_text=8, n=40):
    rng = random.Random(0)
    for name in ("train", "dev"):
        rows = "".join(f"{' '.join(rng.choice(WORDS) for _ in range(words_per_text))},{'pos' if i % 2 else 'neg'}\n" for i in range(n))
        (tmp_path / f"{name}.csv").write_text("text,label\n" + rows)


def _recipe(tmp_path, model, *, max_length=32, finetune=True, export="{method: random, heads: 6, onnx: false}"):
    return (
        f"run_name: r\noutput_dir: {tmp_path / 'out'}\nmodel: {{path: {model}, max_length: {max_length}}}\n"
        "data: {task: custom, train_file: train.csv, dev_file: dev.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
        f"finetune: {{enabled: {str(finetune).lower()}, batch_size: 8, cache_dir: {tmp_path / 'cache'}}}\n"
        "importance: {methods: [random], examples: 8, source: dev, batch_size: 8}\n"
        "pruning: {step_fraction: 0.5, eval_batch_size: 16}\n"
        f"export: {export}\nruntime: {{cpu: true, threads: 1}}\n"
    )


def _cli(tmp_path, monkeypatch, capsys, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    capsys.readouterr()  # what building the model folder printed
    code = main([str(tmp_path / "r.yaml")])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _big_tokenizer(n: int):
    """A word-level tokenizer of ``n`` tokens (ids 0..n-1), BERT's special tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + [f"w{i}" for i in range(n - len(specials) - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _one_line_exit_2(code, out, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert "== fine-tune" not in out and "== tokenize" not in out  # found right after loading


def test_tokenizer_larger_than_embedding_table(tmp_path, monkeypatch, capsys):
    """A 3,000-token tokenizer beside a model saved with vocab_size 5: was IndexError mid fine-tuning."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("bert", labels=2)
    config.vocab_size = 5
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "m")
    tok = _big_tokenizer(3000)
    assert len(tok) == 3000
    tok.save_pretrained(tmp_path / "m")
    _data(tmp_path)
    code, out, err = _cli(tmp_path, monkeypatch, capsys, _recipe(tmp_path, tmp_path / "m"))
    _one_line_exit_2(code, out, err, f"model folder {tmp_path / 'm'}: the tokenizer has 3000 tokens (ids up to 2999)",
                     "embedding table has 5 rows (config.json vocab_size 5)", "resize_token_embeddings")


def test_max_length_above_positions(tmp_path, monkeypatch, capsys):
    """model.max_length 200 against a RoBERTa with 64 position rows (62 positions) and texts longer than
    that: was RuntimeError index out of bounds mid fine-tuning."""
    save_tiny_classifier("roberta", tmp_path / "m")
    _data(tmp_path, words_per_text=150)
    code, out, err = _cli(tmp_path, monkeypatch, capsys, _recipe(tmp_path, tmp_path / "m", max_length=200))
    _one_line_exit_2(code, out, err, "model.max_length 200 exceeds the 62 positions", "set model.max_length to at most 62")


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_model_folder_without_tokenizer_files(kind, tmp_path, monkeypatch, capsys):
    """Was "text ... tokenizes to nothing (special tokens only)" (bert) or a ValueError (modernbert)."""
    tiny_model(kind, labels=2).save_pretrained(tmp_path / "m")
    _data(tmp_path)
    code, out, err = _cli(tmp_path, monkeypatch, capsys, _recipe(tmp_path, tmp_path / "m"))
    _one_line_exit_2(code, out, err, f"model folder {tmp_path / 'm'} has no tokenizer files (it holds config.json, model.safetensors)",
                     "tokenizer.save_pretrained")
    assert "tokenizes to nothing (special tokens only)" not in err


# --- a model at chance, through the CLI -----------------------------------------------------------


def test_model_at_chance_is_not_exported_by_max_drop(tmp_path, monkeypatch, capsys):
    """A tiny random classifier (no fine-tuning) stays at chance on 40 balanced dev rows: export.max_drop
    stops right after the unpruned evaluation with one line and a report without export that says so;
    export.heads still exports, and the console, report.md and report.json say the model is at chance."""
    save_tiny_classifier("bert", tmp_path / "m", id2label={0: "neg", 1: "pos"})
    _data(tmp_path)
    text = _recipe(tmp_path, tmp_path / "m", finetune=False, export="{method: random, max_drop: 0.05, onnx: false}")
    code, out, err = _cli(tmp_path, monkeypatch, capsys, text)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the unpruned model is at chance: accuracy" in err and "export.max_drop has nothing to choose from" in err
    assert "== evaluate unpruned" in out and "== importance" not in out
    folder = tmp_path / "out" / "r"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r"] and not (folder / "model").exists()
    refused = json.loads((folder / "report.json").read_text())
    assert refused["export"] is None and "nothing to choose from" in refused["export_refused"]
    assert refused["warnings"][0].startswith("WARNING: the unpruned model is at chance")
    assert "> **WARNING: the unpruned model is at chance" in (folder / "report.md").read_text()

    text = _recipe(tmp_path, tmp_path / "m", finetune=False)  # export.heads 6
    shutil.rmtree(folder)  # the refused run's report
    code, out, err = _cli(tmp_path, monkeypatch, capsys, text)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "r" / "report.json").read_text())
    chance = report["chance"]
    assert chance["at_chance"] and chance["score"] == report["baseline"]["accuracy"] and chance["examples"] == 40
    assert report["warnings"] and report["warnings"][0].startswith("WARNING: the unpruned model is at chance")
    assert report["export"]["heads_kept"] == 6
    assert "> **WARNING: the unpruned model is at chance" in (tmp_path / "out" / "r" / "report.md").read_text()
    assert out.count("WARNING: the unpruned model is at chance") == 2  # after the evaluation and at the end
