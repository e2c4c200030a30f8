"""Perplexity as a local `evaluate` module: works offline, unlike the Hub's `evaluate.load("perplexity")`.

    import evaluate
    from llama_hybrid.training.evaluation import PERPLEXITY_METRIC   # the path of this file
    metric = evaluate.load(PERPLEXITY_METRIC)
    metric.compute(predictions=[[2.1, 0.3, 1.7], [0.9]])   # per-token negative log-likelihoods (nats), one list per text

The Hub module runs a model inside `compute`; this one takes the model's per-token negative log-likelihoods, so it
works with any model, batching and device placement, and inside `Trainer.evaluate` (see
`llama_hybrid.training.evaluation.compute_perplexity_metrics`). It is self-contained: evaluate copies this file into
its module cache and imports it from there (one import per line: evaluate parses them).
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Perplexity = exp(total negative log-likelihood / number of tokens) over all scored tokens.
Also returns the per-text perplexities and their mean (the Hub module's `mean_perplexity`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list per text of per-token negative log-likelihoods in nats (e.g. cross-entropy of each
        predicted token). Negative values are treated as padding and skipped.
Returns:
    perplexity: exp of the token-weighted mean NLL over every text (corpus perplexity),
    mean_perplexity: the mean of the per-text perplexities,
    perplexities: one perplexity per text (NaN for a text with no scored token),
    num_tokens: number of scored tokens.
"""


def _perplexity(total_nll, count):
    if count == 0:
        return float("nan")
    return math.exp(total_nll / count)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions):
        total, count, per_text = 0.0, 0, []
        for nlls in predictions:
            scored = [value for value in nlls if value >= 0]
            per_text.append(_perplexity(sum(scored), len(scored)))
            total += sum(scored)
            count += len(scored)
        finite = [p for p in per_text if not math.isnan(p)]
        return {
            "perplexity": _perplexity(total, count),
            "mean_perplexity": sum(finite) / len(finite) if finite else float("nan"),
            "perplexities": per_text,
            "num_tokens": count,
        }
