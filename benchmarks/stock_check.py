"""A finished SST-2 run's export used as a user would, in a Python where prune_attattr cannot be imported.

Stock ``pipeline("text-classification", trust_remote_code=True)`` on ``<run>/model`` and ONNX Runtime on
``<run>/onnx/model.onnx`` with the folder's tokenizer: labels of six sentences no test uses, whether the
session's optimized graph runs ``SkipLayerNormalization``, dev predictions at batch 1 against batch 16, and
both accuracies on the SST-2 dev file.

Run (without PYTHONPATH; a minute):
    python benchmarks/stock_check.py exported/sst2-minilm ../shared/data/glue/SST-2/dev.tsv
"""
import csv
import importlib.abc
import sys
import tempfile
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "prune_attattr":
            raise ImportError("prune_attattr blocked")
sys.meta_path.insert(0, Block())
import numpy as np, onnx, onnxruntime as ort
from transformers import AutoTokenizer, pipeline
run, dev_file = sys.argv[1], sys.argv[2]
opt = tempfile.mkdtemp() + "/optimized.onnx"
texts = ["a gripping, funny and moving film", "a dull, lifeless mess", "the plot never quite comes together, but the cast is a joy",
         "I wanted to like it.", "nothing about this works", "an unexpectedly tender portrait of two brothers"]
dev = [r["sentence"] for r in csv.DictReader(open(dev_file), delimiter="\t", quoting=csv.QUOTE_NONE)]
clf = pipeline("text-classification", model=f"{run}/model", trust_remote_code=True)
print("pipeline:", [(t[:30], r["label"], round(r["score"], 3)) for t, r in zip(texts, clf(texts))])
tok = AutoTokenizer.from_pretrained(f"{run}/onnx")
so = ort.SessionOptions(); so.optimized_model_filepath = opt; so.log_severity_level = 3
s = ort.InferenceSession(f"{run}/onnx/model.onnx", so, providers=["CPUExecutionProvider"])
ops = {n.op_type for n in onnx.load(opt).graph.node}
print("session runs SkipLayerNormalization:", "SkipLayerNormalization" in ops, "| LayerNormalization:", "LayerNormalization" in ops)
names = [i.name for i in s.get_inputs()]
def logits(batch):
    enc = tok(batch, padding=True, truncation=True, max_length=64, return_tensors="np")
    return s.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0]
one = np.concatenate([logits([t]) for t in dev])
six = np.concatenate([logits(dev[i:i + 16]) for i in range(0, len(dev), 16)])
print("onnx labels on the 6:", logits(texts).argmax(1).tolist())
print("dev predictions differing batch 1 vs 16:", int((one.argmax(1) != six.argmax(1)).sum()), "of", len(dev), "| max |logit diff|", float(np.abs(one - six).max()))
pipe = clf(dev, batch_size=16)
lab = {v: k for k, v in clf.model.config.id2label.items()}
pt = np.array([lab[r["label"]] for r in pipe])
gold = np.array([int(r["label"]) for r in csv.DictReader(open(dev_file), delimiter="\t", quoting=csv.QUOTE_NONE)])
print("dev accuracy: onnx int8 %.2f%%, stock pipeline (PyTorch float32) %.2f%%; onnx vs pipeline agree %.1f%%" % (100 * (one.argmax(1) == gold).mean(), 100 * (pt == gold).mean(), 100 * (one.argmax(1) == pt).mean()))
