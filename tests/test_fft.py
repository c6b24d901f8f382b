"""FFTProcessor against numpy.fft in float64, with real pyfftw and real wisdom files.

Tolerances are float32-FFT tolerances relative to the largest |X| of the frame
(``eps`` below), propagated through each output: a bin of a float32 transform is
good to about eps, not to a fraction of its own (possibly tiny) value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import platformdirs
import pyfftw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import _fftkern
from broker.fft import FFTProcessor, WisdomStore, wisdom_key
from broker.sources import synthetic_frame

REL_TOL = 2e-6  # float32 FFT error relative to max |X|; observed <= 1.1e-7 up to 480x640
F32 = 1.2e-7  # float32 rounding of a stored result
OUTPUTS = ("spectrum", "magnitude", "radial", "peak")
BACKENDS = ("pyfftw", "scipy", "numpy")
DTYPES = ("uint8", "uint16", "float32")
LAYOUTS = ("gray2d", "bgr_gray", "channels")


# --- references ---------------------------------------------------------------------

def make_frame(hw: tuple[int, int], layout: str, dtype: str, frame_id: int) -> np.ndarray:
    """A read-only camera-like frame, as a worker receives it from the network."""
    shape = hw if layout == "gray2d" else (*hw, 3)
    frame = synthetic_frame(shape, dtype, frame_id)
    if frame.dtype.kind == "f":
        # The id stamp is raw bits in the first 16 bytes: as floats up to ~3e38, which
        # overflows any float32 FFT. Paint it over with the neighbouring pixels.
        flat = frame.reshape(-1)
        flat[:4] = flat[4:8]
    frame.flags.writeable = False
    return frame


def color_of(layout: str) -> str:
    return "channels" if layout == "channels" else "gray"


def ref_planes(frame: np.ndarray, color: str) -> np.ndarray:
    """(P, H, W) float64 planes the processor is meant to transform."""
    f = frame.astype(np.float64)
    if color == "channels":
        return f.transpose(2, 0, 1)
    if f.ndim == 3:
        return (0.114 * f[..., 0] + 0.587 * f[..., 1] + 0.299 * f[..., 2])[None]
    return f[None]


def signed_rows(rows: int) -> np.ndarray:
    return np.rint(np.fft.fftfreq(rows) * rows).astype(np.int64)


def twin_weights(width: int) -> np.ndarray:
    """2 for rfft columns that stand for a dropped mirrored column, else 1."""
    kx = np.arange(width // 2 + 1)
    return np.where((kx > 0) & (2 * kx < width), 2.0, 1.0)


def radius_bins(rows: int, width: int) -> np.ndarray:
    """floor(sqrt(ky^2 + kx^2)) on the rfft half-plane, exact in integers."""
    r2 = signed_rows(rows)[:, None] ** 2 + np.arange(width // 2 + 1)[None, :] ** 2
    return np.array([math.isqrt(int(v)) for v in r2.ravel()]).reshape(r2.shape)


def ref_radial(spec: np.ndarray, width: int) -> np.ndarray:
    """Twin-weighted mean |X|^2 per radius bin, from an rfft2 (P, H, Wh)."""
    rows = spec.shape[1]
    bins = radius_bins(rows, width).ravel()
    weights = np.broadcast_to(twin_weights(width), spec.shape[1:]).ravel()
    nbins = math.isqrt((rows // 2) ** 2 + (width // 2) ** 2) + 1
    counts = np.bincount(bins, weights=weights, minlength=nbins)
    return np.stack([np.bincount(bins, weights=weights * np.abs(p.ravel()) ** 2,
                                 minlength=nbins) / counts for p in spec])


def canonical_mask(rows: int, width: int) -> np.ndarray:
    """Half-plane bins a peak may be reported at: no DC, one of each conjugate pair."""
    mask = np.ones((rows, width // 2 + 1), dtype=bool)
    mask[0, 0] = False
    self_mirrored = [0] + ([width // 2] if width % 2 == 0 else [])
    mask[rows // 2 + 1:, self_mirrored] = False
    return mask


# --- the output matrix -----------------------------------------------------------------

def check_output(output: str, got: np.ndarray, frame: np.ndarray, color: str) -> None:
    """Assert ``got`` matches the float64 numpy reference for this output kind."""
    planes = ref_planes(frame, color)
    spec = np.fft.rfft2(planes)
    absx = np.abs(spec)
    eps = REL_TOL * absx.max()
    height, width = planes.shape[1:]
    squeeze = color == "gray"
    got3 = got[None] if squeeze else got
    if output == "spectrum":
        assert got.dtype == np.complex64 and got3.shape == spec.shape
        assert np.abs(got3 - spec).max() <= eps
    elif output == "magnitude":
        assert got.dtype == np.float32 and got3.shape == spec.shape
        # d log1p(m)/dm = 1/(1+m): an error of eps in |X| moves the log by eps/(1+m).
        tol = eps / (1.0 + absx) + 8 * F32 * np.log1p(absx)
        assert np.all(np.abs(got3 - np.log1p(absx)) <= tol)
    elif output == "radial":
        ref = ref_radial(spec, width)
        assert got.dtype == np.float32 and got3.shape == ref.shape
        # |X|^2 off by at most 2|X|eps + eps^2; the mean of 2|X| is <= 2 sqrt(mean |X|^2).
        tol = 2 * eps * np.sqrt(ref) + eps ** 2 + 4 * F32 * ref
        assert np.all(np.abs(got3 - ref) <= tol)
    else:
        assert got.dtype == np.float32 and got3.shape == (planes.shape[0], 3)
        mask = canonical_mask(height, width)
        for (ky, kx, mag), p_abs in zip(got3, absx):
            ref_max = p_abs[mask].max()
            assert abs(mag - ref_max) <= eps + 4 * F32 * ref_max
            assert ky == int(ky) and kx == int(kx)
            row = int(ky) % height
            assert mask[row, int(kx)], f"peak ({ky}, {kx}) is not a canonical bin"
            assert p_abs[row, int(kx)] >= ref_max - 2 * eps


@pytest.mark.parametrize("hw", [(31, 47), (64, 48)], ids=["31x47", "64x48"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_matches_numpy(output: str, backend: str, dtype: str, layout: str,
                       hw: tuple[int, int]) -> None:
    first = make_frame(hw, layout, dtype, 1)
    second = make_frame(hw, layout, dtype, 2)
    proc = FFTProcessor(first.shape, dtype, color=color_of(layout), output=output,
                        backend=backend)
    proc.process(first)
    # The second frame proves that no state (accumulators, buffers) leaks across calls.
    check_output(output, proc.process(second), second, color_of(layout))
    assert proc.last_compute_ns > 0


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 40), width=st.integers(2, 40), output=st.sampled_from(OUTPUTS),
       layout=st.sampled_from(LAYOUTS), frame_id=st.integers(0, 1000))
def test_matches_numpy_any_small_shape(rows: int, width: int, output: str, layout: str,
                                       frame_id: int) -> None:
    """Every odd/even size pair, including 2-wide frames that are all Nyquist."""
    frame = make_frame((rows, width), layout, "uint8", frame_id)
    proc = FFTProcessor(frame.shape, "uint8", color=color_of(layout), output=output)
    check_output(output, proc.process(frame), frame, color_of(layout))


@pytest.mark.parametrize("output, backend, dtype, layout", [
    ("peak", "pyfftw", "uint8", "channels"),
    ("radial", "scipy", "uint16", "gray2d"),
    ("magnitude", "numpy", "float32", "bgr_gray"),
    ("spectrum", "pyfftw", "uint8", "bgr_gray"),
    ("radial", "pyfftw", "uint16", "channels"),
])
def test_matches_numpy_vga(output: str, backend: str, dtype: str, layout: str) -> None:
    frame = make_frame((480, 640), layout, dtype, 7)
    proc = FFTProcessor(frame.shape, dtype, color=color_of(layout), output=output,
                        backend=backend)
    check_output(output, proc.process(frame), frame, color_of(layout))


@pytest.mark.parametrize("backend", ["pyfftw", "scipy"])
def test_two_threads_give_the_same_result(backend: str) -> None:
    frame = make_frame((64, 48), "gray2d", "uint8", 3)
    proc = FFTProcessor(frame.shape, "uint8", output="spectrum", backend=backend, threads=2)
    assert proc.plan_info["threads"] == 2
    check_output("spectrum", proc.process(frame), frame, "gray")


# --- conventions -------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(31, 47), (64, 48), (2, 2), (5, 2)])
def test_radial_reference_is_the_full_plane_mean(hw: tuple[int, int]) -> None:
    """The twin weighting makes the half-plane profile equal to the full-plane one."""
    rows, width = hw
    img = np.random.default_rng(5).random((1, rows, width))
    full = np.abs(np.fft.fft2(img)[0]) ** 2
    kx = np.rint(np.fft.fftfreq(width) * width).astype(np.int64)
    r2 = signed_rows(rows)[:, None] ** 2 + kx[None, :] ** 2
    bins = np.array([math.isqrt(int(v)) for v in r2.ravel()])
    expected = np.bincount(bins, weights=full.ravel()) / np.bincount(bins)
    np.testing.assert_allclose(ref_radial(np.fft.rfft2(img), width)[0], expected, rtol=1e-12)


@pytest.mark.parametrize("hw", [(2, 2), (2, 3), (3, 2), (5, 200), (200, 5), (31, 47),
                                (64, 48), (480, 640), (1080, 1920)])
def test_radial_bin_count(hw: tuple[int, int]) -> None:
    rows, width = hw
    expected = math.floor(math.sqrt((rows // 2) ** 2 + (width // 2) ** 2)) + 1
    assert _fftkern.radial_bins(rows, width) == expected
    counts = np.empty(expected)
    _fftkern.radial_counts(rows, width, counts)
    assert counts.min() > 0 and counts.sum() == rows * width  # the whole plane, once
    proc = FFTProcessor(hw, "uint8", output="radial", backend="scipy")
    assert proc.process(make_frame(hw, "gray2d", "uint8", 0)).shape == (expected,)


@pytest.mark.parametrize("ky, kx, expected_ky, gain", [
    (-5, 3, -5, 0.5),   # ordinary bin: only (-5, 3) lies in the half-plane
    (7, 0, 7, 0.5),     # column 0 holds (7, 0) and its twin (-7, 0): report ky >= 0
    (-7, 0, 7, 0.5),
    (32, 0, -32, 1.0),  # even-height Nyquist row is its own twin; fftfreq calls it -H/2
    (0, 24, 0, 1.0),    # even-width Nyquist column, kx = W/2
    (-9, 24, 9, 0.5),   # on the Nyquist column the twin of -9 is +9
])
def test_peak_conventions(ky: int, kx: int, expected_ky: int, gain: float) -> None:
    """A cosine of known frequency on a large DC offset: the peak names it, not DC."""
    rows, width, amp = 64, 48, 100.0
    y, x = np.mgrid[0:rows, 0:width]
    img = (1000.0 + amp * np.cos(2 * np.pi * (ky * y / rows + kx * x / width)))
    frame = img.astype(np.float32)
    frame.flags.writeable = False
    proc = FFTProcessor(frame.shape, "float32", output="peak")
    got_ky, got_kx, mag = proc.process(frame)
    assert (got_ky, got_kx) == (expected_ky, kx)
    assert mag == pytest.approx(gain * amp * rows * width, rel=1e-5)


def test_outputs_reuse_their_buffers() -> None:
    """Documented: results are internal buffers, valid until the next call."""
    frame = make_frame((64, 48), "gray2d", "uint8", 0)
    for output in OUTPUTS:
        proc = FFTProcessor(frame.shape, "uint8", output=output)
        assert np.shares_memory(proc.process(frame), proc.process(frame))


# --- validation -----------------------------------------------------------------------------

def test_shape_mismatch_raises() -> None:
    proc = FFTProcessor((64, 48), "uint8", output="peak")
    with pytest.raises(ValueError, match=r"planned for \(64, 48\) uint8"):
        proc.process(make_frame((48, 64), "gray2d", "uint8", 0))
    with pytest.raises(ValueError, match="planned for"):
        proc.process(make_frame((64, 48), "bgr_gray", "uint8", 0))
    with pytest.raises(ValueError, match="planned for"):
        proc.process(make_frame((64, 48), "gray2d", "uint16", 0))


def test_non_contiguous_frame_raises() -> None:
    proc = FFTProcessor((64, 48), "uint8", output="peak")
    with pytest.raises(ValueError, match="C-contiguous"):
        proc.process(make_frame((64, 96), "gray2d", "uint8", 0)[:, ::2])


@pytest.mark.parametrize("shape, dtype, kwargs, message", [
    ((64, 48), "uint8", {"output": "power"}, "output must be one of"),
    ((64, 48), "uint8", {"backend": "cufft"}, "backend must be one of"),
    ((64, 48), "uint8", {"planner": "exhaustive"}, "planner must be one of"),
    ((64, 48), "uint8", {"color": "rgb"}, "color must be one of"),
    ((64, 48), "int32", {}, "uint8, uint16 or float32"),
    ((64, 48, 4), "uint8", {"color": "gray"}, "needs 3 channels"),
    ((64, 48), "uint8", {"color": "channels"}, r"needs an \(H, W, C\) frame"),
    ((1, 48), "uint8", {}, "at least 2x2"),
    ((64, 48), "uint8", {"threads": 0}, "threads must be a positive integer"),
    ((64, 48), "uint8", {"backend": "numpy", "threads": 2}, "single-threaded"),
])
def test_bad_options_raise(shape, dtype, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        FFTProcessor(shape, dtype, **kwargs)


# --- wisdom -----------------------------------------------------------------------------------

WISDOM_SHAPE = (64, 48)


def measured_processor(store: WisdomStore) -> FFTProcessor:
    return FFTProcessor(WISDOM_SHAPE, "uint8", output="peak", planner="measure", wisdom=store)


def wisdom_file(store: WisdomStore) -> Path:
    return store.path_for(wisdom_key(WISDOM_SHAPE, "uint8", "gray", 1, "measure"))


def test_wisdom_round_trip(tmp_path: Path) -> None:
    store = WisdomStore(tmp_path / "wisdom")
    pyfftw.forget_wisdom()
    first = measured_processor(store)
    assert first.plan_info["wisdom_imported"] is False
    assert first.plan_info["wisdom_had_plan"] is False
    assert first.plan_info["wisdom_saved"] is True
    assert first.plan_info["wisdom_error"] is None
    assert wisdom_file(store).read_bytes().startswith(WisdomStore.MAGIC)
    assert [p.name for p in store.directory.iterdir()] == [wisdom_file(store).name]

    pyfftw.forget_wisdom()
    second = measured_processor(store)
    assert second.plan_info["wisdom_imported"] is True
    assert second.plan_info["wisdom_had_plan"] is True
    assert second.plan_info["wisdom_error"] is None
    frame = make_frame(WISDOM_SHAPE, "gray2d", "uint8", 4)
    check_output("peak", second.process(frame), frame, "gray")


def test_missing_wisdom_loads_nothing(tmp_path: Path) -> None:
    assert WisdomStore(tmp_path).load("no-such-key") is False


def test_default_wisdom_directory() -> None:
    expected = Path(platformdirs.user_cache_dir("framebroker")) / "wisdom"
    assert WisdomStore().directory == expected


def _garbage(good: bytes) -> bytes:
    return b"\x80\x04not wisdom at all" * 10


def _truncated(good: bytes) -> bytes:
    return good[:len(good) // 2]


def _bit_flipped(good: bytes) -> bytes:
    i = len(WisdomStore.MAGIC) + 20
    return good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:]


def _rejected_by_fftw(good: bytes) -> bytes:
    """A well-formed file (lengths and CRCs right) whose single-precision blob FFTW refuses."""
    double, _single, longdouble = pyfftw.export_wisdom()
    return WisdomStore._encode((double, b"(fftw-3.3.5 fftwf_wisdom #x0 garbage", longdouble))


@pytest.mark.parametrize("damage, reason", [
    (_garbage, "not a framebroker wisdom file"),
    (_truncated, "truncated"),
    (_bit_flipped, "checksum mismatch"),
    (_rejected_by_fftw, "FFTW rejected it"),
])
def test_damaged_wisdom_is_reported_and_planning_goes_on(tmp_path: Path, damage,
                                                          reason: str) -> None:
    store = WisdomStore(tmp_path)
    pyfftw.forget_wisdom()
    measured_processor(store)
    path = wisdom_file(store)
    path.write_bytes(damage(path.read_bytes()))

    pyfftw.forget_wisdom()
    proc = measured_processor(store)
    assert proc.plan_info["wisdom_imported"] is False
    assert proc.plan_info["wisdom_had_plan"] is False
    assert str(path) in proc.plan_info["wisdom_error"]
    assert reason in proc.plan_info["wisdom_error"]
    frame = make_frame(WISDOM_SHAPE, "gray2d", "uint8", 5)
    check_output("peak", proc.process(frame), frame, "gray")
    # The fresh plan's wisdom replaced the damaged file.
    assert proc.plan_info["wisdom_saved"] is True
    pyfftw.forget_wisdom()
    assert store.load(wisdom_key(WISDOM_SHAPE, "uint8", "gray", 1, "measure")) is True


def test_unwritable_wisdom_store_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    pyfftw.forget_wisdom()
    proc = measured_processor(WisdomStore(blocker / "wisdom"))
    assert proc.plan_info["wisdom_saved"] is False
    assert "cannot save wisdom" in proc.plan_info["wisdom_error"]
    frame = make_frame(WISDOM_SHAPE, "gray2d", "uint8", 6)
    check_output("peak", proc.process(frame), frame, "gray")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_bgr_to_gray_is_the_documented_weights_to_the_last_bit(dtype):
    """The SIMD path (16 pixels at a time) and the plain tail give exactly the float32
    numpy reference (0.114 B + 0.587 G) + 0.299 R, for widths with and without a tail."""
    rng = np.random.default_rng(7)
    top = {"uint8": 256, "uint16": 65536, "float32": 4096}[dtype]
    for width in (1, 2, 15, 16, 17, 31, 33, 48, 640, 645):
        frame = rng.integers(0, top, (5, width, 3)).astype(dtype)
        got = np.full((5, width), np.nan, np.float32)
        _fftkern.bgr_to_gray(frame, got)
        f = frame.astype(np.float32)
        ref = (np.float32(0.114) * f[..., 0] + np.float32(0.587) * f[..., 1]) \
            + np.float32(0.299) * f[..., 2]
        np.testing.assert_array_equal(got, ref, err_msg=f"width {width}")


def test_backend_auto_measures_once_and_keeps_the_choice_beside_the_wisdom(tmp_path):
    """auto picks one of the measured backends, writes its choice into the wisdom
    directory, and the next processor reuses it (no second measurement); a damaged
    choice file is measured again. The chosen backend's results are right."""
    store = WisdomStore(tmp_path)
    first = FFTProcessor((48, 64, 3), "uint8", output="peak", backend="auto",
                         planner="estimate", wisdom=store)
    auto = first.plan_info["auto"]
    assert first.backend in ("pyfftw", "scipy") and auto["backend"] == first.backend
    assert auto["cached"] is False and set(auto["fps"]) == {"pyfftw", "scipy"}
    [choice] = tmp_path.glob("*.backend.json")
    assert json.loads(choice.read_text())["backend"] == first.backend
    second = FFTProcessor((48, 64, 3), "uint8", output="peak", backend="auto",
                          planner="estimate", wisdom=store)
    assert second.plan_info["auto"]["cached"] is True and second.backend == first.backend
    frame = make_frame((48, 64), "bgr_gray", "uint8", 2)
    check_output("peak", second.process(frame), frame, "gray")
    choice.write_text('{"backend": "pickle"}')
    third = FFTProcessor((48, 64, 3), "uint8", output="peak", backend="auto",
                         planner="estimate", wisdom=store)
    assert third.plan_info["auto"]["cached"] is False
    assert json.loads(choice.read_text())["backend"] in ("pyfftw", "scipy")
