"""Derived straggler quantities (rank 0), from every rank's [layers, FIELDS] timings of one step.

Per layer l and phase p (fwd, bwd), with E_r the expert time of rank r:
    W_r        = max_j E_j - E_r           wait at the next all-to-all; needs no clock alignment, because
                                           the dispatch all-to-all before it is a synchronisation point
    straggler  = max_j E_j - mean_j E_j    the straggler rank is argmax_j E_j
Per step: S = sum over layers and phases, in ms and as a fraction of the step time.
Attribution: E ~ a + c*n is fitted per (layer, phase) over the run so far (least squares over every
(step, rank) point); the token-explained straggler time is c*(n_max - n_mean), clipped to [0, straggler];
the residual points to a slow device. balanced_step_ms = step time - token-explained straggler time.
Cross-check: the forward combine all-to-all duration skew A_r - min_j A_j mirrors W_r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_dist.moe.placement import load_ratio
from profiling.runtime.timer import FIELDS

PHASES = ("fwd", "bwd")
_E = {"fwd": FIELDS.index("E_fwd"), "bwd": FIELDS.index("E_bwd")}
_N, _ACOM, _ADIS = FIELDS.index("n"), FIELDS.index("A_com"), FIELDS.index("A_dis")


@dataclass
class LinearFit:
    """Running least squares of y = a + c*x."""

    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, xs: list[float], ys: list[float]) -> None:
        for x, y in zip(xs, ys, strict=True):
            self.n += 1
            self.sx += x
            self.sy += y
            self.sxx += x * x
            self.sxy += x * y

    def coef(self) -> tuple[float, float]:
        if self.n < 2:
            return (self.sy / max(self.n, 1), 0.0)
        var = self.n * self.sxx - self.sx * self.sx
        if var <= 1e-12 * max(1.0, self.sxx * self.n):
            return (self.sy / self.n, 0.0)  # every point had the same load: nothing to attribute
        c = (self.n * self.sxy - self.sx * self.sy) / var
        return ((self.sy - c * self.sx) / self.n, c)


def layer_phase(E: list[float], n: list[float], fit: LinearFit) -> dict:
    emax, emean = max(E), sum(E) / len(E)
    straggler = emax - emean
    _, c = fit.coef()
    explained = min(max(c * (max(n) - sum(n) / len(n)), 0.0), straggler)
    return {
        "E": E,
        "W": [emax - e for e in E],
        "straggler_ms": straggler,
        "rank": int(max(range(len(E)), key=E.__getitem__)),
        "explained_ms": explained,
        "ms_per_token": c,
    }


@dataclass
class StragglerAnalyzer:
    layers: list[int]
    world: int
    fits: dict[tuple[int, str], LinearFit] = field(default_factory=dict)

    def update(self, step: int, step_ms: float, data_RMX: torch.Tensor) -> dict:
        """One step's record; ``data_RMX`` is [ranks, MoE layers, FIELDS] from ``StragglerTimer.collect``."""
        rec: dict = {"step": step, "step_ms": step_ms, "layers": []}
        S = explained = 0.0
        worst = (-1.0, -1, -1)
        for li, layer in enumerate(self.layers):
            n = data_RMX[:, li, _N].tolist()
            a_com = data_RMX[:, li, _ACOM].tolist()
            entry: dict = {
                "layer": layer,
                "n": n,
                "A_dis": data_RMX[:, li, _ADIS].tolist(),
                "A_com": a_com,
                "A_com_skew": [a - min(a_com) for a in a_com],
            }
            for phase in PHASES:
                E = data_RMX[:, li, _E[phase]].tolist()
                fit = self.fits.setdefault((layer, phase), LinearFit())
                fit.add(n, E)
                lp = layer_phase(E, n, fit)
                entry[phase] = lp
                S += lp["straggler_ms"]
                explained += lp["explained_ms"]
                if lp["straggler_ms"] > worst[0]:
                    worst = (lp["straggler_ms"], layer, lp["rank"])
            rec["layers"].append(entry)
        rec.update(
            straggler_ms=S,
            straggler_frac=S / step_ms if step_ms > 0 else 0.0,
            token_explained_ms=explained,
            token_explained_frac=explained / S if S > 0 else 0.0,
            balanced_step_ms=step_ms - explained,
            worst_layer=worst[1],
            worst_rank=worst[2],
        )
        return rec


def scalars(rec: dict) -> dict[str, float]:
    """TensorBoard scalars of one step record."""
    out = {
        f"straggler/{k}": rec[k]
        for k in ("straggler_ms", "straggler_frac", "token_explained_frac", "balanced_step_ms", "step_ms")
    }
    for entry in rec["layers"]:
        ell = entry["layer"]
        for phase in PHASES:
            out[f"straggler/L{ell}/{phase}_ms"] = entry[phase]["straggler_ms"]
            out[f"straggler/L{ell}/{phase}_rank"] = entry[phase]["rank"]
        out[f"load/L{ell}/rank_max_over_mean"] = load_ratio(entry["n"])
    return out


def summary_line(recs: list[dict]) -> str:
    """'straggler 38% of step, 91% token-explained, worst layer 3, rank 2' over a log interval."""
    S = sum(r["straggler_ms"] for r in recs)
    T = sum(r["step_ms"] for r in recs)
    X = sum(r["token_explained_ms"] for r in recs)
    per: dict[tuple[int, int], float] = {}
    for r in recs:
        for e in r["layers"]:
            for phase in PHASES:
                key = (e["layer"], e[phase]["rank"])
                per[key] = per.get(key, 0.0) + e[phase]["straggler_ms"]
    layer, rank = max(per, key=per.__getitem__) if per else (-1, -1)
    return (
        f"straggler {100 * S / T if T else 0:.0f}% of step ({S / max(len(recs), 1):.1f} ms/step), "
        f"{100 * X / S if S else 0:.0f}% token-explained, worst layer {layer}, rank {rank}"
    )
