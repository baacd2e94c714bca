#!/usr/bin/env python3
"""Fixture for the authors' clustering analysis (`benchmark/pca_cluster.py` / `pca_collect.py`
in github.com/ekonwang/UAL4Alignment @ 3ed0ffc): for every pair of the 42 most frequent labels,
sklearn's `PCA(n_components=2)` fitted on that pair's points, then `silhouette_score` of the two
labels in that plane; and the mean over the pairs.

The features are synthetic (labelled clusters in 16 dimensions, 3 decimals, with label
frequencies from very common to rare, so that some pairs have fewer points than dimensions),
which is all the computation depends on.

    pip install numpy scikit-learn
    python scripts/make_clustering_fixture.py
"""
import json
import pathlib

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "paper" / "clustering.json"
DIM = 16
LABELS = 48  # more than 42, so the cut matters


def stat(labels):
    # The authors' insertion-ordered count, then a stable sort by count.
    count = {}
    for label in labels:
        count[label] = count.get(label, 0) + 1
    return sorted(count.items(), key=lambda x: x[1], reverse=True)


def main():
    rng = np.random.default_rng(42)
    ids = rng.choice(32000, LABELS, replace=False).tolist()
    weights = 1.0 / np.arange(1, LABELS + 1) ** 1.1
    labels = rng.choice(ids, 700, p=weights / weights.sum()).tolist()
    centres = {i: rng.normal(0, 1.0, DIM) for i in ids}
    features = np.round(np.stack([centres[l] + rng.normal(0, 0.8, DIM) for l in labels]), 3)
    top = stat(labels)[:42]
    pairs = []
    for i in range(len(top)):
        for j in range(i + 1, len(top)):
            pair = (top[i][0], top[j][0])
            chosen = [k for k, l in enumerate(labels) if l in pair]
            x = features[chosen]
            y = [labels[k] for k in chosen]
            plane = PCA(n_components=2).fit(x).transform(x)
            pairs.append(dict(a=int(pair[0]), b=int(pair[1]), n=len(chosen),
                              silhouette=float(silhouette_score(plane, y)) if len(chosen) >= 3 else None))
    scored = [p["silhouette"] for p in pairs if p["silhouette"] is not None]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(
        labels=[int(l) for l in labels],
        features=[[float(v) for v in row] for row in features],
        top=[dict(id=int(i), count=c) for i, c in top],
        pairs=pairs,
        mean=float(np.mean(scored)),
    )))
    print(f"{len(pairs)} pairs, smallest pair {min(p['n'] for p in pairs)} points, mean {np.mean(scored):.6f}")


if __name__ == "__main__":
    main()
