#!/usr/bin/env python3
"""Collects what a machine without Debian's packages needs to build moecert against
another LibTorch (e.g. a CUDA PyTorch install): the third-party headers that the
library and CLI sources actually include (found with g++ -M from build/compile_commands.json),
a static zlib, and Fashion-MNIST. Writes devdeps/ (git-ignored), for scripts/cuda_check.sh.

    scripts/build.sh && scripts/cuda_deps.py
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = os.path.join(root, "devdeps")
prefixes = ("eigen3/", "boost/", "nlohmann/", "CLI/", "gloo/", "zlib.h", "zconf.h")
headers = set()
for c in json.load(open(os.path.join(root, "build", "compile_commands.json"))):
    if "/tests/" in c["file"] or "/bench/" in c["file"] and "bench_certify" not in c["file"]:
        continue
    args, keep, skip = shlex.split(c["command"]), [], False
    if args[0].endswith("ccache"):
        args = args[1:]
    for a in args:
        if skip:
            skip = False
        elif a in ("-o", "-include"):
            skip = True
        elif a != "-c" and not a.startswith("-Winvalid-pch"):
            keep.append(a)
    r = subprocess.run(keep + ["-M", "-MF", "/dev/stdout", "-w"], capture_output=True, text=True,
                       cwd=c["directory"])
    if r.returncode:
        sys.exit("g++ -M failed for %s: %s" % (c["file"], r.stderr[:500]))
    for tok in r.stdout.replace("\\\n", " ").split():
        if tok.startswith("/usr/include/") and tok[len("/usr/include/"):].startswith(prefixes):
            headers.add(tok)
shutil.rmtree(out, ignore_errors=True)
for h in sorted(headers):
    dst = os.path.join(out, "include", h[len("/usr/include/"):])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(h, dst)
os.makedirs(os.path.join(out, "lib"))
shutil.copy("/usr/lib/x86_64-linux-gnu/libz.a", os.path.join(out, "lib"))
shutil.copytree("/usr/share/datasets/fashion-mnist", os.path.join(out, "data", "fashion-mnist"))
print("devdeps/: %d headers, libz.a, Fashion-MNIST" % len(headers))
