"""Arrival processes: when jobs (workflow instances) or agent sessions start.

Three kinds, chosen because they bracket what the paper's traces show: ``Poisson`` (smooth, CV 1),
``OnOff`` (bursts of a high rate separated by quiet periods, the Markov-modulated shape of bursty
services) and ``Replay`` (the real arrival times of a recorded trace, e.g. Azure code with its
inter-arrival CV of 13). All are seeded through the ``rng`` argument, so a run is reproducible.

Specs can also be written as strings for command lines and configs: ``"poisson:2.0"``,
``"onoff:8,0.5,30,60"`` (rate_on, rate_off, mean_on_s, mean_off_s), ``"replay:azure-code"`` or
``"replay:azure-code:2.0"`` (trace name, rate_scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from traces.schema import MAX_ROWS, WorkloadError


@dataclass(frozen=True)
class Poisson:
    """Exponential gaps at ``rate`` arrivals per second."""

    rate: float

    def times(self, rng: np.random.Generator, n: int | None = None, duration_s: float | None = None) -> np.ndarray:
        _check_horizon(n, duration_s)
        _check_positive("poisson rate", self.rate)
        _check_count(f"poisson:{self.rate:g}", n, self.rate, duration_s)
        if n is not None:
            return np.cumsum(rng.exponential(1.0 / self.rate, n))
        out: list[np.ndarray] = []
        t = 0.0
        while t < duration_s:  # draw in chunks of the expected count until past the horizon
            chunk = t + np.cumsum(rng.exponential(1.0 / self.rate, int(self.rate * duration_s) + 16))
            out.append(chunk)
            t = float(chunk[-1])
        times = np.concatenate(out)
        return times[times < duration_s]


@dataclass(frozen=True)
class OnOff:
    """Alternating on/off periods (exponential lengths, starting on), Poisson arrivals within each."""

    rate_on: float
    rate_off: float
    mean_on_s: float
    mean_off_s: float

    def times(self, rng: np.random.Generator, n: int | None = None, duration_s: float | None = None) -> np.ndarray:
        _check_horizon(n, duration_s)
        _check_positive("onoff rate_on", self.rate_on)
        _check_positive("onoff mean_on_s", self.mean_on_s)
        _check_positive("onoff mean_off_s", self.mean_off_s)
        if not (np.isfinite(self.rate_off) and self.rate_off >= 0):
            raise WorkloadError(f"onoff rate_off={self.rate_off} must be a finite number >= 0")
        _check_count(f"onoff at rate_on={self.rate_on:g}", n, max(self.rate_on, self.rate_off), duration_s)
        out: list[np.ndarray] = []
        count, t, on = 0, 0.0, True
        while (count < n) if n is not None else (t < duration_s):
            length = rng.exponential(self.mean_on_s if on else self.mean_off_s)
            rate = self.rate_on if on else self.rate_off
            k = rng.poisson(rate * length)
            out.append(t + np.sort(rng.uniform(0.0, length, k)))
            count, t, on = count + k, t + length, not on
        times = np.concatenate(out)
        return times[:n] if n is not None else times[times < duration_s]


@dataclass(frozen=True)
class Replay:
    """The arrival times of a recorded trace (its calls without parents), divided by ``rate_scale``.

    When more arrivals are needed than the trace holds, the trace is repeated end to end (the next copy
    starts one mean gap after the last arrival), so its burst pattern recurs rather than stopping. The
    trace's times (``recorded``) are attached by ``traces.loaders.resolve_arrivals``, which can read traces.
    """

    trace: str
    rate_scale: float = 1.0
    recorded: np.ndarray | None = field(default=None, compare=False, repr=False)  # from t=0

    def times(self, rng: np.random.Generator, n: int | None = None, duration_s: float | None = None) -> np.ndarray:
        _check_horizon(n, duration_s)
        _check_positive("replay rate_scale", self.rate_scale)
        if self.recorded is None:
            raise WorkloadError(f"replay:{self.trace}: the trace's arrival times are not loaded; resolve the "
                                f"process with traces.loaders.resolve_arrivals")
        base = self.recorded / self.rate_scale
        period = float(base[-1]) + float(base[-1] - base[0]) / max(len(base) - 1, 1)
        _check_count(f"replay:{self.trace}:{self.rate_scale:g}", n, len(base) / period if period > 0 else np.inf,
                     duration_s)
        reps = -(-n // len(base)) if n is not None else int(duration_s // period) + 1
        times = (base[None, :] + period * np.arange(reps)[:, None]).ravel()
        return times[:n] if n is not None else times[times < duration_s]


ArrivalProcess = Poisson | OnOff | Replay


def poisson(rate: float) -> Poisson:
    return Poisson(float(rate))


def onoff(rate_on: float, rate_off: float, mean_on_s: float, mean_off_s: float) -> OnOff:
    return OnOff(float(rate_on), float(rate_off), float(mean_on_s), float(mean_off_s))


def replay(trace: str, rate_scale: float = 1.0) -> Replay:
    return Replay(trace, float(rate_scale))


_KINDS = {"poisson": (poisson, 1, 1), "onoff": (onoff, 4, 4), "replay": (replay, 1, 2)}


def parse_arrivals(spec: ArrivalProcess | str | dict) -> ArrivalProcess:
    """An arrival process from an object, a ``"kind:args"`` string or a ``{"kind": ..., **params}`` dict."""
    if isinstance(spec, Poisson | OnOff | Replay):
        return spec
    if isinstance(spec, dict):
        params = dict(spec)
        kind = params.pop("kind", None)
        if kind not in _KINDS:
            raise WorkloadError(f"arrivals {spec}: 'kind' must be one of {sorted(_KINDS)}")
        try:
            return _KINDS[kind][0](**params)
        except TypeError as e:
            raise WorkloadError(f"arrivals {spec}: {e}") from None
    if not isinstance(spec, str):
        raise WorkloadError(f"arrivals {spec!r}: expected an arrival process, a 'kind:args' string or a dict")
    kind, _, rest = spec.partition(":")
    if kind not in _KINDS:
        raise WorkloadError(f"arrivals '{spec}': unknown kind '{kind}'; use one of {sorted(_KINDS)}, "
                            "e.g. 'poisson:2.0', 'onoff:8,0.5,30,60', 'replay:azure-code'")
    make, lo, hi = _KINDS[kind]
    args = [a for a in rest.replace(":", ",").split(",") if a] if rest else []
    if not lo <= len(args) <= hi:
        raise WorkloadError(f"arrivals '{spec}': {kind} takes {lo}-{hi} argument(s), got {len(args)}")
    try:
        if kind == "replay":
            return make(args[0], *map(float, args[1:]))
        return make(*map(float, args))
    except ValueError as e:
        raise WorkloadError(f"arrivals '{spec}': {e}") from None


def _check_horizon(n: int | None, duration_s: float | None) -> None:
    if (n is None) == (duration_s is None):
        raise WorkloadError(f"arrival times: give exactly one of n={n} or duration_s={duration_s}")


def _check_count(what: str, n: int | None, rate: float, duration_s: float | None) -> None:
    """Refuse more arrivals than a workload may have rows (``n``, or ``rate`` x ``duration_s`` expected)."""
    count = n if n is not None else rate * duration_s
    if count > MAX_ROWS:
        horizon = f"n={n}" if n is not None else f"{rate:g}/s x duration_s={duration_s:g} s"
        raise WorkloadError(f"arrivals {what}: {horizon} is about {count:.3g} arrivals; a workload may have at most "
                            f"{MAX_ROWS} rows (lower the rate or the duration)")


def _check_positive(what: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise WorkloadError(f"{what}={value} must be a finite number > 0")
