"""L1's trace classifier (verifier.classify): its own sum over the forest's trees is the forest's answer."""

import numpy as np

from maxwell_poi.verifier.classify import FEATURES, WorkloadClassifier


def test_the_summed_trees_give_the_forests_own_probabilities() -> None:
    classifier = WorkloadClassifier.load()
    assert classifier is not None, "the shipped training table (maxwell_poi/data/workload_features.json)"
    rng = np.random.default_rng(0)
    rows = np.array([[float(r[f]) for f in FEATURES] for r in classifier.rows])
    # the training rows, and rows drawn around and beyond them
    x = np.vstack([rows, rows * rng.uniform(0.3, 3.0, rows.shape), rng.uniform(-5, 60, (200, len(FEATURES)))])
    x = np.clip(x, -50, 50)
    assert np.allclose(classifier.proba(x), classifier.model.predict_proba(x), atol=1e-12)
    label, p, extra = classifier.predict(dict(zip(FEATURES, rows[0], strict=True)))
    assert label in classifier.model.classes_ and 0 < p <= 1 and 0 <= extra["p_inference"] <= 1
