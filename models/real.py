"""The real, trained models in ../shared/models/real (never copied into the repository).

- ultraface: Ultra-Light-Fast face detector RFB-320 (opset 9). Inputs are the photos in
  images/, preprocessed as the model states: RGB resized to 320x240, (pixel - 127) / 128, NCHW
  (onnxcomp.calibration.ImagePreprocess). The sorted photos alternate between calibration
  (even positions) and evaluation (odd positions); each set also holds the mirror images of its
  own photos, so the two sets never share a source photo.
- mnist: MNIST classifier (opset 8, IR 3). Inputs: scikit-learn's 8x8 digits upscaled to the
  MNIST layout (digit resized to 20x20, centred in 28x28, white on black, 0..255); calibration
  from the digits train split, evaluation from the test split (the split of digits_cnn).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from models import zoo

ULTRAFACE_FILE = "ultraface-rfb-320.onnx"
MNIST_FILE = "mnist.onnx"


class RealEntry(zoo.Entry):
    filename = ""

    def available(self):
        folder = zoo.real_dir()
        if not (folder / self.filename).exists():
            return False, f"{folder / self.filename} is absent (the shared real models sit beside the repository)"
        return True, ""

    @property
    def path(self):
        self._require()
        return zoo.real_dir() / self.filename


# ---- ultraface ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _ultraface_feeds() -> tuple[list, list]:
    from onnxcomp.calibration import IMAGE_SUFFIXES, ImagePreprocess

    pre = ImagePreprocess(width=320, height=240, mean=(127.0,), std=(128.0,), input_name="input")
    files = sorted(p for p in (zoo.real_dir() / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    arrays = [pre.load(p) for p in files]
    calib, evals = arrays[0::2], arrays[1::2]

    def with_mirrors(xs):
        return [{"input": x} for x in xs] + [{"input": np.ascontiguousarray(x[..., ::-1])} for x in xs]

    return with_mirrors(calib), with_mirrors(evals)


class Ultraface(RealEntry):
    name = "ultraface"
    filename = ULTRAFACE_FILE
    description = "Ultra-Light-Fast face detector RFB-320 (real, opset 9), photos from images/"

    def available(self):
        ok, reason = super().available()
        if ok and not (zoo.real_dir() / "images").is_dir():
            return False, f"{zoo.real_dir() / 'images'} is absent"
        return ok, reason

    def _calibration(self):
        return _ultraface_feeds()[0]

    def _evaluation(self):
        return _ultraface_feeds()[1]

    def evaluate(self, model_or_path, n=None):
        """Output cosine per output (cos_scores, cos_boxes), face-probability cosine and
        max abs diff vs fp32, how many anchors pass face prob > 0.7 (ref and candidate), and faces:
        the boxes left by the model's own post-processing (prob > 0.7, NMS at IoU 0.3), `faces_found`
        counting fp32's faces that the candidate also finds (a box at IoU >= 0.5)."""
        ref = self.reference_outputs(n)
        cand = zoo.run_all(model_or_path, self.evaluation(n))
        result = zoo.output_agreement(ref, cand)
        names_ref, names_cand = list(ref[0]), list(cand[0])
        pick = lambda outs, names: [o[names[0] if "scores" not in names else "scores"][..., 1] for o in outs]  # noqa: E731
        p_ref, p_cand = pick(ref, names_ref), pick(cand, names_cand)
        result["face_prob_cos"] = float(np.mean([zoo.cosine(a, b) for a, b in zip(p_ref, p_cand)]))
        result["face_prob_max_abs"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p_ref, p_cand))
        result["anchors_ref"] = int(sum(int(np.sum(a > 0.7)) for a in p_ref))
        result["anchors"] = int(sum(int(np.sum(b > 0.7)) for b in p_cand))
        ref_faces = [face_boxes(o) for o in ref]
        cand_faces = [face_boxes(o) for o in cand]
        result["faces_ref"] = sum(len(f) for f in ref_faces)
        result["faces"] = sum(len(f) for f in cand_faces)
        result["faces_found"] = sum(int(np.sum(iou(a, b).max(axis=1, initial=0.0) >= 0.5)) if len(a) else 0
                                    for a, b in zip(ref_faces, cand_faces))
        return result


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [n, 4] with every box in b [m, 4] (corner form)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def face_boxes(outputs: dict, threshold: float = 0.7, overlap: float = 0.3) -> np.ndarray:
    """Ultraface's post-processing: boxes with face prob > threshold, greedy NMS at IoU `overlap`."""
    scores, boxes = outputs["scores"][0, :, 1], outputs["boxes"][0]
    order = np.flatnonzero(scores > threshold)
    order = order[np.argsort(-scores[order], kind="stable")]
    kept = []
    while len(order):
        kept.append(order[0])
        order = order[1:][iou(boxes[order[:1]], boxes[order[1:]])[0] <= overlap]
    return boxes[kept]


# ---- mnist ----------------------------------------------------------------------------------
def to_mnist(images_8x8: np.ndarray) -> np.ndarray:
    """[N,1,8,8] in 0..1 -> [N,1,28,28] float32 0..255: resized to 20x20 and centred, as MNIST."""
    from PIL import Image

    out = np.zeros((len(images_8x8), 1, 28, 28), np.float32)
    for i, img in enumerate(images_8x8):
        small = Image.fromarray((img[0] * 255.0).astype(np.float32), mode="F")
        out[i, 0, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR), np.float32)
    return np.clip(out, 0.0, 255.0)


@lru_cache(maxsize=1)
def _mnist_data():
    from models.digits import split

    x_tr, y_tr, x_te, y_te = split()
    return to_mnist(x_tr), y_tr, to_mnist(x_te), y_te


class Mnist(RealEntry):
    name = "mnist"
    filename = MNIST_FILE
    description = "MNIST classifier (real, opset 8), scikit-learn digits upscaled to 28x28"
    default_calibration = 256
    input_name = "Input3"

    def _calibration(self):
        x = _mnist_data()[0]
        return [{self.input_name: x[i:i + 1]} for i in range(len(x))]

    def _evaluation(self):
        x = _mnist_data()[2]
        return [{self.input_name: x[i:i + 1]} for i in range(len(x))]

    def evaluate(self, model_or_path, n=None):
        """{"top1_agree": agreement with fp32, "acc": accuracy on the upscaled digits test split,
        "cos_mean"/"cos_min": logit cosine vs fp32}."""
        feeds = self.evaluation(n)
        ref, cand = self.reference_outputs(n), zoo.run_all(model_or_path, feeds)
        pr = np.array([int(np.argmax(next(iter(o.values())))) for o in ref])
        pc = np.array([int(np.argmax(next(iter(o.values())))) for o in cand])
        labels = _mnist_data()[3][: len(feeds)]
        agreement = zoo.output_agreement(ref, cand)
        return {"top1_agree": float(np.mean(pr == pc)), "acc": float(np.mean(pc == labels)),
                "cos_mean": agreement["cos_mean"], "cos_min": agreement["cos_min"]}


zoo.register(Ultraface.name, Ultraface)
zoo.register(Mnist.name, Mnist)
