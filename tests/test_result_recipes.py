"""docs/protocol.md section 4 gives the RESULT computations as recipes; here they are
in plain numpy (nothing from the kernels) and must reproduce the FFT worker's outputs:
gray conversion, radial profile and peak bit for bit, the spectrum and log-magnitude to
the tolerances the document states."""
from __future__ import annotations

import math

import numpy as np
import pytest

from broker.fft import FFTProcessor

CASES = [((48, 64, 3), "uint8", "gray"), ((45, 63, 3), "uint16", "gray"),
         ((50, 40), "float32", "gray"), ((37, 29, 3), "float32", "channels"),
         ((32, 30, 3), "uint8", "channels"), ((2, 2), "uint8", "gray")]


def frame(shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(20261204)
    if dtype == "float32":
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, 4096 if dtype == "uint16" else 256, shape).astype(dtype)


def planes(fr: np.ndarray, color: str) -> np.ndarray:
    """Section 4: (P, H, W) float32; gray = (0.114 B + 0.587 G) + 0.299 R in float32."""
    f = fr.astype(np.float32)
    if fr.ndim == 2:
        return f[None]
    if color == "channels":
        return np.moveaxis(f, 2, 0)
    w = [np.float32(x) for x in (0.114, 0.587, 0.299)]
    return ((w[0] * f[..., 0] + w[1] * f[..., 1]) + w[2] * f[..., 2])[None]


def ky_of(height: int) -> np.ndarray:
    return np.array([i if i < (height + 1) // 2 else i - height for i in range(height)])


def power(x: np.ndarray) -> np.ndarray:
    return x.real * x.real + x.imag * x.imag  # float32, no fused multiply-add


def radial(x: np.ndarray, width: int) -> np.ndarray:
    h, half = x.shape
    bins = math.isqrt((h // 2) ** 2 + (width // 2) ** 2) + 1
    ky, kx = ky_of(h)[:, None], np.arange(half)[None, :]
    r = np.vectorize(math.isqrt)(ky * ky + kx * kx)
    twin = np.broadcast_to(np.where((kx > 0) & (2 * kx < width), 2.0, 1.0), r.shape)
    acc = np.bincount(r.ravel(), (twin * power(x).astype(np.float64)).ravel(), bins)
    return (acc / np.bincount(r.ravel(), twin.ravel(), bins)).astype(np.float32)


def peak(x: np.ndarray, width: int) -> np.ndarray:
    h = x.shape[0]
    p = power(x)
    allowed = np.ones(p.shape, bool)
    allowed[0, 0] = False  # DC
    allowed[h // 2 + 1:, 0] = False  # self-mirrored columns: rows 0..H//2 only
    if width % 2 == 0:
        allowed[h // 2 + 1:, width // 2] = False
    i, j = divmod(int(np.argmax(np.where(allowed, p, np.float32(-1)))), p.shape[1])
    return np.array([ky_of(h)[i], j, np.sqrt(p[i, j])], np.float32)


@pytest.mark.parametrize("shape,dtype,color", CASES)
def test_result_recipes_reproduce_the_worker(shape, dtype, color):
    fr = frame(shape, dtype)
    width = shape[1]
    out = {o: FFTProcessor(shape, dtype, color=color, output=o).process(fr).copy()
           for o in ("spectrum", "magnitude", "radial", "peak")}
    squeeze = color == "gray"
    if squeeze:  # the plane axis is absent for gray output
        out = {o: v[None] for o, v in out.items()}
    pl = planes(fr, color)
    # the worker's own transform of the recipe's planes is its transform of the frame
    for k, plane in enumerate(pl):
        again = FFTProcessor(plane.shape, "float32", output="spectrum").process(
            np.ascontiguousarray(plane))
        np.testing.assert_array_equal(again, out["spectrum"][k])
    ref = np.fft.rfft2(pl.astype(np.float64), axes=(-2, -1))
    assert np.abs(out["spectrum"] - ref).max() <= 1e-6 * np.abs(ref).max()
    spec = out["spectrum"]
    mag = np.log(np.float32(1) + np.sqrt(power(spec)))
    assert np.abs(out["magnitude"].view(np.int32).astype(np.int64)
                  - mag.view(np.int32)).max() <= 1  # within one float32 ulp
    for k in range(spec.shape[0]):
        np.testing.assert_array_equal(out["radial"][k], radial(spec[k], width))
        np.testing.assert_array_equal(out["peak"][k], peak(spec[k], width))
    assert out["radial"].shape[-1] == math.isqrt((shape[0] // 2) ** 2 + (width // 2) ** 2) + 1
