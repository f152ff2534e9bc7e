"""resnet18 and mobilenet_v2, written out here (random weights, fixed seed, eval mode).

torchvision's PyPI wheel does not import beside the CPU torch 2.13.0 this project pins
("operator torchvision::nms does not exist"), so the two standard architectures are
re-implemented below, layer for layer as in torchvision (BasicBlock ResNet-18; MobileNetV2
with inverted residuals and ReLU6), with torchvision's weight initialisation. The BatchNorm
running statistics are then set by a few forward passes in training mode on seeded
synthetic images, so every BatchNormalization is a non-trivial affine map (work for `fuse`)
and activations stay well scaled through the random network.

Exported at opset 17 with dynamic batch, height and width (global average pooling), so tests
can use small images: `zoo.get("resnet18", image_size=64)`. Inputs are seeded smooth random
images normalised with the ImageNet mean/std; calibration and evaluation use different seeds.
"""

from __future__ import annotations

import io

import numpy as np
import onnx

from models import zoo

SEED = 0
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def _modules():
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    def conv_bn(cin, cout, k, stride, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers = [] if expand == 1 else conv_bn(cin, hidden, 1, 1)
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden)
            layers += conv_bn(hidden, cout, 1, 1, act=False)
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
            layers, cin = conv_bn(3, 32, 3, 2), 32
            for t, c, n, s in settings:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers += conv_bn(cin, 1280, 1, 1)
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(x.flatten(1))

    return {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}


def images(count: int, size: int, seed: int) -> np.ndarray:
    """Seeded smooth random RGB images in 0..1 (low-frequency noise), ImageNet-normalised, NCHW."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 3, 8, 8), dtype=np.float32)
    fine = rng.random((count, 3, size, size), dtype=np.float32)
    idx = (np.arange(size) * 8) // size
    smooth = coarse[:, :, idx][:, :, :, idx]
    pixels = 0.8 * smooth + 0.2 * fine
    return ((pixels - MEAN) / STD).astype(np.float32)


def build(arch: str) -> onnx.ModelProto:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        net = _modules()[arch]()
        # trained networks have non-trivial BatchNorm scales and shifts: draw them (seeded)
        gen = torch.Generator().manual_seed(SEED)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data = 0.5 + torch.rand(m.num_features, generator=gen)
                m.bias.data = 0.1 * torch.randn(m.num_features, generator=gen)
        # set BatchNorm running statistics from data (cumulative average over 4 small batches)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        net.train()
        with torch.no_grad():
            for b in range(4):
                net(torch.from_numpy(images(4, 96, seed=1000 + b)))
        net.eval()
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(
                net, (torch.from_numpy(images(1, 224, seed=999)),), buf, dynamo=False, opset_version=17,
                training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization nodes for `fuse`
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            )
    finally:
        torch.set_num_threads(threads)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxcomp-zoo"
    proto.doc_string = f"{arch}: random weights (seed {SEED}), models/torch_archs.py"
    return proto


class ImageArch(zoo.Entry):
    version = "1"
    default_calibration = 16
    default_evaluation = 8

    def __init__(self, image_size: int = 224):
        super().__init__()
        self.image_size = int(image_size)

    @property
    def cache_path(self):
        return zoo.cache_dir() / f"{self.name}-v{self.version}.onnx"  # one file for every image size

    def _build(self) -> onnx.ModelProto:
        return build(self.name)

    def _calibration(self):
        x = images(self.default_calibration, self.image_size, seed=1)
        return [{"input": x[i:i + 1]} for i in range(len(x))]

    def _evaluation(self):
        x = images(self.default_evaluation, self.image_size, seed=2)
        return [{"input": x[i:i + 1]} for i in range(len(x))]

    def calibration(self, n=None):
        if n and n > self.default_calibration:
            x = images(n, self.image_size, seed=1)
            return [{"input": x[i:i + 1]} for i in range(n)]
        return super().calibration(n)

    def evaluate(self, model_or_path, n=None):
        """Output cosine vs fp32 (mean and min over samples), max abs diff, top-1 agreement."""
        ref = self.reference_outputs(n)
        cand = zoo.run_all(model_or_path, self.evaluation(n))
        result = zoo.output_agreement(ref, cand)
        result["top1_agree"] = float(np.mean([np.argmax(next(iter(r.values()))) == np.argmax(next(iter(c.values())))
                                              for r, c in zip(ref, cand)]))
        return result


class ResNet18Entry(ImageArch):
    name = "resnet18"
    description = "ResNet-18 (torchvision layout), random weights, BatchNorm stats from synthetic images"


class MobileNetV2Entry(ImageArch):
    name = "mobilenet_v2"
    description = "MobileNetV2 (torchvision layout), random weights, BatchNorm stats from synthetic images"


zoo.register("resnet18", ResNet18Entry)
zoo.register("mobilenet_v2", MobileNetV2Entry)


def resnet18():
    """A ResNet-18 module (seeded random weights, eval mode): a PKG.MODULE:FACTORY for `onnxcomp export torch`."""
    import torch

    torch.manual_seed(SEED)
    return _modules()["resnet18"]().eval()


def mobilenet_v2():
    """A MobileNetV2 module (seeded random weights, eval mode), like resnet18()."""
    import torch

    torch.manual_seed(SEED)
    return _modules()["mobilenet_v2"]().eval()
