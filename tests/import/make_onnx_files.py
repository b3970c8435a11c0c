#!/usr/bin/env python3
"""Writes ONNX exports (torch.onnx.export) with reference outputs, and VNNLIB properties
with known answers, for the ONNX / verify tests.

usage: make_onnx_files.py OUT_DIR

For each model NAME: NAME.onnx and NAME_reference.pt ({"inputs", "logits"}: 20 random
inputs and PyTorch's float32 outputs). Properties on mlp.onnx: holds.vnnlib (a tiny box
around an input whose predicted class wins by a margin: no other class can reach it) and
violated.vnnlib (a box around an input and the constraint that the outputs are what they
are there, up to 1e-3: the centre itself is a counterexample); unsupported.onnx uses an
operator without a bound rule (Sigmoid). moe.json assembles an MoE from moe_router.onnx,
moe_expert{0,1}.onnx and the state dict moe_expert2.pt, with moe_reference.pt ({"inputs",
"logits", "routes"}) from the PyTorch MoE.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_torch_files import ResNet18, randomise_bn  # noqa: E402

OUT = sys.argv[1]
torch.manual_seed(1)


class Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class CnnS(nn.Module):
    """moecert's cnn-s with the input normalisation inside (Sub, Div)."""

    def __init__(self):
        super().__init__()
        self.norm = Normalise([0.5], [0.25])
        self.conv1 = nn.Conv2d(1, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(self.norm(x)))))
        return self.fc2(F.relu(self.fc1(y.flatten(1))))


class Mlp(nn.Module):
    def __init__(self, n=20):
        super().__init__()
        self.fc1 = nn.Linear(n, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BnNet(nn.Module):
    """BatchNormalization, MaxPool, AveragePool, GlobalAveragePool, a residual Add, MatMul."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, 1, 1)
        self.w = nn.Parameter(torch.randn(8, 6) * 0.3)

    def forward(self, x):
        y = F.relu(self.conv1(self.bn0(x)))
        y = F.max_pool2d(y, 2)
        y = F.relu(y + self.conv3(F.relu(self.conv2(y))))
        y = F.avg_pool2d(y, 2)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return torch.matmul(y, self.w) - 0.5


class WithSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


def export(name, model, shape):
    model.eval()
    randomise_bn(model)
    x = torch.rand(20, *shape)
    with torch.no_grad():
        y = model(x)
    torch.onnx.export(model, x[:1], os.path.join(OUT, name + ".onnx"), input_names=["input"],
                      output_names=["output"], opset_version=13,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    torch.save({"inputs": x, "logits": y}, os.path.join(OUT, name + "_reference.pt"))
    return model


def vnnlib(path, lower, upper, clauses):
    """clauses: a disjunction of conjunctions of (coefficients over Y, rhs) meaning a.Y <= rhs."""
    with open(path, "w") as f:
        for i in range(len(lower)):
            f.write("(declare-const X_%d Real)\n" % i)
        for j in range(len(clauses[0][0][0])):
            f.write("(declare-const Y_%d Real)\n" % j)
        for i, (lo, hi) in enumerate(zip(lower, upper)):
            f.write("(assert (>= X_%d %.17g))\n(assert (<= X_%d %.17g))\n" % (i, lo, i, hi))
        f.write("(assert (or\n")
        for clause in clauses:
            f.write("  (and")
            for a, rhs in clause:
                terms = " ".join("(* %.17g Y_%d)" % (c, j) for j, c in enumerate(a) if c != 0)
                f.write(" (<= (+ %s) %.17g)" % (terms, rhs))
            f.write(")\n")
        f.write("))\n")


export("cnn_s", CnnS(), (1, 28, 28))
mlp = export("mlp", Mlp(), (20,))
export("bn_net", BnNet(), (3, 16, 16))
export("resnet18", ResNet18(), (3, 32, 32))
export("unsupported", WithSigmoid(), (4,))

x0 = torch.rand(20)
with torch.no_grad():
    y0 = mlp(x0.unsqueeze(0))[0]
pred = int(y0.argmax())
eps = 1e-4
lower = (x0 - eps).tolist()
upper = (x0 + eps).tolist()
# holds: no other class reaches the predicted one (counterexample: Y_pred - Y_k <= 0 for some k).
clauses = []
for k in range(5):
    if k != pred:
        a = [0.0] * 5
        a[pred], a[k] = 1.0, -1.0
        clauses.append([(a, 0.0)])
margin = float((y0[pred] - torch.cat([y0[:pred], y0[pred + 1:]]).max()))
assert margin > 0.01, "the random MLP's prediction is too close to a tie for the test"
vnnlib(os.path.join(OUT, "holds.vnnlib"), lower, upper, clauses)
# violated: Y_0 - Y_1 <= value at x0 + 1e-3 and Y_1 - Y_0 <= -(value) + 1e-3: x0 itself satisfies both.
d = float(y0[0] - y0[1])
vnnlib(os.path.join(OUT, "violated.vnnlib"), lower, upper,
       [[([1.0, -1.0, 0, 0, 0], d + 1e-3), ([-1.0, 1.0, 0, 0, 0], -d + 1e-3)]])

# An MoE of paper 1's kind assembled from components (tests/import/test_onnx.cpp): a linear
# router on the flattened normalised image (argmax), two ONNX experts and one expert as a
# state dict of moecert's cnn-s layout (conv1, conv2, fc1, fc2). The data loader normalises,
# so every component reads normalised images; the reference holds the selected expert's
# logits and the routes.
class Router(nn.Module):
    def __init__(self, n_in, experts):
        super().__init__()
        self.gate = nn.Linear(n_in, experts)

    def forward(self, x):
        return self.gate(x.flatten(1))


class CnnS3(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(y.flatten(1))))


import json  # noqa: E402

mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
router = Router(3 * 32 * 32, 3)
with torch.no_grad():
    router.gate.weight.mul_(20.0)  # routes that spread over the three experts
expert0 = BnNet()  # BatchNorm, pooling and a residual sum, 10 classes
expert0.w = nn.Parameter(torch.randn(8, 10) * 0.3)
randomise_bn(expert0)
experts = [expert0, CnnS3(), CnnS3()]
for m in [router] + experts:
    m.eval()
x = torch.rand(40, 3, 32, 32)
xn = (x - mean) / std
with torch.no_grad():
    routes = router(xn).argmax(1)
    logits = torch.stack([experts[int(r)](xn[i:i + 1])[0] for i, r in enumerate(routes)])
assert len(set(routes.tolist())) == 3, "the random router does not use all three experts"
for name, m in [("moe_router", router), ("moe_expert0", experts[0]), ("moe_expert1", experts[1])]:
    torch.onnx.export(m, xn[:1], os.path.join(OUT, name + ".onnx"), input_names=["input"],
                      output_names=["output"], opset_version=13,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
torch.save({"net": {"experts.2." + k: v for k, v in experts[2].state_dict().items()}},
           os.path.join(OUT, "moe_expert2.pt"))
torch.save({"inputs": x, "logits": logits, "routes": routes},
           os.path.join(OUT, "moe_reference.pt"))
with open(os.path.join(OUT, "moe.json"), "w") as f:
    json.dump({"router": {"onnx": "moe_router.onnx"},
               "experts": [{"onnx": "moe_expert0.onnx"}, {"onnx": "moe_expert1.onnx"},
                           {"torch": "moe_expert2.pt", "backbone": "cnn-s", "state_dict": "net",
                            "prefix": "experts.2."}],
               "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}, f)
