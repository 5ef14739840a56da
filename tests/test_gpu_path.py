"""The CUDA path's logic, on the CPU: uint8 batches, padding, device decode with its fallbacks, choices.

The device JPEG decoder is pluggable: torchvision's batched `decode_jpeg` on device="cpu" stands in
for nvJPEG. Tests that need a GPU skip cleanly without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import jpeg, png, tiny_artifact

from worker.artifact import IMAGENET_MEAN, IMAGENET_STD, load_for_serving
from worker.device_batch import DeviceBatcher
from worker.frames import FrameError
from worker.gpu_decode import DeviceDecodePool, DeviceImage, TorchvisionJpegDecoder, resize_chw
from worker.preprocess import decode_image, to_batch
from worker.runtime import InferenceEngine, compile_model, resolve_decode_device
from worker.settings import Settings, SettingsError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)


def _images(n: int, size: int = 32) -> list[np.ndarray]:
    return [decode_image(jpeg(64, 48, seed=i), (size, size)) for i in range(n)]


def _bomb() -> bytes:
    """A JPEG whose header claims 60000 x 60000 pixels (over VQ_MAX_PIXELS), body irrelevant."""
    data = bytearray(jpeg(16, 16))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


class RefusingDecoder(TorchvisionJpegDecoder):
    """Refuses (like nvJPEG might) any batch holding an image of the given size in bytes."""

    def __init__(self, refuse_len: int) -> None:
        super().__init__("cpu")
        self.refuse_len = refuse_len
        self.calls: list[int] = []

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(len(data))
        if any(len(d) == self.refuse_len for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return super().decode(data)


class BrokenDecoder:
    device = "cpu"

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("no device decoder here")


# -- the uint8 path ------------------------------------------------------------------------------------
def test_uint8_batch_equals_the_float_path_exactly():
    images = _images(5)
    batcher = DeviceBatcher("cpu", (32, 32), MEAN, STD, capacity=8)
    for total in (5, 8):
        got = batcher.batch(images, total)
        want = to_batch(images, MEAN, STD, pad_to=total)
        assert got.shape == (total, 3, 32, 32) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want)


def test_device_images_are_placed_like_host_arrays():
    images = _images(4)
    mixed = [DeviceImage(torch.from_numpy(im).permute(2, 0, 1).contiguous()) if i % 2 else im
             for i, im in enumerate(images)]
    batcher = DeviceBatcher("cpu", (32, 32), MEAN, STD, capacity=8)
    assert torch.equal(batcher.batch(mixed, 8), to_batch(images, MEAN, STD, pad_to=8))
    assert np.array_equal(np.asarray(mixed[1]), images[1]) and mixed[1].shape == (32, 32, 3)


def test_padding_adds_zero_frames_and_returns_one_row_per_image(tmp_path):
    engine = InferenceEngine(load_for_serving(tiny_artifact(tmp_path / "m"), "cpu"), max_batch=8, decode_threads=1)
    images = _images(3)
    plain = engine.forward(images)
    engine.shape_specialized = True  # as for a compiled or PT2E graph: pad 3 -> 4
    assert engine._pad_target(3) == 4 and engine._pad_target(5) == 8
    padded = engine.forward(images)
    assert padded.shape == (3, 4)
    np.testing.assert_allclose(padded, plain, atol=1e-5)
    engine.close()


# -- device decode and its fallbacks ---------------------------------------------------------------------
def test_device_decode_batches_jpegs_and_falls_back_per_image():
    truncated = jpeg(64, 48, seed=3)[:200]
    frames = [jpeg(64, 48, seed=1), png(), truncated, _bomb(), jpeg(80, 60, seed=2), b"not an image"]
    with ThreadPoolExecutor(1) as cpu:
        pool = DeviceDecodePool(TorchvisionJpegDecoder("cpu"), (32, 32), cpu)
        futures = pool.submit(frames)
        results = []
        for fut in futures:
            try:
                results.append(fut.result(timeout=30))
            except FrameError as exc:
                results.append(exc)
        pool.close()
    assert isinstance(results[0], DeviceImage) and results[0].tensor.shape == (3, 32, 32)
    assert isinstance(results[1], np.ndarray) and results[1].shape == (32, 32, 3)  # PNG: the CPU pool
    assert isinstance(results[2], FrameError)  # refused by the device, then by OpenCV: fails alone
    assert isinstance(results[3], FrameError) and "VQ_MAX_PIXELS" in str(results[3])  # checked before decode
    assert isinstance(results[4], DeviceImage)  # the batch failed; this one was retried on its own
    assert isinstance(results[5], FrameError)
    assert pool.fallbacks == 1  # only the truncated JPEG went on to the CPU


def test_a_jpeg_the_device_refuses_is_decoded_by_opencv():
    odd = jpeg(64, 48, seed=9)
    decoder = RefusingDecoder(len(odd))
    with ThreadPoolExecutor(1) as cpu:
        pool = DeviceDecodePool(decoder, (32, 32), cpu)
        results = [f.result(timeout=30) for f in pool.submit([jpeg(64, 48, seed=1), odd, jpeg(64, 48, seed=2)])]
        pool.close()
    assert [type(r) for r in results] == [DeviceImage, np.ndarray, DeviceImage]
    assert decoder.calls == [3, 1, 1, 1]  # one batched call, then one call per image
    np.testing.assert_array_equal(results[1], decode_image(odd, (32, 32)))


def test_device_resize_is_close_to_opencv():
    data = jpeg(128, 96, seed=4)
    [gpu] = TorchvisionJpegDecoder("cpu").decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)])
    [small] = resize_chw([gpu], (32, 32))
    assert small.dtype == torch.uint8 and small.shape == (3, 32, 32)
    cpu = decode_image(data, (32, 32)).astype(np.float32)
    # random-noise frames are the worst case for two resamplers; camera frames differ far less
    assert np.abs(small.permute(1, 2, 0).numpy().astype(np.float32) - cpu).mean() < 40
    same = resize_chw([gpu[:, :32, :32].contiguous()], (32, 32))[0]
    assert torch.equal(same, gpu[:, :32, :32])  # already the right size: untouched


def test_engine_with_device_decode_serves_mixed_batches(tmp_path):
    serving = load_for_serving(tiny_artifact(tmp_path / "m"), "cpu")
    gpu = InferenceEngine(serving, max_batch=8, decode_threads=1, jpeg_decoder=TorchvisionJpegDecoder("cpu"))
    cpu = InferenceEngine(serving, max_batch=8, decode_threads=1)
    gpu.warm_up()
    assert gpu.decode_device == "cpu" and gpu._device_decode is not None  # the stand-in probe passed
    frames = [jpeg(32, 32, seed=1), png(32, 32), jpeg(32, 32, seed=2)[:100], jpeg(32, 32, seed=3)]
    decoded = gpu.decode(frames)
    assert isinstance(decoded[0], DeviceImage) and isinstance(decoded[1], np.ndarray)
    assert isinstance(decoded[2], FrameError)
    good = [d for d in decoded if not isinstance(d, FrameError)]
    probs = gpu.forward(good)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    want = cpu.forward([d for d in cpu.decode(frames) if not isinstance(d, FrameError)])
    np.testing.assert_allclose(probs, want, atol=0.05)  # same frames at 32 px: no resize, decoders agree closely
    gpu.close()
    cpu.close()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_cpu_pool_decodes_a_share_per_thread_and_a_bad_image_fails_alone(tmp_path, threads):
    engine = InferenceEngine(load_for_serving(tiny_artifact(tmp_path / "m"), "cpu"), max_batch=8,
                             decode_threads=threads)
    frames = [jpeg(48, 40, seed=i) for i in range(7)]
    frames[3], frames[4] = frames[3][:100], _bomb()  # truncated, and over VQ_MAX_PIXELS
    slots = engine.submit_decode(frames)
    assert len(slots) == 7 and len({id(s._chunk) for s in slots}) == threads
    for i, slot in enumerate(slots):
        if i in (3, 4):
            with pytest.raises(FrameError):
                slot.result(timeout=30)
        else:
            np.testing.assert_array_equal(slot.result(timeout=30), decode_image(frames[i], (32, 32)))
    assert engine.submit_decode([]) == []
    engine.close()


def test_an_unusable_device_decoder_is_switched_off_at_warm_up(tmp_path):
    engine = InferenceEngine(load_for_serving(tiny_artifact(tmp_path / "m"), "cpu"), max_batch=4,
                             decode_threads=1, jpeg_decoder=BrokenDecoder())
    engine.warm_up()
    assert engine.decode_device == "cpu" and engine._device_decode is None
    [image] = engine.decode([jpeg()])
    assert isinstance(image, np.ndarray)
    engine.close()


# -- choices -------------------------------------------------------------------------------------------
def test_decode_device_choice():
    assert resolve_decode_device("auto", "cpu") == "cpu"
    assert resolve_decode_device("auto", "cuda:1") == "cuda:1"
    assert resolve_decode_device("cpu", "cuda") == "cpu"
    assert resolve_decode_device("cuda", "cuda") == "cuda"
    with pytest.raises(RuntimeError, match="VQ_DECODE_DEVICE"):
        resolve_decode_device("cuda", "cpu")


def test_settings_rows():
    s = Settings.from_env({"VQ_DECODE_DEVICE": "cuda", "VQ_COMPILE": "reduce-overhead"})
    assert (s.decode_device, s.compile) == ("cuda", "reduce-overhead")
    assert (Settings.from_env({}).decode_device, Settings.from_env({}).compile) == ("auto", "off")
    with pytest.raises(SettingsError, match="VQ_COMPILE"):
        Settings.from_env({"VQ_COMPILE": "fast"})


def test_compile_is_off_by_default_and_never_for_int8(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "off") is model
    with pytest.raises(ValueError):
        compile_model(model, "fast")
    int8 = InferenceEngine(load_for_serving(tiny_artifact(tmp_path / "q", int8=True), "cpu"), max_batch=4,
                           decode_threads=1, compile_mode="reduce-overhead")
    assert int8.compile_mode == "off" and int8.model is int8.serving.model
    int8.close()


# -- the GPU-check's dry run ---------------------------------------------------------------------------------
def test_gpu_check_cpu_quick_dry_run(tmp_path, subprocess_env):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "deploy.gpu_check", "--device", "cpu", "--quick", "--out", str(out)],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    table = (out / "gpu-check.md").read_text()
    kinds = {row["measure"] for row in report["rows"]}
    assert {"model_only", "in_process", "full_path"} <= kinds
    assert any(str(row["value"]).startswith("n/a:") for row in report["rows"])  # e.g. GPU decode without a GPU
    assert any(isinstance(row["value"], float) and row["value"] > 0 for row in report["rows"]
               if row["measure"] == "full_path")
    assert "| model |" in table


# -- CUDA only -------------------------------------------------------------------------------------------
@cuda
def test_cuda_engine_with_nvjpeg_and_pinned_uint8(tmp_path):
    serving = load_for_serving(tiny_artifact(tmp_path / "m"), "cuda")
    engine = InferenceEngine(serving, device="cuda", max_batch=8, decode_threads=1, decode_device="cuda")
    engine.warm_up()
    frames = [jpeg(64, 48, seed=i) for i in range(5)] + [png()]
    decoded = engine.decode(frames)
    assert sum(isinstance(d, DeviceImage) for d in decoded) == 5
    assert engine.shape_specialized and engine._pad_target(6) == 8  # eager CUDA runs the warmed sizes only
    probs = engine.forward(decoded)
    assert probs.shape == (6, 4) and np.isfinite(probs).all()
    assert engine._batcher._host is not None and engine._batcher._host.is_pinned()
    engine.close()


@cuda
def test_cuda_graphs_at_padded_sizes(tmp_path):
    serving = load_for_serving(tiny_artifact(tmp_path / "m"), "cuda")
    engine = InferenceEngine(serving, device="cuda", max_batch=4, decode_threads=1, compile_mode="reduce-overhead")
    engine.warm_up()
    images = _images(3)
    np.testing.assert_allclose(engine.forward(images).sum(axis=1), 1.0, atol=1e-3)
    engine.close()


# -- the int8 backend by input size ------------------------------------------------------------------------
def test_int8_default_backend_depends_on_input_size():
    from worker.quant import DEFAULT_BACKEND, SMALL_INPUT_SIDE, default_backend, get_backend

    assert default_backend((16, 16)) == "pt2e-x86" and default_backend(SMALL_INPUT_SIDE) == "pt2e-x86"
    assert default_backend((32, 64)) == DEFAULT_BACKEND == "fx-x86"
    assert default_backend((224, 224)) == "fx-x86" and default_backend() == "fx-x86"
    assert get_backend(default_backend(16)).shape_specialized  # the runtime pads and warms up its batch sizes
