"""An alpha-beta cost model of the three state-exchange methods, fitted to measurements.

Each method's critical path is a number of message *hops* and a number of *bytes* that must pass
through the slowest link one after the other (``lsp.parallel.exchange`` derives them)::

    time = alpha * hops + bytes / beta

For ``P`` ranks, a state of ``s`` bytes, a transition of ``a`` bytes and ``n`` All-Scan blocks:

=========  ======================  ===================================================
method     hops                    bytes on the critical path
=========  ======================  ===================================================
ring       ``P - 1``               ``(P - 1) s``
allscan    ``P - 1 + n - 1``       ``(P - 1 + n - 1) s / n``
allgather  ``P - 1`` (ring algo)   ``(P - 1) (a + s)`` forward, ``(P - 1) s`` backward
=========  ======================  ===================================================

``alpha`` and ``beta`` are fitted per backend (gloo, NCCL) and per message pattern (``p2p`` for
ring and All-Scan, ``allgather`` for the collective) by non-negative least squares over the
measured points. The per-hop update ``A S + B`` is folded into ``alpha``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lsp.parallel.exchange import default_num_blocks

PATTERN = {"ring": "p2p", "allscan": "p2p", "allgather": "allgather"}
# Published by ZeCO (All-Scan vs All-Gather exchange time on H100s), for comparison.
ZECO_PUBLISHED = {8: {"allscan_ms": 0.226, "allgather_ms": 0.375},
                  256: {"allscan_ms": 2.165, "allgather_ms": 8.514}}
# State sizes per layer of lsp's model presets (heads, key dim, value dim), up to a 7B model.
PRESETS = {"125m": (12, 64, 64), "400m": (16, 64, 64), "1b": (16, 128, 128), "7b": (32, 128, 128)}
KIND_ELEMS = {"identity": lambda H, K: 0, "scalar": lambda H, K: H,
              "diagonal": lambda H, K: H * K, "full": lambda H, K: H * K * K}


@dataclass
class Link:
    """Latency ``alpha`` (seconds per hop) and bandwidth ``beta`` (bytes per second)."""

    alpha: float
    beta: float


def critical_path(method: str, P: int, state_bytes: float, trans_bytes: float = 0.0,
                  num_blocks: int = 1, direction: str = "forward") -> tuple[float, float]:
    """``(hops, bytes)`` on the critical path of one exchange (see the module docstring)."""
    if P <= 1:
        return 0.0, 0.0
    if method == "ring":
        return P - 1.0, (P - 1.0) * state_bytes
    if method == "allscan":
        hops = P - 1.0 + num_blocks - 1.0
        return hops, hops * state_bytes / num_blocks
    if method == "allgather":
        per = state_bytes + (trans_bytes if direction == "forward" else 0.0)
        return P - 1.0, (P - 1.0) * per
    raise ValueError(f"unknown method {method!r}")


def predict(link: Link, method: str, P: int, state_bytes: float, trans_bytes: float = 0.0,
            num_blocks: int | None = None, direction: str = "forward") -> float:
    """Predicted seconds for one exchange; All-Scan blocks default to the model's optimum."""
    if num_blocks is None:
        num_blocks = best_num_blocks(link, P, state_bytes) if method == "allscan" else 1
    hops, nbytes = critical_path(method, P, state_bytes, trans_bytes, num_blocks, direction)
    return link.alpha * hops + nbytes / link.beta


def best_num_blocks(link: Link, P: int, state_bytes: float, max_blocks: int = 64) -> int:
    """The block count that minimises the All-Scan time under ``link``."""
    return default_num_blocks(P, int(state_bytes), V=max_blocks, alpha=link.alpha,
                              beta=link.beta) if P > 2 else 1


def fit(points: list[dict]) -> Link:
    """Fit ``alpha``, ``beta`` to points with keys ``hops``, ``bytes``, ``seconds``.

    Non-negative least squares on ``seconds = alpha * hops + bytes * (1 / beta)``, weighted by
    ``1 / seconds`` so that small and large messages count alike (relative error).
    """
    X = np.array([[p["hops"], p["bytes"]] for p in points], dtype=np.float64)
    y = np.array([p["seconds"] for p in points], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-12)
    Xw, yw = X * w[:, None], y * w
    coef, *_ = np.linalg.lstsq(Xw, yw, rcond=None)
    if coef[0] < 0 or coef[1] <= 0:  # fall back to the best one-parameter fits
        cands = []
        if Xw[:, 1].any():
            inv_beta = max(float(Xw[:, 1] @ yw / (Xw[:, 1] @ Xw[:, 1])), 1e-30)
            cands.append((0.0, inv_beta))
        if Xw[:, 0].any():
            alpha = max(float(Xw[:, 0] @ yw / (Xw[:, 0] @ Xw[:, 0])), 0.0)
            cands.append((alpha, 1e-30))
        coef = min(cands, key=lambda c: float(np.sum((Xw @ np.array(c) - yw) ** 2)))
    return Link(alpha=float(max(coef[0], 0.0)), beta=float(1.0 / max(coef[1], 1e-30)))


def points_from_records(records: list[dict], backend: str, pattern: str) -> list[dict]:
    """Fit points from ``lsp-bench comm`` records of one backend and message pattern."""
    pts = []
    for r in records:
        if r["backend"] != backend or PATTERN[r["method"]] != pattern or r["P"] < 2:
            continue
        hops, nbytes = critical_path(r["method"], r["P"], r["state_bytes"], r["trans_bytes"],
                                     r["num_blocks"], r["direction"])
        pts.append({"hops": hops, "bytes": nbytes, "seconds": r["median_ms"] * 1e-3})
    return pts


def fit_records(records: list[dict]) -> dict:
    """``{backend: {pattern: Link}}`` for every backend/pattern with at least two points."""
    out: dict = {}
    for backend in sorted({r["backend"] for r in records}):
        for pattern in ("p2p", "allgather"):
            pts = points_from_records(records, backend, pattern)
            if len(pts) >= 2:
                out.setdefault(backend, {})[pattern] = fit(pts)
    return out


def prediction_table(links: dict, ranks=(2, 4, 8, 16, 32, 64, 128, 256), batch: int = 1,
                     elem_bytes: int = 4) -> list[dict]:
    """Predicted forward exchange time of each method for the presets, kinds and rank counts."""
    rows = []
    for backend, pat in links.items():
        if "p2p" not in pat or "allgather" not in pat:
            continue
        for preset, (H, K, V) in PRESETS.items():
            s = batch * H * K * V * elem_bytes
            for kind in ("scalar", "diagonal", "full"):
                a = batch * KIND_ELEMS[kind](H, K) * elem_bytes
                for P in ranks:
                    t = {m: predict(pat[PATTERN[m]], m, P, s, a) for m in ("allgather", "allscan", "ring")}
                    rows.append({"backend": backend, "preset": preset, "kind": kind, "P": P,
                                 "state_bytes": s, "trans_bytes": a,
                                 "allscan_blocks": best_num_blocks(pat["p2p"], P, s),
                                 **{f"{m}_ms": v * 1e3 for m, v in t.items()},
                                 "allscan_over_allgather": t["allscan"] / t["allgather"]})
    return rows


def zeco_comparison(links: dict, preset: str = "1b", kind: str = "diagonal") -> list[dict]:
    """Our predicted All-Scan / All-Gather ratios next to ZeCO's published ones."""
    rows = []
    H, K, V = PRESETS[preset]
    for backend, pat in links.items():
        if "p2p" not in pat or "allgather" not in pat:
            continue
        s, a = H * K * V * 4, KIND_ELEMS[kind](H, K) * 4
        for P, pub in ZECO_PUBLISHED.items():
            ours = predict(pat["p2p"], "allscan", P, s, a) / predict(pat["allgather"], "allgather", P, s, a)
            rows.append({"backend": backend, "preset": preset, "kind": kind, "P": P,
                         "predicted_ratio": ours,
                         "zeco_ratio": pub["allscan_ms"] / pub["allgather_ms"], **pub})
    return rows


def links_to_json(links: dict) -> dict:
    return {b: {p: asdict(link) for p, link in pats.items()} for b, pats in links.items()}


def crossover(link_p2p: Link, link_ag: Link, state_bytes: float, trans_bytes: float,
              max_P: int = 4096) -> int | None:
    """Smallest P from which All-Scan is predicted faster than All-Gather (None: never)."""
    for P in range(2, max_P + 1):
        if predict(link_p2p, "allscan", P, state_bytes, trans_bytes) < predict(
                link_ag, "allgather", P, state_bytes, trans_bytes):
            return P
    return None
