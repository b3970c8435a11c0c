#!/usr/bin/env python3
"""Writes the files the import tests read, as the papers' codes write them.

The architectures are written here from the layouts the papers' public codes use
(docs/import.md): paper 1's MOE_Resnet18 (experts.{i}.net.<CIFAR ResNet-18>,
router.gate on the flattened normalised image, the argmax expert's logits) and paper 2's
MoE-CNN ResNet-18 (block convs of N channel groups [W*N, in, 3, 3], BatchNorms of W
channels shared by the groups, a dense 64-channel stem, dense shortcuts and head, one
ResNet-20 router whose top-1 choice every MoE conv uses, saved again under every MoE
conv), and its Wide ResNet and VGG-16-BN MoE-CNNs (every MoE conv, including WRN's
convShortcut, as N groups; WRN's first block of each stage reading its raw input; VGG's
first conv dense, 2x2 adaptive pooling, a 256-256 classifier). Weights and BatchNorm
statistics are random; each model is saved with torch.save
in its paper's checkpoint dictionary, with a reference file {"inputs", "logits", "routes"}
of 100 random images. Malicious files are written next to them.

usage: make_torch_files.py OUT_DIR [paper1|paper2|evil|all]
"""
import collections
import io
import os
import sys
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = sys.argv[1] if __name__ == "__main__" else None
WHAT = sys.argv[2] if len(sys.argv) > 2 else "all"


def randomise_bn(model):
    """Random affine parameters and running statistics, so that no BatchNorm is the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)


# --- paper 1 ---------------------------------------------------------------------------
class Block(nn.Module):
    """The CIFAR ResNet's basic block; `conv(cin, cout, stride)` makes its 3x3 convolutions."""

    def __init__(self, cin, cout, stride, conv=None):
        super().__init__()
        conv = conv or (lambda i, o, s: nn.Conv2d(i, o, 3, s, 1, bias=False))
        self.conv1 = conv(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, (c, s) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            blocks = [Block(cin, c, s), Block(c, c, 1)]
            cin = c
            setattr(self, "layer%d" % (i + 1), nn.Sequential(*blocks))
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.layer4(self.layer3(self.layer2(self.layer1(y))))
        return self.linear(F.avg_pool2d(y, 4).flatten(1))


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ResNet18()


class Router1(nn.Module):
    def __init__(self, experts, size):
        super().__init__()
        self.gate = nn.Linear(3 * size * size, experts)


class MoeResnet18(nn.Module):
    def __init__(self, experts=4, size=32):
        super().__init__()
        self.experts = nn.ModuleList([Expert() for _ in range(experts)])
        self.router = Router1(experts, size)

    def forward(self, x):  # x normalised
        routes = self.router.gate(x.flatten(1)).argmax(1)  # the argmax expert, no weight
        out = torch.stack([self.experts[int(r)].net(x[i:i + 1])[0] for i, r in enumerate(routes)])
        return out, routes


PAPER1_MEAN = torch.tensor([125.307, 122.961, 113.8575]).view(1, 3, 1, 1) / 255
PAPER1_STD = torch.tensor([51.5865, 50.847, 51.255]).view(1, 3, 1, 1) / 255


def reference(model, name, normalise, x=None):
    x = torch.rand(100, 3, 32, 32) if x is None else x
    with torch.no_grad():
        logits, routes = model(normalise(x))
    assert len(set(routes.tolist())) >= 2, "the random router sends everything to one expert"
    torch.save({"inputs": x, "logits": logits, "routes": routes}, os.path.join(OUT, name + "_reference.pt"))


def paper1():
    norm = lambda x: (x - PAPER1_MEAN) / PAPER1_STD
    model = MoeResnet18().eval()
    randomise_bn(model)
    state = {"net": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
             "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}, "acc": 91.25, "epoch": 199}
    torch.save(state, os.path.join(OUT, "res18_moe-RT_ER-6.t7"))
    reference(model, "paper1", norm)
    # Two-expert members: DataParallel's module. prefix, and a dual-model (Smoe./Rmoe.).
    smoe, rmoe = MoeResnet18(experts=2).eval(), MoeResnet18(experts=2).eval()
    randomise_bn(smoe)
    randomise_bn(rmoe)
    dp = collections.OrderedDict(("module." + k, v) for k, v in smoe.state_dict().items())
    torch.save({"net": dp, "acc": 90.0, "epoch": 1}, os.path.join(OUT, "res18_moe_dp.t7"))
    reference(smoe, "paper1_smoe", norm)
    dual = collections.OrderedDict()
    for prefix, m in (("Smoe.", smoe), ("Rmoe.", rmoe)):
        for k, v in m.state_dict().items():
            dual[prefix + k] = v
    torch.save({"net": dual, "acc": 88.0, "epoch": 9}, os.path.join(OUT, "dual_model_res18-JTDMoE.t7"))
    reference(rmoe, "paper1_rmoe", norm)


# --- paper 2 ---------------------------------------------------------------------------
class RouterBlock(nn.Module):
    """ResNet-20 basic block with the option-A (parameter-free) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x
        if self.stride != 1 or self.pad:
            s = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + s)


class Router2(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (c, s) in enumerate([(16, 1), (32, 2), (64, 2)]):
            setattr(self, "layer%d" % (i + 1), nn.Sequential(RouterBlock(cin, c, s), RouterBlock(c, c, 1),
                                                              RouterBlock(c, c, 1)))
            cin = c
        self.fc = nn.Linear(64, experts)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.layer3(self.layer2(self.layer1(y)))
        return self.fc(F.avg_pool2d(y, y.size(3)).flatten(1))


class MoEConv(nn.Conv2d):
    """N channel groups of width W in one weight [W*N, in, k, k]; group e = rows [eW, (e+1)W)."""

    def __init__(self, cin, width, stride, experts, kernel=3, padding=1):
        super().__init__(cin, width * experts, kernel, stride, padding, bias=False)
        self.width = width
        self.choice = None

    def forward(self, x):
        out = F.conv2d(x, self.weight, None, self.stride, self.padding)
        idx = (self.choice.view(-1, 1) * self.width + torch.arange(self.width)).view(-1, self.width, 1, 1)
        return torch.gather(out, 1, idx.expand(-1, -1, out.size(2), out.size(3)))


class MoeCnnBase(nn.Module):
    """The router and its registration under every MoE conv (the code's set_router: the
    state dict holds it once more under each of them); forward sets every conv's choice."""

    def set_router(self, experts):
        self.router = Router2(experts)
        for m in list(self.modules()):
            if isinstance(m, MoEConv):
                m.router = self.router

    def choose(self, x):
        choice = self.router(x).argmax(1)
        for m in self.modules():
            if isinstance(m, MoEConv):
                m.choice = choice
        return choice


class MoeCnnResnet18(MoeCnnBase):
    def __init__(self, experts=2, ratio=0.5, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (c, s) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            w = int(ratio * c)
            moe = lambda a, b, st: MoEConv(a, b, st, experts)  # noqa: E731
            setattr(self, "layer%d" % (i + 1), nn.Sequential(Block(cin, w, s, moe), Block(w, w, 1, moe)))
            cin = w
        self.linear = nn.Linear(cin, classes)
        self.set_router(experts)

    def forward(self, x):
        choice = self.choose(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.layer4(self.layer3(self.layer2(self.layer1(y))))
        return self.linear(F.adaptive_avg_pool2d(y, 1).flatten(1)), choice


class WrnBlock(nn.Module):
    """Paper 2's WRN block: MoE conv1, conv2 and convShortcut; when the widths differ,
    conv1 and convShortcut read the raw input (the code never reassigns x)."""

    def __init__(self, cin, cout, stride, experts):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = MoEConv(cin, cout, stride, experts)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = MoEConv(cout, cout, 1, experts)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else MoEConv(cin, cout, stride, experts, 1, 0)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(out if self.equal else x)))
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(x)) + out


class WrnGroup(nn.Module):
    def __init__(self, n, cin, cout, stride, experts):
        super().__init__()
        self.layer = nn.Sequential(*[WrnBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, experts)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class MoeCnnWrn(MoeCnnBase):
    """wrn_28_10_cifar_moe's layout at depth 6n + 4, widen factor k, ratio r."""

    def __init__(self, depth=16, k=2, experts=2, ratio=0.5, classes=10):
        super().__init__()
        n = (depth - 4) // 6
        w = [int(16 * ratio), int(16 * k * ratio), int(32 * k * ratio), int(64 * k * ratio)]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = WrnGroup(n, w[0], w[1], 1, experts)
        self.block2 = WrnGroup(n, w[1], w[2], 2, experts)
        self.block3 = WrnGroup(n, w[2], w[3], 2, experts)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], classes)
        self.set_router(experts)

    def forward(self, x):
        choice = self.choose(x)
        y = self.block3(self.block2(self.block1(self.conv1(x))))
        y = F.adaptive_avg_pool2d(F.relu(self.bn1(y)), 1).flatten(1)
        return self.fc(y), choice


class MoeCnnVgg16(MoeCnnBase):
    """vgg16_bn_moe's layout: features.<i> (conv, BN, ReLU; 'M' pools; the first conv dense),
    AdaptiveAvgPool2d((2, 2)), classifier 4*int(512r) -> 256 -> 256 -> classes."""

    def __init__(self, experts=2, ratio=0.125, classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            v = int(v * ratio)
            conv = nn.Conv2d(cin, v, 3, padding=1, bias=False) if not layers else MoEConv(cin, v, 1, experts)
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(cin * 4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                        nn.Linear(256, classes))
        self.set_router(experts)

    def forward(self, x):
        choice = self.choose(x)
        return self.classifier(self.avgpool(self.features(x)).flatten(1)), choice


def save_paper2(model, name, arch, x):
    model.eval()
    randomise_bn(model)
    with torch.no_grad():  # a router bias that splits these images between groups 0 and 1
        g = model.router(x)
        model.router.fc.bias[1] -= (g[:, 1] - g[:, 0]).median() + 1e-4
    state = {"epoch": 100, "arch": arch, "state_dict": model.state_dict(),
             "router": model.router.state_dict(), "best_acc": 52.5, "sa_record": [10.0, 20.5]}
    torch.save(state, os.path.join(OUT, name + ".pth.tar"))


def paper2():
    model = MoeCnnResnet18().eval()
    x = torch.rand(100, 3, 32, 32)
    save_paper2(model, "checkpoint", "resnet18_moe", x)
    reference(model, "paper2", lambda x: x, x)  # paper 2's default: no normalisation
    for name, m in (("wrn", MoeCnnWrn()), ("vgg16", MoeCnnVgg16())):
        save_paper2(m, "paper2_" + name, name + "_moe", x)
        reference(m, "paper2_" + name, lambda x: x, x)


# --- malicious and broken files --------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch " + os.path.join(OUT, "PWNED"),))


class HugeShape:
    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_tensor_v2,
                (torch.zeros(4).storage(), 0, (10 ** 6, 10 ** 6), (10 ** 6, 1), False, collections.OrderedDict()))


def evil():
    torch.save({"net": collections.OrderedDict(w=torch.zeros(2)), "x": RunsCode()}, os.path.join(OUT, "evil.pt"))
    torch.save({"w": HugeShape()}, os.path.join(OUT, "huge_shape.pt"))
    good = io.BytesIO()
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good)
    data = good.getvalue()
    with open(os.path.join(OUT, "truncated.pt"), "wb") as f:
        f.write(data[: len(data) // 2])
    # The storage record rewritten shorter than its header says (the zip stays valid).
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(os.path.join(OUT, "short_storage.pt"), "w") as dst:
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename.endswith("/data/0"):
                payload = payload[:100]
            dst.writestr(item, payload)
    torch.save({"w": torch.zeros(3)}, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    torch.manual_seed(0)
    if WHAT in ("paper1", "all"):
        paper1()
    if WHAT in ("paper2", "all"):
        paper2()
    if WHAT in ("evil", "all"):
        evil()
