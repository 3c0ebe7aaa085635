"""Per-step LoRA scale schedules: what ScaleSchedule records and Sample applies at every step.

A schedule is a small JSON object, so it can live in a frozen recipe and in a cache key:
    {"kind": "ramp_hold", "start": 1.5, "end": 0.7, "ramp_steps": 20, "hold": 0.2}
It is defined for every step, whatever the total, so the editor can draw it without one.
Kinds: constant (start), linear and cosine (start → end over ramp_steps, then end), ramp_hold
(a linear ramp, then `hold`: diffusers' LoRA guide's `linspace(1.5, 0.7, 20)` then 0.2), keyframes
(`{"0": 1.0, "10": 0.4}`: each keyframe's scale holds until the next).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

KINDS = ("constant", "linear", "cosine", "keyframes", "ramp_hold")


def spec(kind: str, start: float, end: float, ramp_steps: int, hold: float, keyframes: str) -> str:
    """The canonical JSON of a schedule; raises ValueError naming the bad part."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    data: dict[str, Any] = {"kind": kind, "start": start, "end": end, "ramp_steps": ramp_steps, "hold": hold}
    if kind == "keyframes":
        data = {"kind": kind, "keyframes": parse_keyframes(keyframes)}
    return json.dumps(data, sort_keys=True)


def parse_keyframes(text: str) -> dict[str, float]:
    try:
        frames = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"keyframes are not JSON: {exc.msg}") from None
    if not isinstance(frames, dict) or not frames:
        raise ValueError('keyframes: expected an object of step → scale, such as {"0": 1.0, "10": 0.4}')
    out = {}
    for step, scale in frames.items():
        if not (isinstance(step, str) and step.isdigit()) or isinstance(scale, bool) or \
                not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"keyframes: {step!r}: {scale!r} is not a step number and a scale")
        out[str(int(step))] = float(scale)
    return out


@functools.lru_cache(maxsize=256)
def _load(spec_json: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(spec_json)
    return data


def scale_at(spec_json: str, step: int) -> float:
    s = _load(spec_json)
    kind = s["kind"]
    if kind == "keyframes":
        frames = sorted((int(k), v) for k, v in s["keyframes"].items())
        return next((v for k, v in reversed(frames) if k <= step), frames[0][1])
    start, end, ramp = s["start"], s["end"], s["ramp_steps"]
    if kind == "constant":
        return float(start)
    if step >= ramp:
        return float(s["hold"] if kind == "ramp_hold" else end)
    t = step / (ramp - 1) if ramp > 1 else 1.0
    if kind == "cosine":
        t = (1 - math.cos(math.pi * t)) / 2
    return float(start + (end - start) * t)


def preview(spec_json: str) -> list[float]:
    """Enough steps to see the whole shape: the ramp or the keyframes, then one step of what holds."""
    s = _load(spec_json)
    length = max(int(k) for k in s["keyframes"]) + 2 if s["kind"] == "keyframes" else max(s["ramp_steps"], 1) + 1
    return [round(scale_at(spec_json, step), 6) for step in range(length)]
