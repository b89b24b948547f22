"""Binary F1 (positive class 1) as a local `evaluate` metric module, as GLUE reports for MRPC."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 of the positive class (label 1): 2 * precision * recall / (precision + recall), in [0, 1]."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class indices (0 or 1).
    references (list of int): gold class indices (0 or 1).
Returns:
    f1 (float): in [0, 1]; 0 when there are no true positives.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        tp = float(((p == 1) & (r == 1)).sum())
        fp = float(((p == 1) & (r == 0)).sum())
        fn = float(((p == 0) & (r == 1)).sum())
        return {"f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}
