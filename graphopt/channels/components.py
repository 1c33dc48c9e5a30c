"""Connected components of an undirected graph given as edge arrays, in numpy alone.

The channel analysis needs the components of its element coupling graph (about 10^5 elements
and edges on resnet50/densenet121). scipy's ``csgraph.connected_components`` does this in a few
ms, but importing ``scipy.sparse`` costs about 0.3 s cold, as much as the whole analysis; this
module does it with vectorised min-label propagation instead:

    label(v) <- min(label(v), label(u)) for every edge (u, v), both ways,
    label(v) <- label(label(v))                            (pointer jumping, until stable),

repeated until no label changes. Each label is then the smallest element of its component, so
numbering the distinct labels in increasing order numbers the components in the order of their
smallest elements (the order scipy's labelling also gives for this graph's traversal).
"""

from __future__ import annotations

import numpy as np


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """Components of the graph on ``n`` vertices with edges ``a[i] -- b[i]``.

    Returns ``(count, labels)``: ``labels[v]`` in ``0..count-1``, components numbered in the
    order of their smallest vertex."""
    label = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if len(a):
        while True:
            la, lb = label[a], label[b]
            low = np.minimum(la, lb)
            changed = la != lb
            if not changed.any():
                break
            # hook the larger root under the smaller one, then jump pointers to the roots
            np.minimum.at(label, np.maximum(la, lb)[changed], low[changed])
            while True:
                up = label[label]
                if np.array_equal(up, label):
                    break
                label = up
    # every label is now its component's smallest vertex (a root: label[r] == r), so the
    # component number is the root's rank among the roots; no sort needed
    is_root = label == np.arange(n, dtype=np.int64)
    rank = np.cumsum(is_root) - 1
    return int(is_root.sum()), rank[label]


def unique(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a``, as ``np.unique(a)`` gives them.

    numpy 2's ``np.unique`` without ``return_*`` asks ``np.ma.is_masked``, and the first such
    call imports ``numpy.ma`` (tens of ms cold, more on a loaded machine); sorting does not."""
    s = np.sort(np.asarray(a).ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
